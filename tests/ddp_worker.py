"""Worker for test_distributed: run under ``torch.distributed.run --nproc_per_node 2`` (gloo, CPU)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hf_prune
from hf_prune import PruningConfig, PruningTrainer
from tests.test_trainer import args, toy_data, toy_model


def distill(out: Path, kind: str, batch: int) -> None:
    """One distillation step with ``batch`` examples per process; rank 0 writes the loss and weights."""
    from safetensors.torch import save_file

    from tests.distill_setup import CONFIG, setup, training_args

    model, data, collate = setup(kind)
    trainer = PruningTrainer(
        model=model,
        args=training_args(out / "run", batch, 1, ddp_backend="gloo"),
        train_dataset=data,
        data_collator=collate,
        pruning_config=CONFIG,
    )
    trainer.train()
    if torch.distributed.get_rank() == 0:
        loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
        world = torch.distributed.get_world_size()
        (out / "rank0.json").write_text(json.dumps({"loss": loss, "world_size": world}))
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, out / "rank0.safetensors")


def reachable_latency_target(model: torch.nn.Module, config: PruningConfig) -> float:
    """Halfway between this machine's latency floor for ``model`` and 1, agreed by every rank.

    The floor (every layer at its fewest heads, no FFN) is measured, and moves with the machine's load; a fixed target
    under it is refused before training (LatencyTargetError), which is not what this job tests. Each rank times its
    own copy (the pruning callback re-uses that cached table and averages it over ranks); the largest floor of any rank
    sets the target, so the averaged table reaches it too."""
    from accelerate import PartialState

    from hf_prune.planning.allocate import latency_floor

    state = PartialState()  # the process group the Trainer will use
    table = hf_prune.profile_latency(
        model, config.latency_batch_size, config.seq_len, multiple=config.ffn_multiple, head_unit=config.head_unit
    )
    floor = torch.tensor([latency_floor(model, config, table)], device=state.device)
    torch.distributed.all_reduce(floor, op=torch.distributed.ReduceOp.MAX)
    return (1 + floor.item()) / 2


def main(out: Path, target: str) -> None:
    base = toy_model()
    dense_shapes = [s.to_dict() for s in hf_prune.get_adapter(base).layer_shapes(base)]
    # lora: adapters trained under DDP, cut with the structure at every event, masked deltas
    model = hf_prune.get_peft_model(base, {"r": 4}) if target == "lora" else base
    # latency: every rank times its own copy; the averaged table must still give one plan
    keep = {"target_latency": 0.99, "seq_len": 12} if target == "latency" else {"target_flops": 0.5}
    config = PruningConfig(
        **keep,
        criterion="fisher",
        scope="global",
        schedule="iterative",
        frequency=2,
        sparsity=0.3,
        reconstruct=True,  # the refit statistics are reduced across ranks too
    )
    if target == "latency":
        config = dataclasses.replace(config, target_latency=reachable_latency_target(base, config))
    # HF_PRUNE_TEST_BACKEND=nccl runs the same job on GPUs (tests/test_cuda.py)
    backend = os.environ.get("HF_PRUNE_TEST_BACKEND", "gloo")
    trainer = PruningTrainer(
        model=model,
        args=args(out, ddp_backend=backend, use_cpu=backend == "gloo"),
        train_dataset=toy_data(),
        pruning_config=config,
    )
    trainer.train()
    rank = torch.distributed.get_rank()
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    shapes = [s.to_dict() for s in hf_prune.get_adapter(base).layer_shapes(base)]
    result = {
        "dense_shapes": dense_shapes,
        "target_latency": config.target_latency,
        "world_size": torch.distributed.get_world_size(),
        "shapes": shapes,
        "weights_sha256": digest.hexdigest(),
        "events": trainer.pruning_callback.done_steps,
        "sparsity": hf_prune.sparsity.masks.sparsity_report(
            hf_prune.merge_and_unload(model) if target == "lora" else base
        )["overall"],
        "latency_table": trainer.pruning_callback.latency.to_dict() if trainer.pruning_callback.latency else None,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[2].startswith("distill-"):
        distill(Path(sys.argv[1]), sys.argv[2].removeprefix("distill-"), int(sys.argv[3]))
    else:
        main(Path(sys.argv[1]), sys.argv[2])
    # leave together: a rank that exits while another still writes its results tears gloo down under it (SIGABRT)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
