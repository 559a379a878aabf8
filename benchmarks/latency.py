"""CPU latency: dense vs structurally pruned models, and where a forward's time goes.

Two 2x cuts of the transformer blocks' FLOPs: ``width`` removes half of the heads (whole KV groups) and half of the
FFN neurons of every layer; ``width+depth`` removes every fourth block and a third of the remaining heads and
neurons. At batch 1 and short sequences a layer's fixed cost (op dispatch, norms, residual adds) does not shrink
with its width, so width-only cuts lose speedup there and removing blocks does not (``--breakdown`` records the time
per op category to show it).

Random weights are fine for timing: latency depends on shapes, not values. Speedup is measured in the same run
as the dense baseline, interleaving dense and pruned rounds, and compared with the FLOPs ratio of the
transformer blocks (speedup / FLOPs ratio close to 1 means removed FLOPs turned into real time). Rows are kept per
machine kind (CPU model and threads): a run on another machine adds its rows beside these.

    python benchmarks/latency.py --breakdown           # BERT-base + Llama-style, batch 1/8 x seq 32/64/128
    python benchmarks/latency.py --batch 1 --seq-len 32 --plans width
"""

from __future__ import annotations

import copy
import statistics
import time
from collections import defaultdict
from typing import Any

import torch
import transformers as tf

import hf_prune
from hf_prune.measure import compare_latency, count_parameters, encoder_flops, saved_size_bytes

from common import Run, bench_parser
from results import (
    add_run,
    commands,
    machine_groups,
    previous_result,
    publish,
    rows_of_other_machines,
    section,
    span,
    table,
)

CONFIGS = {
    "bert-base": lambda: tf.BertConfig(),  # 12 layers, hidden 768, 12 heads, FFN 3072
    # Llama-style decoder with grouped-query attention (16 query heads in 8 KV groups of 2).
    "llama-style": lambda: tf.LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=2048,
    ),
}


FFN_MULTIPLE = hf_prune.PruningConfig.ffn_multiple


def half_plan(model: torch.nn.Module, seed: int = 0, fraction: float = 0.5) -> hf_prune.PruningPlan:
    """Remove ``fraction`` of the heads (whole KV groups) and of the FFN neurons of every layer, at random (the kept
    FFN width rounded to a multiple of ``FFN_MULTIPLE``)."""
    adapter = hf_prune.get_adapter(model)
    g = torch.Generator().manual_seed(seed)
    heads, ffn = {}, {}
    for i, shape in enumerate(adapter.layer_shapes(model)):
        group = shape.heads // shape.kv_heads
        groups = torch.randperm(shape.kv_heads, generator=g)[: round(shape.kv_heads * fraction)].tolist()
        heads[i] = sorted(h for grp in groups for h in range(grp * group, (grp + 1) * group))
        # the kept width rounded to a multiple of 8, as hf_prune's allocator keeps it (PruningConfig.ffn_multiple):
        # an odd width runs far slower than its FLOPs say, which would time the kernels, not the cut
        kept = max(FFN_MULTIPLE, FFN_MULTIPLE * round(shape.ffn * (1 - fraction) / FFN_MULTIPLE))
        ffn[i] = sorted(torch.randperm(shape.ffn, generator=g)[: shape.ffn - kept].tolist())
    return hf_prune.PruningPlan(heads=heads, ffn=ffn)


def cut(model: torch.nn.Module, plan: str) -> torch.nn.Module:
    """``width``: half of every layer's heads and FFN neurons (2x the block FLOPs). ``width+depth``: every fourth
    block removed, then a third of the remaining layers' heads and neurons (about 2x as well): at batch 1 a layer's
    fixed cost (op dispatch, norms, residuals) does not shrink with its width, and only removing the layer removes
    it."""
    if plan == "width":
        half_plan(model).apply(model)
        return model
    n = len(hf_prune.get_adapter(model).layers(model))
    hf_prune.prune_layers(model, list(range(3, n, 4)))
    half_plan(model, fraction=1 / 3).apply(model)
    return model


PLANS = ("width", "width+depth")


# op name -> what it is, for the per-op breakdown (self CPU time per forward). Composite ops (aten::linear,
# aten::matmul) hold almost no self time: their kernels (addmm, mm, bmm) carry it.
_CATEGORIES = (
    ("matmul", ("addmm", "aten::mm", "bmm", "aten::linear", "aten::matmul", "baddbmm")),
    ("attention", ("scaled_dot_product", "softmax", "flash_attention")),
    ("norm", ("layer_norm", "rms_norm", "rsqrt")),
    ("activation", ("gelu", "silu", "tanh", "relu", "sigmoid")),
    ("elementwise", ("aten::add", "aten::mul", "aten::div", "aten::sub", "aten::pow", "aten::mean", "aten::neg")),
    ("embedding", ("embedding", "index_select")),
    (
        "layout",
        (
            "view",
            "reshape",
            "transpose",
            "permute",
            "contiguous",
            "copy_",
            "cat",
            "expand",
            "slice",
            "select",
            "unsqueeze",
            "squeeze",
            "_to_copy",
            "aten::to",
            "empty",
            "clone",
            "split",
            "chunk",
            "narrow",
        ),
    ),
)


