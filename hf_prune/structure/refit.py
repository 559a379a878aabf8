"""Structured reconstruction: apply a plan and refit what is left of each shrunk branch's output projection.

Removing heads or neurons deletes input columns of the branch's output projection (``o_proj``,
``attention.output.dense``, ``down_proj``...). Instead of just dropping them, the kept columns and the bias are refitted
by least squares so the projection's output on calibration tokens stays as close as possible to the dense one. This is
the linear-regression step of Kwon et al. 2022 ("A Fast Post-Training Pruning Framework for Transformers") applied to
the weights rather than to per-head mask scales, with FLAP-style bias compensation (An et al. 2024). The calibration
pass runs block by block (:class:`~hf_prune.scoring.blockwise.BlockInputs`), so only one block's statistics are alive
at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.utils import logging

from ..architectures import ArchAdapter, get_adapter
from ..architectures.base import head_feature_index, num_features, out_in
from ..scoring.blockwise import BlockInputs, attach_gram_hooks
from ..utils import eval_mode, model_device
from .surgery import validate_plan

if TYPE_CHECKING:
    from ..planning.plan import PruningPlan

logger = logging.get_logger(__name__)

Reduce = Callable[[torch.Tensor], torch.Tensor]
#: per block: (output projection path, its input columns the plan removes)
Targets = dict[int, list[tuple[str, list[int]]]]


def _output_projections(adapter: ArchAdapter, plan: PruningPlan) -> list[tuple[int, str, tuple[str, list[int]]]]:
    """(layer, projection path, (``"heads"`` or ``"ffn"``, removed units)) for every branch the plan shrinks."""
    targets = []
    for layer, heads in plan.heads.items():
        if heads:
            for proj in adapter.attention_projs:
                if proj.side == "in":
                    targets.append((layer, proj.path, ("heads", heads)))
    for layer, neurons in plan.ffn.items():
        if neurons:
            for proj in adapter.ffn_projs:
                if proj.side == "in":
                    targets.append((layer, proj.path, ("ffn", neurons)))
    return targets


def _removed_columns(model: nn.Module, adapter: ArchAdapter, plan: PruningPlan) -> Targets:
    """The input columns of every shrunk output projection that the plan removes, by block."""
    head_dim = adapter.head_dim(model.config)
    targets: Targets = {}
    for layer, path, (kind, removed) in _output_projections(adapter, plan):
        columns = removed if kind == "ffn" else head_feature_index(removed, head_dim).tolist()
        targets.setdefault(layer, []).append((path, columns))
    return targets


def _kept_rows(
    modules: list[nn.Module], targets: list[tuple[str, list[int]]]
) -> tuple[frozenset, dict[int, list[int]]]:
    """Which projections fit a bias, and the Gram rows each refit reads: the kept columns (then the bias's row)."""
    with_ones = frozenset(i for i, m in enumerate(modules) if getattr(m, "bias", None) is not None)
    kept: dict[int, list[int]] = {}
    for i, (module, (_, columns)) in enumerate(zip(modules, targets, strict=True)):
        width, gone = num_features(module, "in"), set(columns)
        kept[i] = [c for c in range(width) if c not in gone] + ([width] if i in with_ones else [])
    return with_ones, kept


def _block_statistics(
    inputs: BlockInputs,
    index: int,
    modules: list[nn.Module],
    kept: dict[int, list[int]],
    with_ones: frozenset,
    device: torch.device,
    reduce: Reduce | None,
) -> tuple[list[torch.Tensor], dict[int, torch.Tensor], torch.Tensor]:
    """Run block ``index`` on every batch while accumulating its projections' Gram rows (padding left out).

    Returns the block's outputs, each projection's ``sum [x, 1][x, 1]^T`` rows (float64) and token count, summed over
    processes by ``reduce``."""
    token_mask: list[torch.Tensor | None] = [None]
    rows = {i: torch.tensor(k, dtype=torch.long) for i, k in kept.items()}
    grams, counts, handles = attach_gram_hooks(dict(enumerate(modules)), with_ones, token_mask, rows)
    try:
        outputs = inputs.run(index, before_each=lambda n: token_mask.__setitem__(0, inputs.token_masks[n]))
    finally:
        for h in handles:
            h.remove()
    # every process must hold every statistic (zeros where its shard had none) before they are summed
    stats_on = device if device.type != "mps" else torch.device("cpu")  # float64, which MPS lacks
    totals = {
        i: grams[i].total()
        if i in grams and grams[i].n
        else torch.zeros(len(kept[i]), num_features(m, "in") + (i in with_ones), dtype=torch.float64, device=stats_on)
        for i, m in enumerate(modules)
    }
    tokens = torch.tensor([float(counts.get(i, 0)) for i in range(len(modules))], dtype=torch.float64, device=device)
    if reduce is not None:
        totals = {i: reduce(g) for i, g in totals.items()}
        tokens = reduce(tokens)
    if not bool((tokens > 0).all()):
        raise ValueError("structured reconstruction needs calibration data, but it yielded no tokens")
    return outputs, totals, tokens


def _dense_copies(
    modules: list[nn.Module], kept: dict[int, list[int]], with_ones: frozenset
) -> list[tuple[torch.Tensor, torch.Tensor | None, list[int]]]:
    """fp32 copies of each dense projection's ``(weight (out, in), bias)`` and its kept columns (MPS has no float64;
    the solve upcasts). One block's projections are copied at a time."""
    dense = []
    for i, module in enumerate(modules):
        w = out_in(module.weight.detach(), module)
        bias = getattr(module, "bias", None)
        keep = kept[i][: len(kept[i]) - (i in with_ones)]  # without the bias row
        dense.append((w.float().clone(), None if bias is None else bias.detach().float().clone(), keep))
    return dense


@torch.no_grad()
def apply_plan_with_compensation(
    model: nn.Module,
    plan: PruningPlan,
    batches: Iterable[dict[str, torch.Tensor]],
    damp: float = 1e-4,
    reduce: Reduce | None = None,
) -> None:
    """Apply a structured ``plan`` and refit what is left of each shrunk branch's output projection.

    With ``G = E[x x^T]`` over the dense inputs ``x`` of an output projection (plus a constant 1 for the bias), its kept
    columns ``K`` and bias become ``[W_K', b'] = [W, b] G[:, K] (G[K, K] + damp)^-1``: the least-squares fit of the
    dense output, so a layer whose heads are all removed still adds their mean contribution. Padding tokens are left
    out of ``G``. Cost: one forward pass of the calibration data and one small solve per shrunk projection; only one
    block's ``(d_in+1)^2`` matrices and fp32 copies of its output projections are alive at a time, besides the
    calibration hidden states.

    ``reduce`` (e.g. an all-reduce sum) combines the statistics of data-parallel processes, so every rank refits the
    same weights.
    """
    adapter = get_adapter(model)
    # validate before the calibration pass, so a bad plan fails fast with the surgery's own message
    validate_plan(model, plan.heads, plan.ffn)
    targets = _removed_columns(model, adapter, plan)
    if not targets:
        plan.apply(model)
        return
    layers = adapter.layers(model)
    # Block by block: block i's dense inputs are the dense outputs of block i - 1 (computed before that block is
    # pruned), exactly the inputs a full pass of the dense model would give; only block i's statistics are alive.
    inputs = BlockInputs(model, layers, batches)
    device = model_device(model)
    short = ""  # the first projection refitted from fewer tokens than it has kept columns
    with eval_mode(model):
        for index in range(len(layers)):
            if index not in targets:
                inputs.advance(inputs.run(index))
                continue
            modules = [layers[index].get_submodule(path) for path, _ in targets[index]]
            with_ones, kept = _kept_rows(modules, targets[index])
            outputs, grams, counts = _block_statistics(inputs, index, modules, kept, with_ones, device, reduce)
            for i, (path, _) in enumerate(targets[index]):
                if counts[i] < len(kept[i]) and not short:
                    short = f"layer {index} {path}: {len(kept[i])} kept columns from {int(counts[i])} tokens"
            dense = _dense_copies(modules, kept, with_ones)
            plan.only(index).apply(model)
            for i, (module, (w, b, keep)) in enumerate(zip(modules, dense, strict=True)):
                _refit(module, w, b, keep, grams[i], counts[i], damp)
            del grams, dense
            inputs.advance(outputs)
    if short:
        # fewer tokens than unknowns: the fit reproduces the calibration tokens exactly and little else
        logger.warning(
            "hf_prune: the least-squares refit is underdetermined (%s); it fits the calibration tokens, not the "
            "data. Give it at least as many calibration tokens (max_samples x sequence length) as the widest kept "
            "projection has inputs, or set reconstruct=False.",
            short,
        )


def _refit(
    module: nn.Module,
    w: torch.Tensor,
    b: torch.Tensor | None,
    keep: list[int],
    gram: torch.Tensor,
    count: torch.Tensor,
    damp: float,
) -> None:
    """Write the least-squares refit of the dense ``[w, b]`` onto the kept columns into the shrunk ``module``.

    ``gram`` holds the rows of ``sum [x, 1][x, 1]^T`` for the kept columns (then the bias's), all columns."""
    if not keep and b is None:
        return  # nothing left to refit: the branch contributes nothing, as in the dense model
    # float64 on the statistics' device (MPS has no float64: solve on the CPU there)
    solve_on = w.device if w.device.type != "mps" else torch.device("cpu")
    gram = gram.to(solve_on).double() / count.to(solve_on)
    full = w.to(solve_on).double()
    if b is not None:
        full = torch.cat([full, b.to(solve_on).double().unsqueeze(1)], dim=1)
    cols = torch.as_tensor(keep + ([w.shape[1]] if b is not None else []), dtype=torch.long, device=solve_on)
    if gram.shape[0] != len(cols):
        raise ValueError(f"the Gram matrix has {gram.shape[0]} rows for {len(cols)} kept columns")
    sub = gram[:, cols]
    reg = damp * torch.diagonal(sub).mean() * torch.eye(len(cols), dtype=sub.dtype, device=solve_on)
    # solve (G_KK + reg) X = G_K: X^T = full @ G[:, K] (G_KK + reg)^-1, as G is symmetric
    fitted = torch.linalg.solve(sub + reg, gram @ full.t()).t()
    new_w, new_b = (fitted, None) if b is None else (fitted[:, :-1], fitted[:, -1])
    module.weight.copy_(out_in(new_w, module).to(module.weight))
    if new_b is not None:
        module.bias.copy_(new_b.to(module.bias))
