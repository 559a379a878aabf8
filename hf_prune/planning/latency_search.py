"""The latency search: allocate against the measured table, time the plan, correct the budget, repeat.

The table (:mod:`hf_prune.planning.latency_table`) predicts a plan's latency from uniform-shape sweeps, and mixed
per-layer shapes run at another speed than predicted, either way and by a machine-specific amount. So a latency
target is met by timing each allocated plan against the model itself (:func:`measure_keep`) and searching the
allocation budget (:func:`search_latency`) until the measured keep lands within :data:`LATENCY_AIM` of the target.
A target below what width pruning can reach at all is refused before any work (:func:`check_latency_reachable`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any

from torch import nn
from transformers.utils import logging

from ..architectures import LayerShape
from ..config import PruningConfig, check_int
from ..measure import compare_latency, measure_latency
from ..scoring.criteria import Scores
from ..structure.surgery import apply_layer_shapes
from ..utils import eval_mode, model_device
from .allocate import allocate, latency_floor
from .latency_table import LatencyTable, dummy_inputs, record_observations
from .plan import PruningPlan

logger = logging.get_logger(__name__)

LATENCY_TOLERANCE = 0.05  # the promise: the measured keep lands within 5% of target_latency, or a warning says why
# The search stops this close, not closer: the same plan re-timed in another process moves by about this much, so a
# search past it chases noise and spends the time budget.
LATENCY_AIM = 0.04
LATENCY_SEARCHES = 6
LATENCY_TIMINGS = 8  # searches plus re-timings of contradicting measurements


class LatencyTargetError(ValueError):
    """``target_latency`` is out of reach of width pruning on this machine at the timed input; raised before the
    model is changed.

    ``floor`` is the fraction of the model's latency the measured table puts every layer at its minimum at, and
    ``lowest`` the smallest ``target_latency`` accepted here, so a caller can re-aim from what this machine measured.
    """

    def __init__(self, message: str, floor: float = float("nan"), lowest: float = float("nan")) -> None:
        super().__init__(message)
        self.floor = floor
        self.lowest = lowest


def check_latency_reachable(model: nn.Module, config: PruningConfig, latency: LatencyTable) -> float:
    """The table's floor for ``model`` (see :func:`~hf_prune.planning.allocate.latency_floor`); raises
    :class:`LatencyTargetError` when it is more than ``LATENCY_TOLERANCE`` above ``config.target_latency``."""
    keep = config.target_latency
    floor = latency_floor(model, config, latency)
    if keep is not None and floor > keep * (1 + LATENCY_TOLERANCE):
        lowest = math.ceil(100 * floor / (1 + LATENCY_TOLERANCE)) / 100
        raise LatencyTargetError(
            f"target_latency={keep:g} is out of reach on {latency.device} at batch {latency.batch_size} x "
            f"{latency.seq_len}: with every layer at its minimum ({config.min_heads_per_layer} head(s), no FFN "
            f"neuron) the measured latency table still puts the model at {floor:.3f} of its latency (embeddings, "
            f"norms, residuals and per-layer overhead stay). Allowed: target_latency >= {lowest:.2f} here; or time "
            "a larger batch/sequence (latency_batch_size, seq_len), where width matters more; or remove whole "
            "blocks (layers=...), which removes their overhead too. The model was not changed.",
            floor=floor,
            lowest=lowest,
        )
    return floor


def measure_keep(
    model: nn.Module,
    shapes: list[LayerShape],
    batch_size: int,
    seq_len: int,
    repeats: int | None = None,
    seconds: float = 2.0,
    dense_ms: float | None = None,
) -> float:
    """Measured latency of ``model`` cut to ``shapes`` as a fraction of its own: a copy is cut and the two are timed
    alternately, one pass each in turn after one untimed pass each, so drift and other load hit both alike.

    Why alternate single passes: they agree with rounds of passes in a row (the benchmarks' way) within the timing
    noise and cost fewer untimed passes. ``repeats`` defaults to enough passes for about ``seconds`` of timing (a
    GPU's millisecond passes are noisy one by one), at least ``3 * seconds`` and at most ``15 * seconds``, sized from
    ``dense_ms`` (the dense model's latency, e.g. the table's) when given, else from one extra pass.
    """
    device = model_device(model)
    with eval_mode(model):
        work = apply_layer_shapes(copy.deepcopy(model), shapes)
        inputs = dummy_inputs(model, batch_size, seq_len, device)
        if repeats is None:
            one = (dense_ms if dense_ms is not None else measure_latency(model, inputs, 1, 1).median_ms) / 1000
            repeats = round(min(15 * seconds, max(3 * seconds, seconds / (1.5 * max(one, 1e-4)))))
        check_int("measure_keep: repeats", repeats, 1)
        result = compare_latency(model, work, inputs, repeats=repeats, warmup=1, rounds=repeats, round_warmup=0)
    return 1.0 / result["speedup"]


@dataclass
class _Try:
    """One allocated plan and its timing."""

    budget: float  # the keep fraction the allocation was asked for (in table terms)
    predicted: float  # what the table predicts for the plan
    measured: float  # what the plan measured against the model, interleaved
    plan: PruningPlan
    shapes: list[Any]


def _contradicts(t: _Try, budget: float, measured: float, keep: float) -> bool:
    """A larger budget measured faster than a smaller one, by more than ``LATENCY_AIM`` of the target."""
    gap = LATENCY_AIM * keep
    return (t.budget > budget and t.measured < measured - gap) or (t.budget < budget and t.measured > measured + gap)


def _next_budget(tried: list[_Try], keep: float) -> float | None:
    """The next budget to allocate at, or ``None`` when no untried budget is left between the tries.

    With tries on both sides of the target: inside the bracket of the closest budgets below and above (secant, kept
    off the bracket's ends so a flat stretch cannot stall it). With tries on one side only: beyond the outermost try
    (below the smallest budget when every plan was too slow), scaled by how far that try measured off and by at most
    2x, so one noisy timing cannot throw the search far. Not from the *last* try: when noise makes a smaller plan
    measure slower, that step can land on an earlier budget and stop the search short.
    """
    below = [t for t in tried if t.measured < keep]
    above = [t for t in tried if t.measured > keep]
    if below and above:
        lo = max(below, key=lambda t: t.budget)
        hi = min(above, key=lambda t: t.budget)
        if lo.budget < hi.budget:
            width = hi.budget - lo.budget
            guess = lo.budget + (keep - lo.measured) * width / (hi.measured - lo.measured)
            guess = min(max(guess, lo.budget + 0.15 * width), hi.budget - 0.15 * width)
        else:  # noise: a larger budget measured faster than a smaller one; split the difference once
            guess = (lo.budget + hi.budget) / 2
    elif above:  # every plan too slow: go below the smallest budget
        base = min(above, key=lambda t: t.budget)
        guess = base.budget * min(0.95, max(0.5, keep / base.measured))
    else:  # every plan faster than needed: go above the largest budget
        base = max(below, key=lambda t: t.budget)
        guess = min(1.0, base.budget * max(1.05, min(2.0, keep / base.measured)))
    if any(abs(t.budget - guess) < 1e-3 for t in tried):
        return None
    return guess


class _Clock:
    """Times plans against the model, counting the timings so a search stops at :data:`LATENCY_TIMINGS`."""

    def __init__(self, model: nn.Module, config: PruningConfig, dense_ms: float):
        self.model, self.config, self.dense_ms = model, config, dense_ms
        self.count = 0

    @property
    def spent(self) -> bool:
        return self.count >= LATENCY_TIMINGS

    def keep(self, shapes: list[LayerShape], seconds: float = 2.0) -> float:
        self.count += 1
        config = self.config
        return measure_keep(
            self.model, shapes, config.latency_batch_size, config.seq_len, seconds=seconds, dense_ms=self.dense_ms
        )


def _measure(clock: _Clock, tried: list[_Try], shapes: list[Any], budget: float, keep: float) -> float:
    """The measured keep of ``shapes`` (allocated at ``budget``).

    The same plan as an earlier try (the budget moved less than one head or neuron) is not timed again. A timing
    that contradicts an earlier one (:func:`_contradicts`) is noise on one of them: the new plan is timed again with
    twice the passes, then the earlier one if the contradiction stays, and the new timing replaces the old. One
    outlier left standing would fence the bracket off the target.
    """
    same = next((t for t in tried if t.shapes == shapes), None)
    if same is not None:
        return same.measured
    measured = clock.keep(shapes)
    for other in [t for t in tried if _contradicts(t, budget, measured, keep)][:1]:
        if clock.spent:
            break
        measured = clock.keep(shapes, seconds=4.0)
        if _contradicts(other, budget, measured, keep) and not clock.spent:
            other.measured = clock.keep(other.shapes, seconds=4.0)
    return measured


def _within(t: _Try, keep: float) -> bool:
    """``t`` measured within the promised :data:`LATENCY_TOLERANCE` of ``keep``."""
    return abs(t.measured - keep) <= LATENCY_TOLERANCE * keep


def _best_try(tried: list[_Try], keep: float) -> _Try:
    """The try measured closest to ``keep`` among those within the tolerance (the larger budget on a tie); with
    none, the slowest one still fast enough; with none of those either, the fastest."""
    close = [t for t in tried if _within(t, keep)]
    if close:
        return min(close, key=lambda t: (abs(t.measured - keep), -t.budget))
    under = [t for t in tried if t.measured <= keep]
    if under:
        return max(under, key=lambda t: t.measured)
    return min(tried, key=lambda t: t.measured)


def _report_trials(best: _Try, tried: list[_Try], keep: float) -> PruningPlan:
    """``best``'s plan with the search's record in its metadata (the table summary stays the last entry)."""
    plan = best.plan
    table = plan.meta.pop("latency_table", None)
    plan.meta.update(
        requested_keep=keep,
        measured_keep=best.measured,
        latency_searches=len(tried),
        latency_trials=[
            {"budget": round(t.budget, 4), "predicted": round(t.predicted, 4), "measured": round(t.measured, 4)}
            for t in tried
        ],
    )
    if table is not None:
        plan.meta["latency_table"] = table
    return plan


def search_latency(model: nn.Module, scores: Scores, config: PruningConfig, latency: LatencyTable) -> PruningPlan:
    """Search the allocation budget until the plan's *measured* keep meets ``config.target_latency``.

    The measured keep of the plan allocated at budget ``b`` rises with ``b`` but not in proportion (mixed shapes,
    kernel-size steps, fixed costs) and not smoothly (plans are discrete), so the search brackets the target and
    interpolates inside the bracket (:func:`_next_budget`) instead of rescaling by the last ratio alone. The plan
    kept is the one measured *closest* to the target (:func:`_best_try`): the largest-budget plan under the target
    can be far faster than asked. Contradicting timings are re-timed (:func:`_measure`). The tries are recorded in
    ``latency`` (:func:`~hf_prune.planning.latency_table.record_observations`) so the next search starts nearer.
    """
    keep = config.target_latency
    assert keep is not None
    clock = _Clock(model, config, latency.full_ms)
    tried: list[_Try] = []
    budget: float | None = latency.first_budget(keep)
    while budget is not None and len(tried) < LATENCY_SEARCHES and not clock.spent:
        plan = allocate(model, scores, replace(config, target_latency=min(1.0, budget)), latency, warn=False)
        shapes = plan.shapes_after(model)
        measured = _measure(clock, tried, shapes, budget, keep)
        predicted = plan.meta.get("achieved_keep", budget)
        tried.append(_Try(budget, predicted, measured, plan, shapes))
        logger.info(
            "hf_prune: latency search %d: budget %.3f, table predicts %.3f, measured %.3f (target %.3f)",
            len(tried),
            budget,
            predicted,
            measured,
            keep,
        )
        if abs(measured - keep) <= LATENCY_AIM * keep:
            break
        if budget >= 1.0 and measured < keep:
            break  # nothing wider exists
        budget = _next_budget(tried, keep)
    record_observations(latency, [(t.predicted, t.measured) for t in tried])
    best = _best_try(tried, keep)
    if not _within(best, keep):
        _explain_missed_latency(config, latency, tried, best)
    return _report_trials(best, tried, keep)


def _explain_missed_latency(config: PruningConfig, latency: LatencyTable, tried: list[_Try], best: _Try) -> None:
    keep = config.target_latency
    if all(t.measured > keep for t in tried):
        reason = (
            "every plan tried ran slower than the target (the table put the narrowest tried at "
            f"{min(t.predicted for t in tried):.3f}); the fastest measured is kept"
        )
    else:
        faster = max((t.measured for t in tried if t.measured < keep), default=None)
        slower = min((t.measured for t in tried if t.measured > keep), default=None)
        reason = (
            f"the nearest plans measured {faster:.3f} and {slower:.3f}: no plan between them was found in "
            f"{len(tried)} searches (timing noise on this machine, or a step in the kernels' speed); the faster "
            "one is kept"
            if faster is not None and slower is not None
            else f"no plan within {LATENCY_TOLERANCE:.0%} was found in {len(tried)} searches"
        )
    logger.warning(
        "hf_prune: target_latency=%s not met on %s at batch %d x %d: the pruned model measures %.3f of the dense "
        "latency; %s",
        keep,
        latency.device,
        latency.batch_size,
        latency.seq_len,
        best.measured,
        reason,
    )