def _category(op: str) -> str:
    return next((cat for cat, keys in _CATEGORIES if any(k in op for k in keys)), "other ops")


def op_breakdown(model: torch.nn.Module, inputs: dict, repeats: int) -> dict[str, float]:
    """Milliseconds per forward by op category (torch.profiler self CPU time), plus ``python + dispatch``: the
    un-profiled median wall time that no op accounts for (module calls, argument handling, op dispatch)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        for _ in range(2):
            model(**inputs)
        walls = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs)
            walls.append((time.perf_counter() - start) * 1000)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                model(**inputs)
    parts: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        parts[_category(event.key)] += event.self_cpu_time_total / 1000 / repeats
    parts["python + dispatch"] = statistics.median(walls) - sum(parts.values())
    return {k: round(v, 3) for k, v in sorted(parts.items())}


def run(name: str, batch: int, seq_len: int, repeats: int, breakdown: bool = False, plan: str = "width") -> dict:
    torch.manual_seed(0)
    dense = tf.AutoModel.from_config(CONFIGS[name]()).eval()
    pruned = cut(copy.deepcopy(dense), plan)
    inputs = {
        "input_ids": torch.randint(100, 1000, (batch, seq_len)),
        "attention_mask": torch.ones(batch, seq_len, dtype=torch.long),
    }
    flops_ratio = encoder_flops(dense, seq_len).total / encoder_flops(pruned, seq_len).total
    timing = compare_latency(dense, pruned, inputs, repeats=repeats, warmup=2, rounds=3)
    row = {
        "model": name,
        "plan": plan,
        "batch": batch,
        "seq_len": seq_len,
        "params_dense": count_parameters(dense),
        "params_pruned": count_parameters(pruned),
        "flops_ratio": flops_ratio,
        "dense_ms": timing["dense_ms"],
        "pruned_ms": timing["pruned_ms"],
        "speedup": timing["speedup"],
        "speedup_over_flops_ratio": timing["speedup"] / flops_ratio,
        "repeats": timing["repeats"],
    }
    if breakdown:
        row["breakdown_ms"] = {"dense": op_breakdown(dense, inputs, 20), "pruned": op_breakdown(pruned, inputs, 20)}
    print(
        f"{name:12s} {plan:11s} b={batch} s={seq_len}: dense {row['dense_ms']:.1f} ms, "
        f"pruned {row['pruned_ms']:.1f} ms, "
        f"speedup {row['speedup']:.2f}x, FLOPs ratio {flops_ratio:.2f}x, "
        f"speedup/FLOPs {row['speedup_over_flops_ratio']:.2f}"
    )
    return row


def sizes(name: str) -> dict:
    """Bytes on disk (safetensors, float32) of the dense model, the structured 50/50 model and a 50% unstructured
    model, saved the stock way: unstructured zeros cost the same bytes as dense there (``sparse=True`` is measured in
    the deployment benchmark)."""
    torch.manual_seed(0)
    dense = tf.AutoModel.from_config(CONFIGS[name]()).eval()
    structured = copy.deepcopy(dense)
    half_plan(structured).apply(structured)
    sparse = copy.deepcopy(dense)
    hf_prune.prune(sparse, hf_prune.PruningConfig(sparsity=0.5))
    return {
        "model": name,
        "dense_bytes": saved_size_bytes(dense),
        "structured_bytes": saved_size_bytes(structured),
        "unstructured_bytes": saved_size_bytes(sparse),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = bench_parser(__doc__, "latency", data=False)
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seq-len", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--repeats", type=int, default=15, help="timed forwards per model (split in 3 rounds)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--plans", nargs="+", default=list(PLANS), choices=PLANS)
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also record where each forward's time goes, by op category, at the smallest batch and shortest "
        "sequence (where a layer's fixed cost weighs most; profiling every shape would double the run)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    this_run = Run("latency.py", argv)
    rows = [
        run(m, b, s, args.repeats, args.breakdown and (b, s) == (min(args.batch), min(args.seq_len)), p)
        for m in args.models
        for p in args.plans
        for b in args.batch
        for s in args.seq_len
    ]
    record = this_run.record()
    previous = previous_result(args.output)

    def key(r: dict) -> tuple:
        return r["model"], r["plan"], r["batch"], r["seq_len"]

    # rows of other machine kinds stay (RESULTS.md shows them side by side), and so do this kind's rows of models,
    # plans and shapes not re-measured now
    measured = {key(r) for r in rows}
    kept = rows_of_other_machines(previous, record, also=lambda r: key(r) not in measured)
    result = {"benchmark": "latency", "runs": previous.get("runs", {}), "sizes": [sizes(m) for m in args.models]}
    add_run(result, record, rows)
    result["rows"] = kept + rows
    publish(args.output, result)
    return result


# ---- RESULTS.md and README ----------------------------------------------------------------------------------------
def render(result: dict[str, Any]) -> list[str]:
    """The RESULTS.md section: every machine kind's rows, where the time goes (``--breakdown`` rows), file sizes."""
    rows = [(kind, r) for kind, group in machine_groups(result) for r in group]
    lines = section(
        "Latency: dense vs structured 2x cuts (width: 50% heads + 50% FFN in every layer; width+depth: every "
        "fourth block removed, then a third of the heads and FFN)",
        result,
    )
    lines += table(
        "machine | model | plan | batch | seq | params dense | params pruned | dense ms | pruned ms | speedup "
        "| FLOPs ratio | speedup / FLOPs ratio",
        (
            f"{kind} | {r['model']} | {r['plan']} | {r['batch']} | {r['seq_len']} | {r['params_dense'] / 1e6:.1f}M "
            f"| {r['params_pruned'] / 1e6:.1f}M | {r['dense_ms']:.1f} | {r['pruned_ms']:.1f} | {r['speedup']:.2f}x "
            f"| {r['flops_ratio']:.2f}x | {r['speedup_over_flops_ratio']:.2f}"
            for kind, r in rows
        ),
    )
    lines += [
        "",
        "Latency is the median of interleaved dense/pruned rounds in one process; FLOPs ratio counts the "
        "transformer blocks (projections, attention, FFN).",
        "",
    ]
    return lines + _render_breakdown(rows) + _render_sizes(result.get("sizes", []))


