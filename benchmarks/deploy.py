"""Deployment table: what pruning, int8 and compact sparse storage buy on CPU, end to end.

Models:

* **MiniLM** (all-MiniLM-L6-v2) fine-tuned 1 epoch on 8,000 SST-2 sentences (``common.finetuned_minilm_sst2``),
  dense and pruned one-shot to a 2x and a 3x encoder-FLOPs cut (Fisher, global, least-squares refit, 512 calibration
  sentences; no retraining), and 50% / 90% unstructured (global magnitude) for the sparse-storage rows.
  Accuracy: SST-2 dev (872 sentences), for every row, through the engine of the row (ONNX rows run in ONNX Runtime).
* **BERT-base** (the bert-base-uncased shapes, random weights: no BERT-base checkpoint ships offline): sizes and
  latency only, pruned with magnitude scores to the same cuts.

Formats per model: PyTorch float32 (safetensors), PyTorch int8 (``torch.ao`` dynamic quantization of every Linear),
ONNX float32 and ONNX int8 (``hf-prune export [--int8]``: torch.onnx + ONNX Runtime dynamic quantization), and the
sparse rows saved with ``hf_prune.save_pretrained(sparse=True)`` (values + bitmask; PyTorch runs them dense).

Latency: CPU, batch 1 x 64 and batch 32 x 64 tokens, every engine of a model timed in interleaved rounds in this
process, median of all rounds; ``vs dense`` divides the dense PyTorch float32 median of the same run by the row's.
Size: the weight files on disk (safetensors or model.onnx).

    python benchmarks/deploy.py [--repeats 12] [--quick] [--models minilm bert-base]
"""

from __future__ import annotations

import copy
import importlib.metadata
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import hf_prune
from hf_prune import PruningConfig
from hf_prune.io.onnx import export_onnx, onnx_session, time_onnx, torch_int8
from hf_prune.utils import random_token_ids

from common import Run, accuracy, add_n_eval, bench_parser, finetuned_minilm_sst2
from results import add_run, commands, publish, section, table

SHAPES = ((1, 64), (32, 64))
CALIBRATION = 512
CUTS = {"2x": 0.5, "3x": 1 / 3}
SPARSITIES = (0.5, 0.9)


def _files_bytes(folder: Path, suffix: str) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.endswith(suffix))


def latency_inputs(vocab: int, batch: int, seq: int) -> dict[str, torch.Tensor]:
    ids = random_token_ids(vocab, batch, seq, seed=batch * 1000 + seq)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def prune_variant(model: nn.Module, variant: str, calibration: Any) -> nn.Module:
    """A pruned copy of ``model``: ``2x`` / ``3x`` structured (Fisher + refit with data, magnitude without), or
    ``sparse-50`` / ``sparse-90`` global magnitude."""
    pruned = copy.deepcopy(model)
    if variant.startswith("sparse-"):
        hf_prune.prune(pruned, PruningConfig(sparsity=int(variant.split("-")[1]) / 100, sparsity_scope="global"))
    elif calibration is not None:
        config = PruningConfig(
            target_flops=CUTS[variant], criterion="fisher", scope="global", reconstruct=True, max_samples=CALIBRATION
        )
        hf_prune.prune(pruned, config, calibration_data=calibration)
    else:
        hf_prune.prune(pruned, PruningConfig(target_flops=CUTS[variant], criterion="magnitude", scope="global"))
    return pruned.eval()


