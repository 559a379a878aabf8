"""Empty branches: a layer whose heads (or FFN neurons) are all removed keeps only its output-projection bias.

The block's attention (or FFN) module gets a subclass whose forward returns that bias and, for decoders, keeps the
KV cache's length bookkeeping right so ``generate()`` still works.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .architectures.base import num_features


def _branch_output(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    out_path = module._hf_prune_out
    if out_path is None:
        # The model applies the output projection outside this module (BERT): hand it zero features.
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
    out = module.get_submodule(out_path)
    result = hidden_states.new_zeros(*hidden_states.shape[:-1], num_features(out, "out"))
    if getattr(out, "bias", None) is not None:
        result = result + out.bias
    return result


def _empty_attention_forward(self: nn.Module, hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any):
    if hidden_states is None:
        hidden_states = kwargs["hidden_states"]
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    layer_idx = getattr(self, "layer_idx", None)
    if cache is not None and layer_idx is not None and kwargs.get("encoder_hidden_states") is None:
        # generate() reads the sequence length from the cache; store zero heads of the right length.
        cache = getattr(cache, "self_attention_cache", cache)
        batch, seq = hidden_states.shape[0], hidden_states.shape[1]
        empty = hidden_states.new_zeros(batch, 0, seq, self._hf_prune_head_dim)
        cache.update(empty, empty, layer_idx)
    return _branch_output(self, hidden_states), None


def _empty_ffn_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return _branch_output(self, hidden_states)


_EMPTY_CLASSES: dict[tuple[type, str], type] = {}


def make_empty(module: nn.Module, kind: str, out_path: str | None, head_dim: int = 0) -> None:
    """Swap ``module``'s class for a subclass whose forward returns the branch's output bias.

    A subclass (not a monkey-patched bound method) keeps ``isinstance`` checks, ``deepcopy`` and
    ``state_dict`` keys exactly as before.
    """
    cls = type(module)
    if getattr(cls, "_hf_prune_empty", None) is None:
        key = (cls, kind)
        if key not in _EMPTY_CLASSES:
            forward = _empty_attention_forward if kind == "attention" else _empty_ffn_forward
            _EMPTY_CLASSES[key] = type(
                f"Empty{cls.__name__}", (cls,), {"forward": forward, "_hf_prune_empty": kind, "__module__": __name__}
            )
        module.__class__ = _EMPTY_CLASSES[key]
    module._hf_prune_out = out_path
    module._hf_prune_head_dim = head_dim
