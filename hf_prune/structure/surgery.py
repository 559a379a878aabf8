"""Structural surgery: physically remove attention heads and FFN neurons, in place.

This module (with the low-level slicing it calls, :mod:`hf_prune.structure.slicing`) is the only one that changes a
model's shapes; the refit after a cut (:mod:`hf_prune.structure.refit`) and
the OBS update (:mod:`hf_prune.sparsity.reconstruct`) copy new values into the kept weights, never reshaping them.
It reads *where* things live from the architecture adapters (:mod:`hf_prune.architectures`) and records the resulting
per-layer shapes in ``model.config.hf_prune`` so :func:`hf_prune.from_pretrained` can rebuild them before weights
load (``transformers`` 5 has no ``PreTrainedModel.prune_heads`` or ``config.pruned_heads``: nothing upstream does).

Layers may lose *every* head or *every* FFN neuron. Such a branch reduces to its output-projection bias: the
block's attention (or FFN) module gets a cheap forward that returns the bias and, for decoders, keeps the
KV cache's length bookkeeping right so ``generate()`` still works.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..architectures import ArchAdapter, LayerShape, get_adapter
from ..architectures.base import unit_feature_index
from .remote_code import make_empty
from .slicing import slice_params, slice_projection
from .state import check_state, current_state, own_config, pruning_state, record_state

logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------------------------------------
# per-layer operations (no validation: callers validate first so a bad request never half-applies)
# ---------------------------------------------------------------------------------------------------------
def _resize_attention(
    adapter: ArchAdapter, block: nn.Module, shape: LayerShape, keep_q: list[int], keep_kv: list[int], head_dim: int
) -> None:
    keep = {"q": keep_q, "kv": keep_kv}
    counts = {"q": shape.heads, "kv": shape.kv_heads}
    width = {"q": head_dim, "kv": head_dim}
    for proj in adapter.attention_projs:
        index = unit_feature_index(proj.units(), keep, counts, width)
        slice_projection(block.get_submodule(proj.path), index, proj.side)
    slice_params(block, adapter.attention_params, keep, counts, width)
    attention = block.get_submodule(adapter.attention_module)
    adapter.set_attention_attrs(attention, len(keep_q), len(keep_kv), head_dim)
    if not keep_q:
        make_empty(attention, "attention", adapter.attention_out, head_dim)


def _resize_ffn(adapter: ArchAdapter, block: nn.Module, size: int, keep: list[int]) -> None:
    keep_units, counts, width = {"ffn": keep}, {"ffn": size}, {"ffn": 1}
    for proj in adapter.ffn_projs:
        index = unit_feature_index(proj.units(), keep_units, counts, width)
        slice_projection(block.get_submodule(proj.path), index, proj.side)
    slice_params(block, adapter.ffn_params, keep_units, counts, width)
    ffn = block.get_submodule(adapter.ffn_module)
    adapter.set_ffn_attrs(ffn, len(keep))
    if not keep:
        make_empty(ffn, "ffn", adapter.ffn_out)


# ---------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------
def _parse_request(request: Mapping[Any, Iterable[int]], what: str, num_layers: int) -> dict[int, list[int]]:
    if not isinstance(request, Mapping):
        raise TypeError(f"{what} must be a mapping {{layer_index: [indices]}}, got {type(request).__name__}")
    out: dict[int, list[int]] = {}
    for key, values in request.items():
        try:
            if isinstance(key, (bool, float)):
                raise TypeError
            layer = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: layer key {key!r} is not an integer layer index") from None
        if not 0 <= layer < num_layers:
            raise ValueError(f"{what}: layer index {key!r} is out of range; allowed 0..{num_layers - 1}")
        out[layer] = sorted(set(out.get(layer, []) + _parse_indices(values, f"{what}[{layer}]")))
    return out


def _parse_indices(values: Iterable[int], what: str) -> list[int]:
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise TypeError(f"{what} must be a list of integer indices, got {values!r}")
    indices = []
    for v in values:
        if isinstance(v, bool) or (not isinstance(v, (int, torch.Tensor)) and not hasattr(v, "__index__")):
            raise TypeError(f"{what} contains {v!r}; indices must be integers")
        indices.append(int(v))
    return indices


def _check_range(what: str, layer: int, indices: list[int], size: int, unit: str) -> None:
    bad = [i for i in indices if not 0 <= i < size]
    if bad:
        raise ValueError(
            f"{what}: layer {layer} has {size} {unit} (valid indices 0..{size - 1}); got out-of-range {bad}"
        )


# ---------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------
def _plan_heads(
    model: nn.Module, heads: Mapping[int, Iterable[int]]
) -> dict[int, tuple[LayerShape, list[int], list[int]]]:
    """Validate a head-removal request against the current model; return per-layer (shape, keep_q, keep_kv)."""
    adapter = get_adapter(model)
    request = _parse_request(heads, "heads", len(adapter.layers(model)))
    plans: dict[int, tuple[LayerShape, list[int], list[int]]] = {}
    for layer, remove in request.items():
        if not remove:
            continue
        shape = adapter.layer_shape(model, layer)
        _check_range("heads", layer, remove, shape.heads, "heads")
        keep_q, keep_kv = _gqa_keep(layer, shape, set(remove))
        plans[layer] = (shape, keep_q, keep_kv)
    return plans


def _gqa_keep(layer: int, shape: LayerShape, remove: set[int]) -> tuple[list[int], list[int]]:
    """Kept query and key/value heads when ``remove`` leaves the layer's groups equal; else a ValueError.

    Query head ``h`` reads key/value head ``h // group``. A group that loses all its query heads loses its key/value
    head too; the surviving groups must keep the same number of query heads each, since the stock forward repeats
    every key/value head the same number of times. Kept heads stay in order, so each still reads its own group.
    """
    group = shape.heads // shape.kv_heads if shape.kv_heads else 1
    keep_q = [h for h in range(shape.heads) if h not in remove]
    kept = {g: [h for h in keep_q if h // group == g] for g in range(max(shape.kv_heads, 1))}
    keep_kv = [g for g, heads in kept.items() if heads]
    sizes = {len(kept[g]) for g in keep_kv}
    if len(sizes) > 1:
        smallest = min(sizes)
        even = sorted(h for g in keep_kv for h in kept[g][smallest:])
        partial = sorted(h for g in keep_kv if len(kept[g]) < group for h in kept[g])
        raise ValueError(
            f"heads: layer {layer} uses grouped-query attention ({group} query heads share each of its "
            f"{shape.kv_heads} key/value heads); removing {sorted(remove)} would leave groups of "
            f"{[len(kept[g]) for g in keep_kv]} query heads, and every group must keep the same number. "
            f"To even them out, also remove heads {even}; or remove whole groups: also remove heads {partial}."
        )
    return keep_q, keep_kv if shape.kv_heads else []


def _plan_ffn(model: nn.Module, neurons: Mapping[int, Iterable[int]]) -> dict[int, list[int]]:
    """Validate a neuron-removal request against the current model; return per-layer kept neurons."""
    adapter = get_adapter(model)
    request = _parse_request(neurons, "neurons", len(adapter.layers(model)))
    plans: dict[int, list[int]] = {}
    for layer, remove in request.items():
        if not remove:
            continue
        size = adapter.layer_shape(model, layer).ffn
        _check_range("neurons", layer, remove, size, "FFN neurons")
        removed = set(remove)
        plans[layer] = [i for i in range(size) if i not in removed]
    return plans


def _apply(
    model: nn.Module,
    head_plans: dict[int, tuple[LayerShape, list[int], list[int]]],
    ffn_plans: dict[int, list[int]],
) -> nn.Module:
    if not head_plans and not ffn_plans:
        return model
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    head_dim = adapter.head_dim(model.config)
    state = current_state(model, adapter)
    own_config(model)
    for layer, (shape, keep_q, keep_kv) in head_plans.items():
        _resize_attention(adapter, layers[layer], shape, keep_q, keep_kv, head_dim)
        state["kept_heads"][layer] = [state["kept_heads"][layer][h] for h in keep_q]
    for layer, keep in ffn_plans.items():
        _resize_ffn(adapter, layers[layer], adapter.layer_shape(model, layer).ffn, keep)
    record_state(model, adapter, state)
    removed_heads = sum(shape.heads - len(keep_q) for shape, keep_q, _ in head_plans.values())
    logger.info("hf_prune: removed %d attention heads in %d layers", removed_heads, len(head_plans))
    if ffn_plans:
        logger.info("hf_prune: pruned the FFN of %d layers", len(ffn_plans))
    return model


def prune_heads(model: nn.Module, heads: Mapping[int, Iterable[int]]) -> nn.Module:
    """Remove attention heads in place and return ``model``.

    Args:
        model: any model of a supported family (base model or task-head class).
        heads: ``{layer_index: [query_head_index, ...]}``. Indices refer to the *current* model, so the
            function can be applied repeatedly. With grouped-query attention (query head ``h`` reads key/value
            head ``h // (num_attention_heads // num_key_value_heads)``), remove whole groups (their key/value head
            goes too) or the same number of query heads from every group that remains, so the groups stay equal.

    Removing every head of a layer is allowed: that layer's attention branch then contributes only its
    output-projection bias (exactly what the unpruned model computes with those heads' values zeroed).

    Raises:
        ValueError: unsupported model type, layer or head index out of range, or groups left unequal (the message
            lists the heads that would even them out or complete the groups). Nothing is modified then.
    """
    return _apply(model, _plan_heads(model, heads), {})


def prune_ffn(model: nn.Module, neurons: Mapping[int, Iterable[int]]) -> nn.Module:
    """Remove FFN intermediate neurons in place and return ``model``.

    Args:
        model: any model of a supported family.
        neurons: ``{layer_index: [neuron_index, ...]}`` referring to the current model. Removing every neuron
            of a layer is allowed (the FFN branch then contributes only its output bias).

    Raises:
        ValueError: unsupported model type, or a layer/neuron index out of range. Nothing is modified then.
    """
    return _apply(model, {}, _plan_ffn(model, neurons))


def validate_plan(
    model: nn.Module,
    heads: Mapping[int, Iterable[int]] | None = None,
    neurons: Mapping[int, Iterable[int]] | None = None,
) -> None:
    """Check a head/neuron removal request against ``model`` without changing it (the errors of
    :func:`prune_structure`), so callers that need a calibration pass first can fail before it."""
    _plan_heads(model, heads or {})
    _plan_ffn(model, neurons or {})


def prune_structure(
    model: nn.Module,
    heads: Mapping[int, Iterable[int]] | None = None,
    neurons: Mapping[int, Iterable[int]] | None = None,
) -> nn.Module:
    """Remove heads and FFN neurons together; both requests are validated before anything changes."""
    head_plans = _plan_heads(model, heads or {})
    ffn_plans = _plan_ffn(model, neurons or {})
    return _apply(model, head_plans, ffn_plans)


def prune_layers(model: nn.Module, layers: Iterable[int]) -> nn.Module:
    """Remove whole transformer blocks in place (depth pruning) and return ``model``.

    Args:
        model: any model of a supported family.
        layers: indices of the blocks to remove, referring to the current model.

    The remaining blocks are renumbered (their ``layer_idx``, which KV caches are keyed by), and the config's block
    count and per-layer lists (``layer_types``) are cut to match, so a model whose widths are uniform loads with
    stock ``from_pretrained``. ``config.hf_prune["kept_layers"]`` records which original blocks remain.

    Raises:
        ValueError: an index out of range or not an integer, or a request that would remove every block. Nothing
            is modified when an error is raised.
    """
    adapter = get_adapter(model)
    blocks = adapter.layers(model)
    n = len(blocks)
    remove = sorted(set(_parse_indices(layers, "layers")))
    bad = [i for i in remove if not 0 <= i < n]
    if bad:
        raise ValueError(f"layers: the model has {n} blocks (valid indices 0..{n - 1}); got out-of-range {bad}")
    if len(remove) == n:
        raise ValueError(f"layers: removing all {n} blocks would leave no model; keep at least one")
    if not remove:
        return model
    state = current_state(model, adapter)
    config = own_config(model)
    keep = [i for i in range(n) if i not in set(remove)]
    for i in reversed(remove):
        del blocks[i]
    for new_index, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, adapter.layer_index_attr, None), int):
                setattr(module, adapter.layer_index_attr, new_index)
    setattr(config, adapter.layer_count_field, len(blocks))
    for field in adapter.per_layer_config_fields:
        values = getattr(config, field, None)
        if isinstance(values, (list, tuple)) and len(values) == n:
            setattr(config, field, [values[i] for i in keep])
    kept_layers = state.get("kept_layers") or list(range(n))
    state["kept_layers"] = [kept_layers[i] for i in keep]
    state["kept_heads"] = [state["kept_heads"][i] for i in keep]
    record_state(model, adapter, state)
    logger.info("hf_prune: removed %d of %d blocks (%s)", len(remove), n, remove)
    return model


def apply_layer_shapes(
    model: nn.Module,
    shapes: list[LayerShape] | list[dict[str, int]],
    state: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Resize every block to ``shapes`` by keeping the *first* heads/neurons, and record the result in the config.

    This rebuilds a pruned model's skeleton before its weights load (the kept values are then overwritten by the
    checkpoint). ``state`` is the checkpoint's recorded pruning state (``config.hf_prune``); it is checked against
    ``shapes`` and recorded as is, so head provenance (``kept_heads``) survives the reload. Without it, the model's
    own recorded state is kept when it already describes ``shapes``, else the state is derived from the resize.

    Raises:
        ValueError: wrong layer count, a shape larger than the model's, or a ``state`` that does not match.
    """
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    shapes = [s if isinstance(s, LayerShape) else LayerShape(**s) for s in shapes]
    if len(shapes) != len(layers):
        raise ValueError(f"the saved pruning state describes {len(shapes)} layers but the model has {len(layers)}")
    current_shapes = adapter.layer_shapes(model)
    for i, (current, target) in enumerate(zip(current_shapes, shapes, strict=True)):
        if target.heads > current.heads or target.kv_heads > current.kv_heads or target.ffn > current.ffn:
            raise ValueError(f"layer {i}: saved shape {target} is larger than the config's {current}")
    recorded = pruning_state(model)
    if state is None and recorded is not None:
        with contextlib.suppress(ValueError):
            check_state(model, recorded, shapes)
            state = recorded  # the config already describes the target shapes (a pruned model being reloaded)
    if state is not None:
        check_state(model, state, shapes)
        state = copy.deepcopy(dict(state))
    else:
        # the modules are cut further: derive from their own state (raises if the config describes another model)
        state = current_state(model, adapter)
        state["kept_heads"] = [k[: t.heads] for k, t in zip(state["kept_heads"], shapes, strict=True)]
    own_config(model)
    head_dim = adapter.head_dim(model.config)
    for block, current, target in zip(layers, current_shapes, shapes, strict=True):
        if (target.heads, target.kv_heads) != (current.heads, current.kv_heads):
            _resize_attention(
                adapter, block, current, list(range(target.heads)), list(range(target.kv_heads)), head_dim
            )
        if target.ffn != current.ffn:
            _resize_ffn(adapter, block, current.ffn, list(range(target.ffn)))
    record_state(model, adapter, state)
    return model
