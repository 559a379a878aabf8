"""The depth step: remove whole blocks, and choose how many under a keep-target.

:func:`depth_step` removes ``config.layers`` of the blocks (or the count :func:`search_depth` picks under
``max_layers``) and hands the width step that follows what is left of the keep-target. The search cuts each candidate
block count on a copy, blocks then width, and compares the candidates by how close they stay to the dense model
(:func:`divergence_from`), so depth and width are traded on the calibration data rather than by a fixed rule.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..architectures import LayerShape, get_adapter
from ..config import PruningConfig
from ..measure import compare_latency, layer_flops, layer_params
from ..scoring.calibration import CalibrationSet, no_cache
from ..scoring.criteria import Scores, structured_scores
from ..scoring.depth import select_attention, select_blocks
from ..structure.surgery import prune_heads, prune_layers
from ..training.distill import is_causal_lm, kl_sum, logit_positions
from ..utils import eval_mode, model_device
from .allocate import allocate
from .latency_table import dummy_inputs, profile_latency

logger = logging.get_logger(__name__)


def remove_attention(model: nn.Module, blocks: Iterable[int]) -> nn.Module:
    """Remove the attention sublayer of ``blocks`` (every head; the blocks keep their MLP), in place."""
    shapes = get_adapter(model).layer_shapes(model)
    return prune_heads(model, {i: list(range(shapes[i].heads)) for i in blocks if shapes[i].heads})


def depth_keep(model: nn.Module, removed: list[int], config: PruningConfig, attention: Iterable[int] = ()) -> float:
    """The fraction of ``config``'s keep-target quantity (block FLOPs, prunable parameters or measured latency) that
    removing the blocks ``removed`` and the attention sublayers of the blocks ``attention`` keeps; the model is not
    changed (latency is timed on a copy, interleaved)."""
    target = config.keep_target
    attention = set(attention)
    if target is None or not (removed or attention):
        return 1.0
    gone = set(removed)
    if target == "latency":
        work = prune_layers(remove_attention(copy.deepcopy(model), attention), removed)
        inputs = dummy_inputs(model, config.latency_batch_size, config.seq_len, model_device(model))
        with eval_mode(model):
            return 1.0 / compare_latency(model, work.eval(), inputs, repeats=12)["speedup"]
    adapter = get_adapter(model)
    hidden, head_dim = adapter.hidden_size(model.config), adapter.head_dim(model.config)
    shapes = adapter.layer_shapes(model)

    def cost(s: LayerShape) -> float:
        if target == "flops":
            return layer_flops(s, hidden, head_dim, adapter.ffn_in_mats, config.seq_len)
        return layer_params(s, hidden, head_dim, adapter.ffn_in_mats)

    kept = [replace(s, heads=0, kv_heads=0) if i in attention else s for i, s in enumerate(shapes)]
    return sum(cost(s) for i, s in enumerate(kept) if i not in gone) / sum(cost(s) for s in shapes)


def depth_step(
    model: nn.Module, config: PruningConfig, calibration: CalibrationSet | None = None
) -> tuple[list[int], list[int], PruningConfig]:
    """Remove ``config.layers`` of the blocks and the attention sublayers of ``config.attention_layers`` of them
    (both chosen by ``config.layer_criterion``); return the removed blocks, the blocks whose attention went (both as
    indices before the step) and the config the width step that follows must use.

    A keep-target (``target_flops`` / ``target_params`` / ``target_latency``) is a fraction of the model passed in,
    depth and width together: the blocks' share is measured (latency: timed) and the width step gets what is left,
    ``keep / depth_keep``. When the blocks alone already reach the target, no width is removed and a warning says
    how far below the target the model went.
    """
    fraction = config.layers
    if config.max_layers:
        fraction = search_depth(model, config, calibration)
    removed, _ = select_blocks(model, config.layer_criterion, fraction, calibration)
    n_attention = round(config.attention_layers * len(get_adapter(model).layers(model)))
    attention = select_attention(model, config.layer_criterion, n_attention, calibration, exclude=removed)
    target = config.keep_target
    width = replace(config, layers=0.0, max_layers=0.0, attention_layers=0.0)
    if target is not None:
        keep = getattr(config, f"target_{target}")
        kept = depth_keep(model, removed, config, attention)
        if kept <= keep:
            logger.warning(
                "hf_prune: layers=%g alone keeps %.3f of the %s, at or below target_%s=%g; no width is removed",
                fraction,
                kept,
                target,
                target,
                keep,
            )
            width = replace(width, **{f"target_{target}": None})
        else:
            width = replace(width, **{f"target_{target}": keep / kept})
    if attention:
        logger.info("hf_prune: removing the attention sublayer of blocks %s", attention)
    prune_layers(remove_attention(model, attention), removed)
    return removed, attention, width


MAX_DEPTH_CANDIDATES = 9


def depth_candidates(n_blocks: int, max_layers: float) -> list[int]:
    """Block counts the depth search tries: 0 to ``round(max_layers * n_blocks)``, at most
    :data:`MAX_DEPTH_CANDIDATES` of them, evenly spaced (always both ends)."""
    top = min(n_blocks - 1, round(max_layers * n_blocks))
    if top + 1 <= MAX_DEPTH_CANDIDATES:
        return list(range(top + 1))
    return sorted({round(i * top / (MAX_DEPTH_CANDIDATES - 1)) for i in range(MAX_DEPTH_CANDIDATES)})


REFERENCE_LOGITS_BYTES = 256 * 2**20  # the depth search keeps the dense logits when they fit in this


@torch.no_grad()
def reference_logits(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], max_bytes: int = REFERENCE_LOGITS_BYTES
) -> list[torch.Tensor] | None:
    """``model``'s logits on every batch, or ``None`` as soon as they would pass ``max_bytes``: an LM's logits are
    tokens x vocabulary, gigabytes over a calibration set, where a classifier's are a few kB."""
    out, size = [], 0
    with eval_mode(model):
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = model(**inputs, **no_cache(model)).logits
            size += logits.numel() * logits.element_size()
            if size > max_bytes:
                return None
            out.append(logits)
    return out


