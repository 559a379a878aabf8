"""Devices, dtypes and shared configs: pruning one model never touches another, and no tensor strays to the CPU."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import hf_prune
from hf_prune import PruningConfig, PruningTrainer, prune
from hf_prune.scoring.calibration import calibration_set
from hf_prune.scoring.criteria import input_norms, magnitude_scores, mask_gradient_scores, random_scores
from hf_prune.sparsity.masks import compute_masks, prunable_linears, weight_scores

from .families import FAMILIES, make_inputs, make_model


class CpuTensorGuard(TorchDispatchMode):
    """Records every op that reads or makes a CPU tensor (0-dim scalars aside) while the model lives elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.offenders: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() > 0:
                self.offenders.append(str(func))
                break
        return out


def meta_model_and_data(name: str):
    """A model on the ``meta`` device stands in for a GPU: any tensor created on the CPU by mistake shows up."""
    family = FAMILIES[name]
    cls = next(c for c in family.classes if "ForSequenceClassification" in c.__name__)
    model = make_model(family, cls).to("meta")
    inputs = make_inputs(family, batch=4, padded=False)
    # meta tensors have no values, and transformers' mask builders branch on values: no attention mask here
    inputs.pop("attention_mask")
    inputs["labels"] = torch.tensor([0, 1, 0, 1])
    return model, calibration_set([inputs], model)


@pytest.mark.parametrize("name", ["bert", "distilbert", "llama"])
def test_scores_statistics_and_masks_stay_on_the_models_device(name):
    model, data = meta_model_and_data(name)
    assert all(v.device.type == "meta" for b in data for v in b.values())
    guard = CpuTensorGuard()
    with guard:
        results = [magnitude_scores(model)]
        results += [mask_gradient_scores(model, data, kind, progress=False) for kind in ("taylor", "fisher")]
        modules = prunable_linears(model)
        norms = input_norms(model, modules, data, progress=False)
        weights = weight_scores(modules, "activation", norms)
        masks = [compute_masks(weights, 0.5, scope) for scope in ("layer", "row")]
        masks.append(compute_masks(weights, 0.5, "layer", nm=(2, 4)))
    assert guard.offenders == []
    results.append(random_scores(model))  # drawn by a CPU generator on purpose, then moved
    for scores in results:
        assert all(t.device.type == "meta" for t in scores.heads + scores.ffn), scores.criterion
    assert all(t.device.type == "meta" for t in norms.values())
    assert all(m.device.type == "meta" for group in masks for m in group.values())


def test_guard_catches_a_cpu_accumulator():
    """The guard is what keeps mixed-device arithmetic from coming back: the old magnitude criterion tripped it."""
    guard = CpuTensorGuard()
    with guard:
        acc = torch.zeros(4)  # the pattern of the old bug: CPU zeros, then += device tensors
        acc += torch.ones(4, device="meta")
    assert guard.offenders


def test_latency_helpers_time_the_model_where_it_lives():
    """CPU inputs are moved to the model's device before timing (the recipe runner's pruned model sits on the GPU
    after training), and a dense/pruned pair on different devices is refused rather than compared."""
    from hf_prune.measure import compare_latency, measure_latency

    model, _ = meta_model_and_data("bert")
    cpu_inputs = {"input_ids": make_inputs(FAMILIES["bert"], batch=2, padded=False)["input_ids"]}
    guard = CpuTensorGuard()
    with guard:
        result = measure_latency(model, cpu_inputs, repeats=2, warmup=1)
    # the one CPU read is the copy of the inputs onto the model's device; every forward ran there
    assert result.repeats == 2 and guard.offenders == ["aten._to_copy.default"]
    cpu_model = make_model(FAMILIES["bert"], tf.BertForSequenceClassification)
    with pytest.raises(ValueError, match="different devices"):
        compare_latency(cpu_model, model, cpu_inputs, repeats=2)


# ---- shared configs -------------------------------------------------------------------------------------
def test_pruning_one_model_leaves_a_model_built_from_the_same_config_alone():
    family = FAMILIES["llama"]
    config = family.make_config()
    a = tf.LlamaForCausalLM(config).eval()
    b = tf.LlamaForCausalLM(config).eval()
    hf_prune.prune_heads(a, {0: [0, 1]})
    hf_prune.prune_ffn(a, {1: list(range(8))})
    assert a.config is not config and b.config is config
    assert not hasattr(config, "hf_prune") and config.intermediate_size == 40
    assert all(m.config is a.config for m in a.modules() if hasattr(m, "config"))
    # b prunes from its own, untouched shapes
    hf_prune.prune_heads(b, {2: [2, 3]})
    assert b.config.hf_prune["layers"][0]["heads"] == 4 and b.config.hf_prune["layers"][2]["heads"] == 2
    assert a.config.hf_prune["layers"][0]["heads"] == 2 and a.config.hf_prune["layers"][2]["heads"] == 4


