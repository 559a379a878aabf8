"""Evaluation through ``transformers.Trainer``'s own evaluation loop, for the runner, the CLI and the benchmarks.

One loop serves all of them: ``Trainer.evaluation_loop`` (batching, collation, device placement, gathering across
processes). A running trainer is reused when there is one (mid-training evaluation); otherwise a plain ``Trainer``
is built for the model where it already is. Inside a training run, always pass ``trainer=``: building a new
``TrainingArguments`` there would reset accelerate's process state under the running trainer.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from .scoring.calibration import model_device


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
        was_training = runner.model.training
        try:
            return runner.evaluation_loop(
                runner.get_eval_dataloader(dataset), "hf_prune evaluation", prediction_loss_only=loss_only
            )
        finally:
            runner.model.train(was_training)


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
