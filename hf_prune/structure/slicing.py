"""Low-level slicing: keep some features of one projection or parameter, in place, and tell whoever holds
per-parameter state (an optimizer's Adam moments) which indices were kept.

Split from :mod:`hf_prune.structure.surgery`, which decides *what* to cut per layer and calls these to do it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..architectures.base import Param, unit_feature_index


@dataclass(frozen=True)
class ParamSlice:
    """One parameter replaced by surgery: ``new = old.index_select(dim, index)``.

    Lets whoever holds per-parameter state (an optimizer's Adam moments, EMA copies) slice it with the same indices
    instead of dropping it (see :func:`record_slices` and :func:`hf_prune.training.optim.remap_optimizer`).
    """

    old: nn.Parameter
    new: nn.Parameter
    dim: int
    index: torch.Tensor


_RECORDERS: list[list[ParamSlice]] = []


@contextlib.contextmanager
def record_slices() -> Iterator[list[ParamSlice]]:
    """Collect a :class:`ParamSlice` for every parameter surgery replaces inside the ``with`` block."""
    log: list[ParamSlice] = []
    _RECORDERS.append(log)
    try:
        yield log
    finally:
        _RECORDERS.remove(log)


def _replace(module: nn.Module, name: str, dim: int, index: torch.Tensor) -> None:
    old = getattr(module, name)
    new = nn.Parameter(old.detach().index_select(dim, index).clone(), requires_grad=old.requires_grad)
    setattr(module, name, new)
    for log in _RECORDERS:
        log.append(ParamSlice(old, new, dim, index))


def slice_projection(module: nn.Module, index: torch.Tensor, side: str) -> None:
    """Keep only the features ``index`` of ``module`` on ``side`` (``"out"`` or ``"in"``), in place.

    Works for ``nn.Linear`` (weight ``(out, in)``) and transformers' ``Conv1D`` (weight ``(in, out)``).
    The bias follows output features. New ``nn.Parameter`` objects replace the old ones, so any optimizer
    holding the old tensors must be told (the PruningTrainer slices their state, see :func:`record_slices`).
    """
    if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
        _slice_lora(module, index, side)
        return
    is_linear = isinstance(module, nn.Linear)
    if not is_linear and not isinstance(module, Conv1D):
        raise TypeError(f"hf_prune cannot slice {type(module).__name__}; expected nn.Linear or Conv1D")
    weight = module.weight
    index = index.to(device=weight.device, dtype=torch.long)
    if side == "out":
        dim = 0 if is_linear else 1
    elif side == "in":
        dim = 1 if is_linear else 0
    else:
        raise ValueError(f"side must be 'out' or 'in', got {side!r}")
    with torch.no_grad():
        _replace(module, "weight", dim, index)
        if side == "out" and getattr(module, "bias", None) is not None:
            _replace(module, "bias", 0, index)
    n = int(index.numel())
    if is_linear:
        if side == "out":
            module.out_features = n
        else:
            module.in_features = n
    elif side == "out":
        module.nf = n
    else:
        module.nx = n


def _slice_lora(layer: nn.Module, index: torch.Tensor, side: str) -> None:
    """Slice a peft LoRA layer: its base projection, each adapter's ``lora_B`` rows (output side) or ``lora_A``
    columns (input side), and its sparsity keep-mask, all with the same indices, so what each kept feature computes is
    unchanged (see :mod:`hf_prune.training.lora` for why adapters are sliced rather than merged first)."""
    base = layer.base_layer
    slice_projection(base, index, side)
    index = index.to(device=base.weight.device, dtype=torch.long)
    n = int(index.numel())
    with torch.no_grad():
        for adapter in layer.lora_A:
            if side == "out":
                lora_b = layer.lora_B[adapter]
                _replace(lora_b, "weight", 0, index.to(lora_b.weight.device))
                if getattr(lora_b, "bias", None) is not None:
                    _replace(lora_b, "bias", 0, index.to(lora_b.weight.device))
                lora_b.out_features = n
            else:
                lora_a = layer.lora_A[adapter]
                _replace(lora_a, "weight", 1, index.to(lora_a.weight.device))
                lora_a.in_features = n
    keep = getattr(layer, "_hf_prune_keep", None)  # hf_prune.compat.KEEP_MASK_ATTR: the delta's sparsity mask
    if keep is not None:
        dim = (0 if side == "out" else 1) if isinstance(base, nn.Linear) else (1 if side == "out" else 0)
        layer._hf_prune_keep = keep.index_select(dim, index.to(keep.device))
    if side == "out":
        layer.out_features = n
    else:
        layer.in_features = n


def slice_params(
    block: nn.Module,
    params: Sequence[Param],
    keep: Mapping[str, Sequence[int]],
    counts: Mapping[str, int],
    width: Mapping[str, int],
) -> None:
    for param in params:
        owner_path, _, name = param.path.rpartition(".")
        try:
            owner = block.get_submodule(owner_path)
            tensor = getattr(owner, name)
        except AttributeError:
            if param.optional:
                continue
            raise
        w = {**width, param.unit: param.width} if param.width is not None else width
        index = unit_feature_index((param.unit,), keep, counts, w)
        with torch.no_grad():
            _replace(owner, name, param.dim, index.to(tensor.device))
