"""The pruning state recorded in ``model.config.hf_prune``: per-layer shapes, which original heads and blocks remain,
and the config fields mirrored so uniform shapes load with stock ``from_pretrained``.

Surgery (:mod:`hf_prune.structure.surgery`) changes modules and then calls :func:`record_state`; readers (loader,
trainer, reports, CLI) use :func:`pruning_state` and :func:`check_state`. The state is read from a config in one place,
:func:`hf_prune.structure.remote_code.recorded_state`, which the self-contained modeling file shares.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from torch import nn
from transformers import PretrainedConfig

from ..architectures import ArchAdapter, LayerConfig, LayerShape, get_adapter
from .remote_code import STATE_KEY, recorded_state

FORMAT_VERSION = 1


def pruning_state(model: nn.Module) -> dict[str, Any] | None:
    """The hf_prune state stored in ``model.config`` (``None`` for an unpruned model): per-layer shapes
    (``layers``), original sizes, kept original heads and blocks. A read-only view: surgery records changes."""
    return recorded_state(model.config)


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
        held = getattr(module, "config", None)
        if held is config:
            module.config = mine
        elif isinstance(held, LayerConfig) and held._base is config:
            module.config = held.rebased(mine)
    model._hf_prune_own_config = mine
    return mine


def fresh_state(model: nn.Module, adapter: ArchAdapter) -> dict[str, Any]:
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
    kept_layers = state.get("kept_layers")
    if kept_layers is not None and len(kept_layers) != len(shapes):
        problem = f"kept_layers lists {len(kept_layers)} blocks, the model has {len(shapes)}"
    elif not isinstance(kept, list) or len(kept) != len(shapes):
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


def current_state(model: nn.Module, adapter: ArchAdapter) -> dict[str, Any]:
    """The model's recorded state, checked against its modules, or a fresh one for an unpruned model."""
    state = pruning_state(model)
    if state is None:
        return fresh_state(model, adapter)
    check_state(model, state)
    return copy.deepcopy(state)


def record_state(model: nn.Module, adapter: ArchAdapter, state: dict[str, Any]) -> None:
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
