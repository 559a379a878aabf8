"""Prune-and-recover on MiniLM / SST-2 with PruningTrainer, against a dense model trained with the same budget.

Every run starts from MiniLM fine-tuned for 1 epoch on the same SST-2 subset (cached, see common.py) and trains
1 more epoch on it:
* dense: plain fine-tuning (the same-budget reference);
* structured 2x / 3x encoder-FLOPs cuts: one-shot Fisher (global) at step 0, then recovery, with and without
  distillation from the dense 1-epoch model; and iterative (Fisher re-scored at steps 0/25/50/75/100);
* unstructured 50 / 70 / 90% magnitude sparsity, gradual (cubic) over the first half of the epoch.
Dev accuracy on the full SST-2 dev set (872), wall time of the recovery epoch, parameters and FLOPs ratio.

    python benchmarks/recovery.py [--data-dir ../shared/data] [--n-train 8000] [--only dense 2x-distill ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers as tf

import hf_prune
from hf_prune import PruningConfig, PruningTrainer
from hf_prune.masks import sparsity_report

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import (  # noqa: E402
    DEFAULT_DATA_DIR,
    accuracy,
    bench_args,
    finetuned_minilm_sst2,
    machine_info,
    versions,
)
from results import render_results, write_result  # noqa: E402

STRUCTURED = {"2x": 0.5, "3x": 1 / 3}


def variants() -> dict[str, PruningConfig | None]:
    out: dict[str, PruningConfig | None] = {"dense": None}
    for name, keep in STRUCTURED.items():
        for distill in (False, True):
            out[f"{name}{'-distill' if distill else ''}"] = PruningConfig(
                target_flops=keep,
                criterion="fisher",
                scope="global",
                schedule="oneshot",
                max_samples=512,
                distill_alpha=0.9 if distill else 0.0,
                distill_temperature=2.0,
            )
        # gradual: Fisher re-scored and the target approached in 4 steps over the first 40% of the epoch
        out[f"{name}-iterative"] = PruningConfig(
            target_flops=keep,
            criterion="fisher",
            scope="global",
            schedule="iterative",
            frequency=25,
            end_step=100,
            max_samples=512,
        )
    for sparsity in (0.5, 0.7, 0.9):
        out[f"sparse-{int(sparsity * 100)}"] = PruningConfig(
            sparsity=sparsity, sparsity_scope="global", schedule="cubic", frequency=25
        )
    return out


def run(name: str, config: PruningConfig | None, data_dir: Path, n_train: int) -> dict:
    model, _, data = finetuned_minilm_sst2(data_dir, n_train)
    flops_before = hf_prune.encoder_flops(model, 64).total
    with tempfile.TemporaryDirectory() as tmp:
        args = bench_args(tmp, num_train_epochs=1, logging_steps=50)
        torch.manual_seed(0)
        if config is None:
            trainer = tf.Trainer(model=model, args=args, train_dataset=data["train"])
        else:
            trainer = PruningTrainer(model=model, args=args, train_dataset=data["train"], pruning_config=config)
        start = time.time()
        trainer.train()
        wall = time.time() - start
    acc = accuracy(model, data["validation"])
    row = {
        "variant": name,
        "accuracy": acc,
        "flops_ratio": flops_before / hf_prune.encoder_flops(model, 64).total,
        "params": hf_prune.count_parameters(model),
        "sparsity": sparsity_report(model)["overall"],
        "recovery_wall_s": wall,
        "config": None if config is None else config.to_dict(),
    }
    print(f"{name:16s} acc {acc:.4f} FLOPs {row['flops_ratio']:.2f}x sparsity {row['sparsity']:.2f} ({wall:.0f} s)")
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--n-train", type=int, default=8000)
    parser.add_argument("--only", nargs="*", default=None, help="variant names to (re)run; others are kept")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "recovery.json")
    args = parser.parse_args(argv)
    command = "python benchmarks/recovery.py " + " ".join(argv if argv is not None else sys.argv[1:])
    previous = json.loads(args.output.read_text()) if args.output.exists() else {"rows": []}
    rows = {r["variant"]: r for r in previous["rows"]}
    start = time.time()
    dense_model, _, data = finetuned_minilm_sst2(args.data_dir, args.n_train)
    start_accuracy = accuracy(dense_model, data["validation"])
    for name, config in variants().items():
        if args.only and name not in args.only:
            continue
        rows[name] = {**run(name, config, args.data_dir, args.n_train), "command": command}
        # written after every variant: a long run that is interrupted keeps what it measured
        result = {
            "benchmark": "recovery",
            "command": command,
            "machine": machine_info(),
            "versions": versions(),
            "wall_time_s": time.time() - start,
            "start_accuracy": start_accuracy,
            "n_train": args.n_train,
            "rows": [rows[n] for n in variants() if n in rows],
        }
        write_result(args.output, result)
        render_results()  # RESULTS.md and the README always match the JSON on disk


if __name__ == "__main__":
    main()
