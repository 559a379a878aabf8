"""Evaluation for the runner, the CLI and the benchmarks: every model metric they report is computed here.

PyTorch models go through ``transformers.Trainer``'s own evaluation loop (batching, collation, device placement,
gathering across processes). A running trainer is reused when there is one (mid-training evaluation); otherwise a
plain ``Trainer`` is built for the model where it already is. Inside a training run, always pass ``trainer=``:
building a new ``TrainingArguments`` there would reset accelerate's process state under the running trainer.

Exported ONNX graphs (:func:`onnx_predict_logits`, :func:`onnx_perplexity`) read the same datasets through the
same collators, so a PyTorch and an ONNX score of one model differ only by the engine. :func:`window_perplexity`
scores a long token stream in fixed windows, every token weighted the same (``Trainer.evaluate``'s ``eval_loss``
averages per batch, which weights the short last window like a full one).
"""

from __future__ import annotations

import contextlib
import math
import random
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainingArguments, default_data_collator

from .utils import eval_mode, model_device, restored_mode


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Leave Python's, NumPy's and torch's (CPU and CUDA) random streams as they were.

    Evaluating in the middle of training must not change the run: an evaluation dataloader draws a base seed from
    torch's generator, and building a ``Trainer`` re-seeds everything.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(py_state)
    np.random.set_state(np_state)


def _evaluation_trainer(
    model: nn.Module, collator: Callable[..., Any] | None, batch_size: int, workdir: str, loss_only: bool
) -> Trainer:
    args = TrainingArguments(
        output_dir=workdir,
        per_device_eval_batch_size=batch_size,
        report_to="none",
        use_cpu=model_device(model).type == "cpu",  # evaluate where the model is; never move it
        dataloader_pin_memory=model_device(model).type == "cuda",
        disable_tqdm=True,
        prediction_loss_only=loss_only,
    )
    return Trainer(model=model, args=args, data_collator=collator)


def _loop(
    model: nn.Module,
    dataset: Any,
    collator: Callable[..., Any] | None,
    batch_size: int,
    trainer: Trainer | None,
    loss_only: bool,
) -> Any:
    with preserved_rng(), tempfile.TemporaryDirectory() as workdir:
        runner = trainer or _evaluation_trainer(model, collator, batch_size, workdir, loss_only)
        with restored_mode(runner.model):  # the loop leaves the model in eval mode
            return runner.evaluation_loop(
                runner.get_eval_dataloader(dataset), "hf_prune evaluation", prediction_loss_only=loss_only
            )


def predict_logits(
    model: nn.Module,
    dataset: Any,
    collator: Callable[..., Any] | None = None,
    batch_size: int = 64,
    trainer: Trainer | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of ``dataset`` (tokenized examples with a ``labels`` column).

    ``trainer``: the running trainer to evaluate with (its arguments, collator and device); by default a plain
    ``Trainer`` with ``collator`` and ``batch_size`` is built for the model on its current device.
    """
    out = _loop(model, dataset, collator, batch_size, trainer, loss_only=False)
    logits = out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions
    if logits is None or out.label_ids is None:
        raise ValueError("evaluation returned no logits or labels: the dataset needs a 'labels' column")
    return logits, out.label_ids


def mean_loss(
    model: nn.Module,
    dataset: Any,
    collator: Callable[..., Any] | None = None,
    batch_size: int = 8,
    trainer: Trainer | None = None,
) -> float:
    """The model's mean loss over ``dataset`` (``Trainer.evaluate``'s ``eval_loss``): for equal-length causal-LM blocks,
    the mean token negative log-likelihood, whose exponential is the perplexity."""
    out = _loop(model, dataset, collator, batch_size, trainer, loss_only=True)
    return float(out.metrics["eval_loss"])


def window_perplexity(model: nn.Module, ids: torch.Tensor, window: int = 512) -> float:
    """Perplexity of a causal LM over the token stream ``ids`` (1-D), read in non-overlapping ``window``-token
    windows, every predicted token weighted the same (a window of ``n`` tokens predicts ``n - 1``)."""
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError(f"ids must be a 1-D tensor of at least 2 tokens, got shape {tuple(ids.shape)}")
    if window < 2:
        raise ValueError(f"window={window} is not allowed; a window needs at least 2 tokens")
    device = model_device(model)
    nll, count = 0.0, 0
    with eval_mode(model), torch.inference_mode():
        for start in range(0, ids.numel() - 1, window):
            chunk = ids[start : start + window].unsqueeze(0).to(device)
            if chunk.shape[1] < 2:
                break
            out = model(input_ids=chunk, labels=chunk)
            n = chunk.shape[1] - 1
            nll += float(out.loss) * n
            count += n
    return math.exp(nll / count)


ONNX_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "labels")


def _onnx_batches(session: Any, dataset: Any, collator: Callable[..., Any] | None, batch_size: int) -> Iterator:
    """``(logits, batch)`` per batch of ``dataset`` (its model-input and label columns), run through ``session``."""
    from .io.onnx import onnx_logits

    if len(dataset) == 0:
        raise ValueError("the dataset is empty: there is nothing to evaluate")
    columns = [c for c in dataset.column_names if c in ONNX_COLUMNS]
    loader = torch.utils.data.DataLoader(
        dataset.select_columns(columns), batch_size=batch_size, collate_fn=collator or default_data_collator
    )
    return onnx_logits(session, loader)


def onnx_predict_logits(
    session: Any, dataset: Any, collator: Callable[..., Any] | None = None, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`predict_logits` for an ONNX Runtime session (``hf_prune.io.onnx.onnx_session``): logits and labels of
    ``dataset`` (tokenized examples with a ``labels`` column), batched by ``collator`` (default: stacking)."""
    if "labels" not in dataset.column_names:
        raise ValueError(f"the dataset needs a 'labels' column; it has {dataset.column_names}")
    logits, labels = [], []
    for out, batch in _onnx_batches(session, dataset, collator, batch_size):
        logits.append(out.numpy())
        labels.append(batch["labels"].numpy())
    return np.concatenate(logits), np.concatenate(labels)


def onnx_perplexity(
    session: Any, dataset: Any, collator: Callable[..., Any] | None = None, batch_size: int = 32
) -> float:
    """Perplexity of an exported causal LM over ``dataset``'s ``input_ids`` blocks: next-token negative
    log-likelihood summed over every position, divided by the number of predicted tokens."""
    if "input_ids" not in dataset.column_names:
        raise ValueError(f"the dataset needs an 'input_ids' column; it has {dataset.column_names}")
    nll, tokens = 0.0, 0
    for logits, batch in _onnx_batches(session, dataset, collator, batch_size):
        labels = batch["input_ids"][:, 1:]
        flat = logits[:, :-1].flatten(0, 1).float()
        loss = torch.nn.functional.cross_entropy(flat, labels.flatten(), reduction="sum")
        nll, tokens = nll + float(loss), tokens + labels.numel()
    return math.exp(nll / tokens)
