"""Accuracy / perplexity vs FLOPs cut and sparsity, with plots.

* MiniLM on SST-2 and RTE (each fine-tuned on its task first, cached): dense; structured 1.5x/2x/3x/4x encoder-FLOPs
  cuts (Fisher, global); unstructured 50/70/90% (global magnitude). One-shot for every point; with ``--recover``
  also after one epoch of recovery (PruningTrainer, same data).
* SmolLM2-135M on WikiText-2: perplexity vs unstructured sparsity (magnitude per layer, activation-aware per row)
  and 2:4 patterns.

    python benchmarks/curves.py [--tasks sst2 rte] [--recover] [--skip-llm] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers as tf
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import hf_prune
from hf_prune import PruningConfig, PruningTrainer, prune
from hf_prune.recipes.offline import minilm_path, smollm2_path
from hf_prune.sparsity.masks import sparsity_report

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import (  # noqa: E402
    DEFAULT_DATA_DIR,
    Run,
    accuracy,
    add_n_eval,
    bench_args,
    cache_dir,
    finetuned_minilm_sst2,
    glue_tsv,
    perplexity,
    wikitext_ids,
)
from results import add_run, publish  # noqa: E402

CUTS = (1.5, 2.0, 3.0, 4.0)
SPARSITIES = (0.5, 0.7, 0.9)


def finetuned_minilm_rte(data_dir: Path, epochs: float = 3.0, seed: int = 0):
    """MiniLM fine-tuned on GLUE RTE (cached); returns (model, tokenizer, tokenized data)."""
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ds = glue_tsv(data_dir, "rte")
    names = {"entailment": 0, "not_entailment": 1}

    def tok(batch):
        enc = tokenizer(batch["sentence1"], batch["sentence2"], truncation=True, padding="max_length", max_length=128)
        enc["labels"] = [names[x] for x in batch["label"]]
        return enc

    data = ds.map(tok, batched=True, remove_columns=ds["train"].column_names).with_format("torch")
    cache = cache_dir(f"minilm-rte-e{epochs}-s{seed}", data_dir, "rte/train.tsv")
    if not (cache / "config.json").exists():
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        args = bench_args(str(cache) + ".tmp-train", per_device_train_batch_size=16, num_train_epochs=epochs, seed=seed)
        tf.Trainer(model=model, args=args, train_dataset=data["train"]).train()
        hf_prune.save_pretrained(model, cache, tokenizer=tokenizer)
    return AutoModelForSequenceClassification.from_pretrained(cache).eval(), tokenizer, data


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
    folder, gguf = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    test_ids = wikitext_ids(tokenizer, data_dir, "test", eval_tokens)
    train_ids = wikitext_ids(tokenizer, data_dir, "train", calib_seqs * 512 * 4)
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, train_ids.numel() - 513, (calib_seqs,), generator=g).tolist()
    calibration = [{"input_ids": train_ids[s : s + 512]} for s in starts]
    dense = perplexity(base, test_ids)
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
        ppl = perplexity(model, test_ids)
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--tasks", nargs="*", default=["sst2", "rte"], choices=["sst2", "rte"])
    parser.add_argument("--recover", action="store_true", help="also recover each point for one epoch")
    parser.add_argument("--skip-llm", action="store_true")
    parser.add_argument("--n-train", type=int, default=8000, help="SST-2 training sentences (RTE uses all)")
    add_n_eval(parser)
    parser.add_argument("--quick", action="store_true", help="2x/50%% points only, fewer eval tokens")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "curves.json")
    args = parser.parse_args(argv)
    cuts, sparsities = ((2.0,), (0.5,)) if args.quick else (CUTS, SPARSITIES)
    this_run = Run("curves.py", argv)
    # a partial re-run (--tasks rte, --skip-llm) keeps the other parts of the previous result with their runs
    previous = json.loads(args.output.read_text()) if args.output.exists() else {}
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
    run_id = add_run(result, this_run.record())
    for name, part in parts.items():
        part["run"] = run_id
        for point in part["points"]:
            point["run"] = run_id
        if name == "llm":
            result["llm"] = part
        else:
            result["tasks"][name] = part
    # the committed plots live next to RESULTS.md; a run written elsewhere (--quick) keeps its plots beside its JSON
    default_output = args.output.resolve() == (HERE / "results" / "curves.json").resolve()
    result["plots"] = plot(result, HERE if default_output else args.output.parent)
    publish(args.output, result)
    print(json.dumps({"plots": result["plots"], "wall_time_s": this_run.elapsed()}))


if __name__ == "__main__":
    main()
