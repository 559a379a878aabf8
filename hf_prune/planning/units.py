"""The units attention heads are allocated in, under grouped-query attention.

Query head ``h`` of a layer with ``K`` key/value heads and ``g = heads // K`` query heads per group reads key/value
head ``h // g``; the stock forward needs every group the same size. Two removals keep that:

* ``"group"``: a unit is one whole group, its ``g`` query heads and its key/value head (``K`` units per layer). It
  also shrinks ``k_proj``/``v_proj`` and the KV cache.
* ``"query"``: a unit is one query head from *every* group, ``K`` heads (``g`` units per layer); the key/value heads
  stay. Small modern decoders have 1-3 key/value heads (SmolLM2-135M: 3 groups of 3, Gemma-3-1B: 1 group of 4), so
  whole groups leave almost nothing to choose from (a single group cannot be removed at all without emptying the
  layer's attention); removing queries inside the groups can.

``"auto"`` picks, from the dense model's head counts, the layout with more units (the finer choice), ``"query"`` on a
tie: SmolLM2 (3 x 3) and Gemma-3 (1 x 4) prune queries inside groups, Llama-3-8B (8 groups of 4) whole groups. The
choice is made once per model (from its original counts, recorded in ``config.hf_prune``), so iterative pruning keeps
one layout. Models without GQA (``g == 1``) have one head per unit either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..architectures import LayerShape, get_adapter
from ..config import HEAD_UNITS
from ..structure.state import STATE_KEY


def head_unit_mode(model: nn.Module, requested: str = "auto") -> str:
    """``"group"`` or ``"query"`` for ``model`` (see module docstring); ``requested`` other than auto is kept."""
    if requested not in HEAD_UNITS:
        raise ValueError(f"head_unit={requested!r} is invalid; allowed: {', '.join(HEAD_UNITS)}")
    if requested != "auto":
        return requested
    state = getattr(model.config, STATE_KEY, None)
    if state and state.get("original"):
        heads, kv = state["original"]["heads"], state["original"]["kv_heads"]
    else:
        adapter = get_adapter(model)
        heads, kv = adapter.num_heads(model.config), adapter.num_kv_heads(model.config)
    group = heads // kv if kv else 1
    return "query" if group > 1 and group >= kv else "group"


TOLERANCE = 0.005  # a keep-target is met when the kept cost is within this fraction of the budget


def round_multiple(n: float, multiple: int, size: int) -> int:
    """``n`` rounded to a multiple of ``multiple``, within ``[0, size]`` (a width below one multiple rounds to 1)."""
    # half-up (not Python's half-to-even): a tie keeps the larger width
    if multiple <= 1 or size < multiple:
        return max(0, min(size, math.floor(n + 0.5)))
    return max(0, min(size, multiple * math.floor(n / multiple + 0.5)))


def smallest_fitting_fraction(cost_at: Callable[[float], float], budget: float, steps: int = 40) -> float:
    """The smallest cut fraction in ``[0, 1]`` whose shapes cost at most ``budget`` (bisection to ``2**-steps``);
    ``cost_at`` falls as the fraction grows. 1 when even the whole cut does not fit."""
    low, high = 0.0, 1.0
    for _ in range(steps):
        mid = (low + high) / 2
        if cost_at(mid) > budget:
            low = mid
        else:
            high = mid
    return high


def unit_norm(t: torch.Tensor) -> torch.Tensor:
    """``t`` divided by its L2 norm (per-layer normalisation before scores compete across layers)."""
    norm = t.float().norm()
    return t.float() / norm if norm > 0 else t.float()


def kept_score(scores: torch.Tensor) -> torch.Tensor:
    """``out[k]`` = total score of the ``k`` best entries (``out[0] = 0``)."""
    ordered = torch.sort(scores.double(), descending=True).values
    return torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(ordered, 0)])


@dataclass(frozen=True)
class HeadUnits:
    """How one layout (``mode``) turns head scores and unit counts into shapes and head removals."""

    mode: str = "group"

    def count(self, shape: LayerShape) -> int:
        """Units a layer of ``shape`` has (or keeps)."""
        if self.mode == "query":
            return shape.heads // shape.kv_heads if shape.kv_heads else 0
        return shape.kv_heads

    def heads_per_unit(self, shape: LayerShape) -> int:
        if not shape.kv_heads:
            return 0
        return shape.kv_heads if self.mode == "query" else shape.heads // shape.kv_heads

    def shape(self, layer: LayerShape, units: int, ffn: int) -> LayerShape:
        """The shape of ``layer`` keeping ``units`` head units and ``ffn`` neurons."""
        units = max(0, min(units, self.count(layer)))
        if self.mode == "query":
            return LayerShape(units * layer.kv_heads, layer.kv_heads if units else 0, ffn)
        return LayerShape(units * (layer.heads // layer.kv_heads if layer.kv_heads else 0), units, ffn)

    def unit_scores(self, layer: LayerShape, head_scores: torch.Tensor) -> torch.Tensor:
        """Score of each unit, in descending order for ``"query"`` (unit ``j``: the ``j``-th best head of every
        group) and in group order for ``"group"`` (a group's summed query-head scores)."""
        if not layer.kv_heads:
            return torch.zeros(0)
        grouped = head_scores.detach().float().cpu().reshape(layer.kv_heads, -1)
        if self.mode == "query":
            return torch.sort(grouped, dim=1, descending=True).values.sum(0)
        return grouped.sum(1)

    def removed_heads(self, layer: LayerShape, head_scores: torch.Tensor, units: int) -> list[int]:
        """Query heads to remove so that ``units`` of the best units stay."""
        if not layer.kv_heads:
            return []
        group = layer.heads // layer.kv_heads
        grouped = head_scores.detach().float().cpu().reshape(layer.kv_heads, group)
        if self.mode == "query":
            order = torch.argsort(grouped, dim=1, descending=True)  # each group keeps its best ``units`` heads
            return sorted(g * group + int(h) for g in range(layer.kv_heads) for h in order[g, units:])
        keep = set(torch.argsort(grouped.sum(1), descending=True)[:units].tolist())
        return [h for g in range(layer.kv_heads) if g not in keep for h in range(g * group, (g + 1) * group)]
