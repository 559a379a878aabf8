"""Accuracy / perplexity vs FLOPs cut and sparsity, with plots.

* MiniLM on SST-2 and RTE (each fine-tuned on its task first, cached): dense; structured 1.5x/2x/3x/4x encoder-FLOPs
  cuts (Fisher, global); unstructured 50/70/90% (global magnitude). One-shot for every point; with ``--recover``
  also after one epoch of recovery (PruningTrainer, same data).
* SmolLM2-135M on WikiText-2: perplexity vs unstructured sparsity (magnitude per layer, activation-aware per row)
  and 2:4 patterns.

    python benchmarks/curves.py [--tasks sst2 rte] [--recover] [--skip-llm] [--quick]
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from hf_prune import PruningConfig, PruningTrainer, prune
from hf_prune.evaluation import window_perplexity
from hf_prune.recipes.offline import minilm_path
from hf_prune.sparsity.masks import sparsity_report

from common import (
    HERE,
    Run,
    accuracy,
    add_n_eval,
    bench_args,
    bench_parser,
    cache_dir,
    finetune_cached,
    finetuned_minilm_sst2,
    glue_tsv,
    load_smollm2,
    token_windows,
    wikitext_ids,
)
from results import RESULTS_DIR, add_run, commands, previous_result, publish, section, table

CUTS = (1.5, 2.0, 3.0, 4.0)
SPARSITIES = (0.5, 0.7, 0.9)


def finetuned_minilm_rte(data_dir: Path, epochs: float = 3.0, seed: int = 0):
    """MiniLM fine-tuned on GLUE RTE (cached); returns (model, tokenizer, tokenized data)."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    ds = glue_tsv(data_dir, "rte")
    names = {"entailment": 0, "not_entailment": 1}

    def tok(batch):
        enc = tokenizer(batch["sentence1"], batch["sentence2"], truncation=True, padding="max_length", max_length=128)
        enc["labels"] = [names[x] for x in batch["label"]]
        return enc

    data = ds.map(tok, batched=True, remove_columns=ds["train"].column_names).with_format("torch")
    cache = cache_dir(f"minilm-rte-e{epochs}-s{seed}", data_dir, "rte/train.tsv")
    model = finetune_cached(
        cache, tokenizer, data["train"], seed, per_device_train_batch_size=16, num_train_epochs=epochs
    )
    return model, tokenizer, data


def _recover(model, data, config: PruningConfig) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        args = bench_args(tmp, num_train_epochs=1)
        torch.manual_seed(0)
        start = time.time()
        PruningTrainer(model=model, args=args, train_dataset=data["train"], pruning_config=config).train()
        return time.time() - start


def _oneshot(model, config: PruningConfig, calibration, data) -> tuple[float, object]:
    pruned = copy.deepcopy(model)
    report = prune(pruned, config, calibration_data=calibration)
    return accuracy(pruned, data["validation"]), report


def task_rows(
    task: str, data_dir: Path, recover: bool, cuts, sparsities, n_train: int = 8000, n_eval: int | None = None
) -> dict:
    if task == "sst2":
        model, _, data = finetuned_minilm_sst2(data_dir, n_train, n_eval=n_eval)
    else:
        model, _, data = finetuned_minilm_rte(data_dir)
    dense_acc = accuracy(model, data["validation"])
    print(f"{task}: dense {dense_acc:.4f}")
    points = []
    calibration = data["train"].select(range(min(512, len(data["train"]))))
    for kind, values in (("structured", cuts), ("unstructured", sparsities)):
        for value in values:
            if kind == "structured":
                # plain Fisher one-shot, and the same with least-squares reconstruction (also the recovery start)
                config = PruningConfig(target_flops=1 / value, criterion="fisher", scope="global", max_samples=512)
                plain_acc, _ = _oneshot(model, config, calibration, data)
                config = PruningConfig(**{**config.to_dict(), "reconstruct": True})
            else:
                config = PruningConfig(sparsity=value, sparsity_scope="global", schedule="oneshot")
            acc, report = _oneshot(model, config, calibration, data)
            point = {
                "kind": kind,
                "value": value,
                "flops_ratio": report.flops_ratio,
                "sparsity": report.sparsity,
                "oneshot_accuracy": plain_acc if kind == "structured" else acc,
                "oneshot_reconstructed_accuracy": acc if kind == "structured" else None,
            }
            if recover:
                fresh = copy.deepcopy(model)
                point["recovery_wall_s"] = _recover(fresh, data, config)
                point["recovered_accuracy"] = accuracy(fresh, data["validation"])
                point["sparsity_after_recovery"] = sparsity_report(fresh)["overall"]
            points.append(point)
            print(task, point, flush=True)
    return {
        "dense_accuracy": dense_acc,
        "dev_sentences": len(data["validation"]),
        "points": points,
        "recovered": recover,
    }


