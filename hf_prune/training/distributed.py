"""The one place hf_prune talks to other processes: sums and averages that every backend accepts.

Every statistic a pruning decision depends on (importance scores, activation norms, Gram matrices, latency tables) is
summed over data-parallel processes so all ranks cut alike. NCCL, the backend accelerate uses on GPUs, reduces CUDA
tensors only; gloo takes CPU tensors. Statistics already live on the model's device, but a caller may hold a CPU
tensor (a table timed on the host), so :func:`all_reduce_sum` moves a tensor to the device the backend needs and back.
Nothing here is private to accelerate: ``torch.distributed`` is the process group accelerate itself set up.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def is_distributed() -> bool:
    """True inside an initialised process group with more than one process."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1


def world_size() -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size()


def _backend_device(tensor: torch.Tensor) -> torch.device:
    """Where ``tensor`` must be for the current backend: NCCL needs the process's CUDA device."""
    backend = str(torch.distributed.get_backend()).lower()
    if "nccl" in backend and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over processes; returns a new tensor on ``tensor``'s device (the input is not modified)."""
    if not is_distributed():
        return tensor.clone()
    work = tensor.detach().to(_backend_device(tensor), copy=True)
    torch.distributed.all_reduce(work, op=torch.distributed.ReduceOp.SUM)
    return work.to(tensor.device)


def all_reduce_sum_many(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Sum each tensor over processes in one collective (flattened and concatenated), preserving devices and shapes."""
    if not is_distributed() or not tensors:
        return [t.clone() for t in tensors]
    dtype = torch.promote_types(torch.float32, tensors[0].dtype)
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    device = _backend_device(tensors[0])
    flat = torch.cat([t.detach().reshape(-1).to(device=device, dtype=dtype) for t in tensors])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    out, offset = [], 0
    for t in tensors:
        n = t.numel()
        out.append(flat[offset : offset + n].reshape(t.shape).to(device=t.device, dtype=t.dtype))
        offset += n
    return out
