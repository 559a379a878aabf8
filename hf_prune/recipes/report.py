"""Run reports: ``pruning_report.json``, a Markdown summary, a per-layer plot and the model card.

A report may be partial: the runner writes it with the saved model, before evaluating, timing and exporting, and
again when a later step fails (``pending``: the steps that did not run, ``error``: what stopped the run). Every
section says what it lacks rather than failing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from ..utils import atomic_write, atomic_write_text


def kept_structure_svg(kept_heads: list[int], total_heads: int, kept_ffn: list[int], total_ffn: int) -> str:
    """Bar chart of kept heads and FFN neurons per layer, as SVG.

    Written by hand rather than with matplotlib: it is ~30 lines, keeps plotting out of the core dependencies,
    and SVG renders on the Hub model card and on GitHub.
    """
    n = len(kept_heads)
    width, height, left, bottom, top = max(360, 60 + 40 * n), 240, 40, 40, 30
    plot_h = height - bottom - top
    bar = (width - left - 20) / max(1, n) / 2.6
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="11">',
        f'<text x="{left}" y="18" font-size="13">Kept per layer: heads (blue) and FFN neurons (orange), % of '
        "original</text>",
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - 10}" y2="{height - bottom}" stroke="#333"/>',
    ]
    for pct in (0, 50, 100):
        y = height - bottom - plot_h * pct / 100
        parts.append(f'<text x="4" y="{y + 4:.1f}">{pct}%</text>')
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - 10}" y2="{y:.1f}" stroke="#ddd"/>')
    for i in range(n):
        x0 = left + 8 + i * bar * 2.6
        for j, (value, total, color) in enumerate(
            ((kept_heads[i], total_heads, "#4472c4"), (kept_ffn[i], total_ffn, "#ed7d31"))
        ):
            frac = value / total if total else 0.0
            h = plot_h * frac
            x = x0 + j * bar
            parts.append(
                f'<rect x="{x:.1f}" y="{height - bottom - h:.1f}" width="{bar:.1f}" height="{h:.1f}" fill="{color}">'
                f"<title>layer {i}: {value}/{total}</title></rect>"
            )
        parts.append(f'<text x="{x0 + bar * 0.4:.1f}" y="{height - bottom + 14}">{i}</text>')
    parts.append(f'<text x="{width / 2 - 15:.0f}" y="{height - 8}">layer</text></svg>')
    return "\n".join(parts)


def _metrics_rows(report: dict[str, Any]) -> list[str]:
    m = report["metrics"]
    rows = ["| metric | dense | after pruning (before recovery) | after recovery |", "|---|---|---|---|"]
    for name, dense in m["dense"].items():
        mid = m.get("after_pruning", {}).get(name)
        final = m.get("after_recovery", {}).get(name)
        rows.append(
            f"| {name} | {dense:.4f} | {'-' if mid is None else f'{mid:.4f}'} | "
            f"{'-' if final is None else f'{final:.4f}'} |"
        )
    return rows


def latency_device(latency: dict[str, Any]) -> str:
    """``"CPU"``, ``"CUDA"``, ...: where the run timed its models (reports before the field existed ran on CPU)."""
    return str(latency.get("device", "cpu")).split(":")[0].upper()


def status_line(report: dict[str, Any]) -> str:
    """One Markdown line for an unfinished run (empty for a finished one)."""
    error, pending = report.get("error"), report.get("pending")
    if error:
        return (
            f"**This run failed at `{error['step']}` ({error['type']}: {error['message']}); not done: "
            f"{', '.join(pending or []) or 'nothing'}. The model was saved before the failure.**\n\n"
        )
    if pending:
        return f"**This run is unfinished: {', '.join(pending)} still to run. The model is saved.**\n\n"
    return ""


def _latency_row(report: dict[str, Any], card: bool = False) -> str:
    """The dense/pruned latency table row (``card``: the model card's shorter form)."""
    lat = report.get("latency")
    if not lat:
        return "| latency | not measured | not measured |"
    if card:
        return (
            f"| {latency_device(lat)} latency (batch {lat['batch']}) | {lat['dense_ms']:.1f} ms | "
            f"{lat['pruned_ms']:.1f} ms |"
        )
    return (
        f"| {latency_device(lat)} latency, batch {lat['batch']} x {lat['seq_len']} | {lat['dense_ms']:.1f} ms "
        f"| {lat['pruned_ms']:.1f} ms ({lat['speedup']:.2f}x) |"
    )


def summary_markdown(report: dict[str, Any]) -> str:
    p, f, s = report["params"], report["encoder_flops"], report["size_bytes"]
    plan, orig = report["plan"], report["plan"].get("original") or {}
    lines = [
        f"# hf_prune run: {report['base_model']}",
        "",
        status_line(report) + "\n".join(_metrics_rows(report)),
        "",
        "| | dense | pruned |",
        "|---|---|---|",
        f"| parameters | {p['dense']:,} | {p['pruned']:,} |",
        f"| encoder FLOPs (seq {f['seq_len']}) | {f['dense']:,} | {f['pruned']:,} ({f['ratio']:.2f}x fewer) |",
        f"| size on disk | {s['dense'] / 2**20:.1f} MiB | {s['pruned'] / 2**20:.1f} MiB |",
        _latency_row(report),
        f"| weight sparsity (blocks) | 0% | {report['sparsity']:.1%} |",
        "",
        f"Kept heads per layer (of {orig.get('heads', '?')}): {plan['kept_heads']}  ",
        f"Kept FFN neurons per layer (of {orig.get('ffn', '?')}): {plan['kept_ffn']}",
        "",
        "![kept structure](kept_structure.svg)",
        "",
        "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in report["wall_time_s"].items()),
        "",
    ]
    return "\n".join(lines)


def _loading_section(report: dict[str, Any], auto_class: str) -> str:
    """Model-card instructions for the way this folder loads (``report["loading"]``, set when it was saved)."""
    with_hf_prune = f"""```python
import hf_prune
from transformers import {auto_class}
model = hf_prune.from_pretrained("<this repo>", {auto_class})
```
"""
    loading = report.get("loading", "hf_prune")
    size = report.get("size_bytes", {})
    stored = (
        f"Weights on disk: {size['saved'] / 2**20:.1f} MiB ({size.get('saved_format', 'dense')}).\n\n"
        if "saved" in size
        else ""
    )
    if loading == "stock":
        return (
            f"{stored}The per-layer shapes are uniform, so the stock config describes them and transformers alone "
            f"loads the model:\n\n```python\nfrom transformers import {auto_class}\n"
            f'model = {auto_class}.from_pretrained("<this repo>")\n```\n\n'
            "or, equally, with hf_prune (which also keeps its pruning record):\n\n" + with_hf_prune
        )
    if loading == "remote-code":
        return (
            f"{stored}The layers were pruned to different sizes (recorded in `config.json` under `hf_prune`). Without "
            "hf_prune installed, transformers loads it through the small `hf_prune_modeling.py` saved next to the "
            "weights (it restores the per-layer shapes, then runs the stock classes; read it before trusting it):"
            f"\n\n```python\nfrom transformers import {auto_class}\nmodel = {auto_class}.from_pretrained"
            f'("<this repo>", trust_remote_code=True)\n```\n\n`pipeline(..., trust_remote_code=True)` works the '
            "same way. With hf_prune installed no remote code is needed:\n\n" + with_hf_prune
        )
    return (
        f"{stored}The sparse weights are stored as non-zero values plus a bitmask (`model.sparse.safetensors`), "
        "which only hf_prune reads; it restores the exact dense tensors:\n\n" + with_hf_prune
    )


def _export_section(report: dict[str, Any]) -> str:
    export = report.get("export")
    if not export:
        return ""
    lat, metrics = export["latency_ms"], export["metrics"]
    scores = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "not measured"
    return (
        f"\n### ONNX ({export['format']})\n`{export['path']}` ({export['size_bytes'] / 2**20:.1f} MiB, "
        f"{export['exporter']}): {scores} on the evaluation split; CPU latency {lat['onnxruntime_cpu']:.1f} ms "
        f"in ONNX Runtime vs {lat['pytorch_cpu']:.1f} ms for the pruned model in PyTorch ({lat['speedup']:.2f}x), "
        "measured by the run that produced this model.\n"
    )


def model_card(report: dict[str, Any], recipe_yaml: str) -> ModelCard:
    task = report["recipe"].get("model", {}).get("task", "sequence-classification")
    data = ModelCardData(
        library_name="transformers",
        tags=["hf_prune", "pruned", "structured-pruning"],
        pipeline_tag="text-classification" if task == "sequence-classification" else "text-generation",
        base_model=report["base_model"] if not Path(str(report["base_model"])).exists() else None,
    )
    plan, orig = report["plan"], report["plan"].get("original") or {}
    removed_heads = (orig.get("heads", 0) * len(plan["kept_heads"]) - sum(plan["kept_heads"])) if orig else "?"
    removed_ffn = (orig.get("ffn", 0) * len(plan["kept_ffn"]) - sum(plan["kept_ffn"])) if orig else "?"
    cfg = report["pruning_config"]
    auto_class = "AutoModelForCausalLM" if task == "causal-lm" else "AutoModelForSequenceClassification"
    kept_layers = plan.get("kept_layers")
    blocks = (
        f"- **Transformer blocks:** {plan.get('original_layers', '?') - len(kept_layers)} removed "
        f"(criterion `{cfg.get('layer_criterion')}`); kept blocks of the original: {kept_layers}.\n"
        if kept_layers is not None and isinstance(plan.get("original_layers"), int)
        else ""
    )
    content = f"""---
{data.to_yaml()}
---

# Pruned {report["base_model"]}

{status_line(report)}This model was pruned with [hf_prune](https://github.com/hf-prune/hf_prune) \
{report["hf_prune_version"]}.

## What was removed
{blocks}- **Attention heads:** {removed_heads} removed in the kept blocks; kept per layer: {plan["kept_heads"]} \
(of {orig.get("heads", "?")}).
- **FFN neurons:** {removed_ffn} removed in the kept blocks; kept per layer: {plan["kept_ffn"]} \
(of {orig.get("ffn", "?")}).
- **Weight sparsity** in the transformer blocks: {report["sparsity"]:.1%}.
- Criterion `{cfg["criterion"]}`, scope `{cfg["scope"]}`, schedule `{cfg["schedule"]}`; distillation alpha
  {cfg["distill_alpha"]}.

## How to load it
{_loading_section(report, auto_class)}{_export_section(report)}
## Results (measured by the run that produced this model)
{chr(10).join(_metrics_rows(report))}

| | dense | pruned |
|---|---|---|
| parameters | {report["params"]["dense"]:,} | {report["params"]["pruned"]:,} |
| encoder FLOPs ratio | 1.00x | {report["encoder_flops"]["ratio"]:.2f}x fewer |
{_latency_row(report, card=True)}

![kept structure](kept_structure.svg)

## Recipe
```yaml
{recipe_yaml.strip()}
```
"""
    return ModelCard(content)


def write_report(folder: Path, report: dict[str, Any], recipe: Any) -> None:
    """Write report, summary, plot, model card and the recipe into ``folder``, each file atomically (a reader or a
    crash sees the old file or the new one, never half of one)."""
    folder = Path(folder)
    recipe_yaml = yaml.safe_dump(report["recipe"], sort_keys=False)
    atomic_write_text(folder / "pruning_report.json", json.dumps(report, indent=2, default=str))
    atomic_write_text(folder / "SUMMARY.md", summary_markdown(report))
    orig = report["plan"].get("original") or {}
    svg = kept_structure_svg(
        report["plan"]["kept_heads"], orig.get("heads", 1), report["plan"]["kept_ffn"], orig.get("ffn", 1)
    )
    atomic_write_text(folder / "kept_structure.svg", svg)
    atomic_write_text(folder / "recipe.yaml", recipe_yaml)
    card = model_card(report, recipe_yaml)
    atomic_write(folder / "README.md", card.save)
