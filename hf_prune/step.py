"""One pruning step, shared by :func:`hf_prune.prune` and every event of the PruningTrainer.

Structure: ``score -> plan -> cut``: importance scores (:func:`~hf_prune.scoring.criteria.structured_scores`, summed
over processes when distributed), a plan for the target (:func:`plan_structure`: allocation, checked against the
clock where the target is latency), then ``plan.apply(model, calibration=...)``. Unstructured sparsity:
``weight scores -> masks -> applied`` (:func:`mask_step`). The callers only decide *when* and *how much*:
``prune()`` once, to the final target; the trainer at each event, to that event's share. Under data-parallel
training every statistic is summed over processes (``distributed=True``) so all ranks cut alike. Whole blocks are
removed before, by :func:`hf_prune.planning.depth_search.depth_step`.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .config import PruningConfig
from .planning.allocate import allocate
from .planning.latency_search import check_latency_reachable, search_latency
from .planning.latency_table import LatencyTable, profile_latency
from .planning.plan import PruningPlan
from .scoring.calibration import CalibrationSet
from .scoring.criteria import Scores, input_norms, structured_scores
from .sparsity.masks import apply_masks, compute_masks, prunable_linears, to_module_layout, weight_scores
from .training.distributed import all_reduce_sum, all_reduce_sum_many


def sum_scores(scores: Scores) -> Scores:
    """Scores summed over processes (data-parallel calibration shards): every rank allocates the same plan."""
    summed = all_reduce_sum_many([*scores.heads, *scores.ffn])
    n = len(scores.heads)
    return Scores(heads=summed[:n], ffn=summed[n:], criterion=scores.criterion)


def plan_structure(
    model: nn.Module,
    scores: Scores,
    config: PruningConfig,
    latency: LatencyTable | None = None,
    verify_latency: bool = True,
) -> PruningPlan:
    """The plan for ``config``'s target. A latency target allocates against ``latency`` (profiled on ``model`` when
    omitted), refuses a target below the table's floor before any change
    (:class:`~hf_prune.planning.latency_search.LatencyTargetError`) and, with ``verify_latency``, times the chosen
    shapes on a copy against ``model`` itself and searches the allocation budget
    (:func:`~hf_prune.planning.latency_search.search_latency`) until the measurement meets the target.

    Why the timing: the table predicts from uniform-shape sweeps, and mixed per-layer shapes run at another speed
    than predicted, faster or slower by a machine-specific amount, so the measured ratio, not the prediction, decides.
    """
    if config.keep_target != "latency":
        return allocate(model, scores, config)
    if latency is None:
        latency = profile_latency(
            model, config.latency_batch_size, config.seq_len, multiple=config.ffn_multiple, head_unit=config.head_unit
        )
    check_latency_reachable(model, config, latency)
    if not verify_latency:
        return allocate(model, scores, config, latency)
    return search_latency(model, scores, config, latency)


def structural_step(
    model: nn.Module,
    config: PruningConfig,
    calibration: CalibrationSet | None = None,
    latency: LatencyTable | None = None,
    distributed: bool = False,
    progress: bool = True,
    timings: dict[str, float] | None = None,
) -> PruningPlan:
    """Score, plan and cut structure to ``config``'s target; returns the applied plan.

    ``calibration`` feeds taylor/fisher scores and, with ``config.reconstruct``, the least-squares refit.
    ``latency`` is the table a latency target allocates against (profiled here when missing). ``distributed``
    sums scores and refit statistics over processes and skips timing (it differs per process).
    """
    timings = {} if timings is None else timings
    start = time.perf_counter()
    needs = config.needs_gradients
    scores = structured_scores(
        model, config.criterion, calibration if needs else None, config.max_samples, config.seed, progress=progress
    )
    if distributed:
        scores = sum_scores(scores)
    timings["scoring"] = time.perf_counter() - start
    start = time.perf_counter()
    plan = plan_structure(model, scores, config, latency, verify_latency=not distributed)
    timings["allocation"] = time.perf_counter() - start
    start = time.perf_counter()
    plan.apply(
        model,
        calibration=calibration if config.reconstruct else None,
        reduce=all_reduce_sum if distributed else None,
    )
    timings["surgery"] = time.perf_counter() - start
    return plan


def mask_step(
    model: nn.Module,
    config: PruningConfig,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    calibration: CalibrationSet | None = None,
    distributed: bool = False,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Compute unstructured (or N:M) masks for the block linears and zero the masked weights.

    Returns the masks in each module's weight layout (keep = ``True``), for re-application after optimizer steps.
    Activation-aware scores (Wanda) need ``calibration``; their input norms are summed over processes when
    ``distributed``.
    """
    modules = prunable_linears(model)
    norms = None
    if config.sparsity_criterion == "activation":
        norms = input_norms(model, modules, calibration, config.max_samples, progress=progress)
        if distributed:
            names = list(norms)
            summed = all_reduce_sum_many([norms[n].pow(2) for n in names])
            norms = {n: t.sqrt() for n, t in zip(names, summed, strict=True)}
    scores = weight_scores(modules, config.sparsity_criterion, norms)
    scope = config.sparsity_scope if nm is None else "row"
    masks = to_module_layout(compute_masks(scores, sparsity, scope, nm), modules)
    apply_masks(model, masks)
    return masks
