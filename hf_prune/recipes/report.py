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
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..architectures import LayerShape
from ..structure.layout import layout_of
from ..utils import atomic_write, atomic_write_text
from .offline import OFFLINE_MODELS


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


#: ``model.task`` -> (Hub ``pipeline_tag``, the transformers auto class that loads it)
TASKS = {
    "sequence-classification": ("text-classification", "AutoModelForSequenceClassification"),
    "causal-lm": ("text-generation", "AutoModelForCausalLM"),
}

#: the copies of public data sets shipped in the repository's ``data/`` (data/README.md), by ``(folder, file)``:
#: ``(Hub dataset id, its config, the split the file holds, a readable name)``
OFFLINE_DATA = {
    ("sst2", "train_8k.tsv"): ("nyu-mll/glue", "sst2", "train", "GLUE SST-2 (8,000 rows of train)"),
    ("sst2", "train.tsv.xz"): ("nyu-mll/glue", "sst2", "train", "GLUE SST-2"),
    ("sst2", "dev.tsv"): ("nyu-mll/glue", "sst2", "validation", "GLUE SST-2"),
    ("rte", "train.tsv.xz"): ("nyu-mll/glue", "rte", "train", "GLUE RTE"),
    ("rte", "dev.tsv.xz"): ("nyu-mll/glue", "rte", "validation", "GLUE RTE"),
    ("wikitext2", "train.txt.xz"): ("Salesforce/wikitext", "wikitext-2-v1", "train", "WikiText-2"),
    ("wikitext2", "valid.txt.xz"): ("Salesforce/wikitext", "wikitext-2-v1", "validation", "WikiText-2"),
    ("wikitext2", "test.txt.xz"): ("Salesforce/wikitext", "wikitext-2-v1", "test", "WikiText-2"),
    ("wikitext2", "test_head.txt"): ("Salesforce/wikitext", "wikitext-2-v1", "test", "WikiText-2 (start of test)"),
}


def _hub_id(name: str | None) -> str | None:
    """``name`` if it reads as a Hub repository id and is not a folder here (a local path is not a Hub id)."""
    if not name:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return None if Path(name).exists() else name


def hub_base_model(report: dict[str, Any]) -> str | None:
    """The Hub id of the model the run pruned, for the card's ``base_model`` (``None`` for a local folder).

    An ``offline:`` alias stands for the Hub model its package carries (:data:`~.offline.OFFLINE_MODELS`); the
    runner already reports that id, the mapping is repeated for reports written before it did.
    """
    name = str(report["base_model"])
    return _hub_id(OFFLINE_MODELS.get(name, name))


def _data_source(data: dict[str, Any], split: str) -> tuple[str, str | None, str, str] | None:
    """``(Hub id, config, split, name)`` of the data a recipe's ``split`` came from: a Hub dataset, or a file that
    is one of the repository's shipped copies (:data:`OFFLINE_DATA`, matched by ``data/<folder>/<file>``).
    ``None`` for any other local file or folder: the card claims no Hub data set for it."""
    if data.get("files"):
        file = data["files"].get(split)
        parts = Path(str(file)).parts if file else ()
        if len(parts) >= 3 and parts[-3] == "data" and (parts[-2], parts[-1]) in OFFLINE_DATA:
            return OFFLINE_DATA[(parts[-2], parts[-1])]
        return None
    dataset = _hub_id(data.get("dataset"))
    if dataset is None:
        return None
    config = data.get("config")
    return dataset, config, split, f"{dataset} {config}" if config else dataset


def hub_datasets(report: dict[str, Any]) -> list[str]:
    """The Hub ids of the data the run trained and evaluated on, for the card's ``datasets`` (empty: none known)."""
    data = report["recipe"].get("data") or {}
    splits = [data.get("train_split", "train"), data.get("eval_split", "validation"), *(data.get("files") or {})]
    ids = [source[0] for split in splits if (source := _data_source(data, split))]
    return list(dict.fromkeys(ids))


