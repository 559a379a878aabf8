"""The one-shot bar of issue #12 on the real MiniLM: ready tokenizer batches of different padded lengths."""

from __future__ import annotations

import copy
import csv
import time
from pathlib import Path

import pytest
import torch
import transformers as tf
from datasets import Dataset

from hf_prune import PruningConfig, prune
from hf_prune.recipes.offline import minilm_path

pytestmark = pytest.mark.real
DATA = Path(__file__).resolve().parents[1] / "data" / "sst2"


def _rows(file: str, start: int, n: int | None) -> list[dict]:
    with open(DATA / file, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[start : start + n if n else None]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """MiniLM fine-tuned for one epoch on 4,000 shipped SST-2 sentences (about 2.5 minutes on 2 CPU cores)."""
    path = minilm_path()
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    rows = _rows("train_8k.tsv", 0, 4000)
    enc = tokenizer([r["sentence"] for r in rows], truncation=True, max_length=64)
    train = Dataset.from_dict({**enc, "labels": [int(r["label"]) for r in rows]})
    args = tf.TrainingArguments(
        output_dir=str(tmp_path_factory.mktemp("ft")),
        per_device_train_batch_size=32,
        num_train_epochs=1,
        learning_rate=1e-4,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        optim="adamw_torch",
    )
    tf.Trainer(model=model, args=args, train_dataset=train, data_collator=tf.DataCollatorWithPadding(tokenizer)).train()
    return model.eval(), tokenizer


def _accuracy(model, tokenizer) -> float:
    rows = _rows("dev.tsv", 0, None)
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(rows), 64):
            chunk = rows[i : i + 64]
            enc = tokenizer([r["sentence"] for r in chunk], padding=True, truncation=True, return_tensors="pt")
            pred = model(**enc).logits.argmax(-1)
            correct += int((pred == torch.tensor([int(r["label"]) for r in chunk])).sum())
    return correct / len(rows)


def test_ready_batches_of_different_lengths_prune_minilm_to_half_the_macs(finetuned):
    model, tokenizer = finetuned
    rows = _rows("train_8k.tsv", 6000, 16 * 32)  # not the sentences it was fine-tuned on
    batches = [
        tokenizer([r["sentence"] for r in rows[i : i + 32]], padding=True, truncation=True, return_tensors="pt")
        | {"labels": torch.tensor([int(r["label"]) for r in rows[i : i + 32]])}
        for i in range(0, len(rows), 32)
    ]
    assert len(batches) == 16 and len({b["input_ids"].shape[1] for b in batches}) > 4
    accuracy = {"dense": _accuracy(model, tokenizer)}
    measured = {}
    for criterion in ("magnitude", "taylor", "fisher"):
        pruned = copy.deepcopy(model)
        start = time.perf_counter()
        report = prune(
            pruned,
            PruningConfig(target_flops=0.5, criterion=criterion, scope="global", max_samples=512),
            calibration_data=batches if criterion != "magnitude" else None,
        )
        seconds = time.perf_counter() - start
        kept = report.flops_after / report.flops_before
        assert 0.45 <= kept <= 0.55, (criterion, kept)
        accuracy[criterion] = _accuracy(pruned, tokenizer)
        measured[criterion] = {"kept_macs": round(kept, 4), "prune_s": round(seconds, 1)}
    print("SST-2 dev accuracy:", accuracy, "pruning:", measured)
    assert max(accuracy["taylor"], accuracy["fisher"]) >= accuracy["magnitude"] + 0.05, accuracy


def test_tokenized_dataset_with_text_columns_and_a_padding_collator(finetuned):
    """A ``datasets.Dataset`` straight from ``dataset.map(tokenize)`` (ragged, raw text and idx columns kept) with
    ``DataCollatorWithPadding``: the same scores as the same sentences given as ready padded batches."""
    model, tokenizer = finetuned
    rows = _rows("train_8k.tsv", 7000, 64)
    data = Dataset.from_dict(
        {"sentence": [r["sentence"] for r in rows], "label": [int(r["label"]) for r in rows], "idx": list(range(64))}
    ).map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=64), batched=True)
    ready = [
        tokenizer(
            [r["sentence"] for r in rows[i : i + 16]], padding=True, truncation=True, max_length=64, return_tensors="pt"
        )
        | {"labels": torch.tensor([int(r["label"]) for r in rows[i : i + 16]])}
        for i in range(0, 64, 16)
    ]
    from hf_prune.scoring.calibration import calibration_set
    from hf_prune.scoring.criteria import mask_gradient_scores

    collated = calibration_set(data, model, batch_size=16, collate_fn=tf.DataCollatorWithPadding(tokenizer))
    assert collated.num_examples == 64
    a = mask_gradient_scores(model, collated, "fisher", progress=False)
    b = mask_gradient_scores(model, calibration_set(ready, model), "fisher", progress=False)
    for x, y in zip(a.heads + a.ffn, b.heads + b.ffn, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-10)
