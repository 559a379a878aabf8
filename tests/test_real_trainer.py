"""PruningTrainer on the real MiniLM and shipped SST-2 sentences: prune iteratively, then recover."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import transformers as tf
from datasets import Dataset

import hf_prune
from hf_prune import PruningConfig, PruningTrainer
from hf_prune.recipes.offline import minilm_path

pytestmark = pytest.mark.real
DATA = Path(__file__).resolve().parents[1] / "data" / "sst2"


def _sst2(tokenizer, file: str, n: int) -> Dataset:
    with open(DATA / file, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:n]
    enc = tokenizer([r["sentence"] for r in rows], truncation=True, padding="max_length", max_length=48)
    return Dataset.from_dict({**enc, "labels": [int(r["label"]) for r in rows]})


def _accuracy(model, data: Dataset) -> float:
    model.eval()
    data = data.with_format("torch")[:]
    with torch.inference_mode():
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    model.train()
    return float((logits.argmax(-1) == data["labels"]).float().mean())


def test_minilm_iterative_50_50_prunes_and_recovers(tmp_path):
    path = minilm_path()
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    train, dev = _sst2(tokenizer, "train_8k.tsv", 1024), _sst2(tokenizer, "dev.tsv", 300)
    dense_params = hf_prune.count_parameters(model)
    args = tf.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=32,
        num_train_epochs=2,
        learning_rate=1e-4,
        report_to="none",
        save_strategy="no",
        logging_steps=8,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        optim="adamw_torch",
    )
    config = PruningConfig(
        heads=0.5, ffn=0.5, criterion="taylor", schedule="iterative", frequency="epoch", max_samples=256
    )
    trainer = PruningTrainer(model=model, args=args, train_dataset=train, pruning_config=config)
    last_event = {}

    class AfterLastEvent(tf.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            events = trainer.pruning_callback.events
            if events and state.global_step == events[-1].step and "accuracy" not in last_event:
                last_event["accuracy"] = _accuracy(model, dev)
                last_event["params"] = hf_prune.count_parameters(model)

    trainer.add_callback(AfterLastEvent())
    trainer.train()
    final = _accuracy(model, dev)
    assert [e.step for e in trainer.pruning_callback.events] == [0, 32]
    assert [s.heads for s in hf_prune.get_adapter(model).layer_shapes(model)] == [6] * 6
    assert [s.ffn for s in hf_prune.get_adapter(model).layer_shapes(model)] == [768] * 6
    assert last_event["params"] == hf_prune.count_parameters(model) < dense_params
    assert final > last_event["accuracy"], (last_event, final)
    assert final > 0.7
