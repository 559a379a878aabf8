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

import contextlib
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .architectures import get_adapter
from .masks import compute_masks


class _Stop(Exception):
    pass


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


def _attach_hessian_hooks(modules: dict[str, nn.Module]):
    """Accumulate ``X^T X`` and the row count of every module's input while the hooks are attached."""
    hessians: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            hessians[name] = hessians.get(name, 0) + x.t() @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    return hessians, counts, handles


def _rows(t: torch.Tensor, module: nn.Module) -> torch.Tensor:
    return t if isinstance(module, nn.Linear) else t.t()


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

    ``scope="global"`` is not meaningful block by block and is treated as ``"layer"``.
    """
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    captured: list[tuple[tuple, dict]] = []

    def capture(module: nn.Module, args: tuple, kwargs: dict):
        captured.append((args, kwargs))
        raise _Stop

    # no KV cache: the captured kwargs are replayed through each block and must not grow a cache
    no_cache = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}
    handle = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_Stop):
                model(**{k: v for k, v in batch.items() if k != "labels"}, **no_cache)
    finally:
        handle.remove()
    if not captured:
        raise ValueError("reconstruction needs calibration data, but it yielded no batches")
    names = {id(m): n for n, m in model.named_modules()}
    scope = "layer" if scope == "global" else scope
    for block in tqdm(layers, desc="prune + reconstruct", disable=not progress, leave=False):
        modules = {}
        for proj in (*adapter.attention_projs, *adapter.ffn_projs):
            module = block.get_submodule(proj.path)
            if module.weight.numel():
                modules[names[id(module)]] = module
        hessians, counts, handles = _attach_hessian_hooks(modules)
        try:
            for args, kwargs in captured:
                block(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        for name, module in modules.items():
            if name not in hessians:
                continue
            hessian = hessians[name] / counts[name]
            w_rows = _rows(module.weight.detach(), module).float()
            scores = w_rows.abs()
            if criterion == "activation":
                scores = scores * torch.sqrt(torch.diag(hessian) * counts[name]).unsqueeze(0)
            keep = compute_masks({name: scores.cpu()}, sparsity, scope, nm)[name]
            updated = obs_update(w_rows, hessian, keep)
            module.weight.copy_(_rows(updated, module).to(module.weight.dtype))
        # the pruned block's outputs feed the next block
        outputs = []
        for args, kwargs in captured:
            out = block(*args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
            if args:
                outputs.append(((hidden, *args[1:]), kwargs))
            else:
                outputs.append(((), {**kwargs, "hidden_states": hidden}))
        captured = outputs