def llm_rows(data_dir: Path, sparsities, calib_seqs: int, eval_tokens: int) -> dict:
    base, tokenizer = load_smollm2()
    test_ids = wikitext_ids(tokenizer, data_dir, "test", eval_tokens)
    calibration = token_windows(wikitext_ids(tokenizer, data_dir, "train", calib_seqs * 512 * 4), 512, calib_seqs)
    dense = window_perplexity(base, test_ids)
    points = []
    settings = [("magnitude", "layer", "unstructured", s) for s in sparsities]
    settings += [("activation", "row", "unstructured", s) for s in sparsities]
    settings += [("magnitude", "layer", "2:4", 0.5), ("activation", "row", "2:4", 0.5)]
    for criterion, scope, pattern, sparsity in settings:
        model = copy.deepcopy(base)
        config = PruningConfig(
            sparsity=sparsity if pattern == "unstructured" else 0.0,
            sparsity_scope=scope,
            sparsity_criterion=criterion,
            pattern=pattern,
            max_samples=calib_seqs,
            batch_size=4,
        )
        report = prune(model, config, calibration_data=calibration)
        ppl = window_perplexity(model, test_ids)
        points.append(
            {"criterion": criterion, "scope": scope, "pattern": pattern, "sparsity": report.sparsity, "perplexity": ppl}
        )
        print("smollm2", points[-1])
        del model
    return {"dense_perplexity": dense, "eval_tokens": int(test_ids.numel()), "points": points}


