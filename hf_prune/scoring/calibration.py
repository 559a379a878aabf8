"""Turn whatever calibration data a user has into one bounded sample of model-input batches on the model's device.

Users hold calibration data in many shapes: tokenized examples of ragged lengths (a list of dicts, a
``datasets.Dataset`` with text and other extra columns), ready batches padded each to its own length (what
``tokenizer(texts[i:i+32], padding=True, return_tensors="pt")`` gives, in a list or a generator), a ``DataLoader``.
:func:`calibration_set` accepts all of them and draws the sample **once**: a generator can be consumed only once, and
pruning needs several passes over the same tokens (scores, then the least-squares refit or the OBS update), so every
pass iterates the returned :class:`CalibrationSet`, never the user's object again.

Why not ``transformers.DataCollatorWithPadding``: it needs a tokenizer, and calibration examples often arrive
without one; padding here uses the model's ``pad_token_id`` and an attention mask, which is all a calibration pass
needs. A ``collate_fn`` (such as that collator) still takes precedence when given.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..utils import model_device

#: inputs kept when the model's forward signature cannot be read
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "labels")
#: padding value per key for ragged examples; other keys pad with 0
_PAD = {"attention_mask": 0, "labels": -100, "token_type_ids": 0, "position_ids": 0}

ACCEPTED_FORMS = (
    "a list/Dataset of tokenized examples (dicts with 'input_ids', ragged lengths allowed), a list or any iterable "
    "(generator, DataLoader) of ready batches (dicts of tensors with 'input_ids' of shape (batch, seq), each batch "
    "padded to its own length), a single batch dict, a 2-D tensor of input_ids, or a CalibrationSet"
)


def no_cache(model: nn.Module) -> dict[str, bool]:
    """``{"use_cache": False}`` for models that keep a KV cache (calibration and timing passes need none)."""
    return {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}


class CalibrationSet:
    """A bounded calibration sample: a list of batches (dicts of tensors) on one device, iterable any number of times.

    Build it with :func:`calibration_set`. ``num_examples`` counts the rows of all batches.
    """

    def __init__(self, batches: list[dict[str, torch.Tensor]]):
        if not batches:
            raise ValueError(f"calibration data is empty; accepted: {ACCEPTED_FORMS}")
        self.batches = batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def num_examples(self) -> int:
        return sum(int(b["input_ids"].shape[0]) for b in self.batches)

    def to(self, device: torch.device | str) -> CalibrationSet:
        """The same sample on ``device`` (``self`` when it is already there)."""
        device = torch.device(device)
        if all(b["input_ids"].device == device for b in self.batches):
            return self
        return CalibrationSet([to_device(b, device) for b in self.batches])

    def __repr__(self) -> str:
        return f"CalibrationSet({len(self.batches)} batches, {self.num_examples} examples)"


def to_device(batch: Mapping[str, Any], device: torch.device | None) -> dict[str, Any]:
    """``batch`` with every tensor on ``device`` (no copy for tensors already there)."""
    if device is None:
        return batch
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _forward_keys(model: nn.Module | None) -> set[str] | None:
    """Names the model's forward accepts (``None``: unknown or ``**kwargs``, keep the usual inputs)."""
    if model is None:
        return None
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        named = {n for n, p in params.items() if p.kind != inspect.Parameter.VAR_KEYWORD}
        return named | set(MODEL_INPUTS)
    return set(params)


def _clean(example: Mapping[str, Any], keys: set[str] | None) -> dict[str, Any]:
    """Rename ``label`` to ``labels`` and drop what the model does not take (text columns, ids, extra fields)."""
    out = dict(example)
    if "label" in out and "labels" not in out:
        out["labels"] = out.pop("label")
    allowed = keys if keys is not None else set(MODEL_INPUTS)
    return {k: v for k, v in out.items() if k in allowed and v is not None and not isinstance(v, str)}


def _is_batch(item: Mapping[str, Any]) -> bool:
    """A ready batch has 2-D ``input_ids`` (a tensor/array of rank 2 or a list of lists); an example has 1-D."""
    ids = item["input_ids"]
    if hasattr(ids, "dim"):
        return ids.dim() >= 2
    if hasattr(ids, "ndim"):
        return ids.ndim >= 2
    return isinstance(ids, (list, tuple)) and len(ids) > 0 and isinstance(ids[0], (list, tuple))


def _as_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        return None


def pad_collate(pad_token_id: int = 0) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """A collator that stacks equal-length fields and right-pads ragged ones.

    ``input_ids`` pad with ``pad_token_id``, ``labels`` with -100, everything else with 0; when padding was needed
    and no ``attention_mask`` was given, one is created so padding never counts as data.
    """

    def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        padded = False
        for key in examples[0]:
            values = [_as_tensor(e[key]) for e in examples]
            if any(v is None for v in values):
                continue
            if all(v.shape == values[0].shape for v in values):
                batch[key] = torch.stack(values)
                continue
            if any(v.dim() != 1 for v in values):
                raise ValueError(f"calibration examples have {key!r} of different shapes that cannot be padded")
            fill = pad_token_id if key == "input_ids" else _PAD.get(key, 0)
            batch[key] = torch.nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=fill)
            padded = padded or key == "input_ids"
        if padded and "attention_mask" not in batch:
            lengths = torch.tensor([len(e["input_ids"]) for e in examples])
            width = batch["input_ids"].shape[1]
            batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return batch

    return collate


