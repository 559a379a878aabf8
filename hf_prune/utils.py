"""Small helpers shared across the pipeline stages, each written once.

* JSON round trip of the plain-data classes (:class:`JsonMixin`: PruningConfig, PruningPlan).
* Where a model lives (:func:`model_device`) and a block run in eval mode with the caller's mode restored after
  (:func:`eval_mode`, :func:`restored_mode`): every pass that scores, times or exports a model must not leave a
  training model in eval mode (dropout silently off) or the reverse.
* Seeded token inputs whose values do not matter but must repeat (:func:`random_token_ids`, :func:`dummy_inputs`):
  timing and export.
* Writes that never leave a half-written file or folder behind (:func:`atomic_write`, :func:`atomic_write_text`,
  :func:`atomic_write_bytes`, :func:`atomic_write_json`, :func:`staged_dir`, :func:`write_atomic_dir`): a crash,
  a full disk or two processes writing at once leave either the old content or the new, never a mix.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from typing_extensions import Self


class JsonMixin:
    """``to_json``/``from_json`` on top of a class's ``to_dict``/``from_dict``."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        raise NotImplementedError

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The JSON text; also written (atomically) to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike) -> Self:
        """From JSON text or from a file holding it."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            text = Path(path_or_text).read_text()
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------------------------------------------------
# models: device and train/eval mode
# ---------------------------------------------------------------------------------------------------------


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter: where its inputs, calibration batches and statistics belong."""
    return next(model.parameters()).device


@contextlib.contextmanager
def restored_mode(*models: nn.Module) -> Iterator[None]:
    """Restore each model's ``training`` flag (``model.train(flag)``) when the block ends, error or not.

    For code that switches modes inside (a Trainer's evaluation loop, a pruning event) and must hand the model back
    as it came.
    """
    flags = [m.training for m in models]
    try:
        yield
    finally:
        for model, flag in zip(models, flags, strict=True):
            model.train(flag)


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Run the block with every model in eval mode (no dropout), then restore each one's ``training`` flag.

    Scoring, calibration, timing and export passes need deterministic forwards, and a caller in the middle of
    training must get its model back in train mode.
    """
    with restored_mode(*models):
        for model in models:
            model.eval()
        yield


# ---------------------------------------------------------------------------------------------------------
# token inputs
# ---------------------------------------------------------------------------------------------------------


def random_token_ids(vocab_size: int, batch: int, seq_len: int, *, low: int = 1000, seed: int = 0) -> torch.Tensor:
    """Seeded ``batch`` x ``seq_len`` token ids, uniform in ``[min(low, vocab_size - 1), vocab_size)``, on CPU.

    For passes where token values do not change the work (timing, tracing an export) but runs must repeat: a CPU
    generator gives the same ids on every device. Ids start at ``low`` to keep clear of the special tokens (pad,
    bos, eos, unk) most vocabularies put first.

    Raises:
        ValueError: ``vocab_size`` is below 2, or ``batch`` or ``seq_len`` below 1.
    """
    if vocab_size < 2:
        raise ValueError(f"token inputs need a vocabulary of at least 2 ids; got vocab_size={vocab_size}")
    if batch < 1 or seq_len < 1:
        raise ValueError(f"token inputs need batch >= 1 and seq_len >= 1; got batch={batch}, seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(min(low, vocab_size - 1), vocab_size, (batch, seq_len), generator=g)


def dummy_inputs(
    model: nn.Module,
    batch: int,
    seq_len: int,
    *,
    low: int = 1000,
    seed: int = 0,
    vocab_size: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """``input_ids`` (:func:`random_token_ids` over ``model.config.vocab_size``, or ``vocab_size``) and an all-ones
    ``attention_mask`` of ``batch`` x ``seq_len``, on ``device`` (CPU when omitted).

    Raises:
        ValueError: no ``vocab_size`` is given and ``model.config.vocab_size`` is missing or below 2.
    """
    if vocab_size is None:
        vocab_size = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
        if vocab_size < 2:
            raise ValueError(
                f"{type(model).__name__} has no config.vocab_size to build token inputs from; pass vocab_size="
            )
    ids = random_token_ids(vocab_size, batch, seq_len, low=low, seed=seed)
    if device is not None:
        ids = ids.to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# ---------------------------------------------------------------------------------------------------------
# atomic files and folders
# ---------------------------------------------------------------------------------------------------------


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a new temporary sibling of ``path`` (``.NAME.*.tmp``), then rename it over ``path``.

    The rename is atomic on one filesystem, so readers (and concurrent writers) see the old file or the new one,
    never half of one; on failure the temporary file is removed and ``path`` is untouched. The parent folder is
    created when missing. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own per call (not mkstemp: its 0600 mode would outlive the rename), so two writers never share one
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 2, **dumps: Any) -> Path:
    """Write ``data`` as JSON (``json.dumps(data, indent=indent, **dumps)`` and a final newline) atomically."""
    return atomic_write_text(path, json.dumps(data, indent=indent, **dumps) + "\n")


def write_atomic_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished folder ``tmp`` to ``target``, replacing any existing folder as late as possible.

    An existing ``target`` is renamed aside first and put back if the move fails, so ``target`` is missing only for
    the instant between two renames and never holds a mix of old and new files.
    """
    tmp, target = Path(tmp), Path(target)
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        if backup.exists():
            shutil.rmtree(backup)
        os.replace(target, backup)
    try:
        os.replace(tmp, target)
    except BaseException:
        if backup is not None:
            os.replace(backup, target)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty temporary sibling folder of ``target`` (``.NAME.tmp-*``) to build in; when the block ends
    normally it replaces ``target`` (:func:`write_atomic_dir`), when it raises it is removed and ``target`` is left
    as it was.

    Why a sibling: the final rename must stay on one filesystem to be atomic. The parent folder is created when
    missing.
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        write_atomic_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
