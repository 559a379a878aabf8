"""Compatibility with other libraries' internals, in one place.

Two kinds of code live here:

* **Private APIs of transformers/accelerate/torch** that hf_prune cannot avoid. Each is reached through a small named
  function below, or (for ``Trainer`` methods that can only be overridden in a subclass) listed in
  :data:`PRIVATE_TRAINER_METHODS`; every entry says what it is for and why no public hook serves. They were checked
  against the versions in :data:`CHECKED_AGAINST`; ``tests/test_compat.py`` fails with a message naming the entry
  when a release removes or changes one. :mod:`hf_prune.structure.remote_code` is copied next to saved models and
  may import only torch and transformers, so what it does outside public APIs is listed in
  :data:`REMOTE_CODE_PRIVATE_APIS` instead of routed through here.
* **Quantized models with float weights.** A GGUF checkpoint loaded without a GGUF matmul kernel
  (``GgufConfig(dequantize=True)``, or the automatic fallback on a CPU) is an ordinary float model, yet transformers
  keeps its quantizer attached: ``Trainer`` then refuses it ("cannot perform fine-tuning on purely quantized models")
  and ``save_pretrained`` raises ("quantized with gguf and is not serializable"). hf_prune slices, masks, trains and
  saves float weights, so :func:`float_weights` drops those marks with transformers' own
  ``HfQuantizer.remove_quantization_config`` once it has checked that no weight is still packed. The saved result is
  a plain safetensors checkpoint that stock ``from_pretrained`` loads without the GGUF file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

_F = TypeVar("_F", bound=Callable[..., Any])

#: The releases every private API below was read in and tested against.
CHECKED_AGAINST = {"transformers": "5.25.0", "accelerate": "1.16.0", "torch": "2.13.0", "peft": "0.21.2"}


# ---- private APIs ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrivateMethod:
    """A private ``transformers.Trainer`` method that :class:`hf_prune.PruningMixin` overrides.

    ``params``: the parameter names the override relies on (``self`` first), checked against ``Trainer``'s own.
    ``why``: what the override does and why no public hook (callback event, public method) serves.
    """

    params: tuple[str, ...]
    why: str


PRIVATE_TRAINER_METHODS: dict[str, PrivateMethod] = {
    "_save": PrivateMethod(
        ("self", "output_dir", "state_dict"),
        "adds the remote-code loader to every checkpoint and save_model() folder once the weights are written. "
        "The public save_model() pushes to the Hub before it returns, so files added after it would miss the push, "
        "and the on_save callback event fires for checkpoints only, not for save_model().",
    ),
    "_load_from_checkpoint": PrivateMethod(
        ("self", "resume_from_checkpoint", "model"),
        "replays the pruned layer shapes recorded in the checkpoint so its smaller tensors fit, right before the "
        "stock loader copies them in. train() loads the checkpoint before any callback event (on_train_begin comes "
        "later), and work done before calling the public train() is lost when a model_init re-creates the model.",
    ),
    "_load_best_model": PrivateMethod(
        ("self",),
        "refuses, with the layer shapes in the message, a best checkpoint whose structure differs from the model's. "
        "The training loop loads the best model before on_train_end, and no callback event sits between choosing "
        "the checkpoint and loading it.",
    ),
}


def overrides_private(method: _F) -> _F:
    """Mark a ``PruningMixin`` method that overrides a private ``Trainer`` method; it must be listed (with why) in
    :data:`PRIVATE_TRAINER_METHODS`, so ``tests/test_compat.py`` checks it still exists in transformers."""
    if method.__name__ not in PRIVATE_TRAINER_METHODS:
        raise RuntimeError(
            f"{method.__name__} overrides a private Trainer method but is not listed in "
            f"hf_prune.compat.PRIVATE_TRAINER_METHODS (known: {sorted(PRIVATE_TRAINER_METHODS)})"
        )
    return method


@dataclass(frozen=True)
class PrivateAttribute:
    """A private attribute of another library that hf_prune reads or writes: ``owner.name``, used by ``where``."""

    owner: str
    name: str
    where: str
    why: str


#: Private attributes reached through the helpers below.
PRIVATE_ATTRIBUTES: tuple[PrivateAttribute, ...] = (
    PrivateAttribute(
        "transformers.AutoModel* classes",
        "_model_mapping",
        "hf_prune.structure.portable.auto_map_for via auto_class_mapping",
        "the config class -> model class table of each auto class. The public MODEL_FOR_*_MAPPING constants are "
        "not tied to their auto class by name (AutoModelForSeq2SeqLM uses MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING), "
        "and asking each of the ~50 auto classes with the public from_config on the meta device builds a model "
        "skeleton per matching class on every save and logs the models' construction warnings.",
    ),
    PrivateAttribute(
        "accelerate.Accelerator (instance)",
        "_models",
        "hf_prune.training.callback._rewrap_ddp via replace_prepared_model",
        "the models the accelerator prepared (save_state/load_state/free_memory walk it). After structural pruning "
        "under DDP hf_prune wraps the resized model in a new DDP; accelerate has no public call to swap a prepared "
        "model, and prepare_model() again would wrap forward in a second autocast under native AMP.",
    ),
    PrivateAttribute(
        "peft LoRA layer (instance; and peft.tuners.lora.layer.LoraVariant)",
        "lora_variant",
        "hf_prune.compat.mask_lora_delta",
        "peft calls a LoRA variant (its DoRA extension point) for the forward, merge and unmerge of an adapter. "
        "hf_prune registers one that multiplies the adapter's delta by the layer's sparsity mask, so the weights "
        "trained (W + mask * BA), merged by peft's own merge_and_unload and saved are the same and keep every pruned "
        "weight at exactly zero. peft documents the class as prone to change; LoRA has no public hook on the delta.",
    ),
    PrivateAttribute(
        "transformers GgufHfQuantizer (instance)",
        "packed_modules",
        "hf_prune.compat.packed_weights",
        "not underscored but undocumented: the modules the GGUF quantizer swapped in to keep weights packed. "
        "Packed weights are also caught by their integer dtype; this names modules that hold none yet.",
    ),
)

#: What hf_prune/structure/remote_code.py does outside public APIs. That file cannot import this module (it is copied
#: verbatim next to saved models and imports only torch and transformers), so it does it directly.
REMOTE_CODE_PRIVATE_APIS: tuple[PrivateAttribute, ...] = (
    PrivateAttribute(
        "Python object model",
        "__class__",
        "hf_prune.structure.remote_code.make_empty (an attention/FFN block with every head or neuron removed)",
        "assigning __class__ (the same move as swap_class) turns the stock block into a subclass whose forward "
        "returns the branch's output bias, keeping its submodules, hooks, state_dict keys and isinstance checks; "
        "transformers has no hook to build one block of a model as another class.",
    ),
)


def auto_class_mapping(auto_class: type) -> Any | None:
    """The config class -> model class table of a transformers ``AutoModel...`` class (``None`` when it has none).

    Private (``_model_mapping``); see :data:`PRIVATE_ATTRIBUTES` for why the public routes do not serve.
    """
    return getattr(auto_class, "_model_mapping", None)


def replace_prepared_model(accelerator: Any, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` in the place of ``old`` in the list of models ``accelerator`` prepared, dropping the reference to
    the old wrapper (and its gradient buckets). Nothing happens when ``old`` was never prepared.

    Private (``Accelerator._models``); see :data:`PRIVATE_ATTRIBUTES` for why no public call serves.
    """
    models = getattr(accelerator, "_models", [])
    for i, model in enumerate(models):
        if model is old:
            models[i] = new