def _ready_batch(batch: Mapping[str, Any], keys: set[str] | None, pad_token_id: int) -> dict[str, torch.Tensor]:
    batch = _clean(batch, keys)
    if "input_ids" not in batch:
        raise ValueError(f"calibration batches must hold 'input_ids'; got keys {sorted(batch)}")
    if _as_tensor(batch["input_ids"]) is None:  # ragged rows (lists of lists): pad them like examples, with a mask
        rows = len(batch["input_ids"])
        examples = [{k: v[i] for k, v in batch.items() if len(v) == rows} for i in range(rows)]
        return pad_collate(pad_token_id)(examples)
    out = {}
    for key, value in batch.items():
        tensor = _as_tensor(value)
        if tensor is None and isinstance(value, (list, tuple)):  # another ragged field: pad it
            tensor = pad_collate(pad_token_id)([{key: row} for row in value])[key]
        if tensor is not None:
            out[key] = tensor
    return out


def _first(data: Iterable[Any]) -> tuple[Any, Iterator[Any]]:
    iterator = iter(data)
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError(f"calibration data is empty; accepted: {ACCEPTED_FORMS}") from None
    return first, itertools.chain([first], iterator)


def _bad(data: Any, why: str = "") -> TypeError:
    got = type(data).__name__
    return TypeError(f"calibration data of type {got} is not supported{why}; accepted: {ACCEPTED_FORMS}")


def calibration_set(
    data: Any,
    model: nn.Module | None = None,
    batch_size: int = 16,
    max_samples: int | None = None,
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None = None,
    device: torch.device | str | None = None,
) -> CalibrationSet:
    """Draw at most ``max_samples`` examples from ``data`` once, as batches of tensors on ``device``.

    Args:
        data: any of the forms in :data:`ACCEPTED_FORMS`. Examples are batched ``batch_size`` at a time with
            ``collate_fn`` (default :func:`pad_collate`, padding with the model's ``pad_token_id``); ready batches
            keep their own size and padding.
        model: used to keep only the inputs its forward accepts (raw text and id columns are dropped) and for its
            pad token and device.
        device: where the batches live (default: the model's device, else where they are).

    Raises:
        TypeError: ``data`` is not one of the accepted forms (the message lists them).
        ValueError: ``data`` is empty or its items lack ``input_ids``.
    """
    if data is None:
        raise ValueError(f"calibration data is required for this criterion; accepted: {ACCEPTED_FORMS}")
    if device is None and model is not None:
        device = model_device(model)
    device = torch.device(device) if device is not None else None
    if isinstance(data, CalibrationSet):
        return _bounded(data.batches, max_samples, device)
    keys = _forward_keys(model)
    pad_id = getattr(getattr(model, "config", None), "pad_token_id", None)
    pad_id = int(pad_id) if isinstance(pad_id, int) else 0
    if isinstance(data, torch.Tensor):
        if data.dim() != 2:
            raise _bad(data, f" (a tensor must be 2-D input_ids, got shape {tuple(data.shape)})")
        data = [{"input_ids": data}]
    elif isinstance(data, Mapping):
        if "input_ids" not in data:
            raise _bad(data, f" (a single batch must hold 'input_ids'; got keys {sorted(data)})")
        if not _is_batch(data):
            data = [data]  # one example
        else:  # a whole tokenized set in one mapping (a dict of lists): cut into batch_size rows, not one huge batch
            whole = _ready_batch(data, keys, pad_id)
            n = int(whole["input_ids"].shape[0])
            data = [{k: v[i : i + batch_size] for k, v in whole.items()} for i in range(0, n, batch_size)]
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise _bad(data)
    first, items = _first(data)
    if not isinstance(first, Mapping) or "input_ids" not in first:
        what = sorted(first) if isinstance(first, Mapping) else type(first).__name__
        raise _bad(data, f" (its items must be dicts with 'input_ids'; the first is {what})")
    if _is_batch(first):
        batches = (_ready_batch(b, keys, pad_id) for b in items)
    else:
        collate = collate_fn or pad_collate(pad_id)
        if isinstance(data, Sequence) and max_samples is not None:
            items = (data[i] for i in range(min(len(data), max_samples)))  # a Dataset: read only what is used
        batches = (collate([_clean(e, keys) for e in chunk]) for chunk in _chunks(items, batch_size))
    return _bounded(batches, max_samples, device)


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _bounded(
    batches: Iterable[dict[str, torch.Tensor]], max_samples: int | None, device: torch.device | None
) -> CalibrationSet:
    out, seen = [], 0
    for batch in batches:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise ValueError(
                f"calibration batches must be dicts of tensors with 'input_ids'; accepted: {ACCEPTED_FORMS}"
            )
        size = int(batch["input_ids"].shape[0])
        if max_samples is not None and seen + size > max_samples:
            keep = max_samples - seen
            batch = {k: v[:keep] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in batch.items()}
            size = keep
        if size:
            out.append(to_device(dict(batch), device))
        seen += size
        if max_samples is not None and seen >= max_samples:
            break
    return CalibrationSet(out)


def iter_batches(
    data: Any,
    batch_size: int = 16,
    max_samples: int | None = None,
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None = None,
    device: torch.device | str | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Iterate the batches of :func:`calibration_set` (kept for callers that want a one-pass iterator)."""
    return iter(calibration_set(data, None, batch_size, max_samples, collate_fn, device))
