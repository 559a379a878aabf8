"""Step time of PruningTrainer with unstructured masks active vs the stock Trainer, same model/data/seed, one run.

Both trainers train MiniLM on the same SST-2 sentences; PruningTrainer prunes 50% of the block weights at step 0
and re-applies the masks after every optimizer step. Step time = on_step_begin -> on_step_end (forward, backward,
optimizer step, mask application), median over steps after warm-up, rounds interleaved.

    python benchmarks/trainer_overhead.py [--steps 30 --rounds 3 --batch 32 --seq-len 64]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

import torch
import transformers as tf
from datasets import Dataset

from hf_prune import PruningConfig, PruningTrainer
from hf_prune.recipes.offline import minilm_path

from common import Run, bench_args, bench_parser
from results import add_run, commands, publish, section, span, table


class StepTimer(tf.TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def run_once(kind: str, data: Dataset, steps: int, batch: int, warmup: int) -> list[float]:
    torch.manual_seed(0)
    model = tf.AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    with tempfile.TemporaryDirectory() as tmp:
        args = bench_args(tmp, per_device_train_batch_size=batch, max_steps=steps, logging_steps=10_000)
        if kind == "stock":
            trainer = tf.Trainer(model=model, args=args, train_dataset=data)
        else:
            config = PruningConfig(sparsity=0.5, sparsity_scope="layer", schedule="oneshot")
            trainer = PruningTrainer(model=model, args=args, train_dataset=data, pruning_config=config)
        timer = StepTimer()
        trainer.add_callback(timer)
        trainer.train()
    return timer.times[warmup:]


def main(argv: list[str] | None = None) -> dict:
    parser = bench_parser(__doc__, "trainer_overhead", data=False)
    # several rounds of many steps: a single short round cannot tell a ratio of 1.0 from the run-to-run spread
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args(argv)
    this_run = Run("trainer_overhead.py", argv)
    g = torch.Generator().manual_seed(0)
    n = args.steps * args.batch
    data = Dataset.from_dict(
        {
            "input_ids": torch.randint(1000, 20000, (n, args.seq_len), generator=g).tolist(),
            "attention_mask": [[1] * args.seq_len] * n,
            "labels": torch.randint(0, 2, (n,), generator=g).tolist(),
        }
    )
    samples: dict[str, list[float]] = {"stock": [], "pruning": []}
    round_ratios = []
    for i in range(args.rounds):
        # alternate which trainer goes first, so neither always runs on a warmer (or hotter) machine
        order = ("stock", "pruning") if i % 2 == 0 else ("pruning", "stock")
        this_round = {kind: run_once(kind, data, args.steps, args.batch, args.warmup) for kind in order}
        for kind, times in this_round.items():
            samples[kind] += times
        round_ratios.append(statistics.median(this_round["pruning"]) / statistics.median(this_round["stock"]))
    stock, pruning = statistics.median(samples["stock"]), statistics.median(samples["pruning"])
    row = {
        "model": "all-MiniLM-L6-v2 (sequence classification)",
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps_timed": len(samples["stock"]),
        "stock_step_ms": stock * 1000,
        "pruning_step_ms": pruning * 1000,
        "ratio": pruning / stock,
        "round_ratios": round_ratios,
    }
    result = {"benchmark": "trainer_overhead", "rows": [row]}
    add_run(result, this_run.record(), [row])
    print(
        f"stock {stock * 1000:.1f} ms/step, PruningTrainer (50% masks) {pruning * 1000:.1f} ms/step, "
        f"ratio {pruning / stock:.3f} (rounds: {', '.join(f'{r:.3f}' for r in round_ratios)})"
    )
    publish(args.output, result)
    return result


def _rounds(row: dict[str, Any]) -> str:
    return span(sorted(row["round_ratios"])) if row.get("round_ratios") else "not recorded"


def render(result: dict[str, Any]) -> list[str]:
    """The RESULTS.md section: step times and their ratio, with the per-round ratios that show the spread."""
    lines = section("Trainer overhead: PruningTrainer with masks active vs stock Trainer", result)
    lines += table(
        "model | batch x seq | steps timed (each) | stock ms/step | PruningTrainer ms/step | ratio | per-round ratios",
        (
            f"{r['model']} | {r['batch']} x {r['seq_len']} | {r['steps_timed']} | {r['stock_step_ms']:.1f} "
            f"| {r['pruning_step_ms']:.1f} | {r['ratio']:.2f} | {_rounds(r)}"
            for r in result["rows"]
        ),
    )
    return [
        *lines,
        "",
        "50% unstructured masks re-applied after every optimizer step. The ratio is the median PruningTrainer step "
        "over the median stock step, all rounds pooled (rounds interleaved); per-round ratios show the run-to-run "
        "spread, which is why the ratio is given to two digits only.",
        "",
    ]


def headline(result: dict[str, Any]) -> list[str]:
    return [
        f"| PruningTrainer step time with 50% masks vs stock Trainer ({row['model'].split(' ')[0]}, "
        f"{row['batch']} x {row['seq_len']}) | {row['ratio']:.2f}x (rounds {_rounds(row)}) "
        f"| {commands(result, [row])} |"
        for row in result["rows"]
    ]


if __name__ == "__main__":
    main()