def swap_class(obj: Any, cls: type) -> None:
    """Make ``obj`` an instance of ``cls``, a class in its own hierarchy, without rebuilding it.

    :func:`hf_prune.from_pretrained` loads through a throw-away subclass whose ``__init__`` resizes the layers before
    the weights load (stock ``from_pretrained`` has no hook between building the model and loading its weights), then
    hands back the stock class so ``isinstance``, the saved ``architectures`` and pickling look normal. Only a class
    along ``obj``'s own inheritance chain is allowed: the instance layout is then the same.

    Raises:
        TypeError: ``cls`` is neither a base nor a subclass of ``type(obj)``.
    """
    own = type(obj)
    if not (issubclass(own, cls) or issubclass(cls, own)):
        raise TypeError(
            f"swap_class: {cls.__name__} is not in the class hierarchy of the {own.__name__} instance; only a base "
            "class or a subclass keeps the instance layout"
        )
    obj.__class__ = cls


# ---- quantized models with float weights ----------------------------------------------------------------------------
# Quantization methods whose dequantized models are ordinary float models once the marks are gone. Other methods
# (bitsandbytes, GPTQ, AWQ ...) keep packed weights: the user dequantizes them with ``model.dequantize()`` first.
_FLOAT_WHEN_DEQUANTIZED = ("gguf",)


def quant_method(model: nn.Module) -> str | None:
    """The quantization method transformers recorded on ``model`` (``"gguf"``, ``"bitsandbytes"`` ...), or None."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None) or getattr(
        getattr(model, "config", None), "quantization_config", None
    )
    if config is None:
        return "unknown" if getattr(model, "is_quantized", False) else None
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return str(getattr(method, "value", method)) if method is not None else "unknown"


def packed_weights(model: nn.Module) -> list[str]:
    """What hf_prune cannot slice or train: parameters that are not float tensors (packed GGUF blocks are uint8), and
    the modules the model's quantizer reports it swapped in to keep weights packed (``packed_modules`` of
    transformers' GGUF quantizer, e.g. ``GgufLinear``)."""
    found = [name for name, p in model.named_parameters() if not p.dtype.is_floating_point]
    swapped = getattr(getattr(model, "hf_quantizer", None), "packed_modules", None) or {}
    ids = {id(m) for m in swapped.values()}
    found += [name for name, m in model.named_modules() if id(m) in ids]
    return found