def _render_breakdown(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Where a forward's time goes: the matrix products, which shrink with width, against the other ops and the
    un-profiled remainder (Python and dispatch), which a layer pays whatever its width."""
    measured = [(kind, r) for kind, r in rows if r.get("breakdown_ms")]
    if not measured:
        return []

    def parts(split: dict[str, float]) -> tuple[float, float, float]:
        matmul, dispatch = split.get("matmul", 0.0), split["python + dispatch"]
        return matmul, sum(split.values()) - matmul - dispatch, dispatch

    cells = []
    for kind, r in measured:
        dense, pruned = (parts(r["breakdown_ms"][side]) for side in ("dense", "pruned"))
        split = " | ".join(f"{d:.1f} -> {p:.1f}" for d, p in zip(dense, pruned, strict=True))
        cells.append(f"{kind} | {r['model']} | {r['plan']} | {r['batch']} x {r['seq_len']} | {split}")
    intro = (
        "Where a forward's time goes (`--breakdown`: torch.profiler self time per op category, ms per forward; "
        "`dispatch` is the median un-profiled wall time minus the profiled ops, i.e. Python and op dispatch, and is "
        "the noisiest column since the profiler's own overhead lands in the ops):"
    )
    head = "machine | model | plan | batch x seq | matmul dense -> pruned | other ops dense -> pruned "
    return [intro, "", *table(head + "| dispatch dense -> pruned", cells), ""]


def _render_sizes(sizes: list[dict[str, Any]]) -> list[str]:
    if not sizes:
        return []
    intro = (
        "On-disk size (safetensors, float32) as a stock `save_pretrained` writes it: unstructured zeros are "
        "stored densely and do not shrink the file (`hf_prune.save_pretrained(..., sparse=True)` stores them as "
        "values + bitmask: see the deployment table):"
    )
    keys = ("dense_bytes", "structured_bytes", "unstructured_bytes")
    mib = [" | ".join([z["model"], *(f"{z[k] / 2**20:.1f} MiB" for k in keys)]) for z in sizes]
    return [intro, "", *table("model | dense | structured 50/50 | 50% unstructured", mib), ""]


def headline(result: dict[str, Any]) -> list[str]:
    """One README line per machine kind, model and plan: the speedup range over the shapes, against the FLOPs cut."""
    what = {"width": "50% heads + 50% FFN", "width+depth": "1/4 of blocks + 1/3 heads and FFN"}
    lines = []
    for kind, measured in machine_groups(result):
        for model, plan in dict.fromkeys((row["model"], row["plan"]) for row in measured):
            rows = [row for row in measured if row["model"] == model and row["plan"] == plan]
            speed, flops = sorted(r["speedup"] for r in rows), sorted(r["flops_ratio"] for r in rows)
            ratio = sorted(r["speedup_over_flops_ratio"] for r in rows)
            grid = "batch " + "/".join(str(b) for b in dict.fromkeys(r["batch"] for r in rows))
            grid += " x seq " + "/".join(str(q) for q in dict.fromkeys(r["seq_len"] for r in rows))
            lines.append(
                f"| CPU latency ({kind}), {model} {what.get(plan, plan)} ({grid}) "
                f"| {span(speed, 'x')} faster for {span(flops, 'x')} fewer FLOPs "
                f"(speedup/FLOPs {span(ratio)}) | {commands(result, rows)} |"
            )
    return lines


if __name__ == "__main__":
    main()
