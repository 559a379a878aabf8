"""Families without an adapter: weight sparsity (unstructured, N:M) works on their blocks' linear layers; removing
heads, neurons or blocks is refused with the registry's error."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from datasets import Dataset

import hf_prune
from hf_prune import PruningConfig, PruningTrainer, prune
from hf_prune.architectures import get_adapter, supported_model_types
from hf_prune.architectures.generic import block_lists
from hf_prune.measure import encoder_flops, prunable_parameters
from hf_prune.sparsity.masks import prunable_linears, sparsity_report


def opt_model() -> tf.PreTrainedModel:
    config = tf.OPTConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        ffn_dim=48,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        dropout=0.0,
        attention_dropout=0.0,
    )
    torch.manual_seed(0)
    return tf.OPTForCausalLM(config).eval()


def t5_model() -> tf.PreTrainedModel:
    config = tf.T5Config(
        vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4, dropout_rate=0.0
    )
    torch.manual_seed(0)
    return tf.T5ForConditionalGeneration(config).eval()


def batches(n: int = 3, seq: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 97, (4, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def test_unknown_families_are_really_unknown():
    # the point of these tests is a family no adapter describes; fail loudly if one is ever registered
    assert "opt" not in supported_model_types() and "t5" not in supported_model_types()


def test_block_linears_of_an_unknown_decoder():
    model = opt_model()
    modules = prunable_linears(model)
    per_block = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"}
    expected = {f"model.decoder.layers.{i}.{p}" for i in range(3) for p in per_block}
    assert set(modules) == expected  # no embeddings, no lm_head, nothing outside the blocks
    assert prunable_parameters(model) == sum(m.weight.numel() for m in modules.values())
    assert encoder_flops(model, 10).total == 2 * 10 * prunable_parameters(model)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_unstructured_prune_of_an_unknown_family(scope):
    model = opt_model()
    embeddings = model.get_input_embeddings().weight.clone()
    report = prune(model, PruningConfig(sparsity=0.5, sparsity_scope=scope, criterion="magnitude"))
    assert report.sparsity == pytest.approx(0.5, abs=0.01)
    assert report.layers_before == report.layers_after == []
    per_module = sparsity_report(model)["per_module"]
    if scope == "layer":
        assert all(v == pytest.approx(0.5, abs=0.02) for v in per_module.values())
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    logits = model(**batches(1)[0]).logits
    assert torch.isfinite(logits).all()


def test_two_four_and_reconstruction_on_an_unknown_family():
    model = opt_model()
    prune(model, PruningConfig(pattern="2:4", sparsity_criterion="activation", criterion="magnitude"), batches())
    for module in prunable_linears(model).values():
        groups = (module.weight != 0).reshape(module.weight.shape[0], -1, 4).sum(-1)
        assert (groups <= 2).all()
    dense, sparse = opt_model(), opt_model()
    prune(sparse, PruningConfig(sparsity=0.5, reconstruct=True, criterion="magnitude"), batches())
    assert sparsity_report(sparse)["overall"] == pytest.approx(0.5, abs=0.01)
    # plain masking with the same criterion and scope removes the same weights and leaves the kept ones as they were;
    # the OBS update moves the kept ones so each layer reproduces its dense output better
    masked = opt_model()
    prune(masked, PruningConfig(sparsity=0.5, criterion="magnitude"))
    for name, module in prunable_linears(sparse).items():
        w_sparse, w_masked = module.weight, prunable_linears(masked)[name].weight
        kept = w_masked != 0
        assert torch.equal(w_masked[kept], prunable_linears(dense)[name].weight[kept]), name
        assert torch.equal(w_sparse != 0, kept), name
        assert not torch.allclose(w_sparse[kept], w_masked[kept]), name
    held_out = batches(2, seq=12)[1]
    with torch.no_grad():
        reference = dense(**held_out).logits
        errors = {
            kind: float((pruned(**held_out).logits - reference).pow(2).mean())
            for kind, pruned in (("obs", sparse), ("masked", masked))
        }
    assert errors["obs"] < errors["masked"], errors


def test_encoder_decoder_masks_both_stacks_and_refuses_a_chain():
    model = t5_model()
    assert [name for name, _ in block_lists(model)] == ["encoder.block", "decoder.block"]
    prune(model, PruningConfig(sparsity=0.6, criterion="magnitude"))
    names = prunable_linears(model)
    assert any(n.startswith("encoder.block.") for n in names) and any(n.startswith("decoder.block.") for n in names)
    assert sparsity_report(model)["overall"] == pytest.approx(0.6, abs=0.01)
    with pytest.raises(ValueError, match=r"encoder\.block, decoder\.block.*reconstruct=False"):
        prune(t5_model(), PruningConfig(sparsity=0.5, reconstruct=True, criterion="magnitude"), batches())


@pytest.mark.parametrize(
    "config",
    [PruningConfig(heads=0.5, criterion="magnitude"), PruningConfig(ffn=0.25), PruningConfig(layers=0.3)],
    ids=["heads", "ffn", "layers"],
)
def test_structure_removal_needs_an_adapter(config):
    with pytest.raises(ValueError, match=r"does not support model_type='opt'.*Unstructured and N:M sparsity work"):
        prune(opt_model(), config, batches())
    with pytest.raises(ValueError, match="does not support model_type='opt'"):
        hf_prune.prune_heads(opt_model(), {0: [1]})
    with pytest.raises(ValueError, match="does not support model_type='opt'"):
        get_adapter(opt_model())


def test_trainer_keeps_masks_on_an_unknown_family_and_it_reloads_stock(tmp_path):
    model = opt_model().train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (32, 12), generator=g).tolist()
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 12] * 32, "labels": ids})
    args = tf.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        max_steps=6,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        optim="adamw_torch",
    )
    config = PruningConfig(sparsity=0.7, schedule="cubic", frequency=2, criterion="magnitude")
    trainer = PruningTrainer(model=model, args=args, train_dataset=data, pruning_config=config)
    before = {n: m.weight.detach().clone() for n, m in prunable_linears(model).items()}
    trainer.train()
    assert sparsity_report(model)["overall"] == pytest.approx(0.7, abs=0.01)
    masks = trainer.pruning_callback.masks
    modules = prunable_linears(model)
    assert set(masks) == set(modules)
    assert all(not modules[n].weight[~m].any() for n, m in masks.items())
    assert any(not torch.equal(before[n][m], modules[n].weight[m]) for n, m in masks.items())  # it did train
    path = hf_prune.save_pretrained(model, tmp_path / "saved")
    reloaded = tf.OPTForCausalLM.from_pretrained(path).eval()
    model.eval()
    batch = batches(1)[0]
    assert torch.equal(reloaded(**batch).logits, model(**batch).logits)
