"""Prune-and-recover on MiniLM / SST-2 with PruningTrainer, against a dense model trained with the same budget.

Every run starts from MiniLM fine-tuned for 1 epoch on the same SST-2 subset (cached, see common.py) and trains
1 more epoch on it:
* dense: plain fine-tuning (the same-budget reference; saved, it is the teacher of the distillation variants);
* structured 2x / 3x encoder-FLOPs cuts: Fisher (global) at step 0 with least-squares reconstruction of the
  shrunk output projections, then recovery; with distillation from the same-budget dense model; iterative
  (re-scored at steps 0/25/50/75/100); and one ablation without reconstruction;
* latency-0.5: the same, but to half of the measured CPU latency (``target_latency``) instead of a FLOPs cut;
* unstructured 50 / 70 / 90% magnitude sparsity, gradual (cubic) over the first half of the epoch.
Dev accuracy on the full SST-2 dev set (872), wall time of the recovery epoch, parameters and FLOPs ratio.

    python benchmarks/recovery.py [--data-dir data] [--n-train 8000] [--only dense 2x-distill ...]
    python benchmarks/recovery.py --seeds 1 2 --only dense 2x-distill   # add seeds to rows already measured
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from transformers import AutoModelForSequenceClassification

import hf_prune
from hf_prune import PruningConfig, PruningTrainer
from hf_prune.sparsity.masks import sparsity_report

from common import Run, accuracy, add_n_eval, bench_args, bench_parser, cache_dir, finetuned_minilm_sst2
from results import add_run, commands, previous_result, publish, same_code, section, span, table

STRUCTURED = {"2x": 0.5, "3x": 1 / 3}
TEACHER = "dense"  # distillation variants learn from the same-budget dense model (cached by the dense run)


def _structured(keep: float | None, **overrides) -> PruningConfig:
    base = {
        "target_flops": keep,
        "criterion": "fisher",
        "scope": "global",
        "schedule": "oneshot",
        "max_samples": 512,
        "reconstruct": True,
    }
    return PruningConfig(**{**base, **overrides})


def variants() -> dict[str, tuple[PruningConfig | None, str]]:
    """name -> (config, one-line description); run (and rendered) in this order."""
    out: dict[str, tuple[PruningConfig | None, str]] = {"dense": (None, "plain fine-tuning (the reference)")}
    for name, keep in STRUCTURED.items():
        out[name] = (_structured(keep), "Fisher (global) one-shot + least-squares reconstruction, then fine-tuning")
    for name, keep in STRUCTURED.items():
        out[f"{name}-distill"] = (
            _structured(keep, distill_alpha=0.7, distill_temperature=2.0),
            "as above, distilling (alpha 0.7, T 2) from the same-budget dense model",
        )
    for name, keep in STRUCTURED.items():
        out[f"{name}-iterative"] = (
            _structured(keep, schedule="iterative", frequency=25, end_step=100),
            "Fisher re-scored + reconstruction at steps 0/25/50/75/100, fine-tuning throughout",
        )
    out["latency-0.5"] = (
        _structured(None, target_latency=0.5, latency_batch_size=32, seq_len=64),
        "Fisher (global) one-shot to half the measured CPU latency at batch 32 x 64 (table + timed plan, included "
        "in the wall time) + reconstruction, then fine-tuning",
    )
    out["2x-no-reconstruct"] = (
        _structured(0.5, reconstruct=False),
        "ablation: Fisher (global) one-shot without reconstruction, then fine-tuning",
    )
    for sparsity in (0.5, 0.7, 0.9):
        out[f"sparse-{int(sparsity * 100)}"] = (
            PruningConfig(sparsity=sparsity, sparsity_scope="global", schedule="cubic", frequency=25),
            "global magnitude masks, cubic schedule over the first half of the epoch",
        )
    return out


def _teacher_dir(data_dir: Path, n_train: int, seed: int) -> Path:
    return cache_dir(f"minilm-sst2-{n_train}-e1-s0-plus1-dense-seed{seed}", data_dir, "sst2/train.tsv")


def run(
    name: str, config: PruningConfig | None, data_dir: Path, n_train: int, seed: int = 0, n_eval: int | None = None
) -> dict:
    """One recovery epoch from the cached 1-epoch model; ``seed`` drives the data order (and dropout)."""
    model, tokenizer, data = finetuned_minilm_sst2(data_dir, n_train, n_eval=n_eval)
    flops_before = hf_prune.encoder_flops(model, 64).total
    teacher = None
    if config is not None and config.distill_alpha > 0:
        teacher_dir = _teacher_dir(data_dir, n_train, seed)
        if not (teacher_dir / "config.json").exists():
            raise FileNotFoundError(
                f"variant {name!r} distils from the dense run of seed {seed}: run the 'dense' variant first"
            )
        teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    with tempfile.TemporaryDirectory() as tmp:
        args = bench_args(tmp, num_train_epochs=1, logging_steps=50, seed=seed)
        torch.manual_seed(seed)
        if config is None:
            trainer = tf.Trainer(model=model, args=args, train_dataset=data["train"])
        else:
            trainer = PruningTrainer(
                model=model, args=args, train_dataset=data["train"], pruning_config=config, teacher_model=teacher
            )
        start = time.time()
        trainer.train()
        wall = time.time() - start
    if config is None:
        hf_prune.save_pretrained(model, _teacher_dir(data_dir, n_train, seed), tokenizer=tokenizer)
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
    # the final training loss tells independent seeds apart even where two reach the same dev accuracy
    row["train_loss"] = trainer.state.log_history[-1].get("train_loss")
    print(f"{name:18s} seed {seed} acc {acc:.4f} FLOPs {row['flops_ratio']:.2f}x ({wall:.0f} s)", flush=True)
    return row


def _config(row: dict) -> dict | str | None:
    """A stored row's config with today's defaults filled in: a new option whose default keeps the old behaviour
    does not invalidate earlier measurements, a changed or removed one does."""
    if row["config"] is None:
        return None
    try:
        return PruningConfig.from_dict(row["config"]).to_dict()
    except (TypeError, ValueError):
        return "outdated"


def merge_run(old: dict | None, new: dict, seed: int, description: str, run_id: str) -> dict:
    """Add one seed's measurement to a variant's row; accuracy and wall time become means over the seeds measured.

    Each seed keeps its own accuracy, FLOPs ratio, parameters, wall time, training loss and the run that measured
    it, so seeds measured by different invocations stay apart and can be checked for independence.
    """
    runs = dict((old or {}).get("runs", {}))
    runs[str(seed)] = {
        "accuracy": new["accuracy"],
        "recovery_wall_s": new["recovery_wall_s"],
        "flops_ratio": new["flops_ratio"],  # differs per seed under target_latency (timed plans)
        "params": new["params"],
        "train_loss": new.get("train_loss"),
        "run": run_id,
    }
    accs = [r["accuracy"] for r in runs.values()]
    return {
        **new,
        "accuracy": statistics.fmean(accs),
        "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "recovery_wall_s": statistics.fmean(r["recovery_wall_s"] for r in runs.values()),
        "runs": dict(sorted(runs.items(), key=lambda kv: int(kv[0]))),
        "description": description,
    }


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, "recovery")
    parser.add_argument("--n-train", type=int, default=8000)
    add_n_eval(parser)
    parser.add_argument("--only", nargs="*", default=None, help="variant names to (re)run; others are kept")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="recovery seeds; runs of other seeds already measured are kept",
    )
    args = parser.parse_args(argv)
    this_run = Run("recovery.py", argv, seeds=args.seeds)
    previous = previous_result(args.output) or {"rows": []}
    current = {name: None if c is None else c.to_dict() for name, (c, _) in variants().items()}
    # a previous row is kept only if it was measured with the variant's current configuration and data
    # SST-2's dev set has 872 sentences (common.sst2 caps --n-eval there); rows measured on another dev size are not
    # pooled
    dev = min(args.n_eval or 872, 872)
    same_data = previous.get("n_train", args.n_train) == args.n_train and previous.get("dev_sentences", 872) == dev
    rows = {r["variant"]: r for r in previous["rows"] if same_data and current.get(r["variant"], "?") == _config(r)}
    runs = previous.get("runs", {})
    if not this_run.dirty:
        # a variant re-measured now pools only seeds measured on the same code; seeds from older code are dropped
        # from the rows this run touches (the others keep theirs, listed as stale by results.py --check)
        for name in rows:
            if args.only is None or name in args.only:
                kept = {
                    seed: s
                    for seed, s in rows[name].get("runs", {}).items()
                    if same_code(runs.get(s.get("run"), {}), this_run.commit, "recovery")
                }
                rows[name] = {**rows[name], "runs": kept}
    run_id = None
    dense_model, _, data = finetuned_minilm_sst2(args.data_dir, args.n_train, n_eval=args.n_eval)
    start_accuracy = accuracy(dense_model, data["validation"])
    for seed in args.seeds:
        for name, (config, description) in variants().items():
            if args.only and name not in args.only:
                continue
            measured = run(name, config, args.data_dir, args.n_train, seed, args.n_eval)
            result = {"benchmark": "recovery", "runs": runs, "start_accuracy": start_accuracy, "n_train": args.n_train}
            result["dev_sentences"] = len(data["validation"])
            # the run's header is rewritten after every measurement (its wall time grows): an interrupted run
            # keeps what it measured, with a true header
            if run_id is None:
                run_id = add_run(result, this_run.record())
            else:
                runs[run_id] = this_run.record()
            rows[name] = merge_run(rows.get(name), measured, seed, description, run_id)
            result["rows"] = [rows[n] for n in current if n in rows and rows[n].get("runs")]
            publish(args.output, result)
            runs = result["runs"]


def render(result: dict[str, Any]) -> list[str]:
    """The RESULTS.md section: every variant's mean accuracy over its seeds, against the same-budget dense model."""
    dense = next((r["accuracy"] for r in result["rows"] if r["variant"] == "dense"), None)
    lines = section(
        "Prune and recover: MiniLM on SST-2 with PruningTrainer",
        result,
        f"All runs start from MiniLM fine-tuned 1 epoch on {result['n_train']} SST-2 sentences "
        f"(dev {result['start_accuracy']:.2%}) and train 1 more epoch on them (batch 32, lr 5e-5); `dense` is the "
        "same-budget reference. The teacher of the `-distill` rows is that dense model (same seed): it took one more "
        "epoch of training to make, which the pruned rows' budget does not count. Where several recovery seeds were "
        "run, accuracy is their mean ± sample standard deviation, and `vs dense` compares means; the seeds column "
        "names the run that measured each seed.",
    )
    rows = []
    for r in result["rows"]:
        delta = f"{(r['accuracy'] - dense) * 100:+.1f} pt" if dense is not None else "n/a"
        seeds = [f"{seed} ({run.get('run', '?')})" for seed, run in r["runs"].items()]
        acc = f"{r['accuracy']:.2%}" + (f" ± {r['accuracy_std'] * 100:.2f}" if len(seeds) > 1 else "")
        flops = sorted({round(run["flops_ratio"], 2) for run in r["runs"].values() if "flops_ratio" in run})
        flops_text = span(flops, "x") if len(flops) > 1 else f"{r['flops_ratio']:.2f}x"
        rows.append(
            f"{r['variant']} | {r.get('description', '')} | {acc} | {', '.join(seeds)} | {delta} | {flops_text} "
            f"| {r['params'] / 1e6:.1f}M | {r['sparsity']:.0%} | {r['recovery_wall_s']:.0f} s"
        )
    head = "variant | method | dev accuracy | seeds | vs dense | encoder FLOPs ratio | params | sparsity "
    return [*lines, *table(head + "| recovery wall time", rows), ""]


def headline(result: dict[str, Any]) -> list[str]:
    """Per cut, the best variant by mean accuracy next to the plain one, against the same-budget dense model."""
    rows = {x["variant"]: x for x in result["rows"]}
    dense, lines = rows.get("dense"), []
    for cut in ("2x", "3x"):
        candidates = [x for name, x in rows.items() if name == cut or name.startswith(f"{cut}-")]
        if dense is None or not candidates:
            continue
        best = max(candidates, key=lambda x: x["accuracy"])
        shown = [best] + ([rows[cut]] if cut in rows and rows[cut] is not best else [])
        text = "; ".join(
            f"{x['variant']} {x['accuracy']:.2%} ({(x['accuracy'] - dense['accuracy']) * 100:+.2f} pt, "
            f"{len(x['runs'])} seed{'s' if len(x['runs']) > 1 else ''})"
            for x in shown
        )
        lines.append(
            f"| MiniLM SST-2, {cut} FLOPs cut + 1 epoch recovery (best of {len(candidates)} variants first) "
            f"| {text} vs dense {dense['accuracy']:.2%} with the same budget "
            f"| {commands(result, [s for x in (dense, *shown) for s in x['runs'].values()])} |"
        )
    return lines


if __name__ == "__main__":
    main()
