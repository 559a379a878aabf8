"""Sharded training: FSDP2 (torch ``fully_shard``, what accelerate runs for ``fsdp_config={"version": 2}``).

Under ``fully_shard`` every parameter becomes a ``DTensor`` split along its first dimension, and each rank holds
one chunk (``weight.to_local()``). FSDP2 wraps modules in place, so module and parameter names do not change. What
that means for pruning:

* **Masks stay whole.** They are computed from the gathered weights (:func:`full`), so every rank chooses the same
  ones, and a checkpoint's mask file holds whole matrices that load into any number of processes. The mask applier
  keeps each rank's chunk of a mask (:func:`shard_like`) and zeroes the same chunk of the weight (:func:`local_part`)
  after every optimizer step: no communication.
* **Statistics reduce over ranks.** ``int()`` of a sum over a sharded weight is this rank's share only, so counts go
  through :func:`full` too.
* **Structure is cut before sharding.** Surgery replaces parameters, and FSDP's shards, hooks and the optimizer all
  refer to the old ones. The one-shot structural event (``schedule="oneshot"`` at step 0) runs on the unwrapped
  model before ``Trainer.train`` shards it (:meth:`~hf_prune.training.trainer.PruningMixin.train`); a schedule
  with structural events later in training is refused before training starts (:func:`check_backend`).
* **DeepSpeed** ZeRO flattens parameters into its own partitions, which masks and heads cannot address per module:
  refused whenever anything is pruned, naming FSDP as the sharded route.

The teacher of distillation is an ordinary (unsharded) module on each rank's device; only the student is sharded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import KEEP_TARGETS, PruningConfig


def _dtensor_type() -> type | None:
    """``DTensor``, or ``None`` where this torch build has no distributed support."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a ``DTensor`` (a parameter of a module under ``fully_shard``)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from all ranks when sharded (a collective: every rank must call it), else as is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's chunk of a sharded tensor (sharing its storage, so in-place writes stick), else the tensor."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's chunk of the whole ``tensor``, cut the way ``like`` is sharded, on the device of ``like``'s chunk.

    Every rank holds the same whole ``tensor`` (masks are computed from gathered weights), so each takes its own
    chunk without communication (``src_data_rank=None``); ``distribute_tensor`` splits exactly as ``fully_shard``
    does, uneven last chunks and multi-dimensional meshes included.
    """
    if not is_sharded(like):
        return tensor.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    chunk = distribute_tensor(tensor, like.device_mesh, like.placements, src_data_rank=None).to_local()
    return chunk.to(local_part(like).device)  # a CPU-offloaded shard lives on the host, its mesh on the GPU


def reshard(model: nn.Module) -> None:
    """Put every ``fully_shard`` module of ``model`` back in its sharded state (no communication).

    After a forward without backward (calibration statistics) FSDP leaves the root's parameters unsharded, and
    ``module.weight`` is then a temporary full copy: writes to it are lost. The optimizer steps the sharded ones.
    """
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# ---- what can be pruned under which backend ------------------------------------------------------------------
def _backend(args: Any, trainer: Any = None) -> str | None:
    if getattr(args, "deepspeed", None) or getattr(trainer, "is_deepspeed_enabled", False):
        return "DeepSpeed"
    if getattr(args, "fsdp", None) or getattr(trainer, "is_fsdp_enabled", False):
        return "FSDP"
    return None


def fsdp_version(args: Any, trainer: Any = None) -> int:
    """The FSDP version the trainer's accelerator runs (else ``fsdp_config["version"]``; transformers' default 2)."""
    state = getattr(getattr(trainer, "accelerator", None), "state", None)
    version = getattr(getattr(state, "fsdp_plugin", None), "fsdp_version", None)
    if version is None:
        version = (getattr(args, "fsdp_config", None) or {}).get("version", 2)
    return int(version)


def cuts_after_start(config: PruningConfig) -> bool:
    """Structural events at a step after 0: anything but a one-shot schedule starting when training starts."""
    starts_at_zero = not config.start_step and not config.start_epoch
    return config.structured and not (config.schedule == "oneshot" and starts_at_zero)


def _structure_fields(config: PruningConfig) -> str:
    fields = [k for k in ("heads", "ffn", *KEEP_TARGETS) if getattr(config, k)]
    return ", ".join(f"{k}={getattr(config, k)}" for k in fields)


def check_backend(args: Any, config: PruningConfig, trainer: Any = None) -> None:
    """Refuse, before training starts, what cannot be pruned under the trainer's sharding backend (see module doc).

    ``args`` is a ``TrainingArguments`` (or anything with its ``deepspeed``/``fsdp``/``fsdp_config`` attributes);
    ``trainer``, when given, tells from its accelerator what actually runs. Nothing to prune: every backend is fine.
    """
    backend = _backend(args, trainer)
    if backend is None or not (config.structured or config.effective_sparsity > 0):
        return
    if backend == "DeepSpeed":
        raise ValueError(
            "hf_prune cannot prune under DeepSpeed: ZeRO flattens and partitions parameters, so heads, neurons and "
            "weight masks cannot be addressed per module. For sharded training use FSDP version 2 "
            "(TrainingArguments(fsdp=True, fsdp_config={'version': 2})); otherwise DDP (plain `accelerate "
            "launch`/`torchrun`) or one device."
        )
    version = fsdp_version(args, trainer)
    if version != 2:
        raise ValueError(
            f"hf_prune prunes under FSDP version 2 only, but fsdp_config version={version}: FSDP1 flattens "
            "parameters, which masks and heads cannot address; set fsdp_config={'version': 2} (the default)"
        )
    if cuts_after_start(config):
        raise ValueError(
            f"hf_prune cannot prune structure under FSDP after training starts: {_structure_fields(config)} with "
            f"schedule={config.schedule!r}, start_step={config.start_step}, start_epoch={config.start_epoch} "
            "places structural events at later steps, and resizing sharded parameters would invalidate FSDP's "
            "shards and the optimizer. Under FSDP structure is cut once, before the model is sharded: use "
            "schedule='oneshot' with start_step/start_epoch unset or 0 (PruningTrainer cuts before sharding), or "
            "prune first with hf_prune.prune(model, PruningConfig(...)) and train the pruned model with a config "
            "without heads/ffn/target_* (weight sparsity may follow any schedule under FSDP)"
        )
    if config.structured and not callable(getattr(trainer, "cut_before_sharding", None)):
        raise ValueError(
            f"hf_prune cuts structure ({_structure_fields(config)}) under FSDP only through PruningTrainer or "
            "PruningMixin, which cut it before Trainer.train shards the model; a PruningCallback on a stock Trainer "
            "first sees the model sharded. Use PruningTrainer, or prune first with hf_prune.prune(model, "
            "PruningConfig(...)) and train the pruned model"
        )
    if config.structured and getattr(trainer, "model_init", None) is not None:
        raise ValueError(
            "hf_prune cannot cut structure under FSDP with model_init: the structure is cut before Trainer.train "
            "shards the model, and model_init would re-create the dense model after that; pass model= instead"
        )
