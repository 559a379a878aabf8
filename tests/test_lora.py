"""LoRA recovery (peft) that keeps what was pruned: masks through training and merging, adapters cut with the
structure, saving either way, resume."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from peft import LoraConfig, PeftModel
from peft import get_peft_model as stock_get_peft_model

import hf_prune
from hf_prune import LoraArguments, PruningConfig, PruningTrainer
from hf_prune.compat import KEEP_MASK_ATTR
from hf_prune.sparsity.masks import prunable_linears
from hf_prune.testing import zero_heads_and_neurons
from hf_prune.training.lora import base_model, lora_layers

from .families import FAMILIES, make_inputs, make_model, output_tensor
from .test_trainer import args, toy_data

# a causal LM (GQA, nn.Linear), GPT-2 (Conv1D: peft's fan_in_fan_out) and an encoder classifier (peft's SEQ_CLS head)
CASES = {"llama": "ForCausalLM", "gpt2": "LMHeadModel", "bert": "ForSequenceClassification"}


def _model(name: str) -> torch.nn.Module:
    family = FAMILIES[name]
    return make_model(family, next(c for c in family.classes if c.__name__.endswith(CASES[name]))).train()


def _data(name: str, n: int = 32):
    data = toy_data(n)
    return data if name == "bert" else data.map(lambda e: {"labels": e["input_ids"]})


def _logits(model, name: str) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model.eval()(**make_inputs(FAMILIES[name])))


def _randomise_adapters(peft_model, seed: int = 0) -> None:
    """lora_B starts at zero (delta 0); give it values so every check below sees a real delta."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(peft_model).values():
            for b in layer.lora_B.values():
                b.weight.copy_(torch.randn(b.weight.shape, generator=g) * 0.05)