def plot(result: dict, out_dir: Path) -> list[str]:
    """One PNG per task (accuracy vs FLOPs ratio / sparsity) and one for SmolLM2; returns file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for task, r in result.get("tasks", {}).items():
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
        for ax, kind, xkey, xlabel in (
            (ax1, "structured", "flops_ratio", "encoder FLOPs cut (x)"),
            (ax2, "unstructured", "sparsity", "weight sparsity"),
        ):
            pts = [p for p in r["points"] if p["kind"] == kind]
            xs = [p[xkey] for p in pts]
            ax.plot(xs, [p["oneshot_accuracy"] for p in pts], "o-", label="one-shot")
            if kind == "structured" and all(p.get("oneshot_reconstructed_accuracy") for p in pts):
                ax.plot(xs, [p["oneshot_reconstructed_accuracy"] for p in pts], "^-", label="one-shot + LS reconstruct")
            if r["recovered"]:
                ax.plot(xs, [p["recovered_accuracy"] for p in pts], "s-", label="+1 epoch recovery")
            # the recovered points trained one epoch more than this model: it is the start, not a same-budget peer
            dense_label = "dense (recovery start)" if r["recovered"] else "dense"
            ax.axhline(r["dense_accuracy"], color="gray", ls="--", label=dense_label)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("dev accuracy")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"MiniLM on {task.upper()}")
        fig.tight_layout()
        name = f"curves_{task}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        files.append(name)
    if "llm" in result:
        r = result["llm"]
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for criterion in ("magnitude", "activation"):
            pts = [p for p in r["points"] if p["criterion"] == criterion and p["pattern"] == "unstructured"]
            ax.plot([p["sparsity"] for p in pts], [p["perplexity"] for p in pts], "o-", label=criterion)
        for p in r["points"]:
            if p["pattern"] != "unstructured":
                ax.plot([p["sparsity"]], [p["perplexity"]], "x", ms=9, label=f"2:4 {p['criterion']}")
        ax.axhline(r["dense_perplexity"], color="gray", ls="--", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("weight sparsity")
        ax.set_ylabel("WikiText-2 perplexity")
        ax.set_title("SmolLM2-135M, one-shot")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "curves_smollm2.png", dpi=110)
        plt.close(fig)
        files.append("curves_smollm2.png")
    return files


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, "curves")
    parser.add_argument("--tasks", nargs="*", default=["sst2", "rte"], choices=["sst2", "rte"])
    parser.add_argument("--recover", action="store_true", help="also recover each point for one epoch")
    parser.add_argument("--skip-llm", action="store_true")
    parser.add_argument("--n-train", type=int, default=8000, help="SST-2 training sentences (RTE uses all)")
    add_n_eval(parser)
    parser.add_argument("--quick", action="store_true", help="2x/50%% points only, fewer eval tokens")
    args = parser.parse_args(argv)
    cuts, sparsities = ((2.0,), (0.5,)) if args.quick else (CUTS, SPARSITIES)
    this_run = Run("curves.py", argv)
    # a partial re-run (--tasks rte, --skip-llm) keeps the other parts of the previous result with their runs
    previous = previous_result(args.output)
    result = {
        "benchmark": "curves",
        "runs": previous.get("runs", {}),
        "tasks": dict(previous.get("tasks", {})),
    }
    if "llm" in previous:
        result["llm"] = previous["llm"]
    parts = {}
    for task in args.tasks:
        part_start = time.time()
        part = task_rows(task, args.data_dir, args.recover, cuts, sparsities, args.n_train, args.n_eval)
        parts[task] = {**part, "wall_time_s": time.time() - part_start}
    if not args.skip_llm:
        part_start = time.time()
        eval_tokens = 4096 if args.quick else 16384
        part = llm_rows(args.data_dir, (0.5,) if args.quick else (0.3, 0.5, 0.7), 32, eval_tokens)
        parts["llm"] = {**part, "wall_time_s": time.time() - part_start}
    add_run(result, this_run.record(), [*parts.values(), *(p for part in parts.values() for p in part["points"])])
    for name, part in parts.items():
        if name == "llm":
            result["llm"] = part
        else:
            result["tasks"][name] = part
    # the committed plots live next to RESULTS.md; a run written elsewhere (--quick) keeps its plots beside its JSON
    default_output = args.output.resolve() == (RESULTS_DIR / "curves.json").resolve()
    result["plots"] = plot(result, HERE if default_output else args.output.parent)
    publish(args.output, result)
    print(json.dumps({"plots": result["plots"], "wall_time_s": this_run.elapsed()}))


def render(result: dict[str, Any]) -> list[str]:
    """The RESULTS.md section: one table and plot per MiniLM task, and SmolLM2's perplexity points."""
    lines = section("Accuracy and perplexity vs FLOPs cut and sparsity", result)
    for task, r in result.get("tasks", {}).items():
        lines += [
            f"### MiniLM on {task.upper()} (dense dev accuracy {r['dense_accuracy']:.2%})",
            "",
            f"Run: {r.get('run', '?')}.",
            "",
            "Structured: Fisher (global) to the FLOPs target; the reconstruction column adds the least-squares refit "
            "of the shrunk output projections (`reconstruct=True`), which is also where recovery starts. "
            "Unstructured: global magnitude. Recovery: 1 epoch of PruningTrainer on the task's training data, starting "
            "from the dense model of the heading; a dense model trained that epoch too is the fair reference (SST-2: "
            "the `dense` row of the recovery table).",
            "",
        ]
        rows = []
        for p in r["points"]:
            target = f"{p['value']:.1f}x FLOPs cut" if p["kind"] == "structured" else f"{p['value']:.0%} sparsity"
            rec = p.get("oneshot_reconstructed_accuracy")
            row = f"{p['kind']} | {target} | {p['flops_ratio']:.2f}x | {p['sparsity']:.0%} | "
            rows.append(row + f"{p['oneshot_accuracy']:.2%} | {'' if rec is None else f'{rec:.2%}'}")
            rows[-1] += f" | {p['recovered_accuracy']:.2%}" if r["recovered"] else ""
        head = "kind | target | FLOPs ratio | sparsity | one-shot accuracy | one-shot + reconstruction"
        head += " | after 1 epoch recovery" if r["recovered"] else ""
        lines += [*table(head, rows), "", f"![{task}](curves_{task}.png)", ""]
    if "llm" in result:
        r = result["llm"]
        lines += [
            f"### SmolLM2-135M on WikiText-2 (dense perplexity {r['dense_perplexity']:.2f}, {r['eval_tokens']} tokens)",
            "",
            f"Run: {r.get('run', '?')}.",
            "",
        ]
        rows = [
            f"{p['criterion']} | {p['scope']} | {p['pattern']} | {p['sparsity']:.0%} | {p['perplexity']:.2f}"
            for p in r["points"]
        ]
        lines += [*table("criterion | scope | pattern | sparsity | perplexity", rows), ""]
        lines += ["![smollm2](curves_smollm2.png)", ""]
    return lines


def headline(result: dict[str, Any]) -> list[str]:
    """The plots, with the commands that measured them (the tables are in RESULTS.md)."""
    if not result.get("plots"):
        return []
    plots = [f"![{name}](benchmarks/{name})" for name in result["plots"]]
    return ["", *plots, f"*Plots: {commands(result)} (tables in benchmarks/RESULTS.md)*"]


if __name__ == "__main__":
    main()
