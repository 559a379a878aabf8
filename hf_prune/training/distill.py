"""Distillation terms that add up the same way whatever the batch layout.

The Trainer normalises a causal LM's cross-entropy by the number of target tokens in the whole accumulated batch (all
micro-batches, all processes), and a classifier's by its micro-batch, divided by the accumulation steps. A
distillation term computed as a per-micro-batch ``batchmean`` over every position (padding included) follows neither,
so its weight ``distill_alpha`` would drift with gradient accumulation, world size and padding. Here each term is a
*sum* over valid positions (padding, ``-100`` labels and, for causal LMs, the last position, which predicts nothing),
divided by the count of valid positions over the whole accumulated, all-process batch (:func:`count_positions`, taken
where the Trainer draws the batches).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def is_causal_lm(model: nn.Module) -> bool:
    """True for decoder-only LMs, whose logits at position ``t`` predict the label at ``t + 1``."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    return getattr(model, "loss_type", None) == "ForCausalLM" or (
        type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    )


def logit_positions(inputs: Mapping[str, torch.Tensor], causal: bool) -> torch.Tensor | None:
    """Boolean mask over the positions of the logits that carry a prediction (``None``: every row of a classifier).

    Token-level logits (causal LMs, token classification) use the labels (``!= -100``, shifted by one for causal
    LMs) or, without labels, the attention mask. Sequence-level logits use the labels (``!= -100``).
    """
    labels = inputs.get("labels")
    mask = inputs.get("attention_mask")
    token_level = causal or (
        labels is not None and labels.dim() == 2 and not labels.is_floating_point() and not labels.is_complex()
    )
    if token_level:
        if labels is not None:
            valid = labels != -100
            if causal:
                valid = torch.cat([valid[:, 1:], valid.new_zeros(valid.shape[0], 1)], dim=1)
            return valid
        if mask is not None:
            return mask.bool()
        ids = inputs["input_ids"]
        return torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    if labels is not None and labels.dim() == 1:
        return labels != -100
    return None


def token_positions(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Non-padding tokens (for the hidden-state term)."""
    mask = inputs.get("attention_mask")
    if mask is not None:
        return mask.bool()
    ids = inputs["input_ids"]
    return torch.ones(ids.shape, dtype=torch.bool, device=ids.device)


def count_positions(inputs: Mapping[str, torch.Tensor], causal: bool) -> tuple[int, int]:
    """(valid logit positions, non-padding tokens) of one batch, matching :func:`kl_sum` and :func:`hidden_mse_sum`."""
    valid = logit_positions(inputs, causal)
    n_logits = int(valid.sum()) if valid is not None else int(inputs["input_ids"].shape[0])
    return n_logits, int(token_positions(inputs).sum())


def _check_aligned(logits: torch.Tensor, valid: torch.Tensor | None) -> None:
    """Distillation and its cross-entropy weigh one distribution per valid position: the mask must match."""
    if valid is not None and tuple(valid.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"distillation cannot align logits of shape {tuple(logits.shape)} with labels/attention mask of shape "
            f"{tuple(valid.shape)}; it needs logits per example or per token"
        )


def kl_sum(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """``T^2 * sum over valid positions of KL(teacher || student)`` at temperature ``T``."""
    _check_aligned(student_logits, valid)
    t = temperature
    per_position = F.kl_div(
        F.log_softmax(student_logits.float() / t, dim=-1),
        F.log_softmax(teacher_logits.float() / t, dim=-1),
        log_target=True,
        reduction="none",
    ).sum(-1)
    if valid is not None:
        per_position = per_position * valid.to(per_position.dtype)
    return per_position.sum() * (t * t)


def hidden_mse_sum(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sum over non-padding tokens of the mean squared difference of the hidden states."""
    per_token = (student.float() - teacher.float()).pow(2).mean(-1)
    return (per_token * valid.to(per_token.dtype)).sum()


def cross_entropy_sum(
    logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None, causal: bool, args: Any = None
) -> torch.Tensor:
    """Sum over valid positions of the cross-entropy of ``labels`` (shifted by one for causal LMs), with the
    Trainer's ``label_smoothing_factor`` when ``args`` has one."""
    if causal:
        labels = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
    _check_aligned(logits, valid)
    smoothing = float(getattr(args, "label_smoothing_factor", 0.0) or 0.0)
    flat = labels.reshape(-1).to(logits.device)
    per_position = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), flat.clamp(min=0), reduction="none", label_smoothing=smoothing
    )
    keep = (flat != -100) if valid is None else valid.reshape(-1).to(logits.device) & (flat != -100)
    return (per_position * keep.to(per_position.dtype)).sum()
