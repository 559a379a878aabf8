"""Importance criteria: pure functions from a model (and calibration data) to scores.

Every structured criterion returns :class:`Scores`: one 1-D tensor per layer for attention heads (indexed by
query head) and one for FFN neurons. Higher means more important. Nothing here modifies the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .architectures import ArchAdapter, get_adapter


@dataclass
class Scores:
    """Per-layer importance of heads (by query head) and FFN neurons."""

    heads: list[torch.Tensor]
    ffn: list[torch.Tensor]
    criterion: str = ""


def feature_sq_norms(module: nn.Module, side: str) -> torch.Tensor:
    """Sum of squared weights per output (``side="out"``) or input feature of a Linear / Conv1D."""
    w = module.weight.detach().float()
    if not isinstance(module, nn.Linear):  # Conv1D stores (in, out)
        w = w.t()
    return w.pow(2).sum(dim=1 if side == "out" else 0)


def _per_head(values: torch.Tensor, n_heads: int, parts: int) -> torch.Tensor:
    """Sum feature values into heads; fused projections (``parts`` blocks) add their blocks together."""
    values = values.reshape(parts, n_heads, -1) if parts > 1 else values.reshape(1, n_heads, -1)
    return values.sum(dim=(0, 2))


def magnitude_scores(model: nn.Module) -> Scores:
    """L2 norm of every weight a head / neuron owns (q, k, v rows and o columns; FFN rows and columns).

    Needs no data. Under grouped-query attention the key/value weights of a group count towards each of
    its query heads, so heads of one group compare fairly with heads of another.
    """
    adapter = get_adapter(model)
    heads, ffn = [], []
    for i, block in enumerate(adapter.layers(model)):
        shape = adapter.layer_shape(model, i)
        head_score = torch.zeros(shape.heads)
        if shape.heads:
            group = shape.heads // shape.kv_heads
            for proj in adapter.attention_projs:
                sq = feature_sq_norms(block.get_submodule(proj.path), proj.side)
                if proj.heads == "kv":
                    head_score += _per_head(sq, shape.kv_heads, proj.parts).repeat_interleave(group)
                else:
                    head_score += _per_head(sq, shape.heads, proj.parts)
        heads.append(head_score.sqrt())
        neuron_score = torch.zeros(shape.ffn)
        for proj in adapter.ffn_projs:
            neuron_score += feature_sq_norms(block.get_submodule(proj.path), proj.side)
        ffn.append(neuron_score.sqrt())
    return Scores(heads=heads, ffn=ffn, criterion="magnitude")


def random_scores(model: nn.Module, seed: int = 0) -> Scores:
    """Seeded random scores: the control every criterion is compared to."""
    adapter: ArchAdapter = get_adapter(model)
    g = torch.Generator().manual_seed(seed)
    shapes = adapter.layer_shapes(model)
    return Scores(
        heads=[torch.rand(s.heads, generator=g) for s in shapes],
        ffn=[torch.rand(s.ffn, generator=g) for s in shapes],
        criterion="random",
    )
