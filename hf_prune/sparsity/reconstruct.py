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

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..architectures import get_adapter
from ..architectures.base import out_in
from ..architectures.generic import block_lists
from ..scoring.blockwise import BlockInputs, attach_gram_hooks
from .masks import compute_masks


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
        hessians, counts, handles = attach_gram_hooks(modules, token_mask=token_mask)
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
