"""Benchmark results: JSON files in ``benchmarks/results/`` are the source of truth; ``RESULTS.md`` is rendered
from them (never edited by hand), so every figure in it can be traced to the command that produced it."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
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


def _header(result: dict[str, Any], run: bool = True) -> list[str]:
    """Machine and versions; with ``run`` also the command and wall time (parts may carry their own instead)."""
    m, v = result["machine"], result["versions"]
    cpu = f"{m['cpu_model']}, " if m.get("cpu_model") else ""
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    lines = [
        f"Machine: {cpu}{m['cpu_cores']} CPU cores ({m.get('torch_threads', '?')} torch threads){gpu}, "
        f"{m['platform']}  ",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + "  ",
    ]
    if run:
        lines = [f"Command: `{result['command'].strip()}`  ", *lines, f"Wall time: {result['wall_time_s']:.0f} s"]
    return [*lines, ""]


def render_latency(result: dict[str, Any]) -> list[str]:
    lines = [
        "## Latency: dense vs 50% heads + 50% FFN (structured, every layer)",
        "",
        *_header(result),
        "| model | batch | seq | params dense | params pruned | dense ms | pruned ms | speedup | FLOPs ratio "
        "| speedup / FLOPs ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['seq_len']} | {r['params_dense'] / 1e6:.1f}M "
            f"| {r['params_pruned'] / 1e6:.1f}M | {r['dense_ms']:.1f} | {r['pruned_ms']:.1f} "
            f"| {r['speedup']:.2f}x | {r['flops_ratio']:.2f}x | {r['speedup_over_flops_ratio']:.2f} |"
        )
    lines += [
        "",
        "Latency is the median of interleaved dense/pruned rounds in one process; FLOPs ratio counts the "
        "transformer blocks (projections, attention, FFN).",
        "",
    ]
    if result.get("sizes"):
        lines += [
            "On-disk size (safetensors, float32). Unstructured zeros are stored densely (hf_prune offers no sparse "
            "storage format), so they do not shrink the file:",
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
    lines = ["## One-shot pruning without retraining", "", *_header(result, run=False)]
    if "minilm" in result:
        m = result["minilm"]
        lines += [
            f"### MiniLM (all-MiniLM-L6-v2) on SST-2: dense dev accuracy {m['dense_accuracy']:.2%}",
            "",
            f"Fine-tuned 1 epoch on {m['n_train']} SST-2 sentences; pruned to a FLOPs target with "
            f"{m['calibration_samples']} calibration sentences; no retraining. Dev set: 872 sentences.",
            "",
            f"Command: `{m['command'].strip()}` (this part: {m['wall_time_s']:.0f} s)",
            "",
            "| FLOPs cut | criterion | scope | LS reconstruction | achieved FLOPs ratio | dev accuracy "
            "| kept heads per layer | prune time |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in m["rows"]:
            lines.append(
                f"| {r['cut']}x | {r['criterion']} | {r['scope']} | {'yes' if r.get('reconstruct') else 'no'} "
                f"| {r['flops_ratio']:.2f}x | {r['accuracy']:.2%} | {r['kept_heads']} | {r['prune_time_s']:.1f} s |"
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
            f"Command: `{m['command'].strip()}` (this part: {m['wall_time_s']:.0f} s)",
            "",
            "| criterion | scope | pattern | OBS reconstruction | sparsity | perplexity | prune time |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in m["rows"]:
            lines.append(
                f"| {r['criterion']} | {r['scope']} | {r['pattern']} | {'yes' if r.get('reconstruct') else 'no'} "
                f"| {r['sparsity']:.1%} | {r['perplexity']:.2f} | {r['prune_time_s']:.0f} s |"
            )
        lines.append("")
    return lines


def render_trainer_overhead(result: dict[str, Any]) -> list[str]:
    r = result
    return [
        "## Trainer overhead: PruningTrainer with masks active vs stock Trainer",
        "",
        *_header(result),
        "| model | batch x seq | steps timed (each) | stock ms/step | PruningTrainer ms/step | ratio |",
        "|---|---|---|---|---|---|",
        f"| {r['model']} | {r['batch']} x {r['seq_len']} | {r['steps_timed']} | {r['stock_step_ms']:.1f} "
        f"| {r['pruning_step_ms']:.1f} | {r['ratio']:.3f} |",
        "",
        "50% unstructured masks re-applied after every optimizer step; medians over interleaved rounds.",
        "",
    ]


def render_recovery(result: dict[str, Any]) -> list[str]:
    rows = {r["variant"]: r for r in result["rows"]}
    dense = rows.get("dense", {}).get("accuracy")
    commands = sorted({run["command"].strip() for r in result["rows"] for run in r.get("runs", {}).values()})
    header = _header(result)
    if len(commands) > 1:  # rows gathered seeds from several runs: name every command, not only the last
        header = [f"Commands: {', '.join(f'`{c}`' for c in commands)}  ", *header[1:]]
    lines = [
        "## Prune and recover: MiniLM on SST-2 with PruningTrainer",
        "",
        *header,
        f"All runs start from MiniLM fine-tuned 1 epoch on {result['n_train']} SST-2 sentences "
        f"(dev {result['start_accuracy']:.2%}) and train 1 more epoch on them (batch 32, lr 5e-5); `dense` is the "
        "same-budget reference. The teacher of the `-distill` rows is that dense model (same seed): it took one more "
        "epoch of training to make, which the pruned rows' budget does not count. Where several recovery seeds were "
        "run, accuracy is their mean ± sample standard deviation, and `vs dense` compares means.",
        "",
        "| variant | method | dev accuracy | seeds | vs dense | encoder FLOPs ratio | params | sparsity "
        "| recovery wall time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        delta = f"{(r['accuracy'] - dense) * 100:+.1f} pt" if dense is not None else "n/a"
        seeds = list(r.get("runs", {"0": None}))
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


def _part(part: dict[str, Any]) -> list[str]:
    if "command" not in part:
        return []
    wall = f", wall time {part['wall_time_s']:.0f} s" if "wall_time_s" in part else ""
    return [f"Command: `{part['command'].strip()}`{wall}", ""]


def render_curves(result: dict[str, Any]) -> list[str]:
    lines = ["## Accuracy and perplexity vs FLOPs cut and sparsity", "", *_header(result, run=False)]
    for task, r in result.get("tasks", {}).items():
        recovered = r.get("recovered", False)
        lines += [
            f"### MiniLM on {task.upper()} (dense dev accuracy {r['dense_accuracy']:.2%})",
            "",
            *_part(r),
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
            *_part(r),
            "| criterion | scope | pattern | sparsity | perplexity |",
            "|---|---|---|---|---|",
        ]
        for p in r["points"]:
            lines.append(
                f"| {p['criterion']} | {p['scope']} | {p['pattern']} | {p['sparsity']:.0%} | {p['perplexity']:.2f} |"
            )
        lines += ["", "![smollm2](curves_smollm2.png)", ""]
    return lines


def render_peers(result: dict[str, Any]) -> list[str]:
    # imported lazily: peers.py imports this module (circular at import time otherwise)
    import sys

    sys.path.insert(0, str(HERE))
    from peers import render_peers as render

    return render(result)


RENDERERS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "latency": render_latency,
    "oneshot": render_oneshot,
    "trainer_overhead": render_trainer_overhead,
    "recovery": render_recovery,
    "curves": render_curves,
    "peers": render_peers,
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


def headline(results: dict[str, dict[str, Any]]) -> list[str]:
    """The README's headline table: one line per benchmark, each with the command that produced it."""
    lines = ["| benchmark | result | command |", "|---|---|---|"]
    if "latency" in results:
        r = results["latency"]
        for model in dict.fromkeys(row["model"] for row in r["rows"]):
            rows = [row for row in r["rows"] if row["model"] == model]
            speed = sorted(row["speedup"] for row in rows)
            ratio = sorted(row["speedup_over_flops_ratio"] for row in rows)
            flops = sorted(row["flops_ratio"] for row in rows)
            grid = "batch " + "/".join(str(b) for b in dict.fromkeys(row["batch"] for row in rows))
            grid += " x seq " + "/".join(str(q) for q in dict.fromkeys(row["seq_len"] for row in rows))
            lines.append(
                f"| CPU latency, {model} 50% heads + 50% FFN ({grid}) "
                f"| {_span(speed, 'x')} faster for {_span(flops, 'x')} fewer FLOPs "
                f"(speedup/FLOPs {_span(ratio)}) | `{r['command'].strip()}` |"
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
                f"magnitude {magnitude:.1%} (dense {m['dense_accuracy']:.1%}) | `{m['command'].strip()}` |"
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
                f"(Wanda), {mag:.1f} magnitude (dense {m['dense_perplexity']:.1f}) | `{m['command'].strip()}` |"
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
                f"{x['variant']} {x['accuracy']:.2%} ({(x['accuracy'] - dense['accuracy']) * 100:+.2f} pt, "
                f"{len(x.get('runs', {'0': 0}))} seeds)"
                for x in shown
            )
            lines.append(
                f"| MiniLM SST-2, {cut} FLOPs cut + 1 epoch recovery (best of {len(candidates)} variants first) "
                f"| {text} vs dense {dense['accuracy']:.2%} with the same budget | `python benchmarks/recovery.py` "
                "(seeds: see RESULTS.md) |"
            )
    if "peers" in results:
        r = results["peers"]
        rows = r["rows"]
        ours = [x for x in rows if x.get("tool") == "hf_prune" and "accuracy" in x]
        others = [x for x in rows if x.get("tool") not in ("hf_prune", "dense")]
        parts = []
        for x in others:
            if x.get("error"):
                parts.append(f"{x['tool']} failed ({x['error'].split(':')[0]})")
            elif x.get("flops_ratio", 1.0) > 1.5:
                parts.append(f"{x['tool']} {x['accuracy']:.1%} ({x['speedup']:.2f}x)")
        if ours:
            best = max(ours, key=lambda x: x["accuracy"])
            text = f"hf_prune {_peer_label(best)} {best['accuracy']:.1%} ({best['speedup']:.2f}x)"
            # the most accurate hf_prune model that is at least as fast as the fastest structured peer
            peer_speed = max((x["speedup"] for x in others if x.get("flops_ratio", 1.0) > 1.5), default=None)
            fast = [x for x in ours if peer_speed is not None and x["speedup"] >= peer_speed]
            if fast:
                m = max(fast, key=lambda x: x["accuracy"])
                text += (
                    f"; at peer speed or faster: {_peer_label(m)} {m['accuracy']:.1%} ({m['speedup']:.2f}x, "
                    f"{m['flops_ratio']:.2f}x fewer FLOPs)"
                )
            lines.append(
                f"| Peers at a 2x FLOPs cut, MiniLM SST-2 one-shot | {text}; " + "; ".join(parts) + f" | "
                f"`{r['command'].strip()}` |"
            )
    if "trainer_overhead" in results:
        r = results["trainer_overhead"]
        lines.append(
            f"| PruningTrainer step time with 50% masks vs stock Trainer | {r['ratio']:.3f}x | "
            f"`{r['command'].strip()}` |"
        )
    if "curves" in results and results["curves"].get("plots"):
        r = results["curves"]
        lines.append("")
        for name in r["plots"]:
            lines.append(f"![{name}](benchmarks/{name})")
        parts = [*r.get("tasks", {}).values(), *([r["llm"]] if "llm" in r else [])]
        commands = dict.fromkeys(p.get("command", r["command"]).strip() for p in parts) or [r["command"].strip()]
        lines.append(f"*Plots: {', '.join(f'`{c}`' for c in commands)} (tables in benchmarks/RESULTS.md)*")
    return lines


def update_readme(results: dict[str, dict[str, Any]], readme: Path = README) -> str | None:
    """Replace the generated block of the README with the current headline table."""
    if not readme.exists():
        return None
    text = readme.read_text()
    if HEADLINE_START not in text or HEADLINE_END not in text:
        return text
    before, rest = text.split(HEADLINE_START, 1)
    _, after = rest.split(HEADLINE_END, 1)
    block = "\n".join([HEADLINE_START, *headline(results), HEADLINE_END])
    new = before + block + after
    readme.write_text(new)
    return new


def load_results(results_dir: Path = RESULTS_DIR) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(results_dir.glob("*.json")):
        result = json.loads(path.read_text())
        out[result.get("benchmark", path.stem)] = result
    return out


def render_results(results_dir: Path = RESULTS_DIR, out: Path = RESULTS_MD) -> str:
    """Regenerate RESULTS.md from every JSON result present."""
    lines = [
        "# Benchmark results",
        "",
        "Generated by `benchmarks/results.py` from the JSON files in `benchmarks/results/`; do not edit by hand.",
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
    text = "\n".join(lines)
    out.write_text(text)
    if out == RESULTS_MD:
        update_readme(load_results(results_dir))
    return text


if __name__ == "__main__":
    print(render_results())