def eval_results(report: dict[str, Any]) -> list[EvalResult]:
    """One ``model-index`` result per metric measured on the pruned model (``metrics["after_recovery"]``: the
    weights in this folder), on the evaluation split. Empty when that step has not run, or when the evaluation data
    has no Hub id: the Hub reads ``model-index`` as results on a named public data set (transformers' own cards
    leave such results out for the same reason)."""
    final = report.get("metrics", {}).get("after_recovery") or {}
    data = report["recipe"].get("data") or {}
    source = _data_source(data, data.get("eval_split", "validation"))
    task = report["recipe"].get("model", {}).get("task", "sequence-classification")
    if not final or source is None or task not in TASKS:
        return []
    dataset, config, split, name = source
    if data.get("max_eval_samples"):
        name += f", up to {data['max_eval_samples']} rows sampled with seed {data.get('shuffle_seed', 0)}"
    task_type = TASKS[task][0]
    where = {"dataset_type": dataset, "dataset_name": name, "dataset_config": config, "dataset_split": split}
    return [EvalResult(task_type=task_type, **where, metric_type=m, metric_value=float(v)) for m, v in final.items()]


def card_data(report: dict[str, Any]) -> ModelCardData:
    """The card's metadata, as the Hub reads it: base model, data sets, pipeline tag, library, tags and the
    ``model-index`` of measured results. Built with ``huggingface_hub``'s card classes so the YAML is what the Hub
    validates, not a hand-written imitation."""
    recipe = report["recipe"]
    task = recipe.get("model", {}).get("task", "sequence-classification")
    results = eval_results(report)
    output = recipe.get("output") or {}
    model_name = output.get("repo_id") or Path(str(output.get("dir") or "hf_prune-pruned")).name
    return ModelCardData(
        library_name="transformers",
        tags=["hf_prune", "pruned", "structured-pruning"],
        pipeline_tag=TASKS.get(task, (None,))[0],
        base_model=hub_base_model(report),
        datasets=hub_datasets(report) or None,
        metrics=list(dict.fromkeys(r.metric_type for r in results)) or None,
        model_name=model_name,
        eval_results=results or None,
    )


def report_layout(report: dict[str, Any]) -> str:
    """``"uniform"``, ``"servable"`` or ``"free"``: the layout (:mod:`hf_prune.structure.layout`) of the pruned
    blocks, from the report's per-block kept heads, key/value heads and FFN widths."""
    plan = report["plan"]
    kv = plan.get("kept_kv_heads") or plan["kept_heads"]  # reports before kv heads were recorded: MHA
    return layout_of([LayerShape(h, k, f) for h, k, f in zip(plan["kept_heads"], kv, plan["kept_ffn"], strict=True)])


_LAYOUT_TEXT = {
    "uniform": "every block has the same shape and keeps both sublayers, so a stock config describes it",
    "servable": "the blocks that keep attention keep the same number of query heads; key/value heads, FFN widths "
    "and removed sublayers differ per block, as vLLM's nemotron-nas (`DeciLMForCausalLM`) and llama.cpp's `deci` "
    "architecture describe",
    "free": "the blocks keep different numbers of query heads, which only transformers runs (with the per-layer "
    "shapes hf_prune records)",
}
_TRANSFORMERS_HOW = {
    "stock": "stock `{auto}.from_pretrained` (see *How to load it*)",
    "remote-code": "`{auto}.from_pretrained(..., trust_remote_code=True)` or `hf_prune.from_pretrained` (see *How to "
    "load it*)",
    "hf_prune": "`hf_prune.from_pretrained` (sparse weights; see *How to load it*)",
}
_VLLM = "`hf-prune export MODEL_DIR --format vllm --output OUT`, then `vllm serve OUT`"
_GGUF = "`hf-prune export MODEL_DIR --format gguf --gguf-type f16 --output OUT.gguf`, then `llama-server -m OUT.gguf`"
_REPRUNE = 'prune with `PruningConfig(layout="servable")` or `layout="uniform"` (recipe: `pruning.layout`)'


