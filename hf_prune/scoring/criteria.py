"""Importance criteria: pure functions from a model (and calibration data) to scores.

Every structured criterion returns :class:`Scores`: one 1-D tensor per layer for attention heads (indexed by
query head) and one for FFN neurons. Higher means more important. Nothing here modifies the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn
from tqdm.auto import tqdm

from ..architectures import ArchAdapter, get_adapter
from ..architectures.base import out_in, unit_sums
from ..config import CRITERIA, GRADIENT_CRITERIA, closest
from ..utils import eval_mode, model_device
from .calibration import to_device


@dataclass
class Scores:
    """Per-layer importance of heads (by query head) and FFN neurons."""

    heads: list[torch.Tensor]
    ffn: list[torch.Tensor]
    criterion: str = ""


def feature_sq_norms(module: nn.Module, side: str) -> torch.Tensor:
    """Sum of squared weights per output (``side="out"``) or input feature of a Linear / Conv1D."""
    w = out_in(module.weight.detach().float(), module)
    return w.pow(2).sum(dim=1 if side == "out" else 0)


def magnitude_scores(model: nn.Module) -> Scores:
    """L2 norm of every weight a head / neuron owns (q, k, v rows and o columns; FFN rows and columns).

    Needs no data. Under grouped-query attention the key/value weights of a group count towards each of
    its query heads, so heads of one group compare fairly with heads of another.
    """
    adapter = get_adapter(model)
    head_dim = adapter.head_dim(model.config)
    heads, ffn = [], []
    for i, block in enumerate(adapter.layers(model)):
        shape = adapter.layer_shape(model, i)
        counts = {"q": shape.heads, "kv": shape.kv_heads, "ffn": shape.ffn}
        width = {"q": head_dim, "kv": head_dim, "ffn": 1}
        device = block.get_submodule(adapter.attention_projs[0].path).weight.device
        head_score = torch.zeros(shape.heads, device=device)
        if shape.heads:
            group = shape.heads // shape.kv_heads
            for proj in adapter.attention_projs:
                sq = feature_sq_norms(block.get_submodule(proj.path), proj.side)
                sums = unit_sums(sq, proj.units(), counts, width)
                if "q" in sums:
                    head_score += sums["q"]
                if "kv" in sums:  # a group's key/value weights count towards each of its query heads
                    head_score += sums["kv"].repeat_interleave(group)
        heads.append(head_score.sqrt())
        ffn_device = block.get_submodule(adapter.ffn_projs[0].path).weight.device
        neuron_score = torch.zeros(shape.ffn, device=ffn_device)
        for proj in adapter.ffn_projs:
            sq = feature_sq_norms(block.get_submodule(proj.path), proj.side)
            neuron_score += unit_sums(sq, proj.units(), counts, width)["ffn"]
        ffn.append(neuron_score.sqrt())
    return Scores(heads=heads, ffn=ffn, criterion="magnitude")


def random_scores(model: nn.Module, seed: int = 0) -> Scores:
    """Seeded random scores: the control every criterion is compared to.

    Drawn by a CPU generator (the same numbers on every device and rank), then placed on the model's device.
    """
    adapter: ArchAdapter = get_adapter(model)
    g = torch.Generator().manual_seed(seed)
    shapes = adapter.layer_shapes(model)
    device = model_device(model)
    return Scores(
        heads=[torch.rand(s.heads, generator=g).to(device) for s in shapes],
        ffn=[torch.rand(s.ffn, generator=g).to(device) for s in shapes],
        criterion="random",
    )


# ---------------------------------------------------------------------------------------------------------
# data-driven criteria
# ---------------------------------------------------------------------------------------------------------
def _ensure_labels(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Batches without labels get the natural self-supervised target: next tokens for causal LMs, the model's
    own prediction (pseudo-label) for classifiers."""
    if "labels" in batch:
        return batch
    batch = dict(batch)
    if getattr(model.config, "is_decoder", False) or type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
        return batch
    with torch.no_grad():
        logits = model(**batch).logits
    batch["labels"] = logits.argmax(-1)
    return batch