def engines_for(name: str, model: nn.Module, work: Path, dev: Any, structured: bool) -> list[dict[str, Any]]:
    """Every deployable form of ``model``: size, accuracy (when ``dev`` is given) and a callable for timing."""
    out = []
    folder = work / name
    sparse = not structured
    hf_prune.save_pretrained(model, folder / "pt", sparse=sparse)
    acc = accuracy(model, dev) if dev is not None else None
    out.append(
        {
            "variant": name,
            "format": "PyTorch float32" + (" (sparse file)" if sparse else ""),
            "size_bytes": _files_bytes(folder / "pt", ".safetensors"),
            "accuracy": acc,
            "run": lambda inputs, m=model: m(**inputs),
        }
    )
    if not structured:
        return out  # unstructured zeros: no ONNX/int8 variant (dense kernels; the point of the row is the file)
    quantized = torch_int8(model)
    qfolder = folder / "pt-int8"
    qfolder.mkdir(parents=True)
    torch.save(quantized.state_dict(), qfolder / "model.pt")
    out.append(
        {
            "variant": name,
            "format": "PyTorch int8 (torch.ao dynamic)",
            "size_bytes": (qfolder / "model.pt").stat().st_size,
            "accuracy": accuracy(quantized, dev) if dev is not None else None,
            "run": lambda inputs, m=quantized: m(**inputs),
        }
    )
    for int8 in (False, True):
        report = export_onnx(model, folder / ("onnx-int8" if int8 else "onnx"), int8=int8)
        session = onnx_session(report.path, threads=torch.get_num_threads())
        out.append(
            {
                "variant": name,
                "format": "ONNX Runtime int8" if int8 else "ONNX Runtime float32",
                "size_bytes": report.size_bytes,
                "accuracy": accuracy(session, dev) if dev is not None else None,
                "max_abs_diff": report.max_abs_diff,
                "session": session,
            }
        )
    return out


def time_engines(engines: list[dict[str, Any]], vocab: int, repeats: int, rounds: int = 3) -> None:
    """Median latency of every engine at every shape, the engines interleaved round by round."""
    for batch, seq in SHAPES:
        inputs = latency_inputs(vocab, batch, seq)
        samples: dict[int, list[float]] = {i: [] for i in range(len(engines))}
        per_round = max(1, repeats // rounds)
        for _ in range(rounds):
            for i, engine in enumerate(engines):
                if "session" in engine:
                    samples[i] += time_onnx(engine["session"], inputs, repeats=per_round, warmup=2)
                    continue
                with torch.inference_mode():
                    for _ in range(2):
                        engine["run"](inputs)
                    for _ in range(per_round):
                        start = time.perf_counter()
                        engine["run"](inputs)
                        samples[i].append((time.perf_counter() - start) * 1000)
        for i, engine in enumerate(engines):
            engine[f"ms_b{batch}x{seq}"] = statistics.median(samples[i])


def bert_base() -> nn.Module:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(num_labels=2)).eval()  # bert-base-uncased's shapes


def measure_model(name: str, model: nn.Module, calibration: Any, dev: Any, repeats: int, quick: bool) -> list[dict]:
    variants = ["dense", "2x"] if quick else ["dense", "2x", "3x", "sparse-50", "sparse-90"]
    engines: list[dict[str, Any]] = []
    flops_dense = hf_prune.encoder_flops(model, 64).total
    with tempfile.TemporaryDirectory() as work:
        for variant in variants:
            start = time.time()
            pruned = model if variant == "dense" else prune_variant(model, variant, calibration)
            structured = not variant.startswith("sparse-")
            rows = engines_for(variant, pruned, Path(work), dev, structured)
            for row in rows:
                row.update(
                    model=name,
                    params=hf_prune.count_parameters(pruned),
                    flops_ratio=flops_dense / hf_prune.encoder_flops(pruned, 64).total,
                    prepare_s=round(time.time() - start, 1),
                )
            engines += rows
            print(f"{name} {variant}: {len(rows)} formats ready in {time.time() - start:.0f} s", flush=True)
        time_engines(engines, model.config.vocab_size, repeats)
    dense = next(e for e in engines if e["variant"] == "dense" and e["format"] == "PyTorch float32")
    for e in engines:
        for batch, seq in SHAPES:
            key = f"ms_b{batch}x{seq}"
            e[f"speedup_b{batch}x{seq}"] = dense[key] / e[key]
        e["size_vs_dense"] = e["size_bytes"] / dense["size_bytes"]
    return [{k: v for k, v in e.items() if k not in ("run", "session")} for e in engines]


