"""Architecture adapters: where attention heads and FFN neurons live in each model family.

An adapter is *declarative*: it lists the projections that carry heads / neurons (as paths relative to one
transformer block) and which side of each projection is sliced. The single surgery module
(:mod:`hf_prune.structure.surgery`) reads these descriptions, so adding a model family is one small file that
subclasses :class:`ArchAdapter` and calls :func:`register`.

Why declarative instead of one ``prune_layer`` method per family (as ``transformers`` used to do with
``prune_heads``): the same description also drives importance scoring, FLOPs counting, zeroing for tests and
shape restoration on reload, so every consumer stays consistent with the surgery by construction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

# shared with the file saved next to pruned models (see structure/remote_code.py), so both read shapes and configs alike
from ..structure.remote_code import LayerConfig as LayerConfig
from ..structure.remote_code import num_features

Side = Literal["out", "in"]
Unit = Literal["q", "kv", "ffn"]
UNITS: tuple[str, ...] = ("q", "kv", "ffn")


@dataclass(frozen=True)
class Proj:
    """One projection touched when heads or neurons are removed.

    Attributes:
        path: dotted path of the ``nn.Linear`` / ``Conv1D`` relative to a transformer block.
        side: ``"out"`` slices output features (rows of ``nn.Linear.weight``, and the bias);
            ``"in"`` slices input features (columns of ``nn.Linear.weight``).
        parts: the unit set indexing each block of features along the sliced side, in order: ``"q"`` (query
            heads, also used by models without grouped-query attention), ``"kv"`` (key/value heads) or ``"ffn"``
            (FFN neurons). A plain projection has one part; fused ones list theirs, each sized by its own set:
            Phi-3's ``qkv_proj`` is ``("q", "kv", "kv")`` (H, KV and KV heads), its ``gate_up_proj`` and
            ModernBERT's ``Wi`` are ``("ffn", "ffn")``. Shorthands: an int repeats ``heads`` (GPT-2's ``c_attn``:
            ``parts=3``); omitted, one part of ``heads`` (attention) or ``"ffn"`` (FFN). :func:`register` expands
            them, so code reading an adapter always sees a tuple.
        heads: the unit set of the shorthand forms (``"q"`` or ``"kv"``).
    """

    path: str
    side: Side
    heads: Literal["q", "kv"] | None = None
    parts: tuple[Unit, ...] | int | None = None

    def units(self) -> tuple[Unit, ...]:
        """The expanded ``parts`` (valid after :func:`register`)."""
        assert isinstance(self.parts, tuple), "Proj.parts is expanded by register()"
        return self.parts


@dataclass(frozen=True)
class Param:
    """A per-unit parameter that is not a projection (e.g. per-head attention-sink logits or gates, a relative
    position bias table with one column per head), sliced along ``dim`` when units are removed.

    Attributes:
        path: dotted path of the ``nn.Parameter`` relative to a transformer block.
        dim: the dimension indexed by units.
        unit: ``"q"``, ``"kv"`` or ``"ffn"``.
        width: entries per unit along ``dim``: ``None`` means the head dimension for heads and 1 for neurons.
        optional: the parameter exists in some blocks only (T5's relative bias lives in the first); skip it where
            it is missing instead of raising.
    """

    path: str
    dim: int
    unit: Unit = "q"
    width: int | None = None
    optional: bool = False


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
        attention_projs: projections sliced when heads are removed (parts of ``"q"`` / ``"kv"``).
        attention_params: non-projection parameters indexed by heads (:class:`Param`).
        ffn_module, ffn_out, ffn_projs, ffn_params: the same for the feed-forward network, indexed by neuron.
        ffn_config_field: config field holding the intermediate size (set when all layers agree).
        head_dim_in_config: the head dimension is stored explicitly in the config, so uniformly pruned heads
            can be written as plain ``num_attention_heads``/``num_key_value_heads`` (stock-loadable).
        layer_count_field: config field holding the number of blocks (rewritten when blocks are removed).
        per_layer_config_fields: config lists with one entry per block (``layer_types``), cut with the blocks.
        layer_index_attr: attribute name holding a block's index on the block and its submodules (KV caches are
            keyed by it); renumbered when blocks are removed.

    Which projections are "in" (the branch's output projection) and which are "out" is all the rest of hf_prune
    needs: a head or neuron is silenced exactly by zeroing its "in" columns (the conformance kit in
    :mod:`hf_prune.testing` checks surgery against that), importance hooks sit on those inputs, and the FLOPs of
    a block follow from the parts (``ffn_in_mats`` counts the hidden->intermediate matrices).
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    layers_path: ClassVar[str]
    attention_module: ClassVar[str]
    attention_out: ClassVar[str | None]
    attention_projs: ClassVar[tuple[Proj, ...]]
    attention_params: ClassVar[tuple[Param, ...]] = ()
    ffn_module: ClassVar[str]
    ffn_out: ClassVar[str | None]
    ffn_projs: ClassVar[tuple[Proj, ...]]
    ffn_params: ClassVar[tuple[Param, ...]] = ()
    ffn_config_field: ClassVar[str]
    ffn_in_mats: ClassVar[int] = 1  # derived by register() from the FFN parts
    head_dim_in_config: ClassVar[bool] = False
    layer_count_field: ClassVar[str] = "num_hidden_layers"
    per_layer_config_fields: ClassVar[tuple[str, ...]] = ("layer_types",)
    layer_index_attr: ClassVar[str] = "layer_idx"
    structural: ClassVar[bool] = True  # heads, neurons and blocks can be removed (False: weight sparsity only)

    # ---- config readers (overridden where a family names fields differently) -------------------------
    def num_layers(self, config: PretrainedConfig) -> int:
        return int(getattr(config, self.layer_count_field))

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

    def block_linears(self, block: nn.Module) -> list[nn.Module]:
        """The attention and FFN projections of one block that still have weights (what weight sparsity masks)."""
        modules = (block.get_submodule(p.path) for p in (*self.attention_projs, *self.ffn_projs))
        return [m for m in modules if m.weight.numel()]

    def all_block_linears(self, model: nn.Module) -> list[nn.Module]:
        """:meth:`block_linears` of every block."""
        return [m for block in self.layers(model) for m in self.block_linears(block)]

    def set_attention_attrs(self, module: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
        """Update attributes the attention forward reads after its head count changed."""

    def set_ffn_attrs(self, module: nn.Module, size: int) -> None:
        """Update attributes the FFN forward reads after its width changed."""

    # ---- current per-layer shapes, read from the modules themselves ---------------------------------
    def layer_shape(self, model: nn.Module, index: int) -> LayerShape:
        block = self.layers(model)[index]
        head_dim = self.head_dim(model.config)
        return LayerShape(
            heads=self._unit_count(block, "q", head_dim),
            kv_heads=self._unit_count(block, "kv", head_dim),
            ffn=self._unit_count(block, "ffn", 1),
        )

    def _unit_count(self, block: nn.Module, unit: str, width: int) -> int:
        """How many units of ``unit`` the block has now, read off its projections' sizes: from a projection whose
        parts are all of that set if there is one, else from a fused one minus its other parts (Phi-3's ``kv``
        heads: ``qkv_proj`` less the query heads ``o_proj`` counts). Without any ``kv`` part, ``kv`` = ``q``."""
        projs = self.ffn_projs if unit == "ffn" else self.attention_projs
        for proj in sorted((p for p in projs if unit in p.units()), key=lambda p: len(set(p.units()))):
            units = proj.units()
            total = num_features(block.get_submodule(proj.path), proj.side)
            # the other sets of a fused projection are read off pure ones (register() requires a pure 'q' / 'ffn')
            others = sum(self._unit_count(block, u, width) for u in units if u != unit)
            return (total - others * width) // (units.count(unit) * width)
        if unit == "kv":
            return self._unit_count(block, "q", width)
        raise ValueError(f"{type(self).__name__} has no projection with a {unit!r} part")

    def layer_shapes(self, model: nn.Module) -> list[LayerShape]:
        return [self.layer_shape(model, i) for i in range(len(self.layers(model)))]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_types={self.model_types})"


def out_in(tensor: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """View a weight-shaped tensor of ``module`` as (out, in), whatever its layout (Conv1D stores (in, out)); the
    view maps back the same way."""
    return tensor.t() if isinstance(getattr(module, "base_layer", module), Conv1D) else tensor  # peft: its base


def head_feature_index(heads: Iterable[int], head_dim: int) -> torch.Tensor:
    """Feature indices covered by ``heads`` (each head owns ``head_dim`` consecutive features; neurons: width 1)."""
    heads = torch.as_tensor(list(heads), dtype=torch.long)
    if heads.numel() == 0:
        return heads
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def unit_feature_index(
    units: Sequence[str], keep: Mapping[str, Sequence[int]], counts: Mapping[str, int], width: Mapping[str, int]
) -> torch.Tensor:
    """Feature indices of the ``keep`` units along a side made of ``units`` parts laid end to end.

    Part ``i`` holds ``counts[units[i]]`` units of ``width[units[i]]`` features each (Phi-3's ``qkv_proj``: H query
    heads, then KV key heads, then KV value heads, each ``head_dim`` wide).
    """
    pieces, offset = [], 0
    for unit in units:
        pieces.append(offset + head_feature_index(keep[unit], width[unit]))
        offset += counts[unit] * width[unit]
    return torch.cat(pieces)


def unit_sums(
    values: torch.Tensor, units: Sequence[str], counts: Mapping[str, int], width: Mapping[str, int]
) -> dict[str, torch.Tensor]:
    """Per-feature ``values`` along a side made of ``units`` parts, summed into one value per unit of each set
    (parts of the same set add up: GPT-2's q, k and v blocks all count towards a head)."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for unit in units:
        n = counts[unit] * width[unit]
        part = values[offset : offset + n].reshape(counts[unit], width[unit]).sum(dim=1)
        out[unit] = out[unit] + part if unit in out else part
        offset += n
    return out


_REGISTRY: dict[str, ArchAdapter] = {}


def _expand(proj: Proj, default: Unit, allowed: tuple[str, ...], where: str) -> Proj:
    if proj.heads is not None and proj.heads not in ("q", "kv"):
        raise ValueError(f"{where}: Proj({proj.path!r}).heads must be 'q' or 'kv', got {proj.heads!r}")
    unit = proj.heads or default
    if proj.parts is None:
        parts: tuple[str, ...] = (unit,)
    elif isinstance(proj.parts, int) and not isinstance(proj.parts, bool):
        if proj.parts < 1:
            raise ValueError(f"{where}: Proj({proj.path!r}).parts must be >= 1, got {proj.parts}")
        parts = (unit,) * proj.parts
    else:
        parts = tuple(proj.parts)
    bad = [u for u in parts if u not in allowed]
    if not parts or bad:
        raise ValueError(f"{where}: Proj({proj.path!r}).parts {parts!r} may only hold {allowed}")
    if proj.side not in ("out", "in"):
        raise ValueError(f"{where}: Proj({proj.path!r}).side must be 'out' or 'in', got {proj.side!r}")
    return replace(proj, parts=parts, heads=None)


def register(adapter_cls: type[ArchAdapter]) -> type[ArchAdapter]:
    """Class decorator: check an adapter's description, expand its shorthands, and register it for each of its
    ``model_types``. A malformed description fails here, at import, not halfway through a surgery."""
    name = adapter_cls.__name__
    attention = tuple(_expand(p, "q", ("q", "kv"), name) for p in adapter_cls.attention_projs)
    ffn = tuple(_expand(p, "ffn", ("ffn",), name) for p in adapter_cls.ffn_projs)
    for kind, projs, unit in (("attention_projs", attention, "q"), ("ffn_projs", ffn, "ffn")):
        if not any(p.side == "in" and set(p.units()) == {unit} for p in projs):
            raise ValueError(f"{name}.{kind} needs the branch's output projection: side 'in' with only {unit!r} parts")
    for p in (*adapter_cls.attention_params, *adapter_cls.ffn_params):
        if p.unit not in UNITS:
            raise ValueError(f"{name}: Param({p.path!r}).unit must be one of {UNITS}, got {p.unit!r}")
    adapter_cls.attention_projs = attention
    adapter_cls.ffn_projs = ffn
    # FLOPs and parameter counts need the number of hidden->intermediate matrices (2 for gated FFNs)
    adapter_cls.ffn_in_mats = sum(p.units().count("ffn") for p in ffn if p.side == "out")
    instance = adapter_cls()
    for model_type in adapter_cls.model_types:
        _REGISTRY[model_type] = instance
    return adapter_cls


def supported_model_types() -> list[str]:
    """All ``config.model_type`` values hf_prune can prune."""
    return sorted(_REGISTRY)


def get_adapter(model_or_config: nn.Module | PretrainedConfig | str, *, structural: bool = True) -> ArchAdapter:
    """Return the adapter for a model, a config or a ``model_type`` string.

    ``structural=False`` asks only for what weight sparsity needs (the blocks' linear layers): a model of an
    unregistered family then gets a :class:`~hf_prune.architectures.generic.GenericAdapter` instead of an error.

    Raises:
        ValueError: the model type is not registered (and ``structural`` is true); the message lists the
            supported types.
    """
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    if not structural:
        from .generic import GenericAdapter  # generic.py subclasses ArchAdapter, so it imports this module

        return GenericAdapter(model_type)
    raise ValueError(
        f"hf_prune does not support model_type={model_type!r} for removing heads, neurons or blocks. Supported "
        f"model types: {', '.join(supported_model_types())}. Unstructured and N:M sparsity work on any model. A "
        "new family is one small adapter file in hf_prune/architectures/ (see base.py)."
    )