@pytest.mark.parametrize("name", list(CASES))
def test_sparsity_holds_through_lora_training_and_the_merge(tmp_path, name):
    model = _model(name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = hf_prune.get_peft_model(model, LoraArguments(r=4, alpha=8))
    config = PruningConfig(sparsity=0.5, sparsity_scope="row", schedule="oneshot")
    trainer = PruningTrainer(
        model=peft_model, args=args(tmp_path, max_steps=3), train_dataset=_data(name), pruning_config=config
    )
    trainer.train()
    masks = trainer.pruning_callback.masks
    assert masks and set(masks) <= set(lora_layers(peft_model))
    # the control: the adapters' own deltas are dense, so a plain merge would refill the pruned weights
    layer = lora_layers(peft_model)[next(iter(masks))]
    assert bool((layer.get_delta_weight("default")[~masks[next(iter(masks))]] != 0).any())
    trained = _logits(peft_model, name)

    merged = hf_prune.merge_and_unload(peft_model)
    assert not [n for n, _ in merged.named_parameters() if "lora_" in n]
    assert not any(hasattr(m, "lora_A") for m in merged.modules())
    for module_name, keep in masks.items():
        weight = merged.get_submodule(module_name).weight
        assert bool((weight[~keep] == 0).all()), module_name  # every pruned weight exactly zero
        assert bool((weight[keep] != before[f"{module_name}.weight"][keep]).any()), module_name  # kept ones moved
    # what was trained (masked deltas) is what was merged
    torch.testing.assert_close(_logits(merged, name), trained, atol=1e-5, rtol=1e-5)


def test_stock_peft_merge_of_a_model_wrapped_by_hf_prune_keeps_the_zeros_too():
    model = _model("llama")
    hf_prune.prune(model, PruningConfig(sparsity=0.6, sparsity_scope="layer"))
    zeros = {n: m.weight == 0 for n, m in prunable_linears(model).items()}
    peft_model = hf_prune.get_peft_model(model, {"r": 4})
    _randomise_adapters(peft_model)
    expected = _logits(peft_model, "llama")
    merged = peft_model.merge_and_unload()  # peft's own merge
    for module_name, zero in zeros.items():
        assert bool((merged.get_submodule(module_name).weight[zero] == 0).all())
    torch.testing.assert_close(_logits(merged, "llama"), expected, atol=1e-5, rtol=1e-5)


def test_merging_an_adapter_trained_without_masks_still_keeps_the_zeros(caplog):
    model = _model("gpt2")
    hf_prune.prune(model, PruningConfig(sparsity=0.5))
    zeros = {n: m.weight == 0 for n, m in prunable_linears(model).items()}
    peft_model = stock_get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    _randomise_adapters(peft_model)
    merged = hf_prune.merge_and_unload(peft_model)
    for module_name, zero in zeros.items():
        assert bool((merged.get_submodule(module_name).weight[zero] == 0).all())
    assert "delta is not masked in this model" in caplog.text


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_cutting_heads_and_neurons_cuts_their_adapters_exactly(name):
    """Reference: the adapters merged into an uncut copy, whose removed heads/neurons are then zeroed."""
    model = _model(name)
    peft_model = hf_prune.get_peft_model(model, {"r": 4, "alpha": 8})
    _randomise_adapters(peft_model)
    heads, neurons = {0: [1, 3], 2: [0, 1]}, {1: list(range(0, 40, 3))}
    reference = copy.deepcopy(peft_model).merge_and_unload()
    zero_heads_and_neurons(reference, heads, neurons)

    base = base_model(peft_model)
    hf_prune.prune_heads(base, heads)
    hf_prune.prune_ffn(base, neurons)
    layers = lora_layers(peft_model)
    for layer in layers.values():  # every adapter matches the projection it wraps
        out_f, in_f = layer.base_layer.weight.shape[:: -1 if name == "gpt2" else 1]
        assert layer.lora_B["default"].weight.shape[0] == out_f and layer.lora_A["default"].weight.shape[1] == in_f
    torch.testing.assert_close(_logits(peft_model, name), _logits(reference, name), atol=1e-5, rtol=1e-4)
    merged = hf_prune.merge_and_unload(peft_model)
    torch.testing.assert_close(_logits(merged, name), _logits(reference, name), atol=1e-5, rtol=1e-4)


def test_iterative_structure_under_lora_slices_adapters_and_their_adam_moments(tmp_path):
    model = _model("llama")
    peft_model = hf_prune.get_peft_model(model, {"r": 4})
    config = PruningConfig(heads=0.5, ffn=0.5, schedule="oneshot", start_step=2)
    trainer = PruningTrainer(
        model=peft_model, args=args(tmp_path, max_steps=4), train_dataset=_data("llama"), pruning_config=config
    )
    seen = {}

    def snapshot():
        layer = lora_layers(peft_model)["model.layers.0.self_attn.q_proj"]
        b = layer.lora_B["default"].weight
        opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        return b.detach().clone(), {k: v.clone() for k, v in opt.state[b].items()}

    class Probe(tf.TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step == 1:  # the 2nd optimizer step, before the event at step 2
                seen["before"] = snapshot()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:  # runs after the PruningCallback's event at this step
                seen["after"] = snapshot()

    trainer.add_callback(Probe())
    trainer.train()
    kept = model.config.hf_prune["kept_heads"][0]
    head_dim = model.config.head_dim
    rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in kept])
    (b1, m1), (b2, m2) = seen["before"], seen["after"]
    assert b2.shape[0] == len(kept) * head_dim < b1.shape[0]
    assert torch.equal(b2, b1[rows])  # the kept heads' adapter rows, unchanged
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(m2[key], m1[key][rows])  # and their Adam moments
    assert int(m2["step"]) == int(m1["step"]) == 2
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)
    merged = hf_prune.merge_and_unload(peft_model)
    assert merged.model.layers[0].self_attn.q_proj.weight.shape[0] == rows.numel()


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_adapter_saved_next_to_the_pruned_base_reloads_with_peft(tmp_path, name):
    model = _model(name)
    hf_prune.prune_heads(model, {0: [0, 2], 1: [2, 3]})
    hf_prune.prune_ffn(model, {2: list(range(30))})
    hf_prune.prune(model, PruningConfig(sparsity=0.5))
    peft_model = hf_prune.get_peft_model(model, {"r": 4})
    _randomise_adapters(peft_model)
    expected = _logits(peft_model, name)
    folder = hf_prune.save_pretrained(peft_model, tmp_path / "saved")
    assert (folder / "adapter" / "adapter_config.json").exists() and (folder / "config.json").exists()

    cls = type(base_model(peft_model))
    auto = tf.AutoModelForCausalLM if name == "llama" else tf.AutoModelForSequenceClassification
    stock = auto.from_pretrained(folder, trust_remote_code=True)  # the base alone, with stock weight names
    assert not any("lora_" in n or "base_layer" in n for n, _ in stock.named_parameters())
    reloaded = PeftModel.from_pretrained(hf_prune.from_pretrained(folder, cls), folder / "adapter")
    # stock peft adds the whole delta; the masks come back from the base's zeros
    assert not torch.allclose(_logits(reloaded, name), expected, atol=1e-4)
    assert hf_prune.keep_masks(reloaded) == len(prunable_linears(base_model(reloaded)))  # the masked ones
    torch.testing.assert_close(_logits(reloaded, name), expected, atol=1e-6, rtol=1e-5)
    again = PeftModel.from_pretrained(hf_prune.from_pretrained(folder, cls), folder / "adapter")
    merged = hf_prune.merge_and_unload(again)  # merging the reloaded adapter keeps the zeros too
    torch.testing.assert_close(_logits(merged, name), expected, atol=1e-5, rtol=1e-5)


