"""Models that transformers marks as quantized but whose weights are plain float tensors.

A GGUF checkpoint loaded without a GGUF matmul kernel (``GgufConfig(dequantize=True)``, or the automatic fallback on
a CPU) is an ordinary float model, yet transformers keeps its quantizer attached: ``Trainer`` then refuses it ("cannot
perform fine-tuning on purely quantized models") and ``save_pretrained`` raises ("quantized with gguf and is not
serializable"). hf_prune slices, masks, trains and saves float weights, so :func:`float_weights` drops those marks
with transformers' own ``HfQuantizer.remove_quantization_config`` once it has checked that no weight is still packed.
The saved result is a plain safetensors checkpoint that stock ``from_pretrained`` loads without the GGUF file.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

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
    """Parameters that are not float tensors, and modules that hold weights in a packed format (e.g. ``GgufLinear``):
    what hf_prune cannot slice or train."""
    found = [name for name, p in model.named_parameters() if not p.dtype.is_floating_point]
    found += [name for name, m in model.named_modules() if type(m).__name__.startswith("Gguf")]
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
