"""What a model pruned by hf_prune needs at run time, in one self-contained file.

This module imports only ``torch`` and ``transformers`` (never ``hf_prune``): :func:`hf_prune.save_pretrained` copies
it verbatim next to a non-uniformly pruned model as ``hf_prune_modeling.py`` and points the config's ``auto_map`` at
it, so that::

    AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)
    pipeline("text-classification", model=path, trust_remote_code=True)

load the model on a machine where hf_prune is not installed. hf_prune itself uses the same code (empty branches,
per-layer config views, the reader of the recorded state and the loading subclass), so the shipped file cannot drift
from what the library runs.

How loading works: the saved config carries, under ``hf_prune["modules"]``, a *manifest* of every module of the base
model that differs from what the stock class builds from that config (parameter and buffer shapes, plain attributes
such as ``num_attention_heads``, per-layer config overrides, and branches that lost every head or neuron).
:func:`pruned_class` subclasses the stock class; its ``__init__`` builds the stock model and then restores the
recorded shapes (:func:`restore_shapes`: the manifest, plus hf_prune's per-layer resizing when hf_prune loads it)
before transformers loads the weights, so dtype, ``device_map``, sharding and Hub
downloads behave as for any model. Class names resolve through the module's ``__getattr__``: ``auto_map`` entries
such as ``"hf_prune_modeling.BertForSequenceClassification"`` become the pruned subclass of that stock class.

Why not a copy of each family's modeling code (the usual remote-code pattern): the stock forward already runs pruned
shapes once a few attributes are right, so one small generic file serves every family and every task head.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn

STATE_KEY = "hf_prune"
MANIFEST_KEY = "modules"
MODELING_FILE = "hf_prune_modeling.py"


def num_features(module: nn.Module, side: str) -> int:
    """Number of output (``side="out"``) or input (``"in"``) features of an ``nn.Linear`` or GPT-2 ``Conv1D`` (or of
    the one a peft LoRA layer wraps)."""
    module = getattr(module, "base_layer", module)
    if isinstance(module, nn.Linear):
        return module.out_features if side == "out" else module.in_features
    if hasattr(module, "nf") and hasattr(module, "nx"):  # transformers' Conv1D stores weight as (in, out)
        return module.nf if side == "out" else module.nx
    raise TypeError(f"hf_prune cannot slice {type(module).__name__}; expected nn.Linear or Conv1D")


class LayerConfig:
    """One block's view of the model config with a few fields overridden, for families whose forward reads a
    per-layer size from the shared config (Phi-3's attention slices its fused ``qkv`` output at
    ``config.num_attention_heads * head_dim``). Every other attribute is read live from the model's config, so later
    changes there (``_attn_implementation``) still reach the block."""

    def __init__(self, base: Any, **overrides: object) -> None:
        if isinstance(base, LayerConfig):
            overrides = {**base._overrides, **overrides}
            base = base._base
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_overrides", overrides)

    def __getattr__(self, name: str) -> object:
        try:
            overrides = object.__getattribute__(self, "_overrides")
        except AttributeError:  # half-built (copy/pickle): no fallback yet
            raise AttributeError(name) from None
        if name in overrides:
            return overrides[name]
        return getattr(object.__getattribute__(self, "_base"), name)

    def __setattr__(self, name: str, value: object) -> None:
        if name in self._overrides:
            self._overrides[name] = value
        else:
            setattr(self._base, name, value)

    def rebased(self, base: Any) -> LayerConfig:
        """The same overrides over another config (when the model gets a config of its own)."""
        return LayerConfig(base, **self._overrides)

    def __repr__(self) -> str:
        return f"LayerConfig({type(self._base).__name__}, overrides={self._overrides})"


# ---- empty branches: a layer whose heads (or FFN neurons) were all removed keeps only its output bias -------------
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
        # generate() reads the sequence length from the cache (layer 0's, by default), and a DynamicLayer holding
        # no elements reports length 0: store one width-1 head of the right length (batch x seq numbers per step).
        cache = getattr(cache, "self_attention_cache", cache)
        batch, seq = hidden_states.shape[0], hidden_states.shape[1]
        empty = hidden_states.new_zeros(batch, 1, seq, 1)
        cache.update(empty, empty, layer_idx)
    return _branch_output(self, hidden_states), None


def _empty_ffn_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return _branch_output(self, hidden_states)


_EMPTY_CLASSES: dict[tuple[type, str], type] = {}


def make_empty(module: nn.Module, kind: str, out_path: str | None, head_dim: int = 0) -> None:
    """Swap ``module``'s class for a subclass whose forward returns the branch's output bias (``kind``:
    ``"attention"`` or ``"ffn"``; ``out_path``: the output projection inside ``module``, ``None`` when the model
    applies it outside).

    A subclass (not a monkey-patched bound method) keeps ``isinstance`` checks, ``deepcopy`` and ``state_dict`` keys
    exactly as before.
    """
    if kind not in ("attention", "ffn"):
        raise ValueError(f"empty branch kind must be 'attention' or 'ffn', got {kind!r}")
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


# ---- the manifest: how a pruned base model differs from the stock one its config builds ---------------------------
def _narrow(tensor: torch.Tensor, shape: list[int], where: str) -> torch.Tensor:
    if tensor.dim() != len(shape) or any(n > size for n, size in zip(shape, tensor.shape, strict=True)):
        raise ValueError(f"{where}: the saved shape {list(shape)} does not fit the stock {list(tensor.shape)}")
    # the kept values are overwritten when the checkpoint loads; only the shape matters here
    return tensor[tuple(slice(0, n) for n in shape)].clone()


def apply_manifest(model: nn.Module, manifest: dict[str, dict[str, Any]]) -> nn.Module:
    """Reshape the stock ``model`` (its ``base_model``) to a pruned one described by ``manifest``, in place.

    ``manifest`` maps module paths (relative to ``model.base_model``; ``""`` is the base model) to
    ``{"shapes": {name: [dims]}, "attrs": {name: value}, "config": {field: value}, "empty": {...}}``.
    """
    base = getattr(model, "base_model", model)
    for path, spec in manifest.items():
        module = base.get_submodule(path) if path else base
        for name, shape in spec.get("shapes", {}).items():
            where = f"{path}.{name}" if path else name
            params = dict(module.named_parameters(recurse=False, remove_duplicate=False))
            buffers = dict(module.named_buffers(recurse=False, remove_duplicate=False))
            with torch.no_grad():  # setattr replaces a registered tensor in its slot (Parameter or buffer alike)
                if name in params:
                    old = params[name]
                    setattr(module, name, nn.Parameter(_narrow(old, shape, where), old.requires_grad))
                elif name in buffers:
                    setattr(module, name, _narrow(buffers[name], shape, where))
                else:
                    raise ValueError(f"{where}: no such parameter or buffer in {type(module).__name__}")
        for name, value in spec.get("attrs", {}).items():
            setattr(module, name, value)
        if "config" in spec:
            module.config = LayerConfig(module.config, **spec["config"])
        if "empty" in spec:
            empty = spec["empty"]
            make_empty(module, empty["kind"], empty.get("out"), int(empty.get("head_dim", 0)))
    return model


# ---- the one reader of the recorded state ------------------------------------------------------------------------
def recorded_state(config: Any) -> dict[str, Any] | None:
    """The pruning state ``config`` records (a config object or a ``config.json`` dict), as the model in memory
    sees it; ``None`` when hf_prune never pruned it.

    The manifest is left out: it describes a saved folder to stock loaders, and the next save describes the model
    afresh, so no reader in memory may take it for the model's own state. The result is a new dict (its values are
    the recorded ones); change the state through hf_prune's surgery, not through it.
    """
    state = config.get(STATE_KEY) if isinstance(config, dict) else getattr(config, STATE_KEY, None)
    if not isinstance(state, dict) or not state:
        return None
    return {key: value for key, value in state.items() if key != MANIFEST_KEY}


def restore_shapes(model: nn.Module, config: Any, resize_layers: Any = None) -> nn.Module:
    """Give ``model``, freshly built by its stock class from ``config``, the shapes ``config`` records, before the
    checkpoint's weights load.

    The manifest (``config.hf_prune["modules"]``) describes every difference from the stock model, so it is applied
    wherever the saved folder has one, by stock loaders and hf_prune's alike. ``resize_layers(model, layers)``
    (hf_prune's surgery; stock loaders have none) then resizes the blocks to the recorded per-layer shapes (a no-op
    after the manifest) and checks and records the state: folders without a manifest (weights stored sparse,
    shapes the stock config already describes) rebuild through it alone.
    """
    state = getattr(config, STATE_KEY, None)
    if not isinstance(state, dict):
        return model
    if state.get(MANIFEST_KEY):
        apply_manifest(model, state[MANIFEST_KEY])
    if resize_layers is not None and state.get("layers"):
        resize_layers(model, state["layers"])
    return model


_PRUNED_CLASSES: dict[tuple[type, Any], type] = {}


def pruned_class(stock: type, resize_layers: Any = None) -> type:
    """A subclass of the transformers class ``stock`` whose ``__init__`` restores the recorded shapes
    (:func:`restore_shapes`; ``resize_layers``: hf_prune's block resizing, ``None`` in the stock loaders).

    It has the stock class's name and config class, so transformers' auto classes, ``save_pretrained`` (its
    ``architectures`` entry) and pipelines treat it as the stock model. A config without a recorded state builds
    the stock model unchanged. For stock loaders the class lives in this file, where ``auto_map`` names it; hf_prune's
    loader hands back ``stock`` itself once the weights are in, so its subclass stays in ``stock``'s module.
    """
    key = (stock, resize_layers)
    if key not in _PRUNED_CLASSES:

        def __init__(self: nn.Module, config: Any, *args: Any, **kwargs: Any) -> None:
            stock.__init__(self, config, *args, **kwargs)
            restore_shapes(self, config, resize_layers)

        module = __name__ if resize_layers is None else stock.__module__
        _PRUNED_CLASSES[key] = type(stock.__name__, (stock,), {"__init__": __init__, "__module__": module})
    return _PRUNED_CLASSES[key]


def __getattr__(name: str) -> type:
    # auto_map names a stock class ("hf_prune_modeling.BertForSequenceClassification"); hand back its pruned subclass
    if not name.startswith("_"):
        stock = getattr(transformers, name, None)
        if isinstance(stock, type) and issubclass(stock, transformers.PreTrainedModel):
            return pruned_class(stock)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