def test_merged_non_uniform_model_reloads_with_stock_from_pretrained(tmp_path):
    model = _model("bert")
    peft_model = hf_prune.get_peft_model(model, {"r": 4})
    config = PruningConfig(target_flops=0.5, criterion="magnitude", scope="global", schedule="oneshot")
    trainer = PruningTrainer(
        model=peft_model, args=args(tmp_path, max_steps=4), train_dataset=_data("bert"), pruning_config=config
    )
    trainer.train()
    merged = hf_prune.merge_and_unload(peft_model)
    shapes = [layer["heads"] for layer in merged.config.hf_prune["layers"]]
    expected = _logits(merged, "bert")
    hf_prune.save_pretrained(merged, tmp_path / "merged")
    reloaded = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", trust_remote_code=True)
    assert [layer["heads"] for layer in reloaded.config.hf_prune["layers"]] == shapes
    torch.testing.assert_close(_logits(reloaded, "bert"), expected, atol=1e-5, rtol=1e-5)


def test_resuming_a_lora_run_with_structural_events_matches_the_uninterrupted_run(tmp_path):
    def run(out, resume=None):
        peft_model = hf_prune.get_peft_model(_model("llama"), {"r": 4})
        config = PruningConfig(heads=0.5, ffn=0.5, sparsity=0.3, schedule="oneshot", start_step=2)
        trainer = PruningTrainer(
            model=peft_model,
            args=args(out, max_steps=6, save_strategy="steps", save_steps=3, optim="adamw_torch"),
            train_dataset=_data("llama"),
            pruning_config=config,
        )
        trainer.train(resume_from_checkpoint=resume)
        return peft_model

    full = run(tmp_path / "a")
    checkpoint = tmp_path / "a" / "out" / "checkpoint-3"
    assert (checkpoint / "hf_prune_base" / "config.json").exists()
    resumed = run(tmp_path / "b", resume=str(checkpoint))
    for (n1, p1), (n2, p2) in zip(full.named_parameters(), resumed.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_bad_lora_input_fails_early(tmp_path):
    for bad, match in (
        ({"r": 0}, r"r=0 .*integer >= 1"),
        ({"alpha": -1}, r"alpha=-1 .*> 0"),
        ({"dropout": 1.0}, r"dropout=1.0 .*\[0, 1\)"),
        ({"target_modules": []}, r"target_modules=\[\] .*all-linear"),
        ({"extra": {"use_dora": True}}, r"use_dora"),
        ({"extra": {"lora_alpha": 4, "bias": "none", "rank": 2}}, r"\['lora_alpha', 'rank'\] are not further peft"),
    ):
        with pytest.raises(ValueError, match=match):
            LoraArguments(**bad)
    model = _model("llama")
    with pytest.raises(TypeError, match="expects a peft model"):
        hf_prune.merge_and_unload(model)
    peft_model = hf_prune.get_peft_model(model, {"r": 2})
    with pytest.raises(ValueError, match="already has peft adapters"):
        hf_prune.get_peft_model(peft_model, {"r": 2})
    with pytest.raises(ValueError, match="sparse=True is invalid for a peft model"):
        hf_prune.save_pretrained(peft_model, tmp_path / "x", sparse=True)
    assert not (tmp_path / "x").exists()
    dora = stock_get_peft_model(_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    before = {k: v.clone() for k, v in dora.state_dict().items()}
    with pytest.raises(ValueError, match=r"q_proj: adapter 'default' uses the LoRA variant .*use_dora=False"):
        hf_prune.prune(dora, PruningConfig(sparsity=0.5))
    assert all(torch.equal(before[k], v) for k, v in dora.state_dict().items())  # refused before any change
    with pytest.raises(ValueError, match="DoRA"):
        PruningTrainer(model=dora, args=args(tmp_path), train_dataset=_data("llama"), pruning_config={"sparsity": 0.5})


def test_prune_on_a_peft_model_cuts_its_adapters_and_masks_their_deltas():
    model = _model("llama")
    peft_model = hf_prune.get_peft_model(model, {"r": 4})
    _randomise_adapters(peft_model)
    data = [make_inputs(FAMILIES["llama"], seed=s) for s in range(2)]
    report = hf_prune.prune(peft_model, PruningConfig(heads=0.5, ffn=0.25, sparsity=0.3), calibration_data=data)
    assert report.sparsity == pytest.approx(0.3, abs=0.01)
    for name, layer in lora_layers(peft_model).items():
        out_f, in_f = layer.base_layer.weight.shape
        assert layer.lora_B["default"].weight.shape[0] == out_f and layer.lora_A["default"].weight.shape[1] == in_f
        assert torch.equal(getattr(layer, KEEP_MASK_ATTR), layer.base_layer.weight != 0), name
    expected = _logits(peft_model, "llama")
    torch.testing.assert_close(_logits(hf_prune.merge_and_unload(peft_model), "llama"), expected, atol=1e-5, rtol=1e-5)


def test_a_sparse_model_wrapped_by_stock_peft_trains_with_masked_deltas(tmp_path, caplog):
    model = _model("llama")
    hf_prune.prune(model, PruningConfig(sparsity=0.5))
    zeros = {n: m.weight == 0 for n, m in prunable_linears(model).items()}
    peft_model = stock_get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    trainer = PruningTrainer(model=peft_model, args=args(tmp_path, max_steps=3), train_dataset=_data("llama"))
    trainer.train()  # nothing to prune: the trainer still masks the deltas by the frozen base's zeros
    trained = _logits(peft_model, "llama")
    merged = hf_prune.merge_and_unload(peft_model)
    assert "delta is not masked" not in caplog.text
    for name, zero in zeros.items():
        assert bool((merged.get_submodule(name).weight[zero] == 0).all())
    torch.testing.assert_close(_logits(merged, "llama"), trained, atol=1e-5, rtol=1e-5)


def test_a_few_exact_zeros_of_a_dense_model_are_not_taken_for_a_mask():
    """Dequantized GGUF weights hold some exact zeros (SmolLM2's Q4_1: under 0.1%): not a sparsity mask."""
    model = _model("llama")
    with torch.no_grad():
        for module in prunable_linears(model).values():
            module.weight.view(-1)[::50] = 0.0  # 2% exact zeros
    peft_model = hf_prune.get_peft_model(model, {"r": 4})
    assert hf_prune.keep_masks(peft_model) == 0
    _randomise_adapters(peft_model)
    expected = _logits(peft_model, "llama")
    merged = hf_prune.merge_and_unload(peft_model)  # the delta lands on those weights too
    assert any(bool((m.weight.view(-1)[::50] != 0).any()) for m in prunable_linears(merged).values())
    torch.testing.assert_close(_logits(merged, "llama"), expected, atol=1e-5, rtol=1e-5)
    # told the zeros are a mask, it keeps them
    again = hf_prune.get_peft_model(_model("llama"), {"r": 4})
    with torch.no_grad():
        for module in prunable_linears(base_model(again)).values():
            module.weight.view(-1)[::50] = 0.0
    assert hf_prune.keep_masks(again, min_zero_fraction=0.0) == len(prunable_linears(base_model(again)))


def test_a_peft_student_distills_from_a_plain_dense_teacher(tmp_path):
    dense = _model("llama")
    peft_model = hf_prune.get_peft_model(copy.deepcopy(dense), {"r": 4})
    config = PruningConfig(heads=0.5, schedule="oneshot", distill_alpha=0.5)
    trainer = PruningTrainer(
        model=peft_model,
        args=args(tmp_path, max_steps=2),
        train_dataset=_data("llama"),
        pruning_config=config,
        teacher_model=dense,
    )
    trainer.train()
    assert trainer.teacher is dense and dense.config.num_attention_heads == 4  # the teacher was not cut
    with pytest.raises(ValueError, match="same task head"):
        PruningTrainer(
            model=hf_prune.get_peft_model(_model("llama"), {"r": 4}),
            args=args(tmp_path),
            train_dataset=_data("llama"),
            pruning_config=config,
            teacher_model=_model("bert"),
        )
