"""CUDA tier: runs wherever a GPU is present (skipped otherwise). Run it on every GPU machine you get:
``pytest -m cuda``. The CPU tier guards the same code paths with the meta-device checks in test_devices.py."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import transformers as tf

import hf_prune
from hf_prune import PruningConfig, PruningTrainer, prune
from hf_prune.planning.allocate import latency_floor
from hf_prune.planning.latency_table import profile_latency
from hf_prune.training.distributed import all_reduce_sum

from .families import FAMILIES, make_inputs, make_model
from .test_calibration import model_and_examples, ready_batches
from .test_deploy import assert_int8_close, int8_test_model
from .test_distributed import check_ranks_agree, launch
from .test_trainer import toy_data

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


# GPU logits in each dtype may differ from the CPU's float32 ones by this fraction of the logits' largest magnitude:
# about 12 (fp16) and 6 (bf16) times the dtype's machine epsilon, since rounding compounds through the blocks and the
# calibration statistics are gathered in that dtype; float32 only by reduction order. All are well below what the
# pruning itself changes (checked in the test), so a GPU path that skipped or broke the refit or the masks fails.
LOGIT_RTOL = {torch.float32: 1e-4, torch.float16: 0.012, torch.bfloat16: 0.05}


def _input_sensitive(model: torch.nn.Module) -> torch.nn.Module:
    """Linear weights 5x BERT's initial scale: logits that move with the input and with the pruning (at 0.02 the
    pooler and classifier leave logits that are mostly their biases)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(5)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("criterion", ["magnitude", "random", "taylor", "fisher"])
def test_oneshot_prune_on_cuda_matches_cpu(criterion, dtype):
    model, examples = model_and_examples()
    _input_sensitive(model)
    batches = ready_batches(examples)
    config = PruningConfig(
        target_flops=0.6,
        criterion=criterion,
        scope="global",
        reconstruct=True,
        sparsity=0.3,
        sparsity_criterion="activation",
        seq_len=16,
    )
    dense, cpu = copy.deepcopy(model), copy.deepcopy(model)
    gpu = model.to("cuda", dtype)
    report = prune(gpu, config, calibration_data=batches)  # CPU batches: moved to the model's device
    assert all(p.device.type == "cuda" and p.dtype == dtype for p in gpu.parameters())
    cpu_report = prune(cpu, config, calibration_data=batches)
    assert report.flops_after == pytest.approx(cpu_report.flops_after, rel=0.02)
    same_plan = report.plan["heads"] == cpu_report.plan["heads"] and report.plan["ffn"] == cpu_report.plan["ffn"]
    if criterion in ("magnitude", "random"):
        # random scores come from a CPU generator, magnitude from the weights (their bf16/fp16 rounding does not
        # reorder this model's heads and neurons): the very same structure on either device, in every dtype
        assert same_plan and report.layers_after == cpu_report.layers_after
    if not same_plan:
        return  # gradient scores in reduced precision may rank near-ties differently: other heads, other logits
    inputs = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    with torch.no_grad():
        want = torch.cat([cpu(**b).logits for b in inputs])
        effect = float((torch.cat([dense(**b).logits for b in inputs]) - want).abs().max())
        got = torch.cat([gpu(**{k: v.cuda() for k, v in b.items()}).logits.float().cpu() for b in inputs])
    tol = LOGIT_RTOL[dtype] * float(want.abs().max())
    assert tol < effect, f"tolerance {tol:.3g} cannot tell the pruned model from the dense one ({effect:.3g})"
    err = float((got - want).abs().max())
    assert err <= tol, f"{dtype} GPU logits off the CPU float32 ones by {err:.3g} (tolerance {tol:.3g})"


