"""Architecture adapters: where attention heads and FFN neurons live in each model family.

An adapter is *declarative*: it lists the projections that carry heads / neurons (as paths relative to one
transformer block) and which side of each projection is sliced. The single surgery module
(:mod:`hf_prune.surgery`) reads these descriptions, so adding a model family is one small file that
subclasses :class:`ArchAdapter` and calls :func:`register`.

Why declarative instead of one ``prune_layer`` method per family (as ``transformers`` used to do with
``prune_heads``): the same description also drives importance scoring, FLOPs counting, zeroing for tests and
shape restoration on reload, so every consumer stays consistent with the surgery by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

Side = Literal["out", "in"]


@dataclass(frozen=True)
class Proj:
    """One projection touched when heads or neurons are removed.

    Attributes:
        path: dotted path of the ``nn.Linear`` / ``Conv1D`` relative to a transformer block.
        side: ``"out"`` slices output features (rows of ``nn.Linear.weight``, and the bias);
            ``"in"`` slices input features (columns of ``nn.Linear.weight``).
        heads: which head set indexes this projection's features: ``"q"`` (query heads, also used by
            models without grouped-query attention) or ``"kv"`` (key/value heads).
        parts: fused projections (GPT-2 ``c_attn`` holds q, k, v side by side) have ``parts`` equal
            blocks along the sliced side, each indexed the same way.
        value_part: for fused projections, which block holds the value features (for zeroing heads).
    """

    path: str
    side: Side
    heads: Literal["q", "kv"] = "q"
    parts: int = 1
    value_part: int | None = None


@dataclass(frozen=True)
class LayerShape:
    """Shape of one transformer block after pruning."""

    heads: int
    kv_heads: int
    ffn: int

    def to_dict(self) -> dict[str, int]:
        return {"heads": self.heads, "kv_heads": self.kv_heads, "ffn": self.ffn}


class ArchAdapter:
    """Describes one model family. Subclass it, fill the class attributes, and :func:`register` it.

    Class attributes:
        model_types: ``config.model_type`` values served by this adapter.
        layers_path: path from ``model.base_model`` to the ``nn.ModuleList`` of transformer blocks.
        attention_module: path (relative to a block) of the module that computes attention; its forward is
            replaced by a cheap one when every head of the layer is removed.
        attention_out: path, relative to ``attention_module``, of the output projection when it lives inside
            that module (``None`` when the model applies it outside, as BERT's ``attention.output.dense``).
        attention_projs: projections sliced when heads are removed.
        value_projs: paths (relative to a block) of the value projections, used to zero heads.
        ffn_module, ffn_out, ffn_projs: the same for the feed-forward network, indexed by neuron.
        ffn_input_projs: projections whose output rows feed the activation (zeroed to silence neurons).
        ffn_config_field: config field holding the intermediate size (set when all layers agree).
        ffn_in_mats: how many hidden->intermediate matrices the FFN has (2 for gated SwiGLU), for FLOPs.
        head_dim_in_config: the head dimension is stored explicitly in the config, so uniformly pruned heads
            can be written as plain ``num_attention_heads``/``num_key_value_heads`` (stock-loadable).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    layers_path: ClassVar[str]
    attention_module: ClassVar[str]
    attention_out: ClassVar[str | None]
    attention_projs: ClassVar[tuple[Proj, ...]]
    value_projs: ClassVar[tuple[Proj, ...]]
    ffn_module: ClassVar[str]
    ffn_out: ClassVar[str | None]
    ffn_projs: ClassVar[tuple[Proj, ...]]
    ffn_input_projs: ClassVar[tuple[Proj, ...]]
    ffn_config_field: ClassVar[str]
    ffn_in_mats: ClassVar[int] = 1
    head_dim_in_config: ClassVar[bool] = False

    # ---- config readers (overridden where a family names fields differently) -------------------------
    def num_layers(self, config: PretrainedConfig) -> int:
        return int(config.num_hidden_layers)

    def hidden_size(self, config: PretrainedConfig) -> int:
        return int(config.hidden_size)

    def num_heads(self, config: PretrainedConfig) -> int:
        return int(config.num_attention_heads)

    def num_kv_heads(self, config: PretrainedConfig) -> int:
        return self.num_heads(config)

    def head_dim(self, config: PretrainedConfig) -> int:
        return self.hidden_size(config) // self.num_heads(config)

    def ffn_size(self, config: PretrainedConfig) -> int:
        return int(getattr(config, self.ffn_config_field))

    # ---- module access ------------------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The transformer blocks of ``model`` (any task-head class of the family)."""
        base = model.base_model if isinstance(model, PreTrainedModel) else model
        return base.get_submodule(self.layers_path)

    def set_attention_attrs(self, module: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
        """Update attributes the attention forward reads after its head count changed."""

    def set_ffn_attrs(self, module: nn.Module, size: int) -> None:
        """Update attributes the FFN forward reads after its width changed."""

    # ---- current per-layer shapes, read from the modules themselves ---------------------------------
    def layer_shape(self, model: nn.Module, index: int) -> LayerShape:
        block = self.layers(model)[index]
        config = model.config
        head_dim = self.head_dim(config)
        q = next(p for p in self.attention_projs if p.heads == "q")
        kv = next((p for p in self.attention_projs if p.heads == "kv"), q)
        heads = num_features(block.get_submodule(q.path), q.side) // (q.parts * head_dim)
        kv_heads = num_features(block.get_submodule(kv.path), kv.side) // (kv.parts * head_dim)
        ffn_proj = self.ffn_projs[0]
        ffn = num_features(block.get_submodule(ffn_proj.path), ffn_proj.side)
        return LayerShape(heads=heads, kv_heads=kv_heads, ffn=ffn)

    def layer_shapes(self, model: nn.Module) -> list[LayerShape]:
        return [self.layer_shape(model, i) for i in range(len(self.layers(model)))]

    def attention_output_bias(self, block: nn.Module) -> torch.Tensor | None:
        """Bias of the attention output projection (what a layer with no heads left contributes)."""
        return _out_bias(block, self.attention_module, self.attention_out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_types={self.model_types})"


def _out_bias(block: nn.Module, module_path: str, out_path: str | None) -> torch.Tensor | None:
    if out_path is None:
        return None
    return getattr(block.get_submodule(module_path).get_submodule(out_path), "bias", None)


def num_features(module: nn.Module, side: Side) -> int:
    """Number of output/input features of a Linear or GPT-2 Conv1D."""
    if isinstance(module, nn.Linear):
        return module.out_features if side == "out" else module.in_features
    if isinstance(module, Conv1D):  # stores weight as (in, out); nf = out, nx = in
        return module.nf if side == "out" else module.nx
    raise TypeError(f"hf_prune cannot slice {type(module).__name__}; expected nn.Linear or Conv1D")


def out_in(tensor: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """View a weight-shaped tensor of ``module`` as (out, in), whatever its layout (Conv1D stores (in, out)); the
    view maps back the same way."""
    return tensor.t() if isinstance(module, Conv1D) else tensor


_REGISTRY: dict[str, ArchAdapter] = {}


def register(adapter_cls: type[ArchAdapter]) -> type[ArchAdapter]:
    """Class decorator: register an adapter for each of its ``model_types``."""
    instance = adapter_cls()
    for model_type in adapter_cls.model_types:
        _REGISTRY[model_type] = instance
    return adapter_cls


def supported_model_types() -> list[str]:
    """All ``config.model_type`` values hf_prune can prune."""
    return sorted(_REGISTRY)


def get_adapter(model_or_config: nn.Module | PretrainedConfig | str) -> ArchAdapter:
    """Return the adapter for a model, a config or a ``model_type`` string.

    Raises:
        ValueError: the model type is not registered; the message lists the supported types.
    """
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise ValueError(
            f"hf_prune does not support model_type={model_type!r}. Supported model types: "
            f"{', '.join(supported_model_types())}. A new family is one small adapter file in "
            "hf_prune/architectures/ (see base.py)."
        )
    return _REGISTRY[model_type]
