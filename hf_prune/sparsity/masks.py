"""Unstructured (and N:M) weight masks for the linear layers of the transformer blocks.

Masks are plain boolean tensors (``True`` = keep) keyed by module name, in the weight's own layout, so they can
be saved with a checkpoint, re-applied after every optimizer step (``apply_masks``) and finally baked in: the
model then holds real zeros and no hooks or parametrizations (unlike ``torch.nn.utils.prune``, which leaves
``weight_orig``/``weight_mask`` in the state dict until ``remove`` is called).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..architectures import get_adapter
from ..architectures.base import out_in
from ..training.fsdp import full, local_part, reshard, shard_like


def prunable_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The attention and FFN projections of every block, by their full module name (no embeddings/heads); for a
    family without an adapter, every linear layer of its blocks (see :mod:`hf_prune.architectures.generic`)."""
    # a peft LoRA layer keeps its stock name (its weight is the wrapped layer's), so masks match with or without LoRA
    names = {id(m): n.removesuffix(".base_layer") for n, m in model.named_modules()}
    return {names[id(m)]: m for m in get_adapter(model, structural=False).all_block_linears(model)}


def live_weight(module: nn.Module) -> torch.Tensor:
    """The weight a layer computes with, detached: for a peft LoRA layer its frozen base plus each active adapter's
    delta (through the layer's keep-mask when it has one), so masks chosen during LoRA training see what LoRA
    learnt."""
    weight = module.weight.detach()
    if not hasattr(module, "lora_A") or getattr(module, "merged", False):
        return weight
    keep = getattr(module, "_hf_prune_keep", None)  # hf_prune.compat.KEEP_MASK_ATTR
    for adapter in module.active_adapters:
        if adapter in module.lora_A:
            delta = module.get_delta_weight(adapter).detach().to(weight.dtype)
            weight = weight + (delta if keep is None else delta * keep.to(delta.device, delta.dtype))
    return weight


def weight_scores(
    modules: Mapping[str, nn.Module], criterion: str = "magnitude", norms: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """|W| (magnitude) or |W| * ||X_j|| (activation, Wanda), as float tensors in (out, in) layout on each weight's
    device."""
    scores = {}
    for name, module in modules.items():
        w = out_in(full(live_weight(module)), module).abs().float().contiguous()  # all ranks score whole weights
        if criterion == "activation":
            if norms is None or name not in norms:
                raise ValueError(f"activation-aware scores need input norms for {name}")
            w = w * norms[name].float().to(w.device).unsqueeze(0)
        elif criterion != "magnitude":
            raise ValueError(f"unknown sparsity criterion {criterion!r}; allowed: magnitude, activation")
        scores[name] = w
    return scores


def _keep_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_keep > 0:
        mask[torch.topk(scores.reshape(-1), n_keep, sorted=False).indices] = True
    return mask.view_as(scores)


def compute_masks(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    scope: str = "layer",
    nm: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks in (out, in) layout.

    ``scope="layer"``: the lowest ``sparsity`` fraction of each matrix; ``"row"``: of each output row (Wanda's
    comparison group); ``"global"``: one threshold over all matrices. ``nm=(N, M)``: keep the N best of every M
    consecutive input weights of each row (sparsity and scope are then implied).
    """
    masks = {}
    if nm is not None:
        n, m = nm
        for name, s in scores.items():
            out_f, in_f = s.shape
            if in_f % m:
                raise ValueError(f"{name}: {in_f} input features are not divisible by M={m} of the {n}:{m} pattern")
            groups = s.reshape(out_f, in_f // m, m)
            idx = torch.topk(groups, n, dim=-1).indices
            mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
            masks[name] = mask.reshape(out_f, in_f)
        return masks
    if scope == "global":
        first = next(iter(scores.values()))
        flat = torch.cat([s.reshape(-1).to(first.device) for s in scores.values()])
        n_prune = int(sparsity * flat.numel())
        if n_prune == 0:
            return {name: torch.ones_like(s, dtype=torch.bool) for name, s in scores.items()}
        threshold = torch.kthvalue(flat, n_prune).values
        # ties at the threshold are broken so exactly n_prune weights go
        below = {name: s < threshold.to(s.device) for name, s in scores.items()}
        remaining = n_prune - sum(int(b.sum()) for b in below.values())
        for name, s in scores.items():
            mask = ~below[name]
            if remaining > 0:
                ties = (s == threshold.to(s.device)).reshape(-1).nonzero().squeeze(1)[:remaining]
                mask.view(-1)[ties] = False
                remaining -= ties.numel()
            masks[name] = mask
        return masks
    for name, s in scores.items():
        if scope == "row":
            k = int(sparsity * s.shape[1])
            if k == 0:
                masks[name] = torch.ones_like(s, dtype=torch.bool)
                continue
            idx = torch.topk(s, k, dim=1, largest=False).indices
            masks[name] = torch.ones_like(s, dtype=torch.bool).scatter_(1, idx, False)
        elif scope == "layer":
            masks[name] = _keep_top(s, s.numel() - int(sparsity * s.numel()))
        else:
            raise ValueError(f"unknown sparsity scope {scope!r}; allowed: layer, row, global")
    return masks


def to_module_layout(masks: Mapping[str, torch.Tensor], modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Convert (out, in) masks to each module's weight layout and device."""
    return {
        name: out_in(mask, modules[name]).contiguous().to(modules[name].weight.device) for name, mask in masks.items()
    }


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the masked weights in place (masks in module layout, as returned by :func:`to_module_layout`)."""
    MaskApplier(model, masks)()


class MaskApplier:
    """Re-applies fixed masks cheaply after every optimizer step.

    Resolves the weights once and keeps the *pruned* positions (``~keep``) on the weights' device, so each call is
    one in-place ``masked_fill_`` per matrix: no module lookup, no dtype conversion, no temporary mask.
    Rebuild it whenever parameters are replaced (structural pruning swaps ``nn.Parameter`` objects). Under FSDP2
    each rank keeps its chunk of every (whole) mask and fills its chunk of the weight (:mod:`hf_prune.training.fsdp`).
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]):
        reshard(model)  # FSDP2: the sharded parameters the optimizer steps, not a forward's temporary full copies
        modules = dict(model.named_modules())
        self.pairs = [(modules[name].weight, shard_like(~mask, modules[name].weight)) for name, mask in masks.items()]

    @torch.no_grad()
    def __call__(self) -> None:
        for weight, pruned in self.pairs:
            local_part(weight).masked_fill_(pruned, 0.0)


def sparsity_report(model: nn.Module) -> dict[str, object]:
    """Fraction of exactly-zero weights per prunable matrix and overall (what the saved model really holds)."""
    per_module = {}
    zeros = total = 0
    for name, module in prunable_linears(model).items():
        z = int(full((module.weight == 0).sum()))  # sharded: this rank's count until reduced over ranks
        n = module.weight.numel()
        per_module[name] = z / n
        zeros += z
        total += n
    return {"overall": zeros / total if total else 0.0, "zeros": zeros, "total": total, "per_module": per_module}