def serving_rows(report: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """``(engine, runs this model, how)`` for each engine the card lists: the model's layout decides which serving
    engines take it; encoders (classification) run in transformers and ONNX Runtime, which vLLM and llama.cpp do not
    serve."""
    task = report["recipe"].get("model", {}).get("task", "sequence-classification")
    layout = report_layout(report)
    auto = TASKS.get(task, ("", "AutoModel"))[1]
    loading = report.get("loading") or ("stock" if layout == "uniform" else "remote-code")
    rows = [("transformers", True, _TRANSFORMERS_HOW[loading].format(auto=auto))]
    if task != "causal-lm":
        onnx = "`hf-prune export MODEL_DIR --output OUT` (`--int8`: dynamic int8), checked against PyTorch"
        return [*rows, ("ONNX Runtime", True, onnx)]
    if layout == "uniform":
        return [*rows, ("vLLM", True, _VLLM), ("llama.cpp", True, f"{_GGUF} (`llama` GGUF)")]
    if layout == "servable":
        return [
            *rows,
            ("vLLM", True, f"{_VLLM} (the export writes a nemotron-nas `DeciLMForCausalLM` config)"),
            ("llama.cpp", True, f"{_GGUF} (`deci` GGUF)"),
        ]
    return [
        *rows,
        ("vLLM", False, f"not this layout: {_REPRUNE}"),
        ("llama.cpp", False, f"not this layout: {_REPRUNE}"),
    ]


def _serving_section(report: dict[str, Any]) -> str:
    """The card's "Serving" section: the layout, then per engine whether and how it runs the model."""
    layout = report_layout(report)
    rows = "\n".join(f"| {name} | {'yes' if ok else 'no'} | {how} |" for name, ok, how in serving_rows(report))
    task = report["recipe"].get("model", {}).get("task", "sequence-classification")
    engines = (
        _LAYOUT_TEXT[layout]
        if task == "causal-lm"
        else "an encoder: transformers and ONNX Runtime run it at any layout; vLLM and llama.cpp serve decoders only"
    )
    return (
        f"Layout: **{layout}** ({engines}). `MODEL_DIR` is a local copy of this repository "
        "(`hf download <this repo> --local-dir MODEL_DIR`).\n\n"
        f"| engine | runs this model | how |\n|---|---|---|\n{rows}\n"
    )


def _removed_section(report: dict[str, Any]) -> str:
    """The card's "What was removed" list: blocks, heads, FFN neurons, sparsity and the pruning settings."""
    plan, orig = report["plan"], report["plan"].get("original") or {}
    removed_heads = (orig.get("heads", 0) * len(plan["kept_heads"]) - sum(plan["kept_heads"])) if orig else "?"
    removed_ffn = (orig.get("ffn", 0) * len(plan["kept_ffn"]) - sum(plan["kept_ffn"])) if orig else "?"
    cfg = report["pruning_config"]
    kept_layers = plan.get("kept_layers")
    blocks = (
        f"- **Transformer blocks:** {plan.get('original_layers', '?') - len(kept_layers)} removed "
        f"(criterion `{cfg.get('layer_criterion')}`); kept blocks of the original: {kept_layers}.\n"
        if kept_layers is not None and isinstance(plan.get("original_layers"), int)
        else ""
    )
    return f"""{blocks}- **Attention heads:** {removed_heads} removed in the kept blocks; kept per layer: \
{plan["kept_heads"]} (of {orig.get("heads", "?")}).
- **FFN neurons:** {removed_ffn} removed in the kept blocks; kept per layer: {plan["kept_ffn"]} \
(of {orig.get("ffn", "?")}).
- **Weight sparsity** in the transformer blocks: {report["sparsity"]:.1%}.
- Criterion `{cfg["criterion"]}`, scope `{cfg["scope"]}`, schedule `{cfg["schedule"]}`; distillation alpha
  {cfg["distill_alpha"]}.
"""


def model_card(report: dict[str, Any], recipe_yaml: str) -> ModelCard:
    """The model card (``README.md``) of a run's output folder: Hub metadata (:func:`card_data`), what was removed,
    how to load and serve the model, the measured results and the recipe that made it."""
    task = report["recipe"].get("model", {}).get("task", "sequence-classification")
    auto_class = TASKS.get(task, ("", "AutoModel"))[1]
    content = f"""---
{card_data(report).to_yaml()}
---

# Pruned {report["base_model"]}

{status_line(report)}This model was pruned with [hf_prune](https://github.com/hf-prune/hf_prune) \
{report["hf_prune_version"]}.

## What was removed
{_removed_section(report)}
## How to load it
{_loading_section(report, auto_class)}
## Serving
{_serving_section(report)}{_export_section(report)}
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
