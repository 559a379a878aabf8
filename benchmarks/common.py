"""Shared benchmark plumbing: data loading (configurable data dir), the cached fine-tuned MiniLM, evaluation."""

from __future__ import annotations

import csv
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

import hf_prune
from hf_prune.evaluation import predict_logits
from hf_prune.offline import minilm_path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_DATA_DIR = Path(os.environ.get("HF_PRUNE_DATA", REPO.parent / "shared" / "data"))
CACHE_DIR = Path(os.environ.get("HF_PRUNE_BENCH_CACHE", REPO / ".cache" / "benchmarks"))


def machine_info() -> dict[str, Any]:
    return {"cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()}


def versions() -> dict[str, str]:
    return {"torch": torch.__version__, "transformers": tf.__version__, "hf_prune": hf_prune.__version__}


def sst2(data_dir: Path, n_train: int | None = None, seed: int = 0):
    """GLUE SST-2 from ``data_dir/sst2`` (train subset shuffled with ``seed``) as a DatasetDict."""
    files = {"train": str(data_dir / "sst2" / "train.tsv"), "validation": str(data_dir / "sst2" / "dev.tsv")}
    missing = [f for f in files.values() if not Path(f).exists()]
    if missing:
        raise FileNotFoundError(f"SST-2 files not found: {missing}; pass --data-dir (default ../shared/data)")
    ds = load_dataset("csv", data_files=files, delimiter="\t", quoting=csv.QUOTE_NONE)
    if n_train is not None:
        ds["train"] = ds["train"].shuffle(seed=seed).select(range(min(n_train, len(ds["train"]))))
    return ds


def tokenize_sst2(ds, tokenizer, max_length: int = 64):
    def tok(batch):
        return tokenizer(batch["sentence"], truncation=True, padding="max_length", max_length=max_length)

    ds = ds.map(tok, batched=True, remove_columns=["sentence"])
    return ds.rename_column("label", "labels").with_format("torch")


def accuracy(model: torch.nn.Module, dataset, batch_size: int = 64) -> float:
    """Accuracy through the Trainer's evaluation loop (hf_prune.evaluation), like the recipes report it."""
    logits, labels = predict_logits(model, dataset, batch_size=batch_size)
    return float((logits.argmax(-1) == labels).mean())


def bench_args(output_dir: str, **overrides: Any) -> TrainingArguments:
    """TrainingArguments shared by the benchmarks: CPU, seed 0, lr 5e-5, batch 32, no checkpoints or reporting."""
    base: dict[str, Any] = {
        "output_dir": output_dir,
        "per_device_train_batch_size": 32,
        "learning_rate": 5e-5,
        "report_to": "none",
        "save_strategy": "no",
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
    }
    return TrainingArguments(**{**base, **overrides})


def finetuned_minilm_sst2(data_dir: Path, n_train: int = 8000, epochs: float = 1.0, seed: int = 0):
    """MiniLM fine-tuned on ``n_train`` SST-2 sentences (cached under CACHE_DIR); returns (model, tok, data)."""
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = tokenize_sst2(sst2(data_dir, n_train, seed), tokenizer)
    cache = CACHE_DIR / f"minilm-sst2-{n_train}-e{epochs}-s{seed}"
    if not (cache / "config.json").exists():
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        args = bench_args(
            str(cache) + ".tmp-train", num_train_epochs=epochs, seed=seed, logging_steps=50, disable_tqdm=False
        )
        start = time.time()
        Trainer(model=model, args=args, train_dataset=data["train"]).train()
        print(f"fine-tuned MiniLM on {n_train} SST-2 sentences in {time.time() - start:.0f} s")
        hf_prune.save_pretrained(model, cache, tokenizer=tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(cache).eval()
    return model, tokenizer, data


def wikitext_ids(tokenizer, data_dir: Path, split: str = "test", max_tokens: int | None = None) -> torch.Tensor:
    text = (data_dir / "wikitext2" / f"{split}.txt").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return ids[:max_tokens] if max_tokens else ids


def perplexity(model: torch.nn.Module, ids: torch.Tensor, window: int = 512) -> float:
    """Perplexity over non-overlapping ``window``-token windows (the protocol of the issue's reference numbers).

    Not ``Trainer.evaluate``: the last window is shorter, and its ``eval_loss`` averages per batch, while this protocol
    weights every token the same.
    """
    model.eval()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, ids.numel() - 1, window):
            chunk = ids[start : start + window].unsqueeze(0)
            if chunk.shape[1] < 2:
                break
            out = model(input_ids=chunk, labels=chunk)
            n = chunk.shape[1] - 1
            nll += float(out.loss) * n
            count += n
    return math.exp(nll / count)
