"""Block-by-block calibration passes: every block gets the inputs a full forward pass gives it, and the block-wise
structured refit and OBS reconstruction keep working on families whose blocks receive different arguments."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

import hf_prune
from hf_prune import PruningConfig, prune
from hf_prune.scoring.blockwise import BlockInputs
from hf_prune.sparsity.masks import sparsity_report

from .families import FAMILIES, make_inputs, make_model, output_tensor

# sliding-window families: seq 11 > their window of 6, so their blocks get different masks
NAMES = ["bert", "gpt2", "llama", "gemma2", "gemma3_text", "modernbert", "distilbert", "phi3"]


def _model(name: str):
    family = FAMILIES[name]
    return family, make_model(family, family.classes[0])


@pytest.mark.parametrize("name", [n for n in NAMES if n in FAMILIES])
def test_each_block_gets_the_inputs_of_a_full_pass(name):
    family, model = _model(name)
    layers = hf_prune.get_adapter(model).layers(model)
    batches = [make_inputs(family, batch=3, seq=11, padded=True, seed=s) for s in range(2)]
    with torch.no_grad():
        full = [model(**b, output_hidden_states=True).hidden_states for b in batches]
    inputs = BlockInputs(model, layers, batches)
    assert len(inputs) == 2
    for index in range(len(layers)):
        for b, hidden in enumerate(inputs.hidden):
            # hidden_states[i] is what block i receives (the last entry is after the final norm in some families)
            torch.testing.assert_close(hidden, full[b][index], rtol=1e-5, atol=1e-5)
        inputs.advance(inputs.run(index))


def test_sliding_window_blocks_are_replayed_with_their_own_mask():
    family, model = _model("gemma2")
    layers = hf_prune.get_adapter(model).layers(model)
    inputs = BlockInputs(model, layers, [make_inputs(family, batch=2, seq=11, padded=False)])
    masks = [calls[1]["attention_mask"] for calls in (next(inputs.calls(i)) for i in range(len(layers)))]
    kinds = model.config.layer_types
    assert kinds[0] != kinds[1] and not torch.equal(masks[0], masks[1])  # what a first-block-only replay got wrong
    assert kinds[0] == kinds[2] and masks[0] is masks[2]  # shared, not copied


@pytest.mark.parametrize("name", ["gemma2", "modernbert"])
def test_reconstruction_helps_on_families_with_per_block_arguments(name):
    family, model = _model(name)
    data = [make_inputs(family, batch=8, seq=11, padded=False, seed=s) for s in range(6)]
    held_out = make_inputs(family, batch=8, seq=11, padded=False, seed=123)
    with torch.no_grad():
        reference = output_tensor(model(**held_out))
    errors = {}
    for reconstruct in (False, True):
        pruned = copy.deepcopy(model)
        prune(pruned, PruningConfig(ffn=0.5, criterion="magnitude", reconstruct=reconstruct), calibration_data=data)
        with torch.no_grad():
            errors[("ffn", reconstruct)] = float((output_tensor(pruned(**held_out)) - reference).pow(2).mean())
        sparse = copy.deepcopy(model)
        config = PruningConfig(sparsity=0.6, sparsity_scope="row", criterion="magnitude", reconstruct=reconstruct)
        prune(sparse, config, calibration_data=data)
        assert sparsity_report(sparse)["overall"] == pytest.approx(0.6, abs=0.01)
        with torch.no_grad():
            errors[("sparse", reconstruct)] = float((output_tensor(sparse(**held_out)) - reference).pow(2).mean())
    assert errors[("ffn", True)] < errors[("ffn", False)]
    assert errors[("sparse", True)] < errors[("sparse", False)]


def test_blocks_replay_under_the_autocast_of_a_wrapped_forward():
    # accelerate's mixed precision wraps model.forward (not the blocks) in autocast; on a bf16 model under CUDA
    # autocast the embeddings' LayerNorm runs in fp32 and hands the first block fp32 activations, which the blocks
    # only accept under that autocast (CPU autocast keeps norms in bf16, so fp32 embeddings stand in for that)
    family = FAMILIES["llama"]
    model = make_model(family, tf.LlamaForCausalLM).to(torch.bfloat16)
    model.model.embed_tokens.float()
    forward = model.forward

    def autocast_forward(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    model.forward = autocast_forward
    batches = [make_inputs(family, batch=4, seq=11, padded=True, seed=s) for s in range(2)]
    plan = hf_prune.PruningPlan(heads={0: [0, 1]}, ffn={1: list(range(0, 40, 2))})
    sliced = copy.deepcopy(model)
    plan.apply(sliced)  # no calibration: the kept columns as they were
    plan.apply(model, batches)
    assert [s.ffn for s in hf_prune.get_adapter(model).layer_shapes(model)] == [40, 20, 40]
    assert all(p.dtype == torch.bfloat16 for p in model.model.layers.parameters())
    # the refit ran (under the recorded autocast) and moved what is left of both shrunk projections
    for refitted, plain in (
        (model.model.layers[0].self_attn.o_proj, sliced.model.layers[0].self_attn.o_proj),
        (model.model.layers[1].mlp.down_proj, sliced.model.layers[1].mlp.down_proj),
    ):
        assert refitted.weight.shape == plain.weight.shape and not torch.equal(refitted.weight, plain.weight)
    with torch.no_grad():
        assert torch.isfinite(model(**batches[0]).logits.float()).all()
