"""Turn whatever calibration data a user has into bounded batches of model inputs on the model's device."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import default_data_collator

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")


def no_cache(model: torch.nn.Module) -> dict[str, bool]:
    """``{"use_cache": False}`` for models that keep a KV cache (calibration and timing passes need none)."""
    return {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}


def _clean_example(example: dict[str, Any]) -> dict[str, Any]:
    example = dict(example)
    if "label" in example and "labels" not in example:
        example["labels"] = example.pop("label")
    return {k: v for k, v in example.items() if k in MODEL_INPUTS}


def iter_batches(
    data: Any,
    batch_size: int = 16,
    max_samples: int | None = None,
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None = None,
    device: torch.device | str | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield at most ``max_samples`` examples as batches of tensors.

    ``data`` may be a ``DataLoader`` or any iterable of ready batches (dicts of tensors), or a sequence of
    tokenized examples (a ``datasets.Dataset``, a list of dicts) that is batched here with ``collate_fn``
    (default: ``transformers.default_data_collator``; pass a ``DataCollatorWithPadding`` for ragged lengths).
    Columns other than ``input_ids``, ``attention_mask``, ``token_type_ids`` and ``labels``/``label`` are
    dropped so raw text columns do not reach the collator.
    """
    if data is None:
        raise ValueError("calibration data is required for this criterion")
    is_examples = isinstance(data, Sequence) or hasattr(data, "column_names")
    if is_examples and not isinstance(data, DataLoader):
        if len(data) == 0:
            raise ValueError("calibration data is empty")
        first = data[0]
        if not isinstance(first, dict) or "input_ids" not in first:
            raise ValueError(
                "calibration examples must be tokenized dicts with 'input_ids'; got "
                f"{sorted(first) if isinstance(first, dict) else type(first).__name__}"
            )
        n = len(data) if max_samples is None else min(len(data), max_samples)
        examples = [_clean_example(data[i]) for i in range(n)]
        loader: Iterable[dict[str, torch.Tensor]] = DataLoader(
            examples, batch_size=batch_size, collate_fn=collate_fn or default_data_collator
        )
    else:
        loader = data
    seen = 0
    for batch in loader:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise ValueError("calibration batches must be dicts of tensors with 'input_ids'")
        batch = _clean_example(dict(batch))
        size = batch["input_ids"].shape[0]
        if max_samples is not None and seen + size > max_samples:
            keep = max_samples - seen
            batch = {k: v[:keep] for k, v in batch.items()}
            size = keep
        if device is not None:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        yield batch
        seen += size
        if max_samples is not None and seen >= max_samples:
            return