def _mask_hooks(model: nn.Module, masks: dict[str, list[torch.Tensor | None]]) -> list:
    """Multiply ``masks["heads"][i]`` (examples, heads) into the input of block ``i``'s attention output projection
    (each head's entry repeated over its ``head_dim`` features) and ``masks["ffn"][i]`` into its FFN down
    projection's; returns the hook handles."""
    adapter = get_adapter(model)
    head_dim = adapter.head_dim(model.config)
    o_proj = next(p for p in adapter.attention_projs if p.side == "in")
    down_proj = next(p for p in adapter.ffn_projs if p.side == "in")

    def hook(kind_: str, i: int, expand: int):
        def pre_hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            mask = masks[kind_][i]
            if mask is None or mask.shape[1] == 0:
                return args
            scale = mask.to(device=x.device, dtype=x.dtype).repeat_interleave(expand, dim=-1)
            return (x * scale.view(x.shape[0], *([1] * (x.dim() - 2)), -1), *args[1:])

        return pre_hook

    handles = []
    for i, block in enumerate(adapter.layers(model)):
        handles.append(block.get_submodule(o_proj.path).register_forward_pre_hook(hook("heads", i, head_dim)))
        handles.append(block.get_submodule(down_proj.path).register_forward_pre_hook(hook("ffn", i, 1)))
    return handles


def _add_mask_gradients(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    masks: dict[str, list[torch.Tensor | None]],
    acc: dict[str, list[torch.Tensor]],
    kind: str,
) -> int:
    """One batch: fresh per-example masks of ones, one backward pass, ``|g|`` (taylor) or ``g**2`` (fisher) summed
    over the examples into ``acc``. Returns the number of examples."""
    n = batch["input_ids"].shape[0]
    device = batch["input_ids"].device
    for key in ("heads", "ffn"):  # one mask entry per unit ``acc`` scores
        masks[key] = [torch.ones(n, len(a), device=device, requires_grad=True) for a in acc[key]]
    loss = model(**batch).loss * n  # per-example gradients of the summed loss
    leaves = [m for m in masks["heads"] + masks["ffn"] if m is not None and m.numel()]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grad_of = {id(m): g for m, g in zip(leaves, grads, strict=True)}
    for key in ("heads", "ffn"):
        for i, m in enumerate(masks[key]):
            g = grad_of.get(id(m))
            if g is None:
                continue
            g = g.detach().float()
            acc[key][i] += (g.abs().sum(0) if kind == "taylor" else g.pow(2).sum(0)).to(acc[key][i].device)
    return n


