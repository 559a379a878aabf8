"""Layer-wise reconstruction after unstructured pruning (the OBS weight update of SparseGPT).

Masking alone (magnitude or Wanda) leaves the surviving weights as they were. SparseGPT (Frantar & Alistarh 2023,
"SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot") also updates them so each layer's output
on calibration data stays close to the dense one: for a fixed mask, the optimal brain surgeon update spreads the
error of every removed weight over the not-yet-processed columns using the inverse Hessian ``(X^T X)^-1``.

Here the mask is chosen by the configured criterion (``|W|`` or Wanda's ``|W| * ||X||``) and the OBS update then
reconstructs the layer. Blocks are processed in order, each fed the outputs of the already-pruned blocks before it
(sequential calibration), so errors do not compound unseen. Needs calibration data; costs about two forward
passes of the calibration set plus one small Cholesky solve per weight matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..architectures import ArchAdapter, get_adapter
from ..architectures.base import head_feature_index, num_features, out_in
from ..architectures.generic import block_lists
from ..scoring.blockwise import BlockInputs
from ..scoring.calibration import model_device
from ..structure.surgery import validate_plan
from .masks import compute_masks

logger = logging.get_logger(__name__)

if TYPE_CHECKING:
    from ..planning.plan import PruningPlan


def obs_update(
    weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, blocksize: int = 128, damp: float = 0.01
) -> torch.Tensor:
    """Return ``weight`` (out, in) with ``~keep`` zeroed and the kept weights updated to reconstruct ``weight @ x``.

    ``hessian`` is ``X^T X / n`` over calibration inputs (in, in). Columns are processed in blocks (lazy batch
    updates, as in SparseGPT).
    """
    w = weight.detach().float().clone()
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    keep = keep.to(w.device)
    columns = w.shape[1]
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        keep1 = keep[:, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            q = col * keep1[:, i]
            q1[:, i] = q
            err = (col - q) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w


class _Gram:
    """``X^T X`` of a stream of row batches, accurate to about float64 from float32 matmuls.

    Large-activation models (Gemma's, any LLM with "massive activations") have inputs dominated by their mean; a
    plain float32 sum of ``x^T x`` then loses the small directions a least-squares refit depends on (measured on a
    tiny Gemma 2: the refit closed a quarter of the gap to the optimum instead of all of it). Each batch's centred
    product is far better conditioned in float32 (float64 on CPUs, where it costs little); the batches are combined in
    float64 with Chan et al.'s pairwise update, and the mean's outer product is added back once, in float64.
    """

    def __init__(self, rows: torch.Tensor | None = None) -> None:
        # Only the rows ``rows`` of ``X^T X`` (all columns): the structured refit needs ``G[K, :]`` for the kept
        # columns ``K`` only, so a 2x cut halves the dominant cost of the refit pass (the products, ~90% of it on
        # 2 CPU cores for MiniLM) with the same numbers as slicing the full matrix.
        self.rows = rows
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.rows is None else t.index_select(0, self.rows.to(t.device))

    def add(self, x: torch.Tensor) -> None:
        n_b = x.shape[0]
        if n_b == 0:
            return
        # float64 lives on the CPU for MPS, which has none
        on = x.device if x.device.type != "mps" else torch.device("cpu")
        if x.device.type == "cpu":
            x = x.double()  # cheap on CPUs (half the float32 rate); GPUs keep float32 (1/64 the rate on many cards)
        mean_b = x.mean(0)
        centred = x - mean_b
        m2_b = (self._rows(centred.t()) @ centred).to(on, torch.float64)
        mean_b = mean_b.to(on, torch.float64)
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        total = self.n + n_b
        delta = mean_b - self.mean
        self.m2 += m2_b + torch.outer(self._rows(delta), delta) * (self.n * n_b / total)
        self.mean += delta * (n_b / total)
        self.n = total

    def total(self) -> torch.Tensor:
        """``sum x x^T`` over all rows (its rows ``self.rows`` only, when given), float64."""
        if self.mean is None or self.m2 is None:
            raise ValueError("no rows were accumulated")
        return self.m2 + self.n * torch.outer(self._rows(self.mean), self.mean)


def _attach_hessian_hooks(
    modules: dict,
    with_ones: frozenset = frozenset(),
    token_mask: list[torch.Tensor | None] | None = None,
    rows: dict | None = None,
):
    """Accumulate ``X^T X`` (:class:`_Gram`) and the row count of every module's input while the hooks are attached.

    Modules whose key is in ``with_ones`` get a constant 1 appended to each input row (for fitting a bias). When
    ``token_mask[0]`` holds the current batch's attention mask, padding rows are left out. ``rows[key]``, when
    given, keeps only those rows of the module's ``X^T X``.
    """
    hessians: dict = {}
    counts: dict = {}

    def make_hook(name):
        def hook(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            mask = token_mask[0] if token_mask is not None else None
            if mask is not None and mask.numel() == x.shape[0]:
                x = x[mask.reshape(-1).to(x.device).bool()]
            if name in with_ones:
                x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
            hessians.setdefault(name, _Gram(None if rows is None else rows.get(name))).add(x)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    return hessians, counts, handles


@torch.no_grad()
def sequential_prune(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    sparsity: float,
    scope: str = "row",
    criterion: str = "activation",
    nm: tuple[int, int] | None = None,
    progress: bool = True,
) -> None:
    """Prune the block linears block by block with masks + OBS reconstruction (see module docstring).

    ``scope="global"`` is not meaningful block by block and is treated as ``"layer"``. Padding tokens are left out
    of the statistics; one block's Hessians are alive at a time.
    """
    adapter = get_adapter(model, structural=False)
    layers = adapter.layers(model)
    if not adapter.structural and len(block_lists(model)) > 1:
        raise ValueError(
            f"reconstruct=True runs the blocks as one chain, but this {type(model).__name__} has several lists of "
            f"blocks ({', '.join(name for name, _ in block_lists(model))}) and no hf_prune adapter says how they "
            "connect; use reconstruct=False (masks from weight or activation scores)"
        )
    inputs = BlockInputs(model, layers, batches)
    names = {id(m): n for n, m in model.named_modules()}
    scope = "layer" if scope == "global" else scope
    token_mask: list[torch.Tensor | None] = [None]
    for index, block in enumerate(tqdm(layers, desc="prune + reconstruct", disable=not progress, leave=False)):
        modules = {names[id(m)]: m for m in adapter.block_linears(block)}
        hessians, counts, handles = _attach_hessian_hooks(modules, token_mask=token_mask)
        try:
            inputs.run(index, before_each=lambda n: token_mask.__setitem__(0, inputs.token_masks[n]))
        finally:
            for h in handles:
                h.remove()
        for name, module in modules.items():
            if name not in hessians:
                continue
            hessian = (hessians[name].total() / counts[name]).float()
            w_rows = out_in(module.weight.detach(), module).float()
            scores = w_rows.abs()
            if criterion == "activation":
                scores = scores * torch.sqrt(torch.diag(hessian) * counts[name]).unsqueeze(0)
            keep = compute_masks({name: scores}, sparsity, scope, nm)[name]
            updated = obs_update(w_rows, hessian, keep)
            module.weight.copy_(out_in(updated, module).to(module.weight.dtype))
        # the pruned block's outputs feed the next block (sequential calibration)
        inputs.advance(inputs.run(index))


# ---------------------------------------------------------------------------------------------------------
# structured pruning: least-squares refit of the output projections
# ---------------------------------------------------------------------------------------------------------
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


@torch.no_grad()
def apply_plan_with_compensation(
    model: nn.Module,
    plan: PruningPlan,
    batches: Iterable[dict[str, torch.Tensor]],
    damp: float = 1e-4,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Apply a structured ``plan`` and refit what is left of each shrunk branch's output projection.

    Removing heads or neurons deletes input columns of the branch's output projection (``o_proj``,
    ``attention.output.dense``, ``down_proj``...). Instead of just dropping them, the kept columns and the bias
    are refitted by least squares so the projection's output on calibration tokens stays as close as possible to
    the dense one: with ``G = E[x x^T]`` over dense inputs ``x`` (plus a constant 1 for the bias),
    ``[W_K', b'] = [W, b] G[:, K] (G[K, K] + damp)^-1``. This is the linear-regression step of Kwon et al. 2022
    ("A Fast Post-Training Pruning Framework for Transformers") applied to the weights rather than to per-head
    mask scales, and it includes FLAP-style bias compensation (An et al. 2024), so a layer whose heads are all
    removed still adds their mean contribution. Padding tokens are left out of ``G``. Cost: one forward pass of
    the calibration data and one small solve per shrunk projection. Memory: the pass runs block by block
    (:class:`~hf_prune.scoring.blockwise.BlockInputs`), so only one block's ``(d_in+1)^2`` matrices and fp32 copies
    of its
    output projections are alive at a time, besides the calibration hidden states.

    ``reduce`` (e.g. an all-reduce sum) combines the statistics of data-parallel processes, so every rank
    refits the same weights.
    """
    adapter = get_adapter(model)
    # validate before the calibration pass, so a bad plan fails fast with the surgery's own message
    validate_plan(model, plan.heads, plan.ffn)
    layers = adapter.layers(model)
    head_dim = adapter.head_dim(model.config)
    targets: dict[int, list[tuple[str, list[int]]]] = {}
    for layer, path, (kind, removed) in _output_projections(adapter, plan):
        columns = removed if kind == "ffn" else head_feature_index(removed, head_dim).tolist()
        targets.setdefault(layer, []).append((path, columns))
    if not targets:
        plan.apply(model)
        return
    # Block by block: block i's dense inputs are the dense outputs of block i - 1 (computed before that block is
    # pruned), exactly the inputs a full pass of the dense model would give; only block i's statistics are alive.
    inputs = BlockInputs(model, layers, batches)
    device = model_device(model)
    token_mask: list[torch.Tensor | None] = [None]
    short = ""  # the first projection refitted from fewer tokens than it has kept columns
    was_training = model.training
    model.eval()
    try:
        for index in range(len(layers)):
            if index not in targets:
                inputs.advance(inputs.run(index))
                continue
            modules = [layers[index].get_submodule(path) for path, _ in targets[index]]
            with_ones = frozenset(i for i, m in enumerate(modules) if getattr(m, "bias", None) is not None)
            # the refit reads the kept columns' rows of each Gram matrix (and the bias row), nothing else
            kept: dict[int, list[int]] = {}
            for i, (module, (_, columns)) in enumerate(zip(modules, targets[index], strict=True)):
                width, gone = num_features(module, "in"), set(columns)
                kept[i] = [c for c in range(width) if c not in gone] + ([width] if i in with_ones else [])
            rows = {i: torch.tensor(k, dtype=torch.long) for i, k in kept.items()}
            grams, counts, handles = _attach_hessian_hooks(dict(enumerate(modules)), with_ones, token_mask, rows)
            try:
                outputs = inputs.run(index, before_each=lambda n: token_mask.__setitem__(0, inputs.token_masks[n]))
            finally:
                for h in handles:
                    h.remove()
            # every process must hold every statistic (zeros where its shard had none) before they are summed
            stats_on = device if device.type != "mps" else torch.device("cpu")  # float64, which MPS lacks
            grams = {
                i: grams[i].total()
                if i in grams and grams[i].n
                else torch.zeros(
                    len(kept[i]),
                    num_features(m, "in") + (i in with_ones),
                    dtype=torch.float64,
                    device=stats_on,
                )
                for i, m in enumerate(modules)
            }
            counts = torch.tensor(
                [float(counts.get(i, 0)) for i in range(len(modules))], dtype=torch.float64, device=device
            )
            if reduce is not None:
                grams = {i: reduce(g) for i, g in grams.items()}
                counts = reduce(counts)
            if not bool((counts > 0).all()):
                raise ValueError("structured reconstruction needs calibration data, but it yielded no tokens")
            for i, (path, _) in enumerate(targets[index]):
                if counts[i] < len(kept[i]) and not short:
                    short = f"layer {index} {path}: {len(kept[i])} kept columns from {int(counts[i])} tokens"
            dense = []
            for i, module in enumerate(modules):
                w = out_in(module.weight.detach(), module)
                bias = getattr(module, "bias", None)
                keep = kept[i][: len(kept[i]) - (i in with_ones)]  # without the bias row
                # one block's projections copied at a time (fp32: MPS has no float64; the solve upcasts)
                dense.append((w.float().clone(), None if bias is None else bias.detach().float().clone(), keep))
            plan.only(index).apply(model)
            for i, (module, (w, b, keep)) in enumerate(zip(modules, dense, strict=True)):
                _refit(module, w, b, keep, grams[i], counts[i], damp)
            del grams, dense
            inputs.advance(outputs)
    finally:
        model.train(was_training)
    if short:
        # fewer tokens than unknowns: the fit reproduces the calibration tokens exactly and little else (measured
        # on SmolLM2-135M with 512 tokens: perplexity 8,656 refitted vs 81 without the refit)
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
