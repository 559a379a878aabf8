"""One-shot pruning without retraining.

Part 1 (MiniLM, SST-2): fine-tune all-MiniLM-L6-v2 on an SST-2 subset (cached), then cut the encoder FLOPs 2x and
3x with every structured criterion x scope and report dev accuracy. Calibration: 512 training sentences.
Part 2 (SmolLM2-135M, WikiText-2): 50% unstructured sparsity (magnitude per layer / per row, activation-aware) and
2:4, perplexity on the first 16,384 test tokens in 512-token windows. Calibration: 32 x 512 train tokens.

    python benchmarks/oneshot.py [--data-dir data] [--skip-llm] [--skip-minilm]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_prune
from hf_prune import PruningConfig, prune
from hf_prune.recipes.offline import smollm2_path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import (  # noqa: E402
    DEFAULT_DATA_DIR,
    Run,
    accuracy,
    add_n_eval,
    finetuned_minilm_sst2,
    perplexity,
    wikitext_ids,
)
from results import add_run, publish  # noqa: E402

CRITERIA = ("magnitude", "taylor", "fisher", "random")


def _minilm_row(model, config: PruningConfig, calibration, validation) -> dict:
    pruned = copy.deepcopy(model)
    start = time.perf_counter()
    report = prune(pruned, config, calibration_data=calibration)
    elapsed = time.perf_counter() - start
    acc = accuracy(pruned, validation)
    row = {
        "cut": round(1 / config.target_flops),
        "criterion": config.criterion,
        "scope": config.scope,
        "reconstruct": config.reconstruct,
        "flops_ratio": report.flops_ratio,
        "accuracy": acc,
        "params_after": report.params_after,
        "kept_heads": [layer["heads"] for layer in report.layers_after],
        "kept_ffn": [layer["ffn"] for layer in report.layers_after],
        "prune_time_s": elapsed,
    }
    print(
        f"{row['cut']}x {config.criterion:9s} {config.scope:6s} reconstruct={config.reconstruct}: acc {acc:.4f} "
        f"(FLOPs {report.flops_ratio:.2f}x, {elapsed:.1f} s) heads {row['kept_heads']}"
    )
    return row


def minilm_rows(
    data_dir: Path, n_train: int, calib: int, criteria=CRITERIA, n_eval: int | None = None
) -> tuple[dict, list[dict]]:
    model, _, data = finetuned_minilm_sst2(data_dir, n_train, n_eval=n_eval)
    dense_acc = accuracy(model, data["validation"])
    print(f"dense MiniLM SST-2 dev accuracy {dense_acc:.4f}")
    calibration = data["train"].select(range(calib))
    rows = []
    for keep in (0.5, 1 / 3):
        for criterion in criteria:
            for scope in ("layer", "global"):
                config = PruningConfig(target_flops=keep, criterion=criterion, scope=scope, max_samples=calib)
                rows.append(_minilm_row(model, config, calibration, data["validation"]))
        # the best criterion again, with the least-squares refit of the shrunk output projections
        config = PruningConfig(
            target_flops=keep, criterion="fisher", scope="global", max_samples=calib, reconstruct=True
        )
        rows.append(_minilm_row(model, config, calibration, data["validation"]))
    meta = {"dense_accuracy": dense_acc, "n_train": n_train, "dev_sentences": len(data["validation"])}
    return {**meta, "calibration_samples": calib}, rows


def llm_rows(data_dir: Path, calib_seqs: int, eval_tokens: int) -> tuple[dict, list[dict]]:
    folder, gguf = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    test_ids = wikitext_ids(tokenizer, data_dir, "test", eval_tokens)
    train_ids = wikitext_ids(tokenizer, data_dir, "train", calib_seqs * 512 * 4)
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, train_ids.numel() - 513, (calib_seqs,), generator=g)
    calibration = [{"input_ids": train_ids[s : s + 512]} for s in starts.tolist()]
    dense_ppl = perplexity(base, test_ids)
    print(f"dense SmolLM2 WikiText-2 ppl {dense_ppl:.2f}")
    variants = [
        ("magnitude", "layer", "unstructured", False),
        ("magnitude", "row", "unstructured", False),
        ("activation", "row", "unstructured", False),
        ("activation", "row", "unstructured", True),
        ("magnitude", "layer", "2:4", False),
        ("activation", "row", "2:4", False),
        ("activation", "row", "2:4", True),
    ]
    rows = []
    for criterion, scope, pattern, reconstruct in variants:
        model = copy.deepcopy(base)
        sparsity = 0.5 if pattern == "unstructured" else 0.0
        config = PruningConfig(
            sparsity=sparsity,
            sparsity_scope=scope,
            sparsity_criterion=criterion,
            pattern=pattern,
            reconstruct=reconstruct,
            max_samples=calib_seqs,
            batch_size=4,
        )
        start = time.perf_counter()
        report = prune(model, config, calibration_data=calibration)
        elapsed = time.perf_counter() - start
        ppl = perplexity(model, test_ids)
        rows.append(
            {
                "criterion": criterion,
                "scope": scope,
                "pattern": pattern,
                "reconstruct": reconstruct,
                "sparsity": report.sparsity,
                "perplexity": ppl,
                "prune_time_s": elapsed,
            }
        )
        print(
            f"{criterion:10s} {scope:5s} {pattern:12s} reconstruct={reconstruct}: sparsity {report.sparsity:.3f} "
            f"ppl {ppl:.2f} ({elapsed:.0f} s)"
        )
        del model
    meta = {
        "dense_perplexity": dense_ppl,
        "eval_tokens": int(test_ids.numel()),
        "window": 512,
        "calibration": f"{calib_seqs} x 512 WikiText-2 train tokens",
    }
    return meta, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--n-train", type=int, default=8000)
    add_n_eval(parser)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--calib-seqs", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA, help="MiniLM criteria")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-llm", action="store_true")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "oneshot.json")
    args = parser.parse_args(argv)
    this_run = Run("oneshot.py", argv)
    result: dict = {"benchmark": "oneshot", "runs": {}}
    if args.output.exists():  # keep the part that was skipped this time, with the run that measured it
        import json

        previous = json.loads(args.output.read_text())
        result["runs"] = previous.get("runs", {})
        result.update({k: previous[k] for k in ("minilm", "llm") if k in previous})
    parts = {}
    if not args.skip_minilm:
        part = time.time()
        meta, rows = minilm_rows(args.data_dir, args.n_train, args.calibration, args.criteria, args.n_eval)
        parts["minilm"] = {**meta, "wall_time_s": time.time() - part, "rows": rows}
    if not args.skip_llm:
        part = time.time()
        meta, rows = llm_rows(args.data_dir, args.calib_seqs, args.eval_tokens)
        parts["llm"] = {**meta, "wall_time_s": time.time() - part, "rows": rows}
    run_id = add_run(result, this_run.record())
    for name, part in parts.items():
        part["run"] = run_id
        for row in part["rows"]:
            row["run"] = run_id
        result[name] = part
    publish(args.output, result)
    print(f"hf_prune {hf_prune.__version__}: wrote {args.output}")


if __name__ == "__main__":
    main()