@contextlib.contextmanager
def recomputed_blocks(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run every transformer block under activation checkpointing (non-reentrant ``torch.utils.checkpoint``) inside
    the ``with`` block: the backward pass recomputes a block's activations instead of keeping them, so the memory a
    gradient pass holds grows by one block input per block rather than by every activation of every block (one
    extra forward pass of compute). ``model.config.use_cache`` is off meanwhile: a recomputed attention must not
    append to a KV cache twice.

    Why not transformers' ``gradient_checkpointing_enable``: it acts only in training mode, and scoring runs in eval
    mode (no dropout).
    """
    if not enabled:
        yield
        return
    blocks = get_adapter(model).layers(model)
    had_cache = getattr(model.config, "use_cache", None)
    for block in blocks:
        forward = block.forward

        def checkpointed(*args: object, _forward=forward, **kwargs: object) -> object:
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed  # an instance attribute: nn.Module.__call__ runs it instead of the class's
    if had_cache is not None:
        model.config.use_cache = False
    try:
        yield
    finally:
        for block in blocks:
            del block.forward
        if had_cache is not None:
            model.config.use_cache = had_cache


def mask_gradient_scores(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    kind: str = "fisher",
    max_samples: int | None = None,
    progress: bool = True,
    recompute: bool | None = None,
) -> Scores:
    """Head and neuron importance from gradients of the loss w.r.t. per-example masks on their outputs.

    A mask of ones is multiplied into the input of each attention output projection (one entry per head) and of
    each FFN down projection (one per neuron), separately for every example, so one backward pass gives
    per-example gradients ``g``. ``kind="taylor"`` sums ``|g|`` (Michel et al. 2019, "Are Sixteen Heads Really
    Better than One?"); ``kind="fisher"`` sums ``g**2``, the diagonal empirical Fisher information of the mask
    (Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers"). The model's weights get no
    gradients (they are frozen for the duration), so this costs about two forward passes per batch.

    ``recompute``: recompute block activations in the backward pass (:func:`recomputed_blocks`), a third forward
    pass for a peak that no longer grows with every block's activations. ``None`` (default): on for a model on a GPU,
    where memory is what runs out (measured and projected to 7B/8B shapes in ``benchmarks/memory.py``), off
    elsewhere, where time is.
    """
    if kind not in GRADIENT_CRITERIA:
        raise ValueError(f"kind={kind!r} is invalid; allowed: {', '.join(GRADIENT_CRITERIA)}")
    shapes = get_adapter(model).layer_shapes(model)
    device = model_device(model)
    acc = {
        "heads": [torch.zeros(s.heads, device=device) for s in shapes],
        "ffn": [torch.zeros(s.ffn, device=device) for s in shapes],
    }
    masks: dict[str, list[torch.Tensor | None]] = {"heads": [None] * len(shapes), "ffn": [None] * len(shapes)}
    handles = _mask_hooks(model, masks)
    requires = {p: p.requires_grad for p in model.parameters()}
    seen = 0
    recompute = device.type == "cuda" if recompute is None else recompute
    with eval_mode(model), recomputed_blocks(model, recompute):
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            for batch in tqdm(batches, desc=f"{kind} scores", disable=not progress, leave=False):
                seen += _add_mask_gradients(model, _ensure_labels(model, to_device(batch, device)), masks, acc, kind)
                if max_samples is not None and seen >= max_samples:
                    break
        finally:
            for h in handles:
                h.remove()
            for p, flag in requires.items():
                p.requires_grad_(flag)
    if seen == 0:
        raise ValueError(f"criterion {kind!r} needs calibration data, but the calibration data yielded no batches")
    return Scores(heads=acc["heads"], ffn=acc["ffn"], criterion=kind)


def input_norms(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[dict[str, torch.Tensor]],
    max_samples: int | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """L2 norm of every input feature of ``modules`` over all calibration tokens (padding excluded): the
    ``||X_j||`` of Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models")."""
    sums = {name: None for name in modules}
    current_mask: list[torch.Tensor | None] = [None]

    def make_hook(name: str):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            x = x.reshape(-1, x.shape[-1])
            if current_mask[0] is not None and current_mask[0].numel() == x.shape[0]:
                x = x[current_mask[0].reshape(-1).to(x.device).bool()]
            sq = x.pow(2).sum(0)
            sums[name] = sq if sums[name] is None else sums[name] + sq

        return pre_hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    device = model_device(model)
    seen = 0
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="activation norms", disable=not progress, leave=False):
                batch = to_device(batch, device)
                current_mask[0] = batch.get("attention_mask")
                model(**{k: v for k, v in batch.items() if k != "labels"})
                seen += batch["input_ids"].shape[0]
                if max_samples is not None and seen >= max_samples:
                    break
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise ValueError("activation-aware pruning needs calibration data, but it yielded no batches")
    return {name: s.sqrt() for name, s in sums.items() if s is not None}


def structured_scores(
    model: nn.Module,
    criterion: str,
    batches: Iterable[dict[str, torch.Tensor]] | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Scores:
    """Dispatch by name: ``magnitude``, ``random``, ``taylor`` or ``fisher``."""
    if criterion == "magnitude":
        return magnitude_scores(model)
    if criterion == "random":
        return random_scores(model, seed)
    if criterion in GRADIENT_CRITERIA:
        if batches is None:
            raise ValueError(f"criterion {criterion!r} needs calibration_data (batches of tokenized examples)")
        return mask_gradient_scores(model, batches, criterion, max_samples, progress)
    raise ValueError(
        f"unknown criterion {criterion!r}{closest(str(criterion), CRITERIA)}; allowed: {', '.join(CRITERIA)}"
    )
