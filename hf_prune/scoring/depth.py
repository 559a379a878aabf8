"""Depth pruning: which whole blocks to remove.

Criteria (``PruningConfig.layer_criterion``), all measured on calibration data over non-padding tokens:

* ``"influence"``: Block Influence (ShortGPT, Men et al. 2024): ``1 - cos(x_in, x_out)`` of each block's input and
  output hidden states; the blocks that change their input least go first. Blocks are scored once, independently.
* ``"angular"``: the angular distance ``arccos(cos(x_l, x_{l+n})) / pi`` between the input of block ``l`` and the
  output of block ``l + n - 1`` (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"): the
  ``n`` *consecutive* blocks whose span changes the representation least go, as one run.
* ``"last"``: the ``n`` blocks before the final one, with no data (the baseline both papers compare against).

The choice is a pure function of the measured statistics (:func:`choose_blocks`); :func:`block_statistics` only
runs the model. Removal itself is :func:`hf_prune.structure.surgery.prune_layers`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..architectures import get_adapter
from ..config import LAYER_CRITERIA
from ..utils import eval_mode, model_device
from .calibration import no_cache, to_device


def _hidden(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def _mean_cos(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, int]:
    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).clamp(-1.0, 1.0)  # (batch, tokens)
    if mask is not None and mask.shape == cos.shape:
        keep = mask.to(cos.device).bool()
        return float(cos[keep].sum()), int(keep.sum())
    return float(cos.sum()), cos.numel()


def block_statistics(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], span: int = 1) -> torch.Tensor:
    """Mean cosine similarity, over non-padding calibration tokens, between the input of block ``l`` and the output
    of block ``l + span - 1``, for every ``l`` (``len = blocks - span + 1``); the model is not changed."""
    adapter = get_adapter(model)
    blocks = adapter.layers(model)
    n = len(blocks)
    if not 1 <= span <= n:
        raise ValueError(f"span must be in 1..{n}, got {span}")
    states: list[torch.Tensor | None] = [None] * (n + 1)  # states[l] = input of block l; states[n] = last output

    def pre_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            states[index] = (args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
        states[n] = _hidden(output).detach()

    handles = [block.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, block in enumerate(blocks)]
    handles.append(blocks[-1].register_forward_hook(post_hook))
    sums, count = torch.zeros(n - span + 1, dtype=torch.float64), 0
    device = model_device(model)
    try:
        with eval_mode(model), torch.inference_mode():
            for batch in batches:
                batch = to_device(batch, device)
                model(**batch, **no_cache(model))
                mask = batch.get("attention_mask")
                for start in range(n - span + 1):
                    total, tokens = _mean_cos(states[start], states[start + span], mask)
                    sums[start] += total
                count += tokens
                states = [None] * (n + 1)
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError("block scores need at least one calibration token")
    return sums / count


def choose_blocks(criterion: str, n_blocks: int, n_remove: int, cos: torch.Tensor | None = None) -> list[int]:
    """Blocks to remove: ``n_remove`` of ``n_blocks`` by ``criterion`` (see module docstring); ``cos`` comes from
    :func:`block_statistics` (span 1 for ``"influence"``, span ``n_remove`` for ``"angular"``)."""
    if criterion not in LAYER_CRITERIA:
        raise ValueError(f"layer_criterion={criterion!r} is invalid; allowed: {', '.join(LAYER_CRITERIA)}")
    if not 0 <= n_remove < n_blocks:
        raise ValueError(f"cannot remove {n_remove} of {n_blocks} blocks; allowed 0..{n_blocks - 1}")
    if n_remove == 0:
        return []
    if criterion == "last":
        return list(range(n_blocks - 1 - n_remove, n_blocks - 1))
    if cos is None:
        raise ValueError(f"layer_criterion={criterion!r} needs block statistics (calibration data)")
    if criterion == "influence":
        influence = 1 - cos  # smallest change first; ties keep the earlier block
        return sorted(torch.argsort(influence, stable=True)[:n_remove].tolist())
    angular = torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi
    start = int(torch.argmin(angular))
    return list(range(start, start + n_remove))


def select_blocks(
    model: nn.Module, criterion: str, fraction: float, batches: Iterable[Mapping[str, torch.Tensor]] | None
) -> tuple[list[int], list[float] | None]:
    """``(blocks to remove, the per-block or per-run scores they were chosen by)`` for ``fraction`` of the blocks."""
    n = len(get_adapter(model).layers(model))
    n_remove = round(fraction * n)
    if n_remove >= n:
        raise ValueError(f"layers={fraction} would remove all {n} blocks; keep at least one")
    if n_remove == 0 or criterion == "last":
        return choose_blocks(criterion, n, n_remove), None
    if batches is None:
        raise ValueError(f"layer_criterion={criterion!r} needs calibration data")
    cos = block_statistics(model, batches, span=1 if criterion == "influence" else n_remove)
    return choose_blocks(criterion, n, n_remove, cos), (1 - cos).tolist()


def attention_statistics(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """Per block, the mean cosine similarity (non-padding calibration tokens) between the block's input ``x`` and
    ``x + a``, ``a`` the attention branch's output (what its output projection adds to the residual stream). One
    minus it is the attention sublayer's influence, ShortGPT's Block Influence applied to the sublayer; a block
    whose attention is already removed gets 1 (no influence). The model is not changed."""
    adapter = get_adapter(model)
    blocks = adapter.layers(model)
    out_path = next(p.path for p in adapter.attention_projs if p.side == "in" and set(p.units()) == {"q"})
    inputs: list[torch.Tensor | None] = [None] * len(blocks)
    branch: list[torch.Tensor | None] = [None] * len(blocks)

    def pre_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            inputs[index] = (args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    def out_hook(index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            branch[index] = _hidden(output).detach()

        return hook

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(block.get_submodule(out_path).register_forward_hook(out_hook(i)))
    sums, count = torch.zeros(len(blocks), dtype=torch.float64), 0
    device = model_device(model)
    try:
        with eval_mode(model), torch.inference_mode():
            for batch in batches:
                batch = to_device(batch, device)
                model(**batch, **no_cache(model))
                mask = batch.get("attention_mask")
                tokens = 0
                for i, x in enumerate(inputs):
                    a = branch[i]
                    # no attention left in this block (its branch adds nothing): x against itself, cosine 1
                    total, tokens = _mean_cos(x, x if a is None or a.shape != x.shape else x + a, mask)
                    sums[i] += total
                count += tokens
                branch = [None] * len(blocks)
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError("attention scores need at least one calibration token")
    return sums / count


def select_attention(
    model: nn.Module,
    criterion: str,
    n_remove: int,
    batches: Iterable[Mapping[str, torch.Tensor]] | None,
    exclude: Iterable[int] = (),
) -> list[int]:
    """Blocks whose attention sublayer to remove: ``n_remove`` of those that still have attention and are not in
    ``exclude`` (blocks going anyway). ``"last"``: the ones before the final block, without data; ``"influence"``
    and ``"angular"``: the smallest influence measured by :func:`attention_statistics` (a sublayer is one step, so
    both name the same statistic here)."""
    if criterion not in LAYER_CRITERIA:
        raise ValueError(f"layer_criterion={criterion!r} is invalid; allowed: {', '.join(LAYER_CRITERIA)}")
    shapes = get_adapter(model).layer_shapes(model)
    gone = set(exclude)
    candidates = [i for i, s in enumerate(shapes) if s.heads > 0 and i not in gone]
    if not 0 <= n_remove <= len(candidates):
        raise ValueError(
            f"cannot remove the attention of {n_remove} blocks: {len(candidates)} blocks keep attention "
            f"({len(gone)} of {len(shapes)} blocks are removed)"
        )
    if n_remove == 0:
        return []
    if criterion == "last":  # the final block's attention goes last, as the final block does in "last" depth
        pool = [i for i in candidates if i != len(shapes) - 1]
        return sorted((pool if len(pool) >= n_remove else candidates)[-n_remove:])
    if batches is None:
        raise ValueError(f"layer_criterion={criterion!r} needs calibration data to choose attention sublayers")
    influence = 1 - attention_statistics(model, batches)
    ranked = sorted(candidates, key=lambda i: (float(influence[i]), i))
    return sorted(ranked[:n_remove])