def test_a_config_that_describes_another_model_is_a_clear_error():
    family = FAMILIES["bert"]
    pruned = make_model(family, tf.BertForSequenceClassification)
    hf_prune.prune_heads(pruned, {0: [0, 1, 2]})
    stranger = tf.BertForSequenceClassification(pruned.config)  # built from a pruned model's config: full size
    with pytest.raises(ValueError, match="does not describe this model"):
        hf_prune.prune_heads(stranger, {0: [0]})
    with pytest.raises(ValueError, match="does not describe this model"):
        prune(stranger, PruningConfig(heads=0.5))


def test_three_models_from_one_config_train_and_resume_exactly(tmp_path):
    """A sweep / model_init builds every model from one config object: pruning the first must not leak into the
    others, and a resumed run equals the uninterrupted one."""
    from .test_trainer import args, toy_data

    config = FAMILIES["bert"].make_config()
    data = toy_data()
    prune_config = PruningConfig(heads=0.5, sparsity=0.5, schedule="iterative", frequency=4)

    def fresh():
        torch.manual_seed(0)
        return tf.BertForSequenceClassification(config)

    def trainer(name: str, **kw) -> PruningTrainer:
        return PruningTrainer(
            model=fresh(), args=args(tmp_path / name, **kw), train_dataset=data, pruning_config=prune_config
        )

    first = trainer("first")
    first.train()
    assert [s.heads for s in hf_prune.get_adapter(first.model).layer_shapes(first.model)] == [2, 2, 2]
    assert not hasattr(config, "hf_prune")

    full = trainer("full", save_strategy="epoch")
    full.train()
    resumed = trainer("resumed", save_strategy="epoch")
    full_model, resumed_model = full.model, resumed.model
    checkpoint = tmp_path / "full" / "out" / "checkpoint-8"
    assert checkpoint.is_dir()
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == full.state.global_step == 16
    full_state, resumed_state = full_model.state_dict(), resumed_model.state_dict()
    assert set(full_state) == set(resumed_state)
    for key, value in full_state.items():
        torch.testing.assert_close(resumed_state[key], value, atol=1e-5, rtol=0)
    assert resumed.pruning_callback.done_steps == full.pruning_callback.done_steps


# ---- dtypes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_prune_with_every_data_pass(dtype):
    from .test_calibration import model_and_examples, ready_batches

    model, examples = model_and_examples()
    model = model.to(dtype)
    config = PruningConfig(
        target_flops=0.6,
        criterion="fisher",
        scope="global",
        reconstruct=True,
        sparsity=0.3,
        sparsity_criterion="activation",
        seq_len=16,
    )
    batches = ready_batches(examples)
    report = prune(model, config, calibration_data=batches)
    assert report.flops_after < report.flops_before and report.sparsity == pytest.approx(0.3, abs=0.02)
    assert all(p.dtype == dtype for p in model.parameters())
    with torch.no_grad():
        logits = model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"]).logits
    assert bool(torch.isfinite(logits.float()).all())


def test_bf16_model_trains_with_structural_events_and_masks(tmp_path):
    from .test_trainer import args, toy_data, toy_model

    model = toy_model().to(torch.bfloat16)
    config = PruningConfig(
        heads=0.5,
        ffn=0.5,
        criterion="taylor",
        reconstruct=True,
        sparsity=0.3,
        schedule="iterative",
        frequency=4,
        distill_alpha=0.5,
    )
    trainer = PruningTrainer(model=model, args=args(tmp_path), train_dataset=toy_data(), pruning_config=config)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(x)) for x in losses)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in trainer.teacher.parameters())


def test_copies_of_a_pruned_model_keep_their_own_config():
    family = FAMILIES["bert"]
    model = make_model(family, tf.BertForSequenceClassification)
    hf_prune.prune_heads(model, {0: [0]})
    twin = copy.deepcopy(model)
    hf_prune.prune_heads(twin, {1: [0, 1]})
    assert model.config.hf_prune["layers"][1]["heads"] == 4
    assert twin.config.hf_prune["layers"][1]["heads"] == 2
