"""Make a saved pruned model load without hf_prune: the manifest and ``auto_map`` that
:mod:`hf_prune.structure.remote_code` reads.

:func:`portable_files` compares the pruned model with the stock model its config builds (on the meta device, so
nothing is allocated) and describes every difference inside the base model as plain data: the *manifest*. It then
checks the description by rebuilding the stock model with :func:`hf_prune.structure.remote_code.apply_manifest` and
comparing every parameter and buffer shape, so a folder never claims to load with stock classes when it would not.

A model whose shapes the stock config already describes (uniform pruning, depth pruning alone) needs none of this and
gets no remote code: it loads with plain ``from_pretrained``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers.utils import logging

from ..compat import auto_class_mapping
from . import remote_code as runtime
from .remote_code import MODELING_FILE, STATE_KEY, LayerConfig

logger = logging.get_logger(__name__)

# Module attributes that describe how the model is being run, not its shape: never copied into the manifest.
_RUNTIME_ATTRS = frozenset({"training", "gradient_checkpointing", "config"})
_SCALARS = (bool, int, float, str, type(None))


class NotPortable(ValueError):
    """The pruned model differs from its stock class in a way the manifest cannot describe."""


@dataclass
class Portable:
    """What :func:`hf_prune.save_pretrained` adds for stock loading: ``manifest`` (into ``config.hf_prune``),
    ``auto_map`` (into the config) and the modeling file's text. Empty ``manifest``: the stock config suffices."""

    manifest: dict[str, dict[str, Any]] = field(default_factory=dict)
    auto_map: dict[str, str] = field(default_factory=dict)

    @property
    def needs_remote_code(self) -> bool:
        return bool(self.manifest)


def stock_class(model: nn.Module) -> type:
    """The transformers class ``model`` is an instance of (past hf_prune's or the runtime's subclasses)."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers.") and getattr(transformers, cls.__name__, None) is cls:
            return cls
    raise NotPortable(
        f"{type(model).__name__} is not a class exported by transformers, so a stock auto class cannot name it"
    )


def _stock_twin(model: nn.Module, manifest: dict[str, Any] | None = None) -> nn.Module:
    """The stock model the saved config builds (meta device), optionally reshaped by ``manifest``."""
    config = copy.deepcopy(model.config)
    if hasattr(config, STATE_KEY):
        delattr(config, STATE_KEY)
    with torch.device("meta"):
        twin = stock_class(model)(config)
    if manifest:
        runtime.apply_manifest(twin, manifest)
    return twin


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and buffers ``module`` registers itself (not its submodules')."""
    own = {"recurse": False, "remove_duplicate": False}
    return dict(chain(module.named_parameters(**own), module.named_buffers(**own)))


def _jsonable(value: Any) -> bool:
    if isinstance(value, _SCALARS):
        return not (isinstance(value, float) and value != value)  # NaN never compares equal
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, _SCALARS) for v in value)
    return False


def _module_spec(path: str, module: nn.Module, stock: nn.Module) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    empty_kind = getattr(type(module), "_hf_prune_empty", None)
    own_cls = type(module).__mro__[1] if empty_kind else type(module)
    if own_cls is not type(stock) and not issubclass(type(stock), own_cls):
        raise NotPortable(f"{path or 'the base model'} is a {own_cls.__name__}, the stock model has a {type(stock)}")
    theirs = _tensors(stock)
    shapes = {}
    for name, tensor in _tensors(module).items():
        if name not in theirs:
            raise NotPortable(f"{path}.{name} does not exist in the stock {type(stock).__name__}")
        if tensor.shape != theirs[name].shape:
            shapes[name] = list(tensor.shape)
    if shapes:
        spec["shapes"] = shapes
    attrs = {}
    for name, value in vars(module).items():
        if name.startswith("_") or name in _RUNTIME_ATTRS or not _jsonable(value):
            continue
        if not hasattr(stock, name) or getattr(stock, name) != value:
            attrs[name] = list(value) if isinstance(value, tuple) else value
    if attrs:
        spec["attrs"] = attrs
    layer_config = vars(module).get("config")
    if isinstance(layer_config, LayerConfig):
        overrides = dict(object.__getattribute__(layer_config, "_overrides"))
        if not all(_jsonable(v) for v in overrides.values()):
            raise NotPortable(f"{path}.config overrides {sorted(overrides)} are not plain values")
        spec["config"] = overrides
    if empty_kind:
        spec["empty"] = {"kind": empty_kind, "out": module._hf_prune_out, "head_dim": int(module._hf_prune_head_dim)}
    return spec


def stock_name(name: str) -> str | None:
    """A module or tensor name as the stock model has it, for a model with peft LoRA layers in it: a wrapped layer's
    ``base_layer`` (or a fully trained module's ``original_module``) takes the wrapper's place, and adapter parts
    (``lora_*``, ``modules_to_save``) have none (``None``). Adapters are saved apart (:mod:`hf_prune.training.lora`)."""
    parts = name.split(".")
    if any(p.startswith("lora_") or p == "modules_to_save" for p in parts):
        return None
    return ".".join(p for p in parts if p not in ("base_layer", "original_module"))


