"""Benchmark results: JSON files in ``benchmarks/results/`` are the source of truth; ``RESULTS.md`` is rendered
from them (never edited by hand), so every figure in it can be traced to the command that produced it."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write a result JSON atomically (a crashed run never leaves a truncated file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def publish(path: Path, result: dict[str, Any]) -> None:
    """Write ``result`` (atomically); when it is one of the committed results, regenerate RESULTS.md and the README
    headline from the JSON on disk, so they always agree. Results written elsewhere (``--output``, ``--quick``)
    leave the committed files alone."""
    write_result(path, prune_runs(result) if "runs" in result else result)
    if path.resolve().parent == RESULTS_DIR.resolve():
        render_results()


def add_run(result: dict[str, Any], record: dict[str, Any]) -> str:
    """Store one run's header in ``result["runs"]`` and return its id; rows name it in their ``run`` field."""
    runs = result.setdefault("runs", {})
    number = 1 + max((int(k[1:]) for k in runs if k[1:].isdigit()), default=0)
    run_id = f"r{number}"
    runs[run_id] = record
    return run_id


def iter_rows(result: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every measured row of a result as ``(label, row)``; each row names the run that measured it.

    Merged files gather rows from several runs (oneshot parts, curves tasks, recovery variants and seeds).
    """
    kind = result.get("benchmark")
    if kind == "recovery":
        for row in result.get("rows", []):
            for seed, run in row.get("runs", {}).items():
                yield f"{row['variant']} seed {seed}", run
    elif kind == "oneshot":
        for part in ("minilm", "llm"):
            for row in result.get(part, {}).get("rows", []):
                yield f"{part}: {row['criterion']}/{row['scope']} {row.get('cut', row.get('pattern', ''))}", row
    elif kind == "curves":
        parts = [*result.get("tasks", {}).items(), *([("llm", result["llm"])] if "llm" in result else [])]
        for name, part in parts:
            for row in part.get("points", []):
                what = row.get("value", row.get("sparsity"))
                pattern = f" {row['pattern']}" if "pattern" in row else ""
                yield f"{name}: {row.get('kind', row.get('criterion'))}{pattern} {what:.2g}", row
    elif kind == "decoder":
        for row in result.get("rows", []):
            yield f"{row['cut']:g}x {row['method']}", row
        for u in decoder_unstructured(result):
            yield f"50% unstructured {u['criterion']}", u
    else:
        for i, row in enumerate(result.get("rows", [])):
            yield f"{row.get('model') or row.get('tool') or 'row'} #{i}", row


def prune_runs(result: dict[str, Any]) -> dict[str, Any]:
    """Drop run headers no row names any more (their rows were re-measured)."""
    used = {row.get("run") for _, row in iter_rows(result)}
    result["runs"] = {k: v for k, v in result.get("runs", {}).items() if k in used}
    return result


def _commit_text(run: dict[str, Any]) -> str:
    if run.get("commit"):
        return f"`{run['commit'][:12]}`" + (" (dirty tree)" if run.get("dirty") else "")
    if run.get("committed_in"):
        return f"not recorded (stored by `{run['committed_in'][:12]}`)"
    return "not recorded"


def _machine_text(m: dict[str, Any]) -> str:
    cpu = f"{m['cpu_model']}, " if m.get("cpu_model") else ""
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return f"{cpu}{m['cpu_cores']} cores, {m.get('torch_threads', '?')} torch threads{gpu}"


def machine_kind(machine: dict[str, Any], device: str = "cpu") -> str:
    """What a timing belongs to: the GPU for CUDA rows, else the CPU model and the torch thread count. Latency
    results keep one set of rows per kind, so a run on another machine adds its rows instead of replacing them."""
    if device.startswith("cuda"):
        return f"GPU {machine.get('gpu') or '?'}"
    return f"{machine.get('cpu_model') or '?'}, {machine.get('torch_threads', '?')} threads"


def rows_of_other_machines(
    previous: dict[str, Any], record: dict[str, Any], device: str = "cpu", also: Callable[[dict], bool] | None = None
) -> list[dict[str, Any]]:
    """Rows of a previous result to keep beside a new run's: those measured on another machine kind
    (:func:`machine_kind`), and those ``also(row)`` says the new run does not re-measure. Their runs stay in
    ``previous["runs"]``, so a run on one machine never erases what another machine measured."""
    kind = machine_kind(record["machine"], device)
    runs = previous.get("runs", {})
    return [
        r
        for r in previous.get("rows", [])
        if r.get("run") in runs
        and (machine_kind(runs[r["run"]]["machine"], r.get("device", "cpu")) != kind or (also is not None and also(r)))
    ]


def machine_groups(result: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The result's rows grouped by the machine kind of the run that measured them, in order of first appearance."""
    runs = result.get("runs", {})
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in result.get("rows", []):
        run = runs.get(r.get("run"), {})
        groups.setdefault(machine_kind(run.get("machine", {}), r.get("device", "cpu")), []).append(r)
    return list(groups.items())


def _header(result: dict[str, Any]) -> list[str]:
    """The runs that measured a section's rows: command, commit, date, machine, wall time; versions and data
    checksums below (once when every run shares them)."""
    runs = result.get("runs", {})
    lines = [
        "| run | command | commit | date | machine | wall time |",
        "|---|---|---|---|---|---|",
    ]
    for run_id, r in runs.items():
        lines.append(
            f"| {run_id} | `{r['command'].strip()}` | {_commit_text(r)} | {r.get('date') or 'not recorded'} "
            f"| {_machine_text(r['machine'])} "
            f"| {'not recorded' if r.get('wall_time_s') is None else format(r['wall_time_s'], '.0f') + ' s'} |"
        )
    lines.append("")
    for key, title in (("versions", "Versions"), ("data", "Data (sha256)")):
        texts = {
            run_id: ", ".join(f"{k} {v[:12] if key == 'data' else v}" for k, v in r.get(key, {}).items())
            or ("none read" if key == "data" and not r.get("legacy") else "not recorded")
            for run_id, r in runs.items()
        }
        distinct = dict.fromkeys(texts.values())
        if len(distinct) == 1:
            text = next(iter(distinct))
            lines.append(f"{title}: {text}  ")
        else:
            lines += [f"{title} ({run_id}): {text}  " for run_id, text in texts.items()]
    for run_id, r in runs.items():
        for key in ("legacy", "note"):
            if r.get(key):
                lines.append(f"{run_id}: {r[key]}  ")
    return [*lines, ""]


def _run_col(result: dict[str, Any], row: dict[str, Any]) -> str:
    """A `run` table cell, only when the section's rows come from more than one run."""
    return f" {row.get('run', '?')} |" if len(result.get("runs", {})) > 1 else ""


def _run_head(result: dict[str, Any]) -> tuple[str, str]:
    return (" run |", "---|") if len(result.get("runs", {})) > 1 else ("", "")


def _render_breakdown(result: dict[str, Any]) -> list[str]:
    """Where a forward's time goes (rows run with ``latency.py --breakdown``): the matrix products, which shrink with
    width, against the other ops (norms, activations, residual adds, layout) and the un-profiled remainder (Python
    and dispatch), which a layer pays whatever its width."""
    measured = [(kind, r) for kind, rows in machine_groups(result) for r in rows if r.get("breakdown_ms")]
    if not measured:
        return []
    lines = [
        "Where a forward's time goes (`--breakdown`: torch.profiler self time per op category, ms per forward; "
        "`dispatch` is the median un-profiled wall time minus the profiled ops, i.e. Python and op dispatch, and is "
        "the noisiest column since the profiler's own overhead lands in the ops):",
        "",
        "| machine | model | plan | batch x seq | matmul dense -> pruned | other ops dense -> pruned "
        "| dispatch dense -> pruned |",
        "|---|---|---|---|---|---|---|",
    ]

    def parts(split: dict[str, float]) -> tuple[float, float, float]:
        matmul, dispatch = split.get("matmul", 0.0), split["python + dispatch"]
        return matmul, sum(split.values()) - matmul - dispatch, dispatch

    for kind, r in measured:
        dense, pruned = (parts(r["breakdown_ms"][side]) for side in ("dense", "pruned"))
        cells = " | ".join(f"{d:.1f} -> {p:.1f}" for d, p in zip(dense, pruned, strict=True))
        lines.append(f"| {kind} | {r['model']} | {r.get('plan', 'width')} | {r['batch']} x {r['seq_len']} | {cells} |")
    return [*lines, ""]


def render_latency(result: dict[str, Any]) -> list[str]:
    lines = [
        "## Latency: dense vs structured 2x cuts (width: 50% heads + 50% FFN in every layer; width+depth: every "
        "fourth block removed, then a third of the heads and FFN)",
        "",
        *_header(result),
        "| machine | model | plan | batch | seq | params dense | params pruned | dense ms | pruned ms | speedup "
        "| FLOPs ratio | speedup / FLOPs ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, rows in machine_groups(result):
        for r in rows:
            lines.append(
                f"| {kind} | {r['model']} | {r.get('plan', 'width')} | {r['batch']} | {r['seq_len']} "
                f"| {r['params_dense'] / 1e6:.1f}M "
                f"| {r['params_pruned'] / 1e6:.1f}M | {r['dense_ms']:.1f} | {r['pruned_ms']:.1f} "
                f"| {r['speedup']:.2f}x | {r['flops_ratio']:.2f}x | {r['speedup_over_flops_ratio']:.2f} |"
            )
    lines += [
        "",
        "Latency is the median of interleaved dense/pruned rounds in one process; FLOPs ratio counts the "
        "transformer blocks (projections, attention, FFN).",
        "",
    ]
    lines += _render_breakdown(result)
    if result.get("sizes"):
        lines += [
            "On-disk size (safetensors, float32) as a stock `save_pretrained` writes it: unstructured zeros are "
            "stored densely and do not shrink the file (`hf_prune.save_pretrained(..., sparse=True)` stores them as "
            "values + bitmask: see the deployment table):",
            "",
            "| model | dense | structured 50/50 | 50% unstructured |",
            "|---|---|---|---|",
        ]
        for z in result["sizes"]:
            lines.append(
                f"| {z['model']} | {z['dense_bytes'] / 2**20:.1f} MiB | {z['structured_bytes'] / 2**20:.1f} MiB "
                f"| {z['unstructured_bytes'] / 2**20:.1f} MiB |"
            )
        lines.append("")
    return lines


def render_oneshot(result: dict[str, Any]) -> list[str]:
    lines = ["## One-shot pruning without retraining", "", *_header(result)]
    run_h, run_sep = _run_head(result)
    if "minilm" in result:
        m = result["minilm"]
        lines += [
            f"### MiniLM (all-MiniLM-L6-v2) on SST-2: dense dev accuracy {m['dense_accuracy']:.2%}",
            "",
            f"Fine-tuned 1 epoch on {m['n_train']} SST-2 sentences; pruned to a FLOPs target with "
            f"{m['calibration_samples']} calibration sentences; no retraining. Dev set: 872 sentences.",
            "",
            "| FLOPs cut | criterion | scope | LS reconstruction | achieved FLOPs ratio | dev accuracy "
            "| kept heads per layer | prune time |" + run_h,
            "|---|---|---|---|---|---|---|---|" + run_sep,
        ]
        for r in m["rows"]:
            lines.append(
                f"| {r['cut']}x | {r['criterion']} | {r['scope']} | {'yes' if r.get('reconstruct') else 'no'} "
                f"| {r['flops_ratio']:.2f}x | {r['accuracy']:.2%} | {r['kept_heads']} | {r['prune_time_s']:.1f} s |"
                + _run_col(result, r)
            )
        lines.append("")
    if "llm" in result:
        m = result["llm"]
        lines += [
            f"### SmolLM2-135M on WikiText-2: dense perplexity {m['dense_perplexity']:.2f}",
            "",
            f"Test perplexity over the first {m['eval_tokens']} tokens in {m['window']}-token windows; "
            f"calibration: {m['calibration']}.",
            "",
            "| criterion | scope | pattern | OBS reconstruction | sparsity | perplexity | prune time |" + run_h,
            "|---|---|---|---|---|---|---|" + run_sep,
        ]
        for r in m["rows"]:
            lines.append(
                f"| {r['criterion']} | {r['scope']} | {r['pattern']} | {'yes' if r.get('reconstruct') else 'no'} "
                f"| {r['sparsity']:.1%} | {r['perplexity']:.2f} | {r['prune_time_s']:.0f} s |" + _run_col(result, r)
            )
        lines.append("")
    return lines


def render_trainer_overhead(result: dict[str, Any]) -> list[str]:
    lines = [
        "## Trainer overhead: PruningTrainer with masks active vs stock Trainer",
        "",
        *_header(result),
        "| model | batch x seq | steps timed (each) | stock ms/step | PruningTrainer ms/step | ratio "
        "| per-round ratios |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        rounds = _span(sorted(r["round_ratios"])) if r.get("round_ratios") else "not recorded"
        lines.append(
            f"| {r['model']} | {r['batch']} x {r['seq_len']} | {r['steps_timed']} | {r['stock_step_ms']:.1f} "
            f"| {r['pruning_step_ms']:.1f} | {r['ratio']:.2f} | {rounds} |"
        )
    return [
        *lines,
        "",
        "50% unstructured masks re-applied after every optimizer step. The ratio is the median PruningTrainer step "
        "over the median stock step, all rounds pooled (rounds interleaved); per-round ratios show the run-to-run "
        "spread, which is why the ratio is given to two digits only.",
        "",
    ]


def render_recovery(result: dict[str, Any]) -> list[str]:
    rows = {r["variant"]: r for r in result["rows"]}
    dense = rows.get("dense", {}).get("accuracy")
    header = _header(result)
    lines = [
        "## Prune and recover: MiniLM on SST-2 with PruningTrainer",
        "",
        *header,
        f"All runs start from MiniLM fine-tuned 1 epoch on {result['n_train']} SST-2 sentences "
        f"(dev {result['start_accuracy']:.2%}) and train 1 more epoch on them (batch 32, lr 5e-5); `dense` is the "
        "same-budget reference. The teacher of the `-distill` rows is that dense model (same seed): it took one more "
        "epoch of training to make, which the pruned rows' budget does not count. Where several recovery seeds were "
        "run, accuracy is their mean ± sample standard deviation, and `vs dense` compares means; the seeds column "
        "names the run that measured each seed.",
        "",
        "| variant | method | dev accuracy | seeds | vs dense | encoder FLOPs ratio | params | sparsity "
        "| recovery wall time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        delta = f"{(r['accuracy'] - dense) * 100:+.1f} pt" if dense is not None else "n/a"
        seeds = [f"{seed} ({run.get('run', '?')})" for seed, run in r.get("runs", {}).items()]
        acc = f"{r['accuracy']:.2%}" + (f" ± {r['accuracy_std'] * 100:.2f}" if len(seeds) > 1 else "")
        flops = sorted({round(run["flops_ratio"], 2) for run in r.get("runs", {}).values() if "flops_ratio" in run})
        flops_text = _span(flops, "x") if len(flops) > 1 else f"{r['flops_ratio']:.2f}x"
        lines.append(
            f"| {r['variant']} | {r.get('description', '')} | {acc} | {', '.join(seeds)} | {delta} "
            f"| {flops_text} | {r['params'] / 1e6:.1f}M | {r['sparsity']:.0%} "
            f"| {r['recovery_wall_s']:.0f} s |"
        )
    lines.append("")
    return lines


def render_curves(result: dict[str, Any]) -> list[str]:
    lines = ["## Accuracy and perplexity vs FLOPs cut and sparsity", "", *_header(result)]
    for task, r in result.get("tasks", {}).items():
        recovered = r.get("recovered", False)
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
            "| kind | target | FLOPs ratio | sparsity | one-shot accuracy | one-shot + reconstruction |"
            + (" after 1 epoch recovery |" if recovered else ""),
            "|---|---|---|---|---|---|" + ("---|" if recovered else ""),
        ]
        for p in r["points"]:
            target = f"{p['value']:.1f}x FLOPs cut" if p["kind"] == "structured" else f"{p['value']:.0%} sparsity"
            rec = p.get("oneshot_reconstructed_accuracy")
            row = (
                f"| {p['kind']} | {target} | {p['flops_ratio']:.2f}x | {p['sparsity']:.0%} | "
                f"{p['oneshot_accuracy']:.2%} | {'' if rec is None else f'{rec:.2%}'} |"
            )
            if recovered:
                row += f" {p['recovered_accuracy']:.2%} |"
            lines.append(row)
        lines += ["", f"![{task}](curves_{task}.png)", ""]
    if "llm" in result:
        r = result["llm"]
        lines += [
            f"### SmolLM2-135M on WikiText-2 (dense perplexity {r['dense_perplexity']:.2f}, {r['eval_tokens']} tokens)",
            "",
            f"Run: {r.get('run', '?')}.",
            "",
            "| criterion | scope | pattern | sparsity | perplexity |",
            "|---|---|---|---|---|",
        ]
        for p in r["points"]:
            lines.append(
                f"| {p['criterion']} | {p['scope']} | {p['pattern']} | {p['sparsity']:.0%} | {p['perplexity']:.2f} |"
            )
        lines += ["", "![smollm2](curves_smollm2.png)", ""]
    return lines


def decoder_unstructured(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The decoder benchmark's 50% sparse entries (one magnitude dict before it had several)."""
    found = result.get("unstructured") or []
    return [{"criterion": "magnitude", **u} for u in ([found] if isinstance(found, dict) else found)]


def render_decoder(result: dict[str, Any]) -> list[str]:
    s = result["settings"]
    run_head, run_rule = _run_head(result)
    lines = [
        "## Decoder LM: SmolLM2-135M width, depth and width+depth pruning with recovery",
        "",
        *_header(result),
        f"WikiText-2 test perplexity over {result['eval_tokens']} tokens (512-token windows); dense "
        f"{result['dense_perplexity']:.2f}. Cuts are of the transformer blocks' FLOPs at {s['seq_len']} tokens; "
        f"{s['calibration_blocks']} calibration blocks of {s['seq_len']} WikiText-2 train tokens. `refit` adds "
        "hf_prune's least-squares refit of the shrunk output projections (block by block). Recovery, the same for "
        f"every row: {s['recovery_steps']} steps x {s['recovery_batch']} packed train blocks "
        f"({s['recovery_tokens']:,} tokens), AdamW lr {s['learning_rate']:g} with linear decay, loss "
        f"{1 - s['distill_alpha']:g} x cross-entropy + {s['distill_alpha']:g} x token-level KL to the dense model; "
        "it starts from the refit model where there is one. Baselines (see `benchmarks/decoder.py`): Torch-Pruning "
        "MetaPruner with L2 magnitude and the same FFN-channel fraction in every layer; ShortGPT's Block Influence, "
        "lowest blocks dropped."
        + (
            " The `1x dense` row is the dense model given the same recovery: the recovery trains on WikiText-2 "
            "train, which the dense model never saw, so recovered perplexities are read against it rather than "
            "against the dense model's own."
            if any(r["method"] == "dense" for r in result["rows"])
            else ""
        ),
        "",
        # the run column names each row's machine (runs table above): prune and recovery times are per machine
        "| cut | method | blocks | FLOPs kept | params | one-shot ppl | refit ppl | recovered ppl | prune time "
        "| recovery time |" + run_head,
        "|---|---|---|---|---|---|---|---|---|---|" + run_rule,
    ]
    for r in result["rows"]:
        last = r.get("refit", r["oneshot"])
        refit = f"{r['refit']['perplexity']:.2f}" if "refit" in r else "n/a"
        recovered = f"{r['recovered']['perplexity']:.2f}" if "recovered" in r else ""
        seconds = r["oneshot"]["seconds"] + (r["refit"]["seconds"] if "refit" in r else 0)
        lines.append(
            f"| {r['cut']:g}x | {r['method']} | {last['blocks']} | {last['flops_keep']:.3f} | "
            f"{last['params'] / 1e6:.1f}M | {r['oneshot']['perplexity']:.2f} | {refit} | {recovered} | "
            f"{'' if r['method'] == 'dense' else format(seconds, '.0f') + ' s'} "
            f"| {'' if 'recovery_seconds' not in r else format(r['recovery_seconds'], '.0f') + ' s'} |"
            + _run_col(result, r)
        )
    described = {
        "magnitude": "magnitude, per matrix",
        "obs": "activation-aware per output row with the OBS weight update",
    }
    for u in decoder_unstructured(result):
        rec = ""
        if "recovered" in u:
            rec = (
                f", {u['recovered']['perplexity']:.2f} after the same recovery (masks kept: "
                f"{u['recovered_sparsity']:.1%} of the block weights zero, {u['recovery_seconds']:.0f} s)"
            )
        lines += [
            "",
            f"50% unstructured ({described.get(u['criterion'], u['criterion'])}): "
            f"{u['oneshot']['perplexity']:.2f} one-shot{rec}.",
        ]
    lines += ["", f"Peak resident memory of the run: {result['peak_rss_mb']} MB.", ""]
    return lines


def render_memory(result: dict[str, Any]) -> list[str]:
    s = result["settings"]
    gib = 1024**3
    shape = s["shape"]
    lines = [
        "## Peak memory of one-shot pruning, projected to a 7B Llama",
        "",
        *_header(result),
        f"A random Llama with hidden {shape['hidden_size']}, FFN {shape['intermediate_size']}, "
        f"{shape['num_attention_heads']} heads ({s['dtype']}, on {s['device']}), built with "
        f"{' and '.join(str(m['blocks']) for m in result['rows'][0]['measured'])} blocks; "
        f"{s['calibration']} calibration sequences of {s['seq_len']} tokens, batch {s['batch_size']}. Peak memory "
        "above the weights is fitted as fixed + per-block through the two depths and projected to 32 blocks, where "
        f"the weights take {result['weights_bytes_32_blocks'] / gib:.1f} GiB.",
        "",
        "| pass | measured peak above weights | fixed | per block | projected peak above weights, 32 blocks "
        "| projected total, 32 blocks |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        measured = ", ".join(
            f"{m['peak_above_weights_bytes'] / gib:.2f} GiB ({m['blocks']} blocks)" for m in r["measured"]
        )
        projected = r["projected_peak_above_weights_bytes_32_blocks"]
        lines.append(
            f"| {r['pass']} | {measured} | {r['fixed_bytes'] / gib:.2f} GiB | {r['per_block_bytes'] / gib:.3f} GiB "
            f"| {projected / gib:.1f} GiB | {(projected + result['weights_bytes_32_blocks']) / gib:.1f} GiB |"
        )
    lines.append("")
    return lines


def render_peers(result: dict[str, Any]) -> list[str]:
    # imported lazily: peers.py imports this module (circular at import time otherwise)
    import sys

    sys.path.insert(0, str(HERE))
    from peers import render_peers as render

    return render(result)


def render_deploy(result: dict[str, Any]) -> list[str]:
    import sys

    sys.path.insert(0, str(HERE))
    from deploy import render_deploy as render

    return render(result)


def render_latency_targets(result: dict[str, Any]) -> list[str]:
    runs = result.get("runs", {})
    lines = [
        "## target_latency: met on this machine, and at what cost",
        "",
        *_header(result),
        "Each row prunes a fresh copy of the model with `target_latency` (fisher, global, least-squares refit, "
        "512 calibration sentences, latency table at the row's batch x sequence) and re-times it against the dense "
        "model, interleaved in the same process; `met` = within 5% of the target. `prune s` is the whole `prune()` "
        "call; `table: cold` starts with no cached latency table (what a first run pays), `cached` reads the table a "
        "cold run left in the disk cache (every later run on that machine).",
        "",
        "| machine | device | model | batch x seq | target | keep (search) | keep (re-timed) | met | FLOPs cut "
        "| searches | table | prune s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result.get("rows", []):
        kind = machine_kind(runs[row["run"]]["machine"], row["device"])
        if row.get("refused"):
            reachable = re.search(r"target_latency >= [0-9.]+", row["refused"])
            lines.append(
                f"| {kind} | {row['device']} | {row['model']} | {row['batch']} x {row['seq_len']} | {row['target']:g} "
                f"| refused before pruning: out of reach{f' ({reachable.group(0)})' if reachable else ''} "
                f"| | | | | {row['table_cache']} | {row['prune_s']:.0f} |"
            )
            continue
        lines.append(
            f"| {kind} | {row['device']} | {row['model']} | {row['batch']} x {row['seq_len']} | {row['target']:g} "
            f"| {row['search_keep']:.3f} | {row['keep']:.3f} | {'yes' if row['met'] else '**no**'} "
            f"| {row['flops_ratio']:.2f}x | {row['searches']} | {row['table_cache']} | {row['prune_s']:.0f} |"
        )
    return [*lines, ""]


RENDERERS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "latency": render_latency,
    "oneshot": render_oneshot,
    "trainer_overhead": render_trainer_overhead,
    "recovery": render_recovery,
    "curves": render_curves,
    "peers": render_peers,
    "decoder": render_decoder,
    "memory": render_memory,
    "deploy": render_deploy,
    "latency_targets": render_latency_targets,
}


README = HERE.parent / "README.md"
HEADLINE_START = "<!-- hf_prune:headline:start (generated by benchmarks/results.py from benchmarks/results/*.json) -->"
HEADLINE_END = "<!-- hf_prune:headline:end -->"


def _span(values: list[float], unit: str = "") -> str:
    lo, hi = f"{values[0]:.2f}", f"{values[-1]:.2f}"
    return f"{lo}{unit}" if lo == hi else f"{lo}-{hi}{unit}"


def _peer_label(row: dict[str, Any]) -> str:
    """A short name for an hf_prune peers row, from its recorded config."""
    c = row.get("config") or {}
    target = next((f"{k}={c[k]}" for k in ("target_latency", "target_flops", "target_params") if c.get(k)), None)
    parts = [f"{c.get('criterion', '?')}/{c.get('scope', '?')}", target or f"{c.get('heads')}/{c.get('ffn')}"]
    return " ".join(parts) + (" + LS" if c.get("reconstruct") else "")


def _cmd(result: dict[str, Any], rows: list[dict[str, Any]] | None = None) -> str:
    """The commands (with the commit each ran on) of the runs that measured ``rows`` (default: every row)."""
    names = dict.fromkeys(r.get("run") for r in (rows if rows is not None else [x for _, x in iter_rows(result)]))
    runs = result.get("runs", {})
    texts = []
    for name in names:
        run = runs.get(name)
        if run is None:
            continue
        commit = run.get("commit")
        texts.append(f"`{run['command'].strip()}`" + (f" at {commit[:12]}" if commit else " (commit not recorded)"))
    return ", ".join(dict.fromkeys(texts)) or "not recorded"


def _seeds(row: dict[str, Any]) -> str:
    """The seed count of a recovery row as the headline prints it ("1 seed", "3 seeds"); a row without per-seed
    runs is one seed."""
    n = len(row.get("runs", {"0": 0}))
    return f"{n} seed{'s' if n > 1 else ''}"


def headline(results: dict[str, dict[str, Any]]) -> list[str]:
    """The README's headline table: one line per benchmark, each with the command that produced it."""
    lines = ["| benchmark | result | command |", "|---|---|---|"]
    if "latency" in results:
        r = results["latency"]
        what = {"width": "50% heads + 50% FFN", "width+depth": "1/4 of blocks + 1/3 heads and FFN"}
        for kind, measured in machine_groups(r):
            for model, plan in dict.fromkeys((row["model"], row.get("plan", "width")) for row in measured):
                rows = [row for row in measured if row["model"] == model and row.get("plan", "width") == plan]
                speed = sorted(row["speedup"] for row in rows)
                ratio = sorted(row["speedup_over_flops_ratio"] for row in rows)
                flops = sorted(row["flops_ratio"] for row in rows)
                grid = "batch " + "/".join(str(b) for b in dict.fromkeys(row["batch"] for row in rows))
                grid += " x seq " + "/".join(str(q) for q in dict.fromkeys(row["seq_len"] for row in rows))
                lines.append(
                    f"| CPU latency ({kind}), {model} {what.get(plan, plan)} ({grid}) "
                    f"| {_span(speed, 'x')} faster for {_span(flops, 'x')} fewer FLOPs "
                    f"(speedup/FLOPs {_span(ratio)}) | {_cmd(r, rows)} |"
                )
    if "oneshot" in results and "minilm" in results["oneshot"]:
        m = results["oneshot"]["minilm"]
        best = {(x["cut"], x["criterion"], x["scope"], x.get("reconstruct", False)): x["accuracy"] for x in m["rows"]}
        fisher, magnitude = best.get((2, "fisher", "global", False)), best.get((2, "magnitude", "layer", False))
        refit = best.get((2, "fisher", "global", True))
        if fisher is not None and magnitude is not None:
            extra = f"{refit:.1%} with least-squares reconstruction, " if refit is not None else ""
            lines.append(
                f"| MiniLM SST-2, 2x FLOPs cut one-shot (no retraining) | Fisher/global {extra}{fisher:.1%} without; "
                f"magnitude {magnitude:.1%} (dense {m['dense_accuracy']:.1%}) | {_cmd(results['oneshot'], m['rows'])} |"
            )
    if "oneshot" in results and "llm" in results["oneshot"]:
        m = results["oneshot"]["llm"]
        by = {
            (x["criterion"], x["scope"], x["pattern"], x.get("reconstruct", False)): x["perplexity"] for x in m["rows"]
        }
        act = by.get(("activation", "row", "unstructured", False))
        mag = by.get(("magnitude", "layer", "unstructured", False))
        rec = by.get(("activation", "row", "unstructured", True))
        if act is not None and mag is not None:
            extra = f"{rec:.1f} with OBS reconstruction, " if rec is not None else ""
            lines.append(
                f"| SmolLM2-135M WikiText-2, 50% unstructured one-shot | perplexity {extra}{act:.1f} activation-aware "
                f"(Wanda), {mag:.1f} magnitude (dense {m['dense_perplexity']:.1f}) "
                f"| {_cmd(results['oneshot'], m['rows'])} |"
            )
    if "decoder" in results:
        r = results["decoder"]
        reference = next((x for x in r["rows"] if x["method"] == "dense" and "recovered" in x), None)
        for cut in dict.fromkeys(x["cut"] for x in r["rows"] if "recovered" in x):
            rows = [x for x in r["rows"] if x["cut"] == cut and "recovered" in x]
            ours = [x for x in rows if x["method"] in ("width", "depth", "width+depth")]
            if not ours:
                continue
            best = min(ours, key=lambda x: x["recovered"]["perplexity"])
            start = f"{best['oneshot']['perplexity']:.1f}"
            if "refit" in best:
                start += f", with refit {best['refit']['perplexity']:.1f}"
            others = "; ".join(
                f"{x['method']} {x['recovered']['perplexity']:.1f}"
                for x in rows
                if x["method"] not in ("width", "depth", "width+depth")
            )
            lines.append(
                f"| SmolLM2-135M WikiText-2, {cut:g}x block-FLOPs cut + recovery "
                f"({r['settings']['recovery_tokens']:,} tokens, best of {len(ours)} hf_prune methods) "
                f"| perplexity {best['method']} {best['recovered']['perplexity']:.1f} (one-shot {start}); "
                f"same budget: {others} (dense {r['dense_perplexity']:.1f}"
                + (
                    f"; dense with the same recovery {reference['recovered']['perplexity']:.1f}"
                    if reference is not None
                    else ""
                )
                + f") | {_cmd(r, rows if reference is None else [*rows, reference])} |"
            )
    if "memory" in results:
        r = results["memory"]
        weights = r["weights_bytes_32_blocks"]
        parts = ", ".join(
            f"{x['pass']} {(x['projected_peak_above_weights_bytes_32_blocks'] + weights) / 1024**3:.1f} GiB"
            for x in r["rows"]
        )
        s = r["settings"]
        lines.append(
            f"| Peak memory per pass, Llama-2-7B shape ({s['dtype']}, {s['calibration']} x {s['seq_len']} calibration "
            f"tokens), projected from 2 and 4 blocks on {s['device']} | {parts} | {_cmd(r)} |"
        )
    if "recovery" in results:
        r = results["recovery"]
        rows = {x["variant"]: x for x in r["rows"]}
        dense = rows.get("dense")
        for cut in ("2x", "3x"):
            candidates = [x for name, x in rows.items() if name == cut or name.startswith(f"{cut}-")]
            if dense is None or not candidates:
                continue
            # the best variant by mean accuracy, named, next to the plain one; every variant is in RESULTS.md
            best = max(candidates, key=lambda x: x["accuracy"])
            shown = [best] + ([rows[cut]] if cut in rows and rows[cut] is not best else [])
            text = "; ".join(
                f"{x['variant']} {x['accuracy']:.2%} ({(x['accuracy'] - dense['accuracy']) * 100:+.2f} pt, {_seeds(x)})"
                for x in shown
            )
            lines.append(
                f"| MiniLM SST-2, {cut} FLOPs cut + 1 epoch recovery (best of {len(candidates)} variants first) "
                f"| {text} vs dense {dense['accuracy']:.2%} with the same budget "
                f"| {_cmd(r, [s for x in (dense, *shown) for s in x.get('runs', {}).values()])} |"
            )
    if "peers" in results:
        r = results["peers"]
        rows = r["rows"]
        ours = [x for x in rows if x.get("tool") == "hf_prune" and "accuracy" in x]
        others = [x for x in rows if x.get("tool") not in ("hf_prune", "dense")]
        parts = []
        for x in others:
            if x.get("error"):
                failed = f"{x['tool']} failed ({x['error'].split(':')[0]})"
                if failed not in parts:  # one line per tool and error, however many of its rows failed
                    parts.append(failed)
            elif x.get("flops_ratio", 1.0) > 1.5:
                parts.append(f"{x['tool']} {x['accuracy']:.1%} ({x['speedup']:.2f}x)")
        if ours:
            best = max(ours, key=lambda x: x["accuracy"])
            text = f"hf_prune {_peer_label(best)} {best['accuracy']:.1%} ({best['speedup']:.2f}x)"
            # the most accurate hf_prune model that is at least as fast as the fastest structured peer
            peer_speed = max((x["speedup"] for x in others if x.get("flops_ratio", 1.0) > 1.5), default=None)
            fast = [x for x in ours if peer_speed is not None and x["speedup"] >= peer_speed]
            m = max(fast, key=lambda x: x["accuracy"], default=None)
            if m is not None and m is not best:
                text += (
                    f"; at peer speed or faster: {_peer_label(m)} {m['accuracy']:.1%} ({m['speedup']:.2f}x, "
                    f"{m['flops_ratio']:.2f}x fewer FLOPs)"
                )
            lines.append(
                f"| Peers at a 2x FLOPs cut, MiniLM SST-2 one-shot | {text}; " + "; ".join(parts) + f" | {_cmd(r)} |"
            )
    if "latency_targets" in results:
        r = results["latency_targets"]
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for kind, measured in machine_groups(r):
            for row in measured:
                if not row.get("refused"):
                    groups.setdefault((kind, row["model"], row["batch"], row["seq_len"]), []).append(row)
        for (kind, model, batch, seq_len), rows in groups.items():
            keeps = ", ".join(
                f"{x['target']:g} -> {x['keep']:.3f}" + (" (cached table)" if x["table_cache"] == "cached" else "")
                for x in rows
            )
            met = sum(bool(x["met"]) for x in rows)
            lines.append(
                f"| `target_latency` re-timed against dense ({kind}, {model}, {batch} x {seq_len}) | {keeps}; "
                f"{met} of {len(rows)} within 5%; `prune()` {min(x['prune_s'] for x in rows):.0f}-"
                f"{max(x['prune_s'] for x in rows):.0f} s "
                f"| {_cmd(r, rows)} |"
            )
    if "trainer_overhead" in results:
        r = results["trainer_overhead"]
        for row in r["rows"]:
            rounds = _span(sorted(row["round_ratios"])) if row.get("round_ratios") else "not recorded"
            lines.append(
                f"| PruningTrainer step time with 50% masks vs stock Trainer ({row['model'].split(' ')[0]}, "
                f"{row['batch']} x {row['seq_len']}) | {row['ratio']:.2f}x (rounds {rounds})"
                f" | {_cmd(r, [row])} |"
            )
    if "deploy" in results:
        r = results["deploy"]
        rows = r["rows"]
        pick = {(x["model"], x["variant"], x["format"]): x for x in rows}
        for model in dict.fromkeys(x["model"] for x in rows):
            onnx = pick.get((model, "2x", "ONNX Runtime int8"))
            pruned = pick.get((model, "2x", "PyTorch float32"))
            sparse = pick.get((model, "sparse-90", "PyTorch float32 (sparse file)"))
            parts = []
            if onnx is not None:
                acc = (
                    f", dev accuracy {onnx['accuracy']:.2%} (pruned PyTorch {pruned['accuracy']:.2%})"
                    if onnx.get("accuracy") is not None and pruned is not None
                    else ""
                )
                parts.append(
                    f"2x cut + ONNX Runtime int8: {onnx['speedup_b1x64']:.2f}x faster than dense PyTorch at batch "
                    f"1 x 64 ({onnx['speedup_b32x64']:.2f}x at 32 x 64), {onnx['size_vs_dense']:.2f} of the file{acc}"
                )
            if sparse is not None:
                parts.append(f"90% sparse saved with `sparse=True`: {sparse['size_vs_dense']:.2f} of the file")
            if parts:
                lines.append(f"| Deploy, {model} (CPU) | {'; '.join(parts)} | {_cmd(r)} |")
    if "curves" in results and results["curves"].get("plots"):
        r = results["curves"]
        lines.append("")
        for name in r["plots"]:
            lines.append(f"![{name}](benchmarks/{name})")
        lines.append(f"*Plots: {_cmd(r)} (tables in benchmarks/RESULTS.md)*")
    return lines


def readme_with_headline(text: str, results: dict[str, dict[str, Any]]) -> str:
    """``text`` (the README) with its generated block replaced by the current headline table."""
    if HEADLINE_START not in text or HEADLINE_END not in text:
        return text
    before, rest = text.split(HEADLINE_START, 1)
    _, after = rest.split(HEADLINE_END, 1)
    return before + "\n".join([HEADLINE_START, *headline(results), HEADLINE_END]) + after


def update_readme(results: dict[str, dict[str, Any]], readme: Path = README) -> str | None:
    """Replace the generated block of the README with the current headline table."""
    if not readme.exists():
        return None
    new = readme_with_headline(readme.read_text(), results)
    readme.write_text(new)
    return new


def load_results(results_dir: Path = RESULTS_DIR) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(results_dir.glob("*.json")):
        result = json.loads(path.read_text())
        out[result.get("benchmark", path.stem)] = result
    return out


def render_markdown(results_dir: Path = RESULTS_DIR) -> str:
    """RESULTS.md's text for every JSON result in ``results_dir``."""
    lines = [
        "# Benchmark results",
        "",
        "Generated by `benchmarks/results.py` from the JSON files in `benchmarks/results/`; do not edit by hand. "
        "Each section lists the runs that measured its rows (command, git commit, date, machine, versions, data "
        "checksums); `python benchmarks/results.py --check` says which rows predate a change to the code they "
        "depend on.",
        "",
    ]
    for path in sorted(results_dir.glob("*.json")):
        result = json.loads(path.read_text())
        renderer = RENDERERS.get(result.get("benchmark", ""))
        if renderer is None:
            continue
        lines += renderer(result)
        lines.append(f"Source: [`results/{path.name}`](results/{path.name})")
        lines.append("")
    return "\n".join(lines)


def render_results(results_dir: Path = RESULTS_DIR, out: Path = RESULTS_MD) -> str:
    """Regenerate RESULTS.md (and, for the committed results, the README's headline) from the JSON results."""
    text = render_markdown(results_dir)
    out.write_text(text)
    if out == RESULTS_MD:
        update_readme(load_results(results_dir))
    return text


# The code a benchmark's numbers depend on: a row measured on a commit older than the last change to any of these is
# stale. Rendering (this file) and documentation are not in it.
def depends_on(benchmark: str) -> list[str]:
    """Repository paths whose changes can change ``benchmark``'s numbers."""
    return ["hf_prune", "pyproject.toml", "data", "benchmarks/common.py", f"benchmarks/{benchmark}.py"]


# A figure typed by hand into README.md outside the generated block: a decimal with a unit, a "~N ms", "about N s".
_HAND_FIGURE = re.compile(r"\b\d+\.\d+(?:-\d+\.\d+)?\s?(?:x|ms|s|%|pt)\b|~\s?\d+\s?(?:ms|s|%)|about \d+\s?(?:ms|s)\b")


def hand_typed_figures(readme_text: str) -> list[str]:
    """README lines outside the generated headline block (and outside code blocks) that quote a measured figure."""
    if HEADLINE_START in readme_text and HEADLINE_END in readme_text:
        before, rest = readme_text.split(HEADLINE_START, 1)
        readme_text = before + rest.split(HEADLINE_END, 1)[1]
    found, in_code = [], False
    for line in readme_text.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        if not in_code and _HAND_FIGURE.search(line):
            found.append(line.strip())
    return found


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True, timeout=30)


# Commits that touch what a benchmark depends on without being able to change a number it measures (e.g. how the
# command line is recorded). Listed by hand, one per line with its reason, like git's .git-blame-ignore-revs: without
# this, a one-line reporting fix in common.py would mark hours of measurements stale. Every entry is printed by
# ``--check`` so a reader can audit it; a commit that changes pruning, training or timing code never belongs here.
NEUTRAL_FILE = HERE / "neutral_commits.txt"


def neutral_commits(path: Path | None = None) -> dict[str, str]:
    """``{full sha: reason}`` from ``benchmarks/neutral_commits.txt`` (``<sha> <reason>`` lines, ``#`` comments)."""
    path = NEUTRAL_FILE if path is None else path
    out: dict[str, str] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        sha, _, reason = line.partition(" ")
        full = _git("rev-parse", "--verify", "--quiet", f"{sha}^{{commit}}").stdout.strip()
        if not full:
            if _git("rev-parse", "--is-shallow-repository").stdout.strip() == "true":
                continue  # outside a shallow clone's history: no run it could excuse is visible either
            raise ValueError(f"{path.name}: {sha!r} is not a commit of this repository")
        if not reason.strip():
            raise ValueError(f"{path.name}: {sha} has no reason")
        out[full] = reason.strip()
    return out


def later_changes(commit: str, benchmark: str, until: str = "HEAD") -> list[str] | None:
    """Commits after ``commit`` up to ``until`` (``commit`` must be its ancestor) that changed what ``benchmark``
    depends on, less the neutral ones; None where ``commit`` is not an ancestor (then only a diff can tell)."""
    if _git("merge-base", "--is-ancestor", commit, until).returncode != 0:
        return None
    changed = _git("log", "--format=%H", f"{commit}..{until}", "--", *depends_on(benchmark)).stdout.split()
    neutral = neutral_commits()
    return [c for c in changed if c not in neutral]


def stale_runs(result: dict[str, Any]) -> list[str]:
    """One line per run whose rows may not describe today's code: measured before the last change to what the
    benchmark depends on, on a dirty tree, or with no commit recorded. Empty where git cannot tell (no history)."""
    if _git("rev-parse", "HEAD").returncode != 0:
        return []
    kind = result.get("benchmark", "?")
    rows_of: dict[str, list[str]] = {}
    for label, row in iter_rows(result):
        rows_of.setdefault(row.get("run", "?"), []).append(label)
    out = []
    for run_id, labels in rows_of.items():
        run = result.get("runs", {}).get(run_id, {})
        commit = run.get("commit") or run.get("committed_in")
        why = []
        if not run.get("commit"):
            why.append("no commit recorded")
        if run.get("dirty"):
            why.append("measured on a dirty tree")
        if commit:
            changed = later_changes(commit, kind)
            if changed is None:
                if _git("diff", "--quiet", commit, "HEAD", "--", *depends_on(kind)).returncode != 0:
                    why.append(f"measured on {commit[:12]}, not an ancestor of HEAD, whose {kind} code differs")
            elif changed:
                deps = ", ".join(depends_on(kind))
                why.append(f"{len(changed)} later change(s) to {deps} (last {changed[0][:12]})")
        if why:
            out.append(f"{kind} run {run_id} ({len(labels)} rows: {', '.join(labels)}): {'; '.join(why)}")
    return out


def same_code(run: dict[str, Any], commit: str | None, benchmark: str) -> bool:
    """Whether ``run`` measured the code ``commit`` has, as far as ``benchmark`` depends on it (so their rows may be
    pooled, e.g. as seeds of one mean): both commits known and clean, no difference in :func:`depends_on`."""
    if not commit or not run.get("commit") or run.get("dirty"):
        return False
    if run["commit"] == commit:
        return True
    if _git("diff", "--quiet", run["commit"], commit, "--", *depends_on(benchmark)).returncode == 0:
        return True
    # differing only by neutral commits (reporting fixes) is the same code
    return later_changes(run["commit"], benchmark, until=commit) == []


def check(
    results_dir: Path = RESULTS_DIR, results_md: Path = RESULTS_MD, readme: Path = README
) -> tuple[list[str], list[str]]:
    """``(errors, stale)``: errors are disagreements (RESULTS.md or the README headline not what the JSON renders to,
    a row naming no run, a hand-typed figure in the README); stale lists rows to re-measure (:func:`stale_runs`)."""
    errors: list[str] = []
    stale: list[str] = []
    try:
        neutral_commits()
    except ValueError as exc:
        errors.append(str(exc))
    results = load_results(results_dir)
    for name, result in results.items():
        runs = result.get("runs", {})
        for label, row in iter_rows(result):
            if row.get("run") not in runs:
                errors.append(f"{name}: row {label!r} names no run ({row.get('run')!r})")
        stale += stale_runs(result)
    expected = render_markdown(results_dir)
    if not results_md.exists() or results_md.read_text() != expected:
        errors.append(f"{results_md.name} differs from what the JSON renders to: run python benchmarks/results.py")
    if readme.exists():
        text = readme.read_text()
        if readme_with_headline(text, results) != text:
            errors.append(f"{readme.name}'s headline table differs from the JSON: run python benchmarks/results.py")
        errors += [f"{readme.name} quotes a figure no JSON backs: {line}" for line in hand_typed_figures(text)]
    return errors, stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if RESULTS.md or README.md disagree with the JSON; list rows measured on older code",
    )
    parser.add_argument("--strict", action="store_true", help="with --check: stale rows fail too")
    args = parser.parse_args(argv)
    if not args.check:
        print(render_results())
        return 0
    errors, stale = check()
    try:
        neutral = neutral_commits()
    except ValueError:  # already among the errors check() reports
        neutral = {}
    for sha, reason in neutral.items():
        print(f"neutral (not counted as a change): {sha[:12]} {reason}")
    for line in stale:
        print(f"stale: {line}")
    for line in errors:
        print(f"error: {line}")
    failed = bool(errors) or (args.strict and bool(stale))
    print(f"results check: {len(errors)} error(s), {len(stale)} stale run(s){' (strict)' if args.strict else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
