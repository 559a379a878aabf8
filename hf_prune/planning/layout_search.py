"""Allocation under a layout: head and FFN counts restricted to shapes a serving engine runs.

``PruningConfig.layout`` (:mod:`hf_prune.structure.layout`) constrains what :func:`~hf_prune.planning.allocate.allocate`
may choose: ``"servable"`` keeps the same query-head count in every block that still has attention (FFN widths
stay free per block, allocated as in the free layout); ``"uniform"`` gives every block one shape. Which heads and
which neurons go is still decided per block by the scores; only the counts are tied.

Keep-targets search the common head count: for each count the blocks can all reach, the FFN widths fill the rest of
the budget (free per block, or one width for all), and the split keeping the most importance wins when the scores
share the loss's units (taylor/fisher, global scope); otherwise heads and FFN lose the same fraction, as in the free
layout's :meth:`~hf_prune.planning.allocate._Allocator.fraction_search`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..architectures import LayerShape
from .units import TOLERANCE, kept_score, smallest_fitting_fraction

if TYPE_CHECKING:  # allocate.py imports this module
    from .allocate import _Allocator


class LayoutSearch:
    """Head-count candidates and FFN fills for one allocator under ``layout`` (``"servable"`` or ``"uniform"``)."""

    def __init__(self, alloc: _Allocator, layout: str):
        self.alloc, self.layout = alloc, layout
        shapes, units = alloc.shapes, alloc.units
        self.attention = [i for i, s in enumerate(shapes) if units.count(s) > 0]
        if layout == "uniform":
            gone = [i for i, s in enumerate(shapes) if units.count(s) == 0 or s.ffn == 0]
            if gone:
                raise ValueError(
                    f"layout='uniform' needs every block to keep attention and MLP; blocks {gone} have lost one. "
                    "Use layout='servable' for this model"
                )
        # the shapes (query heads, key/value heads) every attention block can reach, and the units that give them
        reach: list[dict[tuple[int, int], int]] = []
        for i in self.attention:
            s = shapes[i]
            options = {}
            for u in range(alloc.min_units[i], units.count(s) + 1):
                shape = units.shape(s, u, 0)
                options[(shape.heads, shape.kv_heads) if layout == "uniform" else (shape.heads, 0)] = u
            reach.append(options)
        common = set.intersection(*(set(r) for r in reach)) if reach else {(0, 0)}
        if not common:
            raise ValueError(
                f"layout={layout!r}: the blocks' head counts {[shapes[i].heads for i in self.attention]} share no "
                f"reachable count (head_unit={units.mode!r}, min_heads_per_layer={alloc.config.min_heads_per_layer})"
            )
        self.candidates = sorted(common)  # ascending head counts
        self.reach = reach
        self.ffn_max = min(s.ffn for s in shapes) if layout == "uniform" else None

    def units_for(self, candidate: tuple[int, int]) -> list[int]:
        """Kept head units per block for one common head count."""
        out = [0] * len(self.alloc.shapes)
        for i, options in zip(self.attention, self.reach, strict=True):
            out[i] = options[candidate]
        return out

    def nearest(self, heads: float) -> tuple[int, int]:
        """The candidate whose head count is nearest ``heads`` (ties: more heads)."""
        return min(self.candidates, key=lambda c: (abs(c[0] - heads), -c[0]))

    def widths(self) -> list[int]:
        """Uniform FFN widths to choose from: multiples of ``ffn_multiple`` and the full width, never 0 (a stock
        config cannot say "no MLP", so every uniform block keeps at least one step)."""
        assert self.ffn_max is not None
        step = max(1, self.alloc.config.ffn_multiple)
        return sorted(set(range(step, self.ffn_max, step)) | {self.ffn_max})

    # ---- FFN fills ----------------------------------------------------------------------------------------
    def fill(self, units: list[int], budget: float, target: str, neurons: int | None = None) -> list[int]:
        """FFN widths for ``units`` meeting ``budget``: uniform, the widest single width within it; servable,
        ``neurons`` (default: what the budget buys at the linear neuron cost) allocated as in the free layout, then
        adjusted to the budget."""
        alloc = self.alloc
        if self.layout == "uniform":
            fits = [
                w for w in self.widths() if alloc.total_cost(units, self._same(w), target) <= budget * (1 + TOLERANCE)
            ]
            return self._same(max(fits) if fits else self.widths()[0])
        if neurons is None:
            head_part = alloc.total_cost(units, [0] * len(units), target)
            neurons = round(max(0.0, budget - head_part) / alloc.cost(LayerShape(0, 0, 1), target))
        return alloc.adjust_ffn(units, alloc.ffn_by_total(neurons), budget, target)

    def _same(self, width: int) -> list[int]:
        return [width] * len(self.alloc.shapes)

    def value(self, units: list[int], ffn: list[int]) -> float:
        """Total kept importance (raw scores: the loss's units under taylor/fisher)."""
        alloc = self.alloc
        total = 0.0
        for i in range(len(alloc.shapes)):
            total += float(kept_score(alloc.unit_scores[i])[units[i]]) + float(kept_score(alloc.ffn_scores[i])[ffn[i]])
        return total

    # ---- searches -----------------------------------------------------------------------------------------
    def joint(self, budget: float, target: str) -> tuple[list[int], list[int]]:
        """Most kept importance over the common head counts, each filled with FFN to the budget."""
        best = None
        for candidate in self.candidates:
            units = self.units_for(candidate)
            if self.alloc.total_cost(units, [0] * len(units), target) > budget * (1 + TOLERANCE):
                continue
            ffn = self.fill(units, budget, target, self._best_neurons(units, budget, target))
            cost = self.alloc.total_cost(units, ffn, target)
            key = (abs(cost - budget) <= TOLERANCE * budget, self.value(units, ffn))
            if best is None or key > best[0]:
                best = (key, units, ffn)
        if best is None:  # even the fewest heads exceed the budget: fewest heads, the least FFN the layout allows
            units = self.units_for(self.candidates[0])
            return units, self._same(self.widths()[0]) if self.layout == "uniform" else [0] * len(units)
        return best[1], best[2]

    def _best_neurons(self, units: list[int], budget: float, target: str) -> int | None:
        """Servable under loss-unit scores: the best neurons across blocks by raw score (as the free layout's
        joint search), counted at the linear neuron cost; uniform widths need none."""
        if self.layout == "uniform":
            return None
        head_part = self.alloc.total_cost(units, [0] * len(units), target)
        return round(max(0.0, budget - head_part) / self.alloc.cost(LayerShape(0, 0, 1), target))

    def fraction(self, budget: float, target: str) -> tuple[list[int], list[int]]:
        """Heads and FFN lose the same fraction, the smallest meeting ``budget`` (bisection), FFN absorbing the rest."""
        alloc = self.alloc
        full_heads = max(c[0] for c in self.candidates)
        total_ffn = sum(s.ffn for s in alloc.shapes)

        def at(f: float) -> tuple[list[int], list[int]]:
            units = self.units_for(self.nearest((1 - f) * full_heads))
            if self.layout == "uniform":
                return units, self._same(_round_width(self, (1 - f) * (self.ffn_max or 0)))
            return units, alloc.ffn_by_total(round((1 - f) * total_ffn))

        units, ffn = at(smallest_fitting_fraction(lambda f: alloc.total_cost(*at(f), target), budget))
        return units, self.fill(units, budget, target, sum(ffn))

    def fractions(self, heads: float, ffn: float) -> tuple[list[int], list[int]]:
        """``heads`` / ``ffn`` fractions removed: one head count for all blocks, FFN as the layout allows."""
        alloc = self.alloc
        full_heads = max(c[0] for c in self.candidates)
        units = self.units_for(self.nearest((1 - heads) * full_heads))
        if self.layout == "uniform":
            return units, self._same(_round_width(self, (1 - ffn) * (self.ffn_max or 0)))
        sizes = [s.ffn for s in alloc.shapes]
        return units, alloc.ffn_by_total(round((1 - ffn) * sum(sizes))) if ffn else sizes


def _round_width(search: LayoutSearch, width: float) -> int:
    return min(search.widths(), key=lambda w: (abs(w - width), -w))


def layout_allocation(
    alloc: _Allocator, layout: str, target: str | None, budget: float, loss_scores: bool
) -> tuple[list[int], list[int]]:
    """Kept head units and FFN widths per block under ``layout`` (see module docstring)."""
    search = LayoutSearch(alloc, layout)
    if target is None:
        return search.fractions(alloc.config.heads, alloc.config.ffn)
    if loss_scores:
        return search.joint(budget, target)
    return search.fraction(budget, target)