def _stock_view(named: Any) -> dict[str, Any]:
    """``{stock name: item}`` of ``(name, item)`` pairs (see :func:`stock_name`); a wrapped layer replaces its
    wrapper, which comes first in ``named_modules`` order."""
    out = {}
    for name, item in named:
        key = stock_name(name)
        if key is not None:
            out[key] = item
    return out


def manifest_of(model: nn.Module) -> dict[str, dict[str, Any]]:
    """How ``model``'s base model differs from the stock one its config builds: ``{module path: spec}`` (see
    :func:`hf_prune.structure.remote_code.apply_manifest`). Raises :class:`NotPortable` when a difference cannot be
    described or
    lies outside the base model (hf_prune never changes task heads)."""
    twin = _stock_twin(model)
    base, twin_base = model.base_model, twin.base_model
    ours = _stock_view(base.named_modules())
    theirs = dict(twin_base.named_modules())
    if set(ours) != set(theirs):
        extra, missing = sorted(set(ours) - set(theirs))[:3], sorted(set(theirs) - set(ours))[:3]
        raise NotPortable(f"module trees differ from the stock model (only here: {extra}; only there: {missing})")
    manifest = {}
    for path, module in ours.items():
        spec = _module_spec(path, module, theirs[path])
        if spec:
            manifest[path] = spec
    prefix = getattr(model, "base_model_prefix", "")
    stock_tensors = twin.state_dict()
    outside = [
        n
        for n, t in _stock_view(model.state_dict().items()).items()
        if not n.startswith(f"{prefix}.") and n in stock_tensors and stock_tensors[n].shape != t.shape
    ]
    if outside and model.base_model is not model:
        raise NotPortable(f"tensors outside the base model changed shape: {outside[:3]}")
    return json.loads(json.dumps(manifest))  # plain JSON data, as it will be read back


def _check_round_trip(model: nn.Module, manifest: dict[str, Any]) -> None:
    rebuilt = _stock_twin(model, manifest)
    want = {n: tuple(t.shape) for n, t in _stock_view(chain(model.named_parameters(), model.named_buffers())).items()}
    got = {n: tuple(t.shape) for n, t in chain(rebuilt.named_parameters(), rebuilt.named_buffers())}
    if want != got:
        diff = sorted(n for n in set(want) | set(got) if want.get(n) != got.get(n))[:3]
        raise NotPortable(f"the manifest does not rebuild the model's shapes (first differences: {diff})")


def auto_map_for(model: nn.Module) -> dict[str, str]:
    """``auto_map`` entries for every transformers ``AutoModel...`` class that builds this config's family, each
    naming the runtime's pruned subclass of the stock class (``hf_prune_modeling.BertForMaskedLM``), so any task
    head (and ``pipeline``) loads the pruned body."""
    module = Path(MODELING_FILE).stem
    config_class = type(model.config)
    out = {}
    for name in sorted(n for n in dir(transformers) if n.startswith("AutoModel")):
        auto = getattr(transformers, name, None)
        mapping = auto_class_mapping(auto)  # how transformers' own auto classes resolve a config
        if mapping is None:
            continue
        try:
            cls = mapping[config_class]
        except (KeyError, ValueError, ImportError, AttributeError):
            continue
        if isinstance(cls, type) and getattr(transformers, cls.__name__, None) is cls:
            out[name] = f"{module}.{cls.__name__}"
    out.setdefault("AutoModel", f"{module}.{stock_class(model.base_model).__name__}")
    return out


def portable_files(model: nn.Module) -> Portable:
    """The manifest and ``auto_map`` that let stock auto classes load ``model`` (empty when stock loading already
    works). Raises :class:`NotPortable` when the model cannot be described."""
    if not getattr(model.config, STATE_KEY, None):
        return Portable()
    manifest = manifest_of(model)
    if not manifest:
        return Portable()
    _check_round_trip(model, manifest)
    return Portable(manifest=manifest, auto_map=auto_map_for(model))


def modeling_source() -> str:
    """The text of the self-contained modeling file written next to the weights."""
    return Path(runtime.__file__).read_text()


def _is_ours(entry: Any) -> bool:
    return isinstance(entry, str) and entry.startswith(f"{Path(MODELING_FILE).stem}.")


def forget_portable(config: Any) -> None:
    """Drop what only the saved folder needs (the manifest, our ``auto_map`` entries): in memory the model is a
    stock model with hf_prune's state, and the next save describes it afresh."""
    state = runtime.recorded_state(config)
    if state is not None:
        setattr(config, STATE_KEY, state)
    auto_map = getattr(config, "auto_map", None)
    if isinstance(auto_map, dict):
        kept = {k: v for k, v in auto_map.items() if not _is_ours(v)}
        if kept:
            config.auto_map = kept
        else:
            delattr(config, "auto_map")
