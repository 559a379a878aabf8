"""One-shot pruning without retraining.

Part 1 (MiniLM, SST-2): fine-tune all-MiniLM-L6-v2 on an SST-2 subset (cached), then cut the encoder FLOPs 2x and
3x with every structured criterion x scope and report dev accuracy. Calibration: 512 training sentences.
Part 2 (SmolLM2-135M, WikiText-2): 50% unstructured sparsity (magnitude per layer / per row, activation-aware) and
2:4, perplexity on the first 16,384 test tokens in 512-token windows. Calibration: 32 x 512 train tokens.

    python benchmarks/oneshot.py [--data-dir data] [--skip-llm] [--skip-minilm]
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import hf_prune
from hf_prune import PruningConfig, prune
from hf_prune.config import CRITERIA
from hf_prune.evaluation import window_perplexity

from common import (
    Run,
    accuracy,
    add_n_eval,
    bench_parser,
    finetuned_minilm_sst2,
    load_smollm2,
    token_windows,
    wikitext_ids,
)
from results import add_run, commands, previous_result, publish, run_ids, section, table


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
    base, tokenizer = load_smollm2()
    test_ids = wikitext_ids(tokenizer, data_dir, "test", eval_tokens)
    calibration = token_windows(wikitext_ids(tokenizer, data_dir, "train", calib_seqs * 512 * 4), 512, calib_seqs)
    dense_ppl = window_perplexity(base, test_ids)
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
        ppl = window_perplexity(model, test_ids)
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
    parser = bench_parser(__doc__, "oneshot")
    parser.add_argument("--n-train", type=int, default=8000)
    add_n_eval(parser)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--calib-seqs", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA, help="MiniLM criteria")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-llm", action="store_true")
    args = parser.parse_args(argv)
    this_run = Run("oneshot.py", argv)
    # keep the part that was skipped this time, with the run that measured it
    previous = previous_result(args.output)
    result: dict = {"benchmark": "oneshot", "runs": previous.get("runs", {})}
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
    add_run(result, this_run.record(), [*parts.values(), *(row for part in parts.values() for row in part["rows"])])
    result.update(parts)
    publish(args.output, result)
    print(f"hf_prune {hf_prune.__version__}: wrote {args.output}")


def render(result: dict[str, Any]) -> list[str]:
    """The RESULTS.md section: the MiniLM and SmolLM2 tables (whichever parts were measured)."""
    lines = section("One-shot pruning without retraining", result)
    if "minilm" in result:
        m = result["minilm"]
        lines += [
            f"### MiniLM (all-MiniLM-L6-v2) on SST-2: dense dev accuracy {m['dense_accuracy']:.2%}",
            "",
            f"Fine-tuned 1 epoch on {m['n_train']} SST-2 sentences; pruned to a FLOPs target with "
            f"{m['calibration_samples']} calibration sentences; no retraining. Dev set: 872 sentences.",
            "",
        ]
        cells = (
            f"{r['cut']}x | {r['criterion']} | {r['scope']} | {'yes' if r['reconstruct'] else 'no'} "
            f"| {r['flops_ratio']:.2f}x | {r['accuracy']:.2%} | {r['kept_heads']} | {r['prune_time_s']:.1f} s"
            for r in m["rows"]
        )
        head = "FLOPs cut | criterion | scope | LS reconstruction | achieved FLOPs ratio | dev accuracy "
        lines += [*table(head + "| kept heads per layer | prune time", cells, run_ids(result, m["rows"])), ""]
    if "llm" in result:
        m = result["llm"]
        lines += [
            f"### SmolLM2-135M on WikiText-2: dense perplexity {m['dense_perplexity']:.2f}",
            "",
            f"Test perplexity over the first {m['eval_tokens']} tokens in {m['window']}-token windows; "
            f"calibration: {m['calibration']}.",
            "",
        ]
        cells = (
            f"{r['criterion']} | {r['scope']} | {r['pattern']} | {'yes' if r['reconstruct'] else 'no'} "
            f"| {r['sparsity']:.1%} | {r['perplexity']:.2f} | {r['prune_time_s']:.0f} s"
            for r in m["rows"]
        )
        head = "criterion | scope | pattern | OBS reconstruction | sparsity | perplexity | prune time"
        lines += [*table(head, cells, run_ids(result, m["rows"])), ""]
    return lines


def headline(result: dict[str, Any]) -> list[str]:
    """MiniLM at a 2x cut (Fisher/global with and without the refit, magnitude) and SmolLM2 at 50% sparsity."""
    lines = []
    if "minilm" in result:
        m = result["minilm"]
        acc = {(x["cut"], x["criterion"], x["scope"], x["reconstruct"]): x["accuracy"] for x in m["rows"]}
        fisher, magnitude = acc.get((2, "fisher", "global", False)), acc.get((2, "magnitude", "layer", False))
        refit = acc.get((2, "fisher", "global", True))
        if fisher is not None and magnitude is not None:
            extra = f"{refit:.1%} with least-squares reconstruction, " if refit is not None else ""
            lines.append(
                f"| MiniLM SST-2, 2x FLOPs cut one-shot (no retraining) | Fisher/global {extra}{fisher:.1%} without; "
                f"magnitude {magnitude:.1%} (dense {m['dense_accuracy']:.1%}) | {commands(result, m['rows'])} |"
            )
    if "llm" in result:
        m = result["llm"]
        ppl = {(x["criterion"], x["scope"], x["pattern"], x["reconstruct"]): x["perplexity"] for x in m["rows"]}
        act, rec = (
            ppl.get(("activation", "row", "unstructured", False)),
            ppl.get(("activation", "row", "unstructured", True)),
        )
        mag = ppl.get(("magnitude", "layer", "unstructured", False))
        if act is not None and mag is not None:
            extra = f"{rec:.1f} with OBS reconstruction, " if rec is not None else ""
            lines.append(
                f"| SmolLM2-135M WikiText-2, 50% unstructured one-shot | perplexity {extra}{act:.1f} activation-aware "
                f"(Wanda), {mag:.1f} magnitude (dense {m['dense_perplexity']:.1f}) | {commands(result, m['rows'])} |"
            )
    return lines


if __name__ == "__main__":
    main()
