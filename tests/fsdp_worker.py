"""Worker for test_fsdp: run under ``torch.distributed.run --nproc_per_node N`` (gloo on CPU, NCCL on GPUs).

``cpu``: the pruning callback and PruningTrainer's pre-sharding cut on tiny Llamas sharded with torch's
``fully_shard`` (FSDP2, what accelerate runs), driven step by step the way ``Trainer`` drives them (the stock
Trainer refuses FSDP without CUDA). ``trainer``: a real ``PruningTrainer`` with ``fsdp_config={"version": 2}``
(GPUs only). Each rank writes ``rank{r}.json``; the test compares them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
import transformers as tf
from datasets import Dataset
from safetensors.torch import load_file
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hf_prune
from hf_prune import PruningCallback, PruningConfig, PruningTrainer
from hf_prune.training.callback import MASKS_FILE
from hf_prune.training.lora import base_model
from tests.families import FAMILIES, VOCAB

STEPS = 6
ROWS = 4  # sequences per step, all ranks together
SEQ = 12

#: (name, how the model is wrapped, PruningConfig keywords). Uneven shards: 45 FFN rows split 23 / 22.
MASK_SCENARIOS = [
    ("magnitude-iterative", "layers", {"sparsity": 0.5, "schedule": "iterative", "frequency": 2, "end_step": 4}),
    # root only: after the calibration forward FSDP leaves the root's weights unsharded (the applier reshards)
    (
        "activation-global-root",
        "root",
        {
            "sparsity": 0.4,
            "sparsity_criterion": "activation",
            "sparsity_scope": "global",
            "schedule": "iterative",
            "frequency": 3,
            "end_step": 3,
        },
    ),
    ("nm-oneshot", "layers", {"pattern": "2:4"}),
    # LoRA adapters on the sharded model: frozen, masked base shards; the masked deltas train
    ("magnitude-lora", "layers", {"sparsity": 0.5, "sparsity_scope": "row", "schedule": "oneshot"}),
]


def tiny_llama(intermediate_size: int = 40) -> tf.LlamaForCausalLM:
    config = FAMILIES["llama"].make_config()
    config.intermediate_size = intermediate_size
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config).train()


def shard(model: torch.nn.Module, wrap: str) -> None:
    """``fully_shard`` as accelerate's TRANSFORMER_BASED_WRAP does (each decoder layer, then the root), or the root.
    A peft model's base is sharded (what accelerate's FSDP2 wrap reaches inside it)."""
    if wrap == "layers":
        for layer in model.model.layers:
            fully_shard(layer)
    fully_shard(model)


def step_ids(step: int, sharded: bool) -> torch.Tensor:
    """The step's batch: all of it for the single-process reference, this rank's rows when sharded."""
    ids = torch.randint(3, VOCAB, (ROWS, SEQ), generator=torch.Generator().manual_seed(100 + step))
    if not sharded:
        return ids
    world, rank = dist.get_world_size(), dist.get_rank()
    return ids.chunk(world)[rank]


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as a whole tensor (gathered from the shards: all ranks take part)."""
    out = {}
    for name, p in model.named_parameters():
        p = p.detach()
        out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).cpu()
    return out


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def masked_abs(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest |weight| at a pruned position: on this rank's own shard (cut with ``torch.chunk``, as FSDP2 shards,
    independently of hf_prune's helper) and in the gathered whole weight."""
    modules = dict(base_model(model).named_modules())
    local = whole = 0.0
    for name, keep in masks.items():
        w = modules[name].weight.detach()
        pruned = ~keep.cpu()
        if hasattr(w, "to_local"):
            mine = pruned.chunk(dist.get_world_size())[dist.get_rank()]
            shard_w = w.to_local().cpu()
            assert shard_w.shape == mine.shape, (name, shard_w.shape, mine.shape)
            local = max(local, float(shard_w[mine].abs().max()) if mine.any() else 0.0)
            w = w.full_tensor()
        values = w.cpu()[pruned]
        whole = max(whole, float(values.abs().max()) if values.numel() else 0.0)
    return {"local": local, "whole": whole}


def fake_args(out: Path, fsdp: bool) -> SimpleNamespace:
    """What the callback reads of TrainingArguments; ``fsdp=True`` as ``TrainingArguments(fsdp=True)`` sets it."""
    return SimpleNamespace(
        fsdp=fsdp, fsdp_config={"version": 2} if fsdp else {}, deepspeed=None, output_dir=str(out), should_save=True
    )


def drive(model, callback, out: Path, sharded: bool, loss_fn=None) -> dict[str, Any]:
    """What ``Trainer`` does around the callback: train begin, then per step forward, backward, optimizer step,
    ``on_optimizer_step``, ``on_step_end``; the pruned weights are checked after every optimizer step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if callback.trainer is not None:
        callback.trainer.optimizer = optimizer
    args = fake_args(out, sharded) if callback.trainer is None else callback.trainer.args
    state, control = tf.TrainerState(max_steps=STEPS, num_train_epochs=1), tf.TrainerControl()
    callback.on_train_begin(args, state, control, model=model, optimizer=optimizer)
    worst = {"local": 0.0, "whole": 0.0}
    losses = []
    for step in range(STEPS):
        ids = step_ids(step, sharded)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        loss = loss_fn(model, inputs) if loss_fn else model(**inputs).loss
        loss.backward()
        losses.append(float(loss.detach()))
        optimizer.step()
        callback.on_optimizer_step(args, state, control, model=model)
        for k, v in masked_abs(model, callback.masks).items():
            worst[k] = max(worst[k], v)
        optimizer.zero_grad()
        state.global_step += 1
        callback.on_step_end(args, state, control, model=model, optimizer=optimizer)
    return {"masked_abs": worst, "losses": losses, "done_steps": list(callback.done_steps)}


def calibration() -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(3, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(7))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


def masks_scenario(out: Path, name: str, wrap: str, config_kw: dict[str, Any]) -> dict[str, Any]:
    """Masks on the sharded model against the same run on an unsharded copy (same seed, same whole batches)."""
    config = PruningConfig(**config_kw)
    model = tiny_llama(intermediate_size=44 if "pattern" in config_kw else 45)  # N:M needs whole groups of 4
    if name.endswith("lora"):
        model = hf_prune.get_peft_model(model, {"r": 4, "target_modules": ["q_proj", "o_proj", "up_proj", "down_proj"]})
    reference = copy.deepcopy(model)
    shard(base_model(model), wrap)
    callback = PruningCallback(config, calibration_dataset=calibration())
    result = drive(model, callback, out, sharded=True)
    ref_callback = PruningCallback(config, calibration_dataset=calibration())
    ref = drive(reference, ref_callback, out, sharded=False)
    got, want = full_state(model), {k: v.detach() for k, v in reference.named_parameters()}
    modules = dict(base_model(reference).named_modules())
    result.update(
        ref_masked_abs=ref["masked_abs"],
        ref_done_steps=ref["done_steps"],
        max_weight_diff=max(float((got[k] - want[k]).abs().max()) for k in want),
        masks_equal=set(callback.masks) == set(ref_callback.masks)
        and all(torch.equal(callback.masks[k].cpu(), ref_callback.masks[k]) for k in ref_callback.masks),
        masks_whole=all(m.shape == modules[k].weight.shape for k, m in callback.masks.items()),
        n_masks=len(callback.masks),
        sparsity=callback.stats(base_model(model))["pruning/sparsity"],
        ref_sparsity=ref_callback.stats(base_model(reference))["pruning/sparsity"],
        sharded_type=type(dict(base_model(model).named_modules())[next(iter(callback.masks))].weight).__name__,
    )
    if dist.get_rank() == 0:  # the checkpoint's mask file holds whole matrices
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        callback.save_state(folder)
        saved = load_file(folder / MASKS_FILE)
        result["saved_masks_whole"] = all(
            saved[k].shape == modules[k].weight.shape and torch.equal(saved[k].bool(), ref_callback.masks[k])
            for k in ref_callback.masks
        )
    return result


def shapes(model: torch.nn.Module) -> list[dict[str, int]]:
    return [s.to_dict() for s in hf_prune.get_adapter(model).layer_shapes(model)]


def causal_data(n: int = 32) -> Dataset:
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(3)).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * SEQ] * n, "labels": ids})


def structure_scenario(out: Path) -> dict[str, Any]:
    """PruningTrainer's one-shot cut before sharding (taylor scores summed over ranks, distillation from the dense
    copy), then sharded steps: the cut is not repeated and the shapes stay."""
    model = tiny_llama()
    dense = shapes(model)
    args = tf.TrainingArguments(
        output_dir=str(out / "trainer"),
        use_cpu=True,
        ddp_backend="gloo",
        per_device_train_batch_size=2,
        max_steps=STEPS,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    config = PruningConfig(heads=0.5, ffn=0.5, criterion="taylor", sparsity=0.3, distill_alpha=0.5)
    trainer = PruningTrainer(model=model, args=args, train_dataset=causal_data(), pruning_config=config)
    # what accelerate's FSDP plugin sets (the stock Trainer refuses FSDP without CUDA); train() would now call:
    trainer.is_fsdp_enabled = True
    trainer.cut_before_sharding()
    cut = shapes(model)
    cut_digest = digest({k: v.detach() for k, v in model.named_parameters()})
    shard(model, "layers")

    def loss_fn(m, inputs):  # the mixin's distillation loss: sharded student, unsharded teacher
        return trainer.compute_loss(m, inputs)

    result = drive(model, trainer.pruning_callback, out, sharded=True, loss_fn=loss_fn)
    modules = dict(model.named_modules())
    result.update(
        dense=dense,
        cut=cut,
        after=shapes(model),
        cut_digest=cut_digest,
        weights_digest=digest(full_state(model)),
        teacher_sharded=any(hasattr(p, "to_local") for p in trainer.teacher.parameters()),
        teacher_shapes=shapes(trainer.teacher),
        masks_whole=all(m.shape == modules[k].weight.shape for k, m in trainer.pruning_callback.masks.items()),
        sparsity=trainer.pruning_callback.stats(model)["pruning/sparsity"],
    )
    return result


def cpu(out: Path) -> None:
    dist.init_process_group("gloo")
    result = {"world_size": dist.get_world_size()}
    for name, wrap, config_kw in MASK_SCENARIOS:
        result[name] = masks_scenario(out, name, wrap, config_kw)
    result["structure"] = structure_scenario(out)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))


def trainer_on_gpus(out: Path) -> None:
    """A real PruningTrainer under FSDP2 (accelerate's fully_shard): one-shot cut before sharding, masks and
    distillation while sharded, then a resumed run that replays the cut before sharding again."""
    fsdp = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
    common = {"per_device_train_batch_size": 2, "report_to": "none", "disable_tqdm": True, "save_steps": 3, **fsdp}
    config = PruningConfig(heads=0.5, ffn=0.5, criterion="taylor", sparsity=0.3, distill_alpha=0.5)
    model = tiny_llama()
    dense = shapes(model)
    args = tf.TrainingArguments(output_dir=str(out / "run"), max_steps=STEPS, **common)
    trainer = PruningTrainer(model=model, args=args, train_dataset=causal_data(), pruning_config=config)
    trainer.train()
    masked = masked_abs(trainer.model, trainer.pruning_callback.masks)
    result = {
        "world_size": dist.get_world_size(),
        "fsdp": trainer.is_fsdp_enabled,
        "sharded": any(hasattr(p, "to_local") for p in trainer.model.parameters()),
        "dense": dense,
        "after": shapes(trainer.model),
        "masked_abs": masked,
        "done_steps": trainer.pruning_callback.done_steps,
        "loss": trainer.state.log_history[-1].get("train_loss"),
    }
    resumed = PruningTrainer(
        model=tiny_llama(),
        args=tf.TrainingArguments(output_dir=str(out / "run"), max_steps=STEPS + 2, **common),
        train_dataset=causal_data(),
        pruning_config=config,
    )
    resumed.train(resume_from_checkpoint=True)
    result["resumed_after"] = shapes(resumed.model)
    result["resumed_masked_abs"] = masked_abs(resumed.model, resumed.pruning_callback.masks)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    {"cpu": cpu, "trainer": trainer_on_gpus}[sys.argv[2]](Path(sys.argv[1]))
    # leave together: a rank that exits while another still writes its results tears gloo down under it (SIGABRT)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