def test_target_latency_profiles_on_the_gpu():
    model, examples = model_and_examples()
    model = model.cuda()
    config = PruningConfig(target_latency=0.6, criterion="fisher", scope="global", seq_len=32, latency_batch_size=8)
    # a tiny model on a GPU is launch-bound: its reachable floor is machine-specific, so aim halfway above it
    table = profile_latency(
        model, config.latency_batch_size, config.seq_len, multiple=config.ffn_multiple, head_unit=config.head_unit
    )
    floor = latency_floor(model, config, table)
    assert floor < 1.0 and table.device.startswith("cuda")
    config = replace(config, target_latency=(1 + floor) / 2)
    report = prune(model, config, calibration_data=ready_batches(examples))
    assert report.plan["meta"]["latency_table"]["device"].startswith("cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trainer_prunes_distills_and_masks_on_cuda(tmp_path, dtype):
    family = FAMILIES["bert"]
    model = make_model(family, tf.BertForSequenceClassification).to(dtype)
    args = tf.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_train_epochs=2,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        logging_steps=2,
        seed=0,
        disable_tqdm=True,
        bf16=dtype == torch.bfloat16,
    )
    config = PruningConfig(
        heads=0.5,
        ffn=0.5,
        criterion="fisher",
        reconstruct=True,
        sparsity=0.4,
        sparsity_criterion="activation",
        schedule="iterative",
        frequency=4,
        distill_alpha=0.5,
        distill_hidden=0.1,
    )
    trainer = PruningTrainer(model=model, args=args, train_dataset=toy_data(), pruning_config=config)
    trainer.train()
    assert next(model.parameters()).device.type == "cuda"
    assert [s.heads for s in hf_prune.get_adapter(model).layer_shapes(model)] == [2, 2, 2]
    assert hf_prune.sparsity.masks.sparsity_report(model)["overall"] == pytest.approx(0.4, abs=0.01)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    live = {id(p) for p in model.parameters()}
    assert all(id(p) in live for g in inner.param_groups for p in g["params"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_recovery_on_cuda_keeps_masks_and_cuts_adapters(tmp_path, dtype):
    """LoRA on the GPU: Fisher scores with recomputed block activations (the GPU default), an iterative cut that
    slices the adapters, masked deltas in bf16 autocast, and a merge that keeps every pruned weight at zero."""
    family = FAMILIES["llama"]
    model = make_model(family, tf.LlamaForCausalLM).train()
    peft_model = hf_prune.get_peft_model(model, {"r": 4, "alpha": 8})
    data = toy_data().map(lambda e: {"labels": e["input_ids"]})
    args = tf.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=6, learning_rate=1e-3, report_to="none",
        save_strategy="no", seed=0, disable_tqdm=True, bf16=dtype == torch.bfloat16,
    )  # fmt: skip
    config = PruningConfig(
        heads=0.5, ffn=0.5, criterion="fisher", sparsity=0.4, schedule="iterative", frequency=2, end_step=4
    )
    trainer = PruningTrainer(model=peft_model, args=args, train_dataset=data, pruning_config=config)
    trainer.train()
    assert next(model.parameters()).device.type == "cuda"
    masks = trainer.pruning_callback.masks
    layers = hf_prune.training.lora.lora_layers(peft_model)
    assert all(layer.lora_B["default"].weight.shape[0] == layer.base_layer.out_features for layer in layers.values())
    merged = hf_prune.merge_and_unload(peft_model)
    for name, keep in masks.items():
        assert bool((merged.get_submodule(name).weight[~keep] == 0).all()), name
    assert [s.heads for s in hf_prune.get_adapter(merged).layer_shapes(merged)] == [2, 2, 2]


def _non_uniform_cuda_bert(dtype):
    model = make_model(FAMILIES["bert"], tf.BertForSequenceClassification)
    hf_prune.prune_heads(model, {0: [0, 1, 2, 3], 1: [2]})
    hf_prune.prune_ffn(model, {2: list(range(40))})
    return model.to("cuda", dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_cuda_model_saves_portable_and_sparse_and_reloads_onto_the_gpu(tmp_path, dtype):
    model = _non_uniform_cuda_bert(dtype)
    inputs = {k: v.cuda() for k, v in make_inputs(FAMILIES["bert"]).items()}
    hf_prune.save_pretrained(model, tmp_path / "portable")
    stock = tf.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "portable", trust_remote_code=True, device_map="cuda", dtype=dtype
    ).eval()
    with torch.no_grad():
        assert torch.equal(stock(**inputs).logits, model(**inputs).logits)
    prune(model, PruningConfig(sparsity=0.6, sparsity_scope="global"))
    hf_prune.save_pretrained(model, tmp_path / "sparse", sparse=True)
    back = hf_prune.from_pretrained(tmp_path / "sparse", tf.AutoModelForSequenceClassification, device_map="cuda")
    want = model.state_dict()
    got = back.state_dict()
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert got[name].device.type == "cuda" and got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)


def test_onnx_export_of_a_cuda_model_matches_it_and_leaves_it_on_the_gpu(tmp_path):
    pytest.importorskip("onnxruntime")
    from hf_prune.io.onnx import export_onnx, onnx_session, run_onnx

    model = int8_test_model().cuda()
    report = export_onnx(model, tmp_path / "onnx", int8=True)
    assert all(p.device.type == "cuda" for p in model.parameters())
    inputs = make_inputs(FAMILIES["bert"], batch=8, seq=19)
    with torch.no_grad():
        want = model(**{k: v.cuda() for k, v in inputs.items()}).logits.cpu()
    got = run_onnx(onnx_session(report.path), inputs)[0]
    assert_int8_close(got, want)


def test_reduction_helper_outside_a_process_group_is_a_copy_on_the_same_device():
    t = torch.arange(4.0, device="cuda")
    out = all_reduce_sum(t)
    assert out.device == t.device and torch.equal(out, t) and out is not t


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("target", ["flops", "latency"])
def test_two_gpu_nccl_ddp_prunes_identically(tmp_path, target):
    launch(tmp_path, target, env={"HF_PRUNE_TEST_BACKEND": "nccl"})
    check_ranks_agree(tmp_path, target)