@torch.no_grad()
def divergence_from(
    reference: nn.Module,
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    cached: list[torch.Tensor] | None = None,
) -> float:
    """Mean KL divergence of ``model``'s output distribution from ``reference``'s over the calibration positions that
    carry a prediction (non-padding tokens of an LM, every example of a classifier); 0 when they agree exactly.
    ``cached`` holds ``reference``'s logits on ``batches`` (:func:`reference_logits`), computed once for a search.

    A search among pruned candidates compares them by this rather than by a task loss: it needs no labels, and on a
    model that is not yet trained for the task a cut can lower the loss by chance, but never the divergence.
    """
    total, count = 0.0, 0
    causal = is_causal_lm(reference)
    with eval_mode(reference, model):
        for i, batch in enumerate(batches):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            valid = logit_positions(inputs, causal)
            ref = cached[i] if cached is not None else reference(**inputs, **no_cache(reference)).logits
            out = model(**inputs, **no_cache(model)).logits
            total += float(kl_sum(out, ref, valid, 1.0))
            count += int(valid.sum()) if valid is not None else ref.shape[0]
    return total / max(1, count)


def search_depth(model: nn.Module, config: PruningConfig, calibration: CalibrationSet | None) -> float:
    """The fraction of blocks to remove under ``config``'s keep-target, chosen by how close each candidate stays to
    the dense model on the calibration data (:func:`divergence_from`; see ``PruningConfig.max_layers``); the model is
    not changed. Under ``target_latency`` each candidate's blocks are timed and its width is priced with
    :meth:`~hf_prune.planning.latency_table.LatencyTable.for_depth` of the model's table.

    Each candidate block count is cut on a copy: its blocks (``layer_criterion``), then heads and neurons to what
    the target leaves, allocated from scores measured once on the dense model (the removed blocks' entries dropped),
    without refit. The divergence compares the candidates; the caller then prunes the model for real (fresh scores
    on the shallower model, refit if configured).
    """
    if calibration is None:
        raise ValueError("max_layers needs calibration data (the depth search compares the candidates on it)")
    n = len(get_adapter(model).layers(model))
    needs = config.needs_gradients
    scores = structured_scores(model, config.criterion, calibration if needs else None, config.max_samples, config.seed)
    target = config.keep_target
    keep = getattr(config, f"target_{target}")
    table = None
    if target == "latency":  # one table for the whole model; each candidate's is derived from it (no re-profiling)
        table = profile_latency(
            model, config.latency_batch_size, config.seq_len, multiple=config.ffn_multiple, head_unit=config.head_unit
        )
    results: list[tuple[int, float]] = []
    dense_logits = reference_logits(model, calibration)  # once, not once per candidate, when they fit in memory
    for k in tqdm(depth_candidates(n, config.max_layers), desc="depth search", leave=False):
        removed, _ = select_blocks(model, config.layer_criterion, k / n, calibration)
        kept = depth_keep(model, removed, config)
        work = prune_layers(copy.deepcopy(model), removed)
        if kept > keep:
            gone = set(removed)
            remaining = Scores(
                heads=[h for i, h in enumerate(scores.heads) if i not in gone],
                ffn=[f for i, f in enumerate(scores.ffn) if i not in gone],
                criterion=scores.criterion,
            )
            width = replace(config, max_layers=0.0, **{f"target_{target}": keep / kept})
            # under a latency target the blocks' share was timed (their fixed cost included) and the width is
            # priced by the table of the shallower model, so at small inputs the search can trade width for depth
            derived = None if table is None else table.for_depth(n - len(removed), kept * table.full_ms)
            allocate(work, remaining, width, derived, warn=False).apply(work)
        results.append((k, divergence_from(model, work, calibration, dense_logits)))
        del work
    best = min(results, key=lambda r: r[1])[0]
    logger.info(
        "hf_prune: depth search (blocks removed -> KL from the dense model): %s; chose %d",
        ", ".join(f"{k} -> {loss:.4f}" for k, loss in results),
        best,
    )
    return best / n
