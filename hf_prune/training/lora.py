"""LoRA recovery with peft that keeps what was pruned.

The route most LLM users take to recover a pruned model is LoRA (LLM-Pruner's), and it is where pruning is usually
lost: a merged LoRA delta ``scaling * B @ A`` is dense, so merging it into a sparse model fills every pruned weight
again, and training an adapter whose delta ignores the mask optimises a model that the final masked one is not. This
module keeps both right:

* **Sparsity masks hold through training and merging.** Every LoRA layer whose base weight is masked adds
  ``mask * delta`` instead of ``delta`` (a peft LoRA variant, :func:`hf_prune.compat.mask_lora_delta`). The model
  trained, the one peft's own ``merge_and_unload`` returns and the one :func:`merge_and_unload` returns are the same,
  and every pruned weight stays exactly zero. The mask is a layer's recorded mask (the
  :class:`~hf_prune.PruningCallback`'s) or, where none was recorded (a model pruned by :func:`hf_prune.prune` and then
  wrapped), the zeros of its base weight: the base is frozen under LoRA, so its zeros are the mask.
* **Structure is cut with the adapters.** Heads and neurons removed while adapters exist (a schedule under
  :class:`~hf_prune.PruningTrainer`) take their adapter rows and columns with them: the base projection and the
  adapter's ``lora_B`` rows (output side) or ``lora_A`` columns (input side) are sliced with the same indices, and
  their Adam moments too (:mod:`hf_prune.training.optim`). Sliced rather than merged first: merging would fold the
  adapter into the frozen base, so the adapter could no longer be saved on its own next to the pruned base, and the
  optimizer state of the adapters would be lost at every event. The slice leaves what each kept unit computes
  unchanged, exactly.

Saving: :func:`merge_and_unload` returns a plain model that :func:`hf_prune.save_pretrained` saves like any pruned
model; :func:`hf_prune.save_pretrained` on the peft model itself writes the pruned base (stock weight names, no LoRA)
and the adapter in ``adapter/`` next to it, for ``PeftModel.from_pretrained(hf_prune.from_pretrained(path),
path / "adapter")``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..compat import KEEP_MASK_ATTR, float_weights, mask_lora_delta, masked_variant
from ..structure.portable import stock_name

logger = logging.get_logger(__name__)

ADAPTER_DIR = "adapter"
#: Where a LoRA run's checkpoint keeps the base when the run reshaped it (the stock checkpoint holds the adapter only).
LORA_BASE_DIR = "hf_prune_base"
_TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}


@dataclass
class LoraArguments:
    """What a recipe's ``training.lora`` section and :func:`get_peft_model` take (peft's ``LoraConfig`` fields).

    Args:
        r: adapter rank.
        alpha: ``lora_alpha``; the delta is scaled by ``alpha / r``.
        dropout: dropout on the adapter's input, in [0, 1).
        target_modules: module names (or peft's ``"all-linear"``) to adapt. The default adapts every linear layer of
            the transformer blocks (peft leaves the output head out).
        modules_to_save: modules trained in full next to the adapters (a classifier head, say). For sequence or token
            classification peft adds the task head itself.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraArguments.r={self.r!r} is invalid; allowed: an integer >= 1")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"LoraArguments.alpha={self.alpha!r} is invalid; allowed: a number > 0")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoraArguments.dropout={self.dropout!r} is invalid; allowed: a number in [0, 1)")
        targets = self.target_modules
        if not (isinstance(targets, str) and targets) and not (
            isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)
        ):
            raise ValueError(
                f"LoraArguments.target_modules={targets!r} is invalid; allowed: 'all-linear' or a non-empty list of "
                "module names (e.g. [q_proj, v_proj])"
            )
        if self.extra.get("use_dora"):
            raise ValueError("LoraArguments.extra.use_dora=True is invalid: hf_prune keeps masks through plain LoRA")
        from peft import LoraConfig

        own = {"r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "task_type"}
        allowed = sorted({f.name for f in fields(LoraConfig)} - own)
        unknown = [k for k in self.extra if k not in allowed]
        if unknown:
            raise ValueError(
                f"LoraArguments.extra={self.extra!r} is invalid: {unknown} are not further peft LoraConfig fields "
                f"(r, alpha, dropout, target_modules and modules_to_save have their own keys); allowed: {allowed}"
            )

    def to_peft(self, model: nn.Module) -> Any:
        """The peft ``LoraConfig``, its ``task_type`` read off the model's class."""
        from peft import LoraConfig

        name = type(model).__name__
        task = next((t for suffix, t in _TASK_TYPES.items() if name.endswith(suffix)), None)
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=float(self.dropout),
            target_modules=self.target_modules,
            modules_to_save=self.modules_to_save,
            task_type=task,
            **self.extra,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_peft_model(model: Any) -> bool:
    """A peft ``PeftModel`` (or one of its task subclasses)."""
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft model (its LoRA layers still in place), or ``model`` itself.

    hf_prune's scoring, planning and surgery run on this model: a forward through it runs the adapters too, and cutting
    its modules cuts them in the peft model, which holds the same modules.
    """
    return model.get_base_model() if is_peft_model(model) else model


def is_lora_layer(module: nn.Module) -> bool:
    """A peft LoRA layer wrapping a linear layer (``base_layer`` plus ``lora_A`` / ``lora_B``)."""
    return hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "lora_B")


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every peft LoRA layer of ``model`` (a peft model or its base) by its name in the base model."""
    return {name: m for name, m in base_model(model).named_modules() if is_lora_layer(m)}


def check_maskable(model: nn.Module) -> None:
    """Refuse, before any work, LoRA layers whose adapters use another LoRA variant (DoRA, aLoRA...): their deltas
    are not a plain matrix, so sparsity masks cannot be kept through them."""
    ours = masked_variant()
    for name, layer in lora_layers(model).items():
        for adapter, variant in layer.lora_variant.items():
            if variant is not None and not isinstance(variant, ours):
                raise ValueError(
                    f"{name}: adapter {adapter!r} uses the LoRA variant {type(variant).__name__} (DoRA or similar); "
                    "hf_prune keeps sparsity masks through plain LoRA only: set use_dora=False, or prune without "
                    "sparsity"
                )


#: A LoRA layer whose base weight has no recorded mask counts as masked by its zeros when at least this fraction of
#: them is exactly zero: pruning leaves far more (0.5 at 2:4), trained dense weights none, and dequantized 4-bit GGUF
#: weights up to about a tenth (SmolLM2's Q4_1 file: under 0.1%), which must not be taken for a mask.
MIN_ZERO_FRACTION = 0.25


def zero_mask(weight: torch.Tensor, min_zero_fraction: float = MIN_ZERO_FRACTION) -> torch.Tensor | None:
    """``weight != 0`` when at least ``min_zero_fraction`` of ``weight`` is exactly zero (and any is), else ``None``."""
    zeros = weight == 0
    fraction = float(zeros.float().mean()) if weight.numel() else 0.0
    return ~zeros if fraction > 0 and fraction >= min_zero_fraction else None


def keep_masks(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None = None,
    min_zero_fraction: float = MIN_ZERO_FRACTION,
) -> int:
    """Make the LoRA deltas of ``model`` respect its sparsity masks; returns how many layers are masked.

    ``masks``: keep-masks by module name in each weight's own layout (what the callback holds). A LoRA layer without
    an entry is masked by its base weight's zeros when at least ``min_zero_fraction`` of it is zero (the frozen
    base's zeros are its mask; see :data:`MIN_ZERO_FRACTION`) and left plain otherwise. Call again whenever masks
    change; the callback does.
    """
    count = 0
    for name, layer in lora_layers(model).items():
        keep = masks.get(name) if masks else None
        if keep is None:
            keep = zero_mask(layer.get_base_layer().weight, min_zero_fraction)
        count += mask_lora_delta(layer, keep)
    return count


def get_peft_model(model: nn.Module, lora: LoraArguments | Mapping[str, Any] | Any) -> nn.Module:
    """Wrap a (pruned) model in LoRA adapters whose deltas keep its sparsity masks (see the module docstring).

    ``lora``: :class:`LoraArguments`, a mapping of its fields, or a peft ``LoraConfig`` (used as given). Structural
    pruning done before this call needs nothing more: peft sizes each adapter from the pruned layer it wraps.
    """
    import peft

    if is_peft_model(model):
        raise ValueError("get_peft_model: the model already has peft adapters; pass the plain (pruned) model")
    if isinstance(lora, Mapping):
        lora = LoraArguments(**lora)
    float_weights(model)  # a dequantized GGUF model trains as the float model it is (see hf_prune.compat)
    config = lora.to_peft(model) if isinstance(lora, LoraArguments) else lora
    if getattr(config, "use_dora", False):
        raise ValueError("use_dora=True is invalid here: hf_prune keeps sparsity masks through plain LoRA only")
    wrapped = peft.get_peft_model(model, config)
    masked = keep_masks(wrapped)
    if masked:
        logger.info(f"hf_prune: {masked} LoRA layers add mask * BA, keeping their base weight's zeros")
    return wrapped


def _recorded_keeps(model: nn.Module) -> dict[str, torch.Tensor]:
    """The keep-mask of every LoRA layer: the one its delta used, else its base weight's zeros (when at least
    :data:`MIN_ZERO_FRACTION` of it is zero)."""
    keeps = {}
    for name, layer in lora_layers(model).items():
        keep = getattr(layer, KEEP_MASK_ATTR, None)
        if keep is None:
            keep = zero_mask(layer.get_base_layer().weight)
            if keep is not None and any(bool(layer.get_delta_weight(a)[~keep].any()) for a in layer.lora_A):
                logger.warning(
                    f"hf_prune: {name}'s LoRA delta is not masked in this model (trained without its sparsity "
                    "mask, or reloaded without hf_prune.keep_masks): the merge keeps the zeros, so where the "
                    "adapter was trained unmasked the merged model differs from the trained one"
                )
        if keep is not None:
            keeps[name] = keep.to(torch.bool)
    return keeps


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge a peft model's LoRA adapters into its (pruned) base and return that plain transformers model.

    Unlike a plain ``peft`` merge of a sparse model, every pruned weight is still exactly zero afterwards: each layer's
    delta is merged through its mask (the variant hf_prune installed, else the base weight's zeros), and the masks
    are applied once more after the merge. The result holds no LoRA parameter and saves with
    :func:`hf_prune.save_pretrained` like any pruned model (stock ``from_pretrained`` or remote code).
    """
    if not is_peft_model(model):
        raise TypeError(
            f"merge_and_unload expects a peft model (PeftModel), got {type(model).__name__}; wrap one with "
            "hf_prune.get_peft_model"
        )
    keeps = _recorded_keeps(model)
    merged = model.merge_and_unload()
    for name, keep in keeps.items():
        weight = merged.get_submodule(name).weight
        weight.masked_fill_(~keep.to(weight.device), 0.0)
    left = [n for n, _ in merged.named_parameters() if "lora_" in n]
    if left:
        raise RuntimeError(f"merge_and_unload left LoRA parameters behind: {left[:5]}")
    return merged


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's weights under their stock names, without adapters: what the pruned base saves as (see
    :func:`hf_prune.structure.portable.stock_name`)."""
    state = {}
    for key, tensor in base_model(model).state_dict().items():
        name = stock_name(key)
        if name is not None:
            state[name] = tensor
    return state


def save_adapter(model: nn.Module, folder: str | os.PathLike, base_path: str | os.PathLike) -> None:
    """Write a peft model's adapters to ``folder`` in peft's own format, ``base_model_name_or_path`` naming
    ``base_path`` (where the pruned base is saved) for the write only."""
    configs = model.peft_config
    previous = {name: c.base_model_name_or_path for name, c in configs.items()}
    try:
        for c in configs.values():
            c.base_model_name_or_path = str(base_path)
        model.save_pretrained(folder)
    finally:
        for name, c in configs.items():
            c.base_model_name_or_path = previous[name]


@torch.no_grad()
def load_base_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """Copy a saved pruned base (stock names, as :func:`hf_prune.save_pretrained` writes it) into the base of a peft
    model of the same shapes, adapters untouched.

    Raises:
        ValueError: a base weight the folder lacks (tied weights excepted) or holds with another shape.
    """
    from safetensors.torch import load_file

    saved: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        saved.update(load_file(file))
    seen: set[int] = set()
    for key, param in base_model(model).state_dict(keep_vars=True).items():
        stock = stock_name(key)
        if stock is None:
            continue
        if stock not in saved:
            if id(param) in seen:
                continue  # a tied weight, already copied under its other name
            raise ValueError(f"{folder} holds no {stock}; it is not the base this model was trained on")
        if tuple(saved[stock].shape) != tuple(param.shape):
            raise ValueError(f"{folder}: {stock} has shape {tuple(saved[stock].shape)}, the model {tuple(param.shape)}")
        param.copy_(saved[stock])
        seen.add(id(param))
