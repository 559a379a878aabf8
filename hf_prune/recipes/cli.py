"""``hf-prune``: run recipes, inspect and evaluate pruned models, run the benchmarks."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from transformers.utils import logging

from .schema import RecipeError, load_recipe

logger = logging.get_logger(__name__)


def _cmd_run(args: argparse.Namespace) -> int:
    from .runner import run_recipe, summary_table

    recipe = load_recipe(args.recipe, args.set)
    if args.dry_run:
        from huggingface_hub import constants

        from .data import load_data

        if recipe.data.files or not constants.HF_HUB_OFFLINE:
            data = load_data(recipe)  # files found, splits and columns present: everything short of the model
            sizes = "data " + ", ".join(f"{split} {len(ds)}" for split, ds in data.items())
        else:  # a Hub dataset id while offline: the schema is checked, the data cannot be
            sizes = f"Hub dataset {recipe.data.dataset} not loaded offline"
        model = recipe.model.name_or_path
        print(f"{args.recipe}: valid recipe (model {model}, {sizes}, output {recipe.output.dir})")
        return 0
    report = run_recipe(recipe, output_dir=args.output_dir, push=True if args.push else None)
    print()
    print(summary_table(report))
    print(f"\nwrote {report['output_dir']}")
    return 0


def _load_any(path: str, task: str | None):
    import transformers as tf

    from ..io.load import from_pretrained
    from .offline import resolve_offline

    path, gguf = resolve_offline(path)
    extra = {"gguf_file": gguf} if gguf else {}
    cls = {
        "sequence-classification": tf.AutoModelForSequenceClassification,
        "causal-lm": tf.AutoModelForCausalLM,
        None: tf.AutoModel,
    }[task]
    return from_pretrained(path, cls, **extra)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from ..measure import model_summary

    model = _load_any(args.model, args.task)
    summary = model_summary(model, args.seq_len)  # an unknown family: sparsity only, no per-layer shapes
    info = {k: summary[k] for k in ("model_type", "class", "parameters", "encoder_flops", "seq_len", "sparsity")}
    info["layers"] = [
        {**layer, "sparsity": sparsity}
        for layer, sparsity in zip(summary["layers"], summary["sparsity_per_layer"], strict=True)
    ]
    info["pruned_by_hf_prune"] = summary["pruned_by_hf_prune"]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{args.model}: {info['class']} ({info['model_type']}), {info['parameters'] / 1e6:.2f}M parameters")
    print(
        f"encoder FLOPs per sequence of {args.seq_len}: {info['encoder_flops'] / 1e9:.3f} G; "
        f"block weight sparsity {info['sparsity']:.1%}"
    )
    print(f"{'layer':>5} {'heads':>6} {'kv':>4} {'ffn':>6} {'sparsity':>9}")
    for i, layer in enumerate(info["layers"]):
        print(f"{i:>5} {layer['heads']:>6} {layer['kv_heads']:>4} {layer['ffn']:>6} {layer['sparsity']:>9.1%}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import load_data, load_model_and_tokenizer, tokenize
    from .runner import evaluate_model

    recipe = load_recipe(args.recipe, args.set)
    raw = load_data(recipe)
    base_model, tokenizer, _ = load_model_and_tokenizer(recipe)
    model = _load_any(args.model, recipe.model.task) if args.model else base_model
    _, evaluation = tokenize(recipe, raw, tokenizer)
    metrics = evaluate_model(recipe, model, evaluation, tokenizer)
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    if args.format != "onnx":
        return _export_serving(args)
    from ..io.onnx import export_onnx

    report = export_onnx(args.model, args.output, int8=args.int8, atol=args.atol)
    what = "int8 (ONNX Runtime dynamic quantization)" if report.int8 else "float32"
    print(f"wrote {report.path} ({what}, {report.size_bytes / 2**20:.1f} MiB, {report.exporter}, {report.seconds} s)")
    check = "batch x sequence " + " and ".join(f"{b} x {s}" for b, s in report.checked_shapes)
    if report.int8:
        print(
            f"ONNX Runtime vs PyTorch on {check}: max |difference| {report.max_abs_diff:.3g} (outputs up to "
            f"{report.output_scale:.3g}), same argmax for {report.agreement:.1%}; re-measure accuracy on your task"
        )
    else:
        print(f"ONNX Runtime vs PyTorch on {check}: max |difference| {report.max_abs_diff:.3g} (tolerance met)")
    return 0


def _export_serving(args: argparse.Namespace) -> int:
    """``--format vllm`` (a folder vLLM serves) or ``--format gguf`` (a file llama.cpp runs)."""
    if args.int8:
        raise ValueError(f"--int8 is an ONNX option; --format {args.format} takes --gguf-type for its precision")
    if args.format == "vllm":
        from ..io.vllm import CONFIG_FILE, export_vllm

        path = export_vllm(args.model, args.output)
        # a servable (per-block) export is vLLM's nemotron-nas, whose config class ships in the folder
        remote = (path / CONFIG_FILE).exists()
        flag, kwarg = (" --trust-remote-code", ", trust_remote_code=True") if remote else ("", "")
        print(f"wrote {path}: serve it with `vllm serve {path}{flag}` (or vllm.LLM({str(path)!r}{kwarg}))")
        return 0
    from ..io.gguf import export_gguf

    path = export_gguf(args.model, args.output, gguf_type=args.gguf_type)
    print(f"wrote {path} ({args.gguf_type}, {path.stat().st_size / 2**20:.1f} MiB): run it with llama.cpp")
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "run_all.py"
    if not script.exists():
        print("benchmarks/run_all.py not found: run from a source checkout of hf_prune", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *args.rest])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-prune",
        description="Structured and unstructured pruning for Hugging Face transformers.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a prune-and-recover recipe (YAML)")
    run.add_argument("recipe", help="path to a recipe YAML file")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set training.num_train_epochs=2 (repeatable)",
    )
    run.add_argument("--output-dir", help="override output.dir")
    run.add_argument("--push", action="store_true", help="push the output folder to output.repo_id")
    run.add_argument("--dry-run", action="store_true", help="validate the recipe and its data, then exit")
    run.set_defaults(func=_cmd_run)

    inspect = sub.add_parser("inspect", help="heads/FFN per layer, parameters, sparsity, FLOPs of a model")
    inspect.add_argument("model", help="a saved folder, a Hub id, or offline:minilm / offline:smollm2")
    inspect.add_argument("--task", choices=["sequence-classification", "causal-lm"], default=None)
    inspect.add_argument("--seq-len", type=int, default=128)
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=_cmd_inspect)

    ev = sub.add_parser("evaluate", help="evaluate a (pruned) model on a recipe's evaluation data and metrics")
    ev.add_argument("recipe")
    ev.add_argument("--model", help="model folder to evaluate (default: the recipe's base model)")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ev.set_defaults(func=_cmd_evaluate)

    export = sub.add_parser(
        "export", help="export a saved (pruned) model to ONNX (checked), a vLLM folder or a llama.cpp GGUF file"
    )
    export.add_argument("model", help="a folder saved by hf_prune.save_pretrained or a recipe run")
    export.add_argument(
        "--format",
        choices=["onnx", "vllm", "gguf"],
        default="onnx",
        help="onnx: model.onnx checked against PyTorch; vllm: a folder `vllm serve` runs (uniform or servable "
        "layout); gguf: one .gguf file for llama.cpp / Ollama (uniform: llama, servable: deci)",
    )
    export.add_argument(
        "--output", required=True, help="onnx/vllm: folder to write (+ config, tokenizer); gguf: the .gguf file"
    )
    export.add_argument("--gguf-type", choices=["f32", "f16", "q8_0"], default="f16", help="GGUF tensor type")
    export.add_argument("--int8", action="store_true", help="ONNX Runtime dynamic int8 quantization")
    export.add_argument(
        "--atol", type=float, default=1e-4, help="float32 check: max |ONNX - PyTorch| / max(1, output scale)"
    )
    export.set_defaults(func=_cmd_export)

    bench = sub.add_parser("benchmark", help="run benchmarks/run_all.py (arguments are passed through)")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_cmd_benchmark)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