def float_weights(model: Any) -> Any:
    """Return ``model`` (changed in place) without the quantization marks of a dequantized checkpoint.

    A model with no marks is returned untouched. A GGUF-loaded model whose weights were dequantized at load time loses
    its quantizer and ``config.quantization_config``, so it prunes, trains, saves and reloads like any float model.

    Raises:
        ValueError: weights are still packed (a GGUF file loaded with its matmul kernel, or another quantization
            method), naming the modules and how to load or convert the model as float.
    """
    method = quant_method(model)
    if method is None:
        return model
    packed = packed_weights(model)
    if packed or method not in _FLOAT_WHEN_DEQUANTIZED:
        where = f" (e.g. {', '.join(packed[:3])})" if packed else ""
        hint = (
            "load it dequantized: from_pretrained(..., gguf_file=..., quantization_config="
            "transformers.GgufConfig(dequantize=True)), or hf_prune.from_pretrained(..., gguf_file=...)"
            if method == "gguf"
            else "convert it first with model.dequantize() (transformers), or load the unquantized checkpoint"
        )
        raise ValueError(
            f"the model is quantized with {method} and holds packed weights{where}; hf_prune prunes and "
            f"trains float weights: {hint}"
        )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    else:  # marks without a quantizer object (a config carried over by hand): the same fields transformers clears
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    logger.info(f"hf_prune: the {method} model's weights are float; its quantization marks were removed")
    return model


# ---- peft: a LoRA delta that keeps the sparsity mask ----------------------------------------------------------------
#: Attribute of a peft LoRA layer holding its keep-mask (bool, the base weight's layout); not a buffer, so it is
#: neither saved with the adapter nor moved by ``.to()`` (the variant moves it to the delta's device when used).
KEEP_MASK_ATTR = "_hf_prune_keep"


def _masked_delta(module: Any, adapter: str) -> Any:
    delta = module.get_delta_weight(adapter)  # the base weight's layout (peft transposes for fan_in_fan_out)
    keep = getattr(module, KEEP_MASK_ATTR)
    if keep.device != delta.device:
        keep = keep.to(delta.device)
        setattr(module, KEEP_MASK_ATTR, keep)
    return delta * keep.to(delta.dtype)


def masked_variant() -> type:
    """peft's ``LoraVariant`` subclass whose delta is ``mask * scaling * B @ A`` (built lazily: peft imports late)."""
    global _MASKED_VARIANT
    if _MASKED_VARIANT is None:
        import torch.nn.functional as F
        from peft.tuners.lora.layer import LoraVariant

        class MaskedLora(LoraVariant):
            """Vanilla LoRA with its delta multiplied by the layer's keep-mask (see :func:`mask_lora_delta`)."""

            @staticmethod
            def init(module: Any, adapter_name: str, **kwargs: Any) -> None:
                pass

            @staticmethod
            def merge_safe(module: Any, active_adapter: str, orig_weight: Any) -> Any:
                return orig_weight + _masked_delta(module, active_adapter).to(orig_weight.dtype)

            @staticmethod
            def merge_unsafe(module: Any, active_adapter: str, orig_weight: Any) -> None:
                orig_weight.data += _masked_delta(module, active_adapter).to(orig_weight.dtype)

            @staticmethod
            def unmerge(module: Any, active_adapter: str, orig_weight: Any) -> Any:
                return orig_weight - _masked_delta(module, active_adapter).to(orig_weight.dtype)

            @staticmethod
            def forward(module: Any, active_adapter: str, x: Any, result: Any, **kwargs: Any) -> Any:
                delta = _masked_delta(module, active_adapter)
                weight = delta.t() if module.fan_in_fan_out else delta  # F.linear wants (out, in)
                x = module.lora_dropout[active_adapter](x)
                return result + F.linear(x.to(weight.dtype), weight).to(result.dtype)

        _MASKED_VARIANT = MaskedLora
    return _MASKED_VARIANT


_MASKED_VARIANT: type | None = None


def mask_lora_delta(layer: nn.Module, keep: Any) -> bool:
    """Make every adapter of one peft LoRA layer add ``keep * delta`` instead of ``delta`` (``keep=None``: undo).

    Returns whether the layer is masked now. Raises ``ValueError`` for an adapter that already uses another LoRA
    variant (DoRA, aLoRA...): their deltas are not a plain matrix hf_prune can mask.
    """
    variants = layer.lora_variant
    masked = masked_variant()
    for adapter in layer.lora_A:
        current = variants.get(adapter)
        if current is not None and not isinstance(current, masked):
            raise ValueError(
                f"adapter {adapter!r} of {type(layer).__name__} uses the LoRA variant {type(current).__name__} "
                "(DoRA or similar); hf_prune keeps sparsity masks through plain LoRA only: set use_dora=False"
            )
        if keep is None:
            variants.pop(adapter, None)
        else:
            variants[adapter] = masked()
    if keep is None:
        if hasattr(layer, KEEP_MASK_ATTR):
            delattr(layer, KEEP_MASK_ATTR)
        return False
    setattr(layer, KEEP_MASK_ATTR, keep.to(torch.bool))
    return True
