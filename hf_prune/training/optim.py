"""Keep an optimizer in step with structural surgery: swap the replaced parameters in place, slice their state.

Surgery replaces each pruned ``nn.Parameter`` by a smaller one (:class:`~hf_prune.structure.slicing.ParamSlice`).
Rebuilding the
optimizer would restart Adam for every pruned matrix at each event (its moments are the optimizer's memory of
the gradient scale; losing them spikes the update size exactly when the network is most fragile). Instead the new
parameter takes the old one's place in its param group, and every state tensor shaped like the parameter (Adam's
``exp_avg``/``exp_avg_sq``, momentum buffers) is sliced with the same indices, so the kept rows keep their moments.

Working in place also keeps every other reference valid: the LR scheduler (it points at the param groups, not the
parameters), accelerate's optimizer wrapper and the trainer's own attribute, so nothing needs re-preparing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.utils import logging

from ..structure.slicing import ParamSlice

logger = logging.get_logger(__name__)


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    # accelerate's AcceleratedOptimizer (and similar wrappers) keep the torch optimizer in ``.optimizer``
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"cannot update optimizer of type {type(optimizer).__name__}; expected a torch.optim.Optimizer")
    return optimizer


def _slice_state(state: dict[str, Any], s: ParamSlice) -> dict[str, Any] | None:
    """The state of ``s.old`` sliced for ``s.new``; ``None`` when a tensor cannot be mapped (factored/quantised)."""
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            out[key] = value
        elif value.shape == s.old.shape:
            out[key] = value.index_select(s.dim, s.index.to(value.device)).clone()
        else:
            return None
    return out


def remap_optimizer(optimizer: Any, slices: Sequence[ParamSlice]) -> int:
    """Replace every sliced parameter in ``optimizer``'s param groups by its successor and slice its state.

    Slices are applied in order, so a parameter cut twice follows the chain. Parameters the optimizer does not hold
    are ignored. Returns the number of parameters whose state was carried over; a state that cannot be sliced
    (e.g. Adafactor's factored moments) is dropped for that parameter with a warning, so it restarts.
    """
    inner = _inner(optimizer)
    position = {id(p): (g, k) for g, group in enumerate(inner.param_groups) for k, p in enumerate(group["params"])}
    carried, dropped = 0, []
    for s in slices:
        where = position.pop(id(s.old), None)
        if where is None:
            continue
        g, k = where
        inner.param_groups[g]["params"][k] = s.new
        position[id(s.new)] = where
        state = inner.state.pop(s.old, None)
        if state:
            sliced = _slice_state(state, s)
            if sliced is None:
                dropped.append(tuple(s.old.shape))
            else:
                inner.state[s.new] = sliced
                carried += 1
    if dropped:
        logger.warning(
            "hf_prune: optimizer state of %d pruned parameters (shapes %s) has a layout that cannot be sliced; it "
            "restarts for them",
            len(dropped),
            dropped[:4],
        )
    return carried
