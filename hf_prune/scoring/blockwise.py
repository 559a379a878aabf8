"""Calibration batches run through a model's blocks one block at a time (as SparseGPT does).

Passes that need statistics of each block's inputs (the OBS reconstruction of sparse weights, the least-squares refit
of structured pruning) hold one block's statistics at a time this way, instead of hooking every block in one full
pass: on a 7B model the Gram matrices of all blocks' output projections alone are about 17 GB in fp32, one block's
about 0.5 GB. :class:`Gram` and :func:`attach_gram_hooks` collect those statistics (``X^T X`` of a module's inputs).

One hooked forward pass records, per batch, the hidden states entering the first block and the other arguments every
block receives. Those arguments differ between blocks in current models (Gemma 2/3, ModernBERT and Qwen3 give sliding-
window layers another attention mask and other rotary tables than full-attention layers), so each block gets its own,
as recorded; they are the same tensor objects for blocks of one kind, so keeping them costs no memory. The pass stops
before the last block runs, so the output head (a vocabulary-sized logits tensor for LMs) is never computed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..utils import eval_mode, model_device
from .calibration import no_cache, to_device

Call = tuple[tuple[Any, ...], dict[str, Any]]


class _Stop(Exception):
    pass


class BlockInputs:
    """The inputs of ``layers[i]`` for every calibration batch, advanced block by block.

    Usage::

        inputs = BlockInputs(model, layers, batches)
        for i, block in enumerate(layers):
            ...                      # hook block i, then:
            outputs = inputs.run(i)  # block i on every batch
            inputs.advance(outputs)  # what block i + 1 receives

    ``token_masks`` holds each batch's attention mask (``None`` where the batch has none), to leave padding out of
    statistics.
    """

    def __init__(self, model: nn.Module, layers: nn.ModuleList, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        self.layers = layers
        self.hidden: list[torch.Tensor] = []
        self.token_masks: list[torch.Tensor | None] = []
        # per batch, per block: the call with the hidden states left out (None where they are)
        self._calls: list[list[Call]] = []
        self._positional: list[bool] = []
        self._autocast: tuple[str, bool, torch.dtype] = ("cpu", False, torch.bfloat16)
        current: list[Call] = []

        def record(index: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                if index == 0:
                    positional = bool(args)
                    self._positional.append(positional)
                    hidden = args[0] if positional else kwargs["hidden_states"]
                    self.hidden.append(hidden)
                    # accelerate's mixed precision wraps model.forward (not the blocks) in autocast: replay the
                    # blocks under the autocast state they ran in, or fp32 activations meet bf16 weights
                    kind = hidden.device.type
                    self._autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
                if args:
                    current.append(((None, *args[1:]), kwargs))
                else:
                    current.append(((), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
                if index == len(layers) - 1:
                    raise _Stop

            return hook

        handles = [block.register_forward_pre_hook(record(i), with_kwargs=True) for i, block in enumerate(layers)]
        # no KV cache: the recorded arguments are replayed through each block and must not grow a cache
        cache_off = no_cache(model)
        device = model_device(model)
        try:
            with eval_mode(model), torch.no_grad():
                for batch in batches:
                    batch = to_device(batch, device)
                    current = []
                    with contextlib.suppress(_Stop):
                        model(**{k: v for k, v in batch.items() if k != "labels"}, **cache_off)
                    if len(current) != len(layers):
                        raise RuntimeError(
                            f"the calibration pass reached {len(current)} of {len(layers)} blocks; hf_prune replays "
                            "each block's recorded inputs and needs the model to call every block once per forward"
                        )
                    self._calls.append(current)
                    self.token_masks.append(batch.get("attention_mask"))
        finally:
            for h in handles:
                h.remove()
        if not self.hidden:
            raise ValueError("the calibration data yielded no batches")

    def __len__(self) -> int:
        """Number of batches."""
        return len(self.hidden)

    def calls(self, index: int) -> Iterator[Call]:
        """``(args, kwargs)`` of block ``index`` for each batch, with the current hidden states."""
        for hidden, positional, calls in zip(self.hidden, self._positional, self._calls, strict=True):
            args, kwargs = calls[index]
            if positional:
                yield (hidden, *args[1:]), kwargs
            else:
                yield (), {**kwargs, "hidden_states": hidden}

    @torch.no_grad()
    def run(self, index: int, before_each: Any = None) -> list[torch.Tensor]:
        """Block ``index`` on every batch; returns its output hidden states. ``before_each(batch_number)`` is called
        before each batch (e.g. to point a statistics hook at that batch's token mask)."""
        block = self.layers[index]
        outputs = []
        kind, enabled, dtype = self._autocast
        with torch.autocast(kind, dtype=dtype, enabled=enabled):
            for n, (args, kwargs) in enumerate(self.calls(index)):
                if before_each is not None:
                    before_each(n)
                out = block(*args, **kwargs)
                outputs.append(out[0] if isinstance(out, tuple) else out)
        return outputs

    def advance(self, outputs: list[torch.Tensor]) -> None:
        """Make ``outputs`` (of the block just run) the inputs of the next block."""
        if len(outputs) != len(self.hidden):
            raise ValueError(f"expected {len(self.hidden)} outputs, got {len(outputs)}")
        self.hidden = outputs


class Gram:
    """``X^T X`` of a stream of row batches, accurate to about float64 from float32 matmuls.

    Large-activation models (Gemma's, any LLM with "massive activations") have inputs dominated by their mean; a
    plain float32 sum of ``x^T x`` then loses the small directions a least-squares refit depends on. Each batch's
    centred product is far better conditioned in float32 (float64 on CPUs, where it costs little); the batches are
    combined in float64 with Chan et al.'s pairwise update, and the mean's outer product is added back once, in
    float64. Shared by the OBS update of sparse weights and the structured least-squares refit.
    """

    def __init__(self, rows: torch.Tensor | None = None) -> None:
        # Only the rows ``rows`` of ``X^T X`` (all columns): the structured refit needs ``G[K, :]`` for the kept
        # columns ``K`` only, so a 2x cut halves the dominant cost of the refit pass (the products) with the same
        # numbers as slicing the full matrix.
        self.rows = rows
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.rows is None else t.index_select(0, self.rows.to(t.device))

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (rows, features)."""
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


def attach_gram_hooks(
    modules: dict,
    with_ones: frozenset = frozenset(),
    token_mask: list[torch.Tensor | None] | None = None,
    rows: dict | None = None,
) -> tuple[dict, dict, list]:
    """Accumulate ``X^T X`` (:class:`Gram`) and the row count of every module's input while the hooks are attached.

    Returns ``(grams, counts, handles)``, keyed like ``modules``; remove the handles when done. Modules whose key is
    in ``with_ones`` get a constant 1 appended to each input row (for fitting a bias). When ``token_mask[0]`` holds
    the current batch's attention mask, padding rows are left out. ``rows[key]``, when given, keeps only those rows
    of the module's ``X^T X``.
    """
    grams: dict = {}
    counts: dict = {}

    def make_hook(name):
        def hook(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            mask = token_mask[0] if token_mask is not None else None
            if mask is not None and mask.numel() == x.shape[0]:
                x = x[mask.reshape(-1).to(x.device).bool()]
            if name in with_ones:
                x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
            grams.setdefault(name, Gram(None if rows is None else rows.get(name))).add(x)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    return grams, counts, handles
