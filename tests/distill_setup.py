"""Shared by test_distill and the DDP worker: a causal LM and a classifier with ragged, padded examples."""

from __future__ import annotations

import torch
import transformers as tf
from datasets import Dataset

from hf_prune import PruningConfig
from hf_prune.scoring.calibration import pad_collate

from .families import FAMILIES, VOCAB, make_model

CONFIG = PruningConfig(heads=0.5, criterion="magnitude", distill_alpha=0.5, distill_hidden=0.3)


def setup(kind: str):
    """(model, dataset of 16 ragged examples, collator) for ``kind`` = ``"causal"`` or ``"classifier"``."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(16):
        length = int(torch.randint(4, 13, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        labels = list(ids) if kind == "causal" else i % 2
        if kind == "causal":
            labels[: length // 3] = [-100] * (length // 3)  # a prompt that is not trained on
        rows.append({"input_ids": ids, "labels": labels})
    family = FAMILIES["llama"] if kind == "causal" else FAMILIES["bert"]
    cls = tf.LlamaForCausalLM if kind == "causal" else tf.BertForSequenceClassification
    return make_model(family, cls), Dataset.from_list(rows), pad_collate(0)


def training_args(out, batch: int, accumulation: int, **kw) -> tf.TrainingArguments:
    return tf.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        # SGD: the update is lr x gradient, so comparing weights compares gradients. Adam divides by the gradient's
        # own magnitude, which turns float32 summation-order noise in a near-zero gradient into a full-size step.
        optim="sgd",
        **kw,
    )