def render(result: dict[str, Any]) -> list[str]:
    """The RESULTS.md section: every model in every deployable form."""
    lines = section(
        "Deployment: pruning x int8 x ONNX Runtime x sparse storage (CPU)",
        result,
        "Each model in every deployable form: size of the weight file, CPU latency at batch 1 x 64 and batch 32 x 64 "
        "(all forms of a model timed interleaved in one process; median), speedup over the dense PyTorch float32 "
        "model of the same run, and SST-2 dev accuracy measured through that engine (MiniLM; BERT-base has random "
        "weights, so no accuracy). Structured cuts: Fisher (global) + least-squares refit, one-shot (MiniLM); "
        "magnitude (BERT-base). int8: dynamic quantization (torch.ao for PyTorch, ONNX Runtime's for ONNX). Sparse "
        "rows: global magnitude, saved with `sparse=True` (values + bitmask); PyTorch runs them with dense kernels.",
    )
    rows = [
        f"{r['model']} | {r['variant']} | {r['format']} | {r['flops_ratio']:.2f}x | {r['size_bytes'] / 2**20:.1f} MiB "
        f"| {r['size_vs_dense']:.2f} | {r['ms_b1x64']:.1f} ms | {r['speedup_b1x64']:.2f}x | {r['ms_b32x64']:.0f} ms "
        f"| {r['speedup_b32x64']:.2f}x | {'n/a' if r.get('accuracy') is None else format(r['accuracy'], '.2%')}"
        for r in result["rows"]
    ]
    head = "model | variant | format | FLOPs cut | size | size vs dense | batch 1 x 64 | vs dense | batch 32 x 64 "
    lines += table(head + "| vs dense | dev accuracy", rows)
    return [*lines, "", f"ONNX Runtime threads: {result.get('threads')} (the same as torch's).", ""]


def headline(result: dict[str, Any]) -> list[str]:
    """Per model: the 2x cut + ONNX Runtime int8 against dense PyTorch, and the 90% sparse file's size."""
    pick = {(x["model"], x["variant"], x["format"]): x for x in result["rows"]}
    lines = []
    for model in dict.fromkeys(x["model"] for x in result["rows"]):
        onnx = pick.get((model, "2x", "ONNX Runtime int8"))
        pruned = pick.get((model, "2x", "PyTorch float32"))
        sparse = pick.get((model, "sparse-90", "PyTorch float32 (sparse file)"))
        parts = []
        if onnx is not None:
            acc = ""
            if onnx.get("accuracy") is not None and pruned is not None:
                acc = f", dev accuracy {onnx['accuracy']:.2%} (pruned PyTorch {pruned['accuracy']:.2%})"
            parts.append(
                f"2x cut + ONNX Runtime int8: {onnx['speedup_b1x64']:.2f}x faster than dense PyTorch at batch "
                f"1 x 64 ({onnx['speedup_b32x64']:.2f}x at 32 x 64), {onnx['size_vs_dense']:.2f} of the file{acc}"
            )
        if sparse is not None:
            parts.append(f"90% sparse saved with `sparse=True`: {sparse['size_vs_dense']:.2f} of the file")
        if parts:
            lines.append(f"| Deploy, {model} (CPU) | {'; '.join(parts)} | {commands(result)} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, "deploy")
    parser.add_argument("--models", nargs="+", default=["minilm", "bert-base"], choices=["minilm", "bert-base"])
    parser.add_argument("--repeats", type=int, default=12, help="timed runs per engine and shape (in 3 rounds)")
    parser.add_argument("--n-train", type=int, default=8000)
    add_n_eval(parser)
    parser.add_argument("--quick", action="store_true", help="dense and 2x only, MiniLM fine-tuned briefly")
    args = parser.parse_args(argv)
    this_run = Run("deploy.py", argv)
    rows: list[dict[str, Any]] = []
    if "minilm" in args.models:
        model, _, data = finetuned_minilm_sst2(args.data_dir, n_train=args.n_train, n_eval=args.n_eval)
        calibration = data["train"].select(range(min(CALIBRATION, len(data["train"]))))
        rows += measure_model("MiniLM (SST-2)", model, calibration, data["validation"], args.repeats, args.quick)
    if "bert-base" in args.models:
        rows += measure_model("BERT-base (random)", bert_base(), None, None, args.repeats, args.quick)
    result = {"benchmark": "deploy", "threads": torch.get_num_threads(), "shapes": [list(s) for s in SHAPES]}
    if "minilm" in args.models:
        result["dev_sentences"] = len(data["validation"])
    result["rows"] = rows
    record = this_run.record()
    for package in ("onnx", "onnxruntime"):
        record["versions"][package] = importlib.metadata.version(package)
    add_run(result, record, rows)
    publish(args.output, result)
    print("\n".join(render(result)))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
