"""Structural surgery: physically remove attention heads and FFN neurons, in place.

This is the only module that rewrites weights. It reads *where* things live from the architecture adapters
(:mod:`hf_prune.architectures`) and records the resulting per-layer shapes in ``model.config.hf_prune`` so
:func:`hf_prune.from_pretrained` can rebuild them before weights load (``transformers`` 5 removed
``PreTrainedModel.prune_heads`` and ``config.pruned_heads``, so nothing upstream does this anymore).

Layers may lose *every* head or *every* FFN neuron. Such a branch reduces to its output-projection bias: the
block's attention (or FFN) module gets a cheap forward that returns the bias and, for decoders, keeps the
KV cache's length bookkeeping right so ``generate()`` still works.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging

from .architectures import ArchAdapter, LayerShape, Proj, get_adapter
from .architectures.base import num_features

logger = logging.get_logger(__name__)

STATE_KEY = "hf_prune"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------
# low-level slicing
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamSlice:
    """One parameter replaced by surgery: ``new = old.index_select(dim, index)``.

    Lets whoever holds per-parameter state (an optimizer's Adam moments, EMA copies) slice it with the same indices
    instead of dropping it (see :func:`record_slices` and :func:`hf_prune.optim.remap_optimizer`).
    """

    old: nn.Parameter
    new: nn.Parameter
    dim: int
    index: torch.Tensor


_RECORDERS: list[list[ParamSlice]] = []


@contextlib.contextmanager
def record_slices() -> Iterator[list[ParamSlice]]:
    """Collect a :class:`ParamSlice` for every parameter surgery replaces inside the ``with`` block."""
    log: list[ParamSlice] = []
    _RECORDERS.append(log)
    try:
        yield log
    finally:
        _RECORDERS.remove(log)


def _replace(module: nn.Module, name: str, dim: int, index: torch.Tensor) -> None:
    old = getattr(module, name)
    new = nn.Parameter(old.detach().index_select(dim, index).clone(), requires_grad=old.requires_grad)
    setattr(module, name, new)
    for log in _RECORDERS:
        log.append(ParamSlice(old, new, dim, index))


def slice_projection(module: nn.Module, index: torch.Tensor, side: str) -> None:
    """Keep only the features ``index`` of ``module`` on ``side`` (``"out"`` or ``"in"``), in place.

    Works for ``nn.Linear`` (weight ``(out, in)``) and transformers' ``Conv1D`` (weight ``(in, out)``).
    The bias follows output features. New ``nn.Parameter`` objects replace the old ones, so any optimizer
    holding the old tensors must be told (the PruningTrainer slices their state, see :func:`record_slices`).
    """
    is_linear = isinstance(module, nn.Linear)
    if not is_linear and not isinstance(module, Conv1D):
        raise TypeError(f"hf_prune cannot slice {type(module).__name__}; expected nn.Linear or Conv1D")
    weight = module.weight
    index = index.to(device=weight.device, dtype=torch.long)
    if side == "out":
        dim = 0 if is_linear else 1
    elif side == "in":
        dim = 1 if is_linear else 0
    else:
        raise ValueError(f"side must be 'out' or 'in', got {side!r}")
    with torch.no_grad():
        _replace(module, "weight", dim, index)
        if side == "out" and getattr(module, "bias", None) is not None:
            _replace(module, "bias", 0, index)
    n = int(index.numel())
    if is_linear:
        if side == "out":
            module.out_features = n
        else:
            module.in_features = n
    elif side == "out":
        module.nf = n
    else:
        module.nx = n


def head_feature_index(heads: Iterable[int], head_dim: int) -> torch.Tensor:
    """Feature indices covered by ``heads`` (each head owns ``head_dim`` consecutive features)."""
    heads = torch.as_tensor(list(heads), dtype=torch.long)
    if heads.numel() == 0:
        return heads
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def proj_feature_index(proj: Proj, heads: Iterable[int], head_dim: int, part_size: int) -> torch.Tensor:
    """Feature indices of ``proj`` for the given heads, repeated over fused parts (GPT-2 ``c_attn``)."""
    base = head_feature_index(heads, head_dim)
    if proj.parts == 1:
        return base
    return torch.cat([base + p * part_size for p in range(proj.parts)])


# ---------------------------------------------------------------------------------------------------------
# empty branches (a layer with no heads / no neurons left)
# ---------------------------------------------------------------------------------------------------------
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


def _make_empty(module: nn.Module, kind: str, out_path: str | None, head_dim: int = 0) -> None:
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


# ---------------------------------------------------------------------------------------------------------
# per-layer operations (no validation: callers validate first so a bad request never half-applies)
# ---------------------------------------------------------------------------------------------------------
def _resize_attention(
    adapter: ArchAdapter, block: nn.Module, shape: LayerShape, keep_q: list[int], keep_kv: list[int], head_dim: int
) -> None:
    for proj in adapter.attention_projs:
        module = block.get_submodule(proj.path)
        keep = keep_q if proj.heads == "q" else keep_kv
        current_heads = shape.heads if proj.heads == "q" else shape.kv_heads
        index = proj_feature_index(proj, keep, head_dim, part_size=current_heads * head_dim)
        slice_projection(module, index, proj.side)
    attention = block.get_submodule(adapter.attention_module)
    adapter.set_attention_attrs(attention, len(keep_q), len(keep_kv), head_dim)
    if not keep_q:
        _make_empty(attention, "attention", adapter.attention_out, head_dim)


def _resize_ffn(adapter: ArchAdapter, block: nn.Module, keep: list[int]) -> None:
    index = torch.as_tensor(keep, dtype=torch.long)
    for proj in adapter.ffn_projs:
        slice_projection(block.get_submodule(proj.path), index, proj.side)
    ffn = block.get_submodule(adapter.ffn_module)
    adapter.set_ffn_attrs(ffn, len(keep))
    if not keep:
        _make_empty(ffn, "ffn", adapter.ffn_out)


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
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise TypeError(f"{what}[{layer}] must be a list of integer indices, got {values!r}")
        indices = []
        for v in values:
            if isinstance(v, bool) or (not isinstance(v, (int, torch.Tensor)) and not hasattr(v, "__index__")):
                raise TypeError(f"{what}[{layer}] contains {v!r}; indices must be integers")
            indices.append(int(v))
        out[layer] = sorted(set(out.get(layer, []) + indices))
    return out


def _check_range(what: str, layer: int, indices: list[int], size: int, unit: str) -> None:
    bad = [i for i in indices if not 0 <= i < size]
    if bad:
        raise ValueError(
            f"{what}: layer {layer} has {size} {unit} (valid indices 0..{size - 1}); got out-of-range {bad}"
        )


# ---------------------------------------------------------------------------------------------------------
# state recorded in the config
# ---------------------------------------------------------------------------------------------------------
def pruning_state(model: nn.Module) -> dict[str, Any] | None:
    """The hf_prune state stored in ``model.config`` (``None`` for an unpruned model)."""
    return getattr(model.config, STATE_KEY, None)


def own_config(model: nn.Module) -> PretrainedConfig:
    """Give ``model`` a config object of its own (once) and return it.

    Surgery writes the pruned shapes into the config. Two models built from one config object (a ``model_init``, a
    sweep, ``Model(cfg)`` twice) share it, and pruning one would then rewrite the other's recorded shapes. The first
    structural change therefore deep-copies the config and points every submodule that held the shared object at the
    copy; later changes find the model already owning it.
    """
    config = model.config
    if getattr(model, "_hf_prune_own_config", None) is config:
        return config
    mine = copy.deepcopy(config)
    for module in model.modules():
        if getattr(module, "config", None) is config:
            module.config = mine
    model._hf_prune_own_config = mine
    return mine


def _fresh_state(model: nn.Module, adapter: ArchAdapter) -> dict[str, Any]:
    config = model.config
    n = adapter.num_layers(config)
    return {
        "format_version": FORMAT_VERSION,
        "model_type": config.model_type,
        "original": {
            "heads": adapter.num_heads(config),
            "kv_heads": adapter.num_kv_heads(config),
            "head_dim": adapter.head_dim(config),
            "ffn": adapter.ffn_size(config),
        },
        "kept_heads": [list(range(adapter.num_heads(config))) for _ in range(n)],
        "layers": None,
    }


def check_state(model: nn.Module, state: Mapping[str, Any], shapes: list[LayerShape] | None = None) -> None:
    """Raise a clear ``ValueError`` when a recorded pruning ``state`` does not describe ``model``'s modules.

    ``shapes`` are the shapes the state must describe (default: the modules' current shapes).
    """
    adapter = get_adapter(model)
    shapes = adapter.layer_shapes(model) if shapes is None else shapes
    recorded = state.get("layers")
    kept = state.get("kept_heads")
    problem = None
    if not isinstance(kept, list) or len(kept) != len(shapes):
        problem = (
            f"kept_heads covers {len(kept) if isinstance(kept, list) else kept!r} layers, the model has {len(shapes)}"
        )
    elif recorded is not None and [LayerShape(**r) for r in recorded] != list(shapes):
        problem = f"it records layer shapes {[tuple(r.values()) for r in recorded]}"
    else:
        bad = [i for i, (k, sh) in enumerate(zip(kept, shapes, strict=True)) if len(k) != sh.heads]
        if bad:
            problem = f"kept_heads of layers {bad} do not match their head counts"
    if problem:
        raise ValueError(
            f"model.config.{STATE_KEY} does not describe this model ({problem}; the modules have "
            f"{[(s.heads, s.kv_heads, s.ffn) for s in shapes]} as (heads, kv_heads, ffn)). The config probably "
            "belongs to another model: a config object shared by two models, or a pruned model's config used to "
            "build a new one. Build each model from its own config (copy.deepcopy(config)), or load a pruned "
            "model with hf_prune.from_pretrained."
        )


def _current_state(model: nn.Module, adapter: ArchAdapter) -> dict[str, Any]:
    """The model's recorded state, checked against its modules, or a fresh one for an unpruned model."""
    state = pruning_state(model)
    if state is None:
        return _fresh_state(model, adapter)
    check_state(model, state)
    return copy.deepcopy(state)


def _record(model: nn.Module, adapter: ArchAdapter, state: dict[str, Any]) -> None:
    """Write per-layer shapes to ``config.hf_prune`` and mirror uniform sizes into stock config fields.

    Mirroring matters for interoperability: a model whose FFNs were pruned uniformly (and whose heads were
    not) then loads with plain ``AutoModel...from_pretrained``; so does a Llama-family model with uniformly
    pruned heads, because its config stores ``head_dim`` explicitly.
    """
    config = model.config
    shapes = adapter.layer_shapes(model)
    state["layers"] = [s.to_dict() for s in shapes]
    ffn_sizes = {s.ffn for s in shapes}
    if len(ffn_sizes) == 1:
        setattr(config, adapter.ffn_config_field, ffn_sizes.pop())
    head_counts = {(s.heads, s.kv_heads) for s in shapes}
    if adapter.head_dim_in_config and len(head_counts) == 1:
        heads, kv_heads = head_counts.pop()
        if heads > 0:
            config.head_dim = state["original"]["head_dim"]
            config.num_attention_heads = heads
            config.num_key_value_heads = kv_heads
    setattr(config, STATE_KEY, state)


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
        group = shape.heads // shape.kv_heads if shape.kv_heads else 1
        removed_groups = sorted({h // group for h in remove})
        missing = [h for g in removed_groups for h in range(g * group, (g + 1) * group) if h not in remove]
        if missing:
            raise ValueError(
                f"heads: layer {layer} uses grouped-query attention ({group} query heads share each key/value "
                f"head); heads must be removed in whole groups. To remove {remove}, also remove heads {missing}."
            )
        keep_kv = [g for g in range(shape.kv_heads) if g not in removed_groups]
        keep_q = [h for h in range(shape.heads) if h not in set(remove)]
        plans[layer] = (shape, keep_q, keep_kv)
    return plans


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
    state = _current_state(model, adapter)
    own_config(model)
    for layer, (shape, keep_q, keep_kv) in head_plans.items():
        _resize_attention(adapter, layers[layer], shape, keep_q, keep_kv, head_dim)
        state["kept_heads"][layer] = [state["kept_heads"][layer][h] for h in keep_q]
    for layer, keep in ffn_plans.items():
        _resize_ffn(adapter, layers[layer], keep)
    _record(model, adapter, state)
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
            function can be applied repeatedly. With grouped-query attention, heads must be removed in whole
            key/value groups (``num_attention_heads // num_key_value_heads`` consecutive query heads).

    Removing every head of a layer is allowed: that layer's attention branch then contributes only its
    output-projection bias (exactly what the unpruned model computes with those heads' values zeroed).

    Raises:
        ValueError: unsupported model type, layer or head index out of range, or a partial GQA group (the
            message lists the heads that would complete it). Nothing is modified when an error is raised.
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
        state = _current_state(model, adapter)
        state["kept_heads"] = [k[: t.heads] for k, t in zip(state["kept_heads"], shapes, strict=True)]
    own_config(model)
    head_dim = adapter.head_dim(model.config)
    for block, current, target in zip(layers, current_shapes, shapes, strict=True):
        if (target.heads, target.kv_heads) != (current.heads, current.kv_heads):
            _resize_attention(
                adapter, block, current, list(range(target.heads)), list(range(target.kv_heads)), head_dim
            )
        if target.ffn != current.ffn:
            _resize_ffn(adapter, block, list(range(target.ffn)))
    _record(model, adapter, state)
    return model
