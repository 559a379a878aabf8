"""Allocation: importance scores + targets -> a :class:`~hf_prune.planning.plan.PruningPlan`.

Heads are allocated in *units* (:mod:`hf_prune.planning.units`): one head without grouped-query attention; under GQA
either one key/value group with all its query heads, or one query head from every group (``config.head_unit``). FFN
neurons are allocated per layer and each layer's kept width is rounded to ``ffn_multiple``.

Targets:
* ``heads`` / ``ffn`` fractions: that fraction of units is removed, in every layer (``scope="layer"``) or across
  layers by normalised score (``scope="global"``; each layer's scores are divided by their L2 norm, as Michel et al.
  do, so layers with larger activations do not dominate).
* ``target_flops`` / ``target_params`` (fraction to keep): with taylor/fisher scores and global scope, heads and
  neurons share one currency (the loss), so we search the number of kept head units and fill the rest of the budget
  with the best neurons, maximising total kept importance (the mask search of Kwon et al. 2022). Otherwise heads and
  FFN lose the same fraction and the FFN width absorbs head rounding. Either way a final pass adjusts FFN widths
  until the kept cost is within 0.5% of the target.
* ``target_latency`` (fraction of the measured latency to keep): costs come from a
  :class:`~hf_prune.planning.latency_table.LatencyTable`, which is not linear in width, so taylor/fisher global
  scores go through a Lagrangian search (:meth:`_Allocator.latency_search`) and other criteria cut heads and FFN by
  the same fraction, bisected to the budget. Timing the chosen shapes and correcting the budget is orchestrated
  outside (:mod:`hf_prune.planning.latency_search`): allocation itself never runs the model.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.utils import logging

from ..architectures import LayerShape, get_adapter
from ..config import GRADIENT_CRITERIA, PruningConfig
from ..measure import layer_flops, layer_params
from ..scoring.criteria import Scores
from ..structure.layout import check_layout
from .latency_table import LatencyTable
from .layout_search import layout_allocation
from .plan import PruningPlan
from .units import (
    TOLERANCE,
    HeadUnits,
    head_unit_mode,
    kept_score,
    round_multiple,
    smallest_fitting_fraction,
    unit_norm,
)

logger = logging.get_logger(__name__)


class _Allocator:
    def __init__(self, model: nn.Module, scores: Scores, config: PruningConfig, latency: LatencyTable | None = None):
        self.config = config
        self.latency = latency
        adapter = get_adapter(model)
        self.shapes: list[LayerShape] = adapter.layer_shapes(model)
        self.hidden = adapter.hidden_size(model.config)
        self.head_dim = adapter.head_dim(model.config)
        self.ffn_in_mats = adapter.ffn_in_mats
        if len(scores.heads) != len(self.shapes) or len(scores.ffn) != len(self.shapes):
            raise ValueError(f"scores cover {len(scores.heads)} layers but the model has {len(self.shapes)}")
        self.units = HeadUnits(head_unit_mode(model, config.head_unit))
        for i, s in enumerate(self.shapes):
            if scores.heads[i].numel() != s.heads or scores.ffn[i].numel() != s.ffn:
                raise ValueError(f"layer {i}: score sizes do not match the model's heads/FFN")
        # Scores live on the model's device; allocation is a small sequential search over plain numbers (CPU).
        self.head_scores = [h.detach().float().cpu() for h in scores.heads]
        self.unit_scores = [self.units.unit_scores(s, h) for s, h in zip(self.shapes, self.head_scores, strict=True)]
        self.ffn_scores = [f.detach().float().cpu() for f in scores.ffn]
        self.min_units = min_units(self.shapes, self.units, config)

    # ---- costs ------------------------------------------------------------------------------------------
    def cost(self, shape: LayerShape, target: str) -> float:
        if target == "flops":
            return layer_flops(shape, self.hidden, self.head_dim, self.ffn_in_mats, self.config.seq_len)
        if target == "latency":
            if self.latency is None:
                raise ValueError("a latency target needs a LatencyTable")
            return self.latency.block_ms(shape)
        return layer_params(shape, self.hidden, self.head_dim, self.ffn_in_mats)

    def total_cost(self, units: list[int], ffn: list[int], target: str) -> float:
        return sum(
            self.cost(self.units.shape(s, u, f), target) for s, u, f in zip(self.shapes, units, ffn, strict=True)
        )

    def full_units(self) -> list[int]:
        return [self.units.count(s) for s in self.shapes]

    def unit_cost(self, i: int, target: str) -> float:
        """Cost of one head unit of layer ``i``. A query-head unit shares the layer's key/value projections with
        the others, so it carries its share of them (the average over the layer's units)."""
        s = self.shapes[i]
        if self.units.mode == "query":
            count = self.units.count(s)
            full, none = self.cost(self.units.shape(s, count, 0), target), self.cost(LayerShape(0, 0, 0), target)
            return (full - none) / count if count else 0.0
        return self.cost(self.units.shape(s, 1, 0), target)

    # ---- head units -------------------------------------------------------------------------------------
    def heads_by_fraction(self, fraction: float) -> list[int]:
        """Kept unit count per layer."""
        units = self.full_units()
        if self.config.scope == "layer":
            return [max(self.min_units[i], n - round(fraction * n)) if n else 0 for i, n in enumerate(units)]
        n_remove = round(fraction * sum(units))
        return self._global_keep_units(sum(units) - n_remove)

    def _global_keep_units(self, n_keep: int) -> list[int]:
        kept = list(self.min_units)
        candidates = []
        for i, s in enumerate(self.unit_scores):
            norm = unit_norm(s)
            order = torch.argsort(norm, descending=True).tolist()
            candidates += [(float(norm[j]), i) for j in order[self.min_units[i] :]]
        candidates.sort(key=lambda c: -c[0])
        for _, i in candidates[: max(0, n_keep - sum(kept))]:
            kept[i] += 1
        return kept

    # ---- FFN --------------------------------------------------------------------------------------------
    def ffn_by_total(self, n_keep: int) -> list[int]:
        sizes = [s.ffn for s in self.shapes]
        total = sum(sizes)
        n_keep = max(0, min(total, n_keep))
        multiple = self.config.ffn_multiple
        if self.config.scope == "layer" or total == 0:
            return [round_multiple(n_keep * size / total if total else 0, multiple, size) for size in sizes]
        normed = [unit_norm(s) for s in self.ffn_scores]
        flat = torch.cat(normed) if normed else torch.zeros(0)
        if n_keep == 0:
            return [0] * len(sizes)
        threshold = torch.topk(flat, n_keep).values[-1]
        counts = [int((s >= threshold).sum()) for s in normed]
        return [round_multiple(c, multiple, size) for c, size in zip(counts, sizes, strict=True)]

    def adjust_ffn(self, units: list[int], ffn: list[int], budget: float, target: str) -> list[int]:
        """Move FFN widths one multiple at a time until the kept cost is within tolerance of ``budget``."""
        ffn = list(ffn)
        step = max(1, self.config.ffn_multiple)
        sizes = [s.ffn for s in self.shapes]
        normed = [torch.sort(unit_norm(s), descending=True).values for s in self.ffn_scores]

        def marginal(i: int, keep: int) -> float:
            # importance of the next block of neurons to drop (keep > 0) or add
            if self.config.scope == "layer":
                return float(keep)  # layer scope: keep widths even, trim the widest first
            vals = normed[i]
            return float(vals[max(0, keep - step) : keep].sum()) if keep else 0.0

        for _ in range(10 * sum(sizes) // step + 10):
            cost = self.total_cost(units, ffn, target)
            if cost > budget * (1 + TOLERANCE):
                options = [i for i in range(len(ffn)) if ffn[i] > 0]
                if not options:
                    break
                key = (
                    (lambda i: -marginal(i, ffn[i]))
                    if self.config.scope == "layer"
                    else (lambda i: marginal(i, ffn[i]))
                )
                i = min(options, key=key)
                ffn[i] = max(0, ffn[i] - step)
            elif cost < budget * (1 - TOLERANCE):
                options = [i for i in range(len(ffn)) if ffn[i] < sizes[i]]
                if not options:
                    break
                if self.config.scope == "layer":
                    i = min(options, key=lambda i: ffn[i])
                else:
                    i = max(options, key=lambda i: float(normed[i][ffn[i] : ffn[i] + step].sum()))
                before, ffn[i] = ffn[i], min(sizes[i], ffn[i] + step)
                # a measured cost can jump by more than the tolerance at one step; never overshoot to get closer
                if self.total_cost(units, ffn, target) > budget * (1 + TOLERANCE):
                    ffn[i] = before
                    break
            else:
                break
        return ffn

    def joint_search(self, budget: float, target: str) -> tuple[list[int], list[int]]:
        """Kwon et al.: choose how many head units to keep, fill the remaining budget with the best neurons."""
        unit_cost = [self.unit_cost(i, target) for i in range(len(self.shapes))]
        neuron_cost = self.cost(LayerShape(0, 0, 1), target)
        # mandatory units (min heads) first, then all other units by raw score (mask scores share units)
        mandatory, optional = [], []
        for i, s in enumerate(self.unit_scores):
            order = torch.argsort(s, descending=True).tolist()
            mandatory += [(float(s[j]), i) for j in order[: self.min_units[i]]]
            optional += [(float(s[j]), i) for j in order[self.min_units[i] :]]
        optional.sort(key=lambda c: -c[0])
        ranked = mandatory + optional
        neuron_flat = torch.cat(self.ffn_scores) if self.ffn_scores else torch.zeros(0)
        neuron_sorted = torch.sort(neuron_flat, descending=True).values
        neuron_cum = torch.cat([torch.zeros(1), torch.cumsum(neuron_sorted.double(), 0)])
        best = None
        # running prefix sums (same additions in the same order as summing each prefix afresh, in O(H))
        head_score = sum(r[0] for r in ranked[: len(mandatory)])
        head_cost = sum(unit_cost[r[1]] for r in ranked[: len(mandatory)])
        for h in range(len(mandatory), len(ranked) + 1):
            if h > len(mandatory):
                head_score += ranked[h - 1][0]
                head_cost += unit_cost[ranked[h - 1][1]]
            remaining = budget - head_cost
            if remaining < 0:
                break
            n = min(neuron_flat.numel(), int(remaining // neuron_cost))
            # a split that cannot use the budget (all neurons kept, too few heads) would miss the target
            if head_cost + n * neuron_cost < budget * (1 - TOLERANCE) and h < len(ranked):
                continue
            value = head_score + float(neuron_cum[n])
            if best is None or value > best[0]:
                best = (value, h, n)
        if best is None:  # even the mandatory heads exceed the budget
            best = (0.0, len(mandatory), 0)
        _, h, n = best
        units = [0] * len(self.shapes)
        for _, i in ranked[:h]:
            units[i] += 1
        if n > 0:
            threshold = neuron_sorted[n - 1]
            counts = [int((s >= threshold).sum()) for s in self.ffn_scores]
        else:
            counts = [0] * len(self.shapes)
        ffn = [round_multiple(c, self.config.ffn_multiple, s.ffn) for c, s in zip(counts, self.shapes, strict=True)]
        return units, ffn

    def latency_search(self, budget: float) -> tuple[list[int], list[int]]:
        """Most kept importance under a measured-latency budget (taylor/fisher scores, global scope).

        Latency is not linear in width (see :mod:`hf_prune.planning.latency_table`), so the linear mask search above
        does not apply. The block cost is additive in its attention and FFN parts, so for a price ``mu`` every layer
        picks, independently, the head count and FFN width maximising ``kept score - mu * latency``; ``mu`` is
        bisected to the budget (Lagrangian relaxation of the knapsack), then the leftover budget is filled
        greedily by the best score per millisecond.
        """
        table = self.latency
        assert table is not None
        step = self.config.ffn_multiple
        unit_opts, ffn_opts = [], []  # per layer: [(kept, cumulative score, part latency)]
        for i, s in enumerate(self.shapes):
            cum = kept_score(self.unit_scores[i])
            units = range(self.min_units[i], self.units.count(s) + 1)
            unit_opts.append([(u, float(cum[u]), table.attention_ms(u)) for u in units])
            cum = kept_score(self.ffn_scores[i])
            widths = sorted(set(range(0, s.ffn, step)) | {s.ffn})
            ffn_opts.append([(n, float(cum[n]), table.ffn_part_ms(n)) for n in widths])
        fixed = len(self.shapes) * table.base_ms
        options = unit_opts + ffn_opts

        def pick(mu: float) -> list[int]:
            # index of the best option per part; ties keep more (the options are in ascending order)
            return [max(range(len(opts)), key=lambda j: (opts[j][1] - mu * opts[j][2], j)) for opts in options]

        def cost(choice: list[int]) -> float:
            return fixed + sum(opts[j][2] for opts, j in zip(options, choice, strict=True))

        low, high = 0.0, 1.0
        while cost(pick(high)) > budget and high < 1e30:
            low, high = high, high * 4
        for _ in range(60):
            mid = (low + high) / 2
            if cost(pick(mid)) > budget:
                low = mid
            else:
                high = mid
        choice = pick(high)
        spent = cost(choice)
        while True:  # greedy fill of what the relaxation left unused
            best, best_ratio = None, 0.0
            for p, (opts, j) in enumerate(zip(options, choice, strict=True)):
                if j + 1 >= len(opts):
                    continue
                gain, extra = opts[j + 1][1] - opts[j][1], opts[j + 1][2] - opts[j][2]
                if spent + extra > budget:
                    continue
                ratio = gain / extra if extra > 0 else float("inf")
                if best is None or ratio > best_ratio:
                    best, best_ratio = p, ratio
            if best is None:
                break
            spent += options[best][choice[best] + 1][2] - options[best][choice[best]][2]
            choice[best] += 1
        n = len(self.shapes)
        units = [unit_opts[i][choice[i]][0] for i in range(n)]
        ffn = [ffn_opts[i][choice[n + i]][0] for i in range(n)]
        return units, ffn

    def fraction_search(self, budget: float, target: str) -> tuple[list[int], list[int]]:
        """Heads and FFN lose the same fraction, the smallest that meets ``budget`` (bisection), then the FFN
        widths absorb what is left."""
        total_ffn = sum(s.ffn for s in self.shapes)

        def shapes_at(fraction: float) -> tuple[list[int], list[int]]:
            units = self.heads_by_fraction(fraction)
            return units, self.ffn_by_total(round((1 - fraction) * total_ffn))

        units, ffn = shapes_at(smallest_fitting_fraction(lambda f: self.total_cost(*shapes_at(f), target), budget))
        return units, self.adjust_ffn(units, ffn, budget, target)

    # ---- plan -------------------------------------------------------------------------------------------
    def to_plan(self, units: list[int], ffn: list[int]) -> PruningPlan:
        heads, neurons = {}, {}
        for i, s in enumerate(self.shapes):
            removed = self.units.removed_heads(s, self.head_scores[i], units[i])
            if removed:
                heads[i] = removed
            keep_n = set(torch.argsort(self.ffn_scores[i], descending=True)[: ffn[i]].tolist())
            removed_n = [j for j in range(s.ffn) if j not in keep_n]
            if removed_n:
                neurons[i] = removed_n
        return PruningPlan(heads=heads, ffn=neurons)

    def warn_unmet(self, units: list[int], ffn: list[int], meta: dict) -> None:
        """Say so when the plan misses what was asked (units too coarse, ``min_heads_per_layer``, nothing left)."""
        if "requested_keep" in meta:
            asked, got = meta["requested_keep"], meta["achieved_keep"]
            if abs(got - asked) > 2 * TOLERANCE * asked:
                logger.warning(
                    f"hf_prune: target_{meta['target']}={asked:g} not reached: the plan keeps {got:.3f} "
                    f"(head units of {sorted({self.units.heads_per_unit(s) for s in self.shapes})} heads, "
                    f"min_heads_per_layer={self.config.min_heads_per_layer}, ffn_multiple={self.config.ffn_multiple})"
                )
            return
        total_heads = sum(s.heads for s in self.shapes)
        kept_heads = sum(self.units.shape(s, u, 0).heads for s, u in zip(self.shapes, units, strict=True))
        total_ffn = sum(s.ffn for s in self.shapes)
        checks = (("heads", self.config.heads, total_heads, kept_heads), ("ffn", self.config.ffn, total_ffn, sum(ffn)))
        for name, asked, total, kept in checks:
            if not asked or not total:
                continue
            got = 1 - kept / total
            # rounding to whole units (heads) or to ffn_multiple (every layer) may miss by half a step
            if name == "heads":
                slack = max(self.units.heads_per_unit(s) for s in self.shapes) / (2 * total)
            else:
                slack = self.config.ffn_multiple * len(self.shapes) / (2 * total)
            if abs(got - asked) > slack + 1e-9:
                logger.warning(
                    f"hf_prune: {name}={asked:g} removes {got:.3f} of the {name} instead "
                    + (
                        f"(heads go in units of {sorted({self.units.heads_per_unit(s) for s in self.shapes})} "
                        f"(head_unit={self.units.mode!r}), min_heads_per_layer={self.config.min_heads_per_layer})"
                        if name == "heads"
                        else f"(ffn_multiple={self.config.ffn_multiple})"
                    )
                )


def min_units(shapes: list[LayerShape], units: HeadUnits, config: PruningConfig) -> list[int]:
    """Per layer, the fewest head units ``config.min_heads_per_layer`` allows (0 where a layer has none left)."""
    return [
        min(units.count(s), math.ceil(config.min_heads_per_layer / units.heads_per_unit(s)))
        if units.heads_per_unit(s)
        else 0
        for s in shapes
    ]


def latency_floor(model: nn.Module, config: PruningConfig, latency: LatencyTable) -> float:
    """The smallest fraction of ``model``'s latency width pruning can reach as ``latency`` prices it: every layer at
    its fewest allowed head units and no FFN neuron (embeddings, norms, residuals and per-layer overhead stay)."""
    shapes = get_adapter(model).layer_shapes(model)
    units = HeadUnits(head_unit_mode(model, config.head_unit))
    floor = [units.shape(s, u, 0) for s, u in zip(shapes, min_units(shapes, units, config), strict=True)]
    return latency.model_ms(floor) / latency.model_ms(shapes)


def allocate(
    model: nn.Module,
    scores: Scores,
    config: PruningConfig,
    latency: LatencyTable | None = None,
    warn: bool = True,
) -> PruningPlan:
    """Turn per-layer scores into a plan meeting ``config``'s targets (see module docstring).

    A pure function of the scores, the costs and the budget: ``model`` is only read for its current shapes.
    ``warn=False`` leaves a missed target to the caller to report (the latency search tries budgets it never
    promised the user).
    ``latency`` is the measured table ``config.target_latency`` is priced with (profile one with
    :func:`~hf_prune.planning.latency_table.profile_latency`); :func:`hf_prune.step.plan_structure` profiles it and
    checks the plan against the clock.
    """
    config = PruningConfig.coerce(config, "allocate(config=...)")
    target = config.keep_target
    if target == "latency" and latency is None:
        raise ValueError(
            "target_latency needs a LatencyTable: pass latency=profile_latency(model, ...) or use "
            "hf_prune.step.plan_structure, which profiles and verifies"
        )
    alloc = _Allocator(model, scores, config, latency)
    shapes = alloc.shapes
    full_units = alloc.full_units()
    full_ffn = [s.ffn for s in shapes]
    if target is not None:
        keep = getattr(config, f"target_{target}")
        budget = keep * alloc.total_cost(full_units, full_ffn, target)
        loss_scores = config.scope == "global" and scores.criterion in GRADIENT_CRITERIA
        if config.layout != "free":
            units, ffn = layout_allocation(alloc, config.layout, target, budget, loss_scores)
        elif target == "latency":
            units, ffn = alloc.latency_search(budget) if loss_scores else alloc.fraction_search(budget, "latency")
        elif loss_scores:
            units, ffn = alloc.joint_search(budget, target)
        else:
            units = alloc.heads_by_fraction(1 - keep)
            head_part = alloc.total_cost(units, [0] * len(shapes), target)
            neuron_cost = alloc.cost(LayerShape(0, 0, 1), target)
            ffn = alloc.ffn_by_total(round(max(0.0, budget - head_part) / neuron_cost))
        if target != "latency" and config.layout == "free":
            ffn = alloc.adjust_ffn(units, ffn, budget, target)
        achieved = alloc.total_cost(units, ffn, target) / alloc.total_cost(full_units, full_ffn, target)
        meta = {"target": target, "requested_keep": keep, "achieved_keep": achieved}
        if latency is not None and target == "latency":
            # what width pruning can reach at most: every layer at its fewest allowed units and no FFN neuron
            floor = alloc.total_cost(alloc.min_units, [0] * len(shapes), target)
            meta["latency_floor"] = floor / alloc.total_cost(full_units, full_ffn, target)
            meta["latency_table"] = latency.summary()
    elif config.layout != "free":
        units, ffn = layout_allocation(alloc, config.layout, None, 0.0, False)
        meta = {"heads": config.heads, "ffn": config.ffn}
    else:
        units = alloc.heads_by_fraction(config.heads) if config.heads else full_units
        ffn = alloc.ffn_by_total(round((1 - config.ffn) * sum(full_ffn))) if config.ffn else full_ffn
        meta = {"heads": config.heads, "ffn": config.ffn}
    if warn:
        alloc.warn_unmet(units, ffn, meta)
    plan = alloc.to_plan(units, ffn)
    plan.meta = {"criterion": scores.criterion, "scope": config.scope, "head_unit": alloc.units.mode, **meta}
    if config.layout != "free":
        plan.meta["layout"] = config.layout
        check_layout(plan.shapes_after(model), config.layout, "PruningConfig(layout=...)")
    return plan
