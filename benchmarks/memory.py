"""Peak memory of one-shot pruning, and what it projects to for a 7B Llama.

A randomly initialised Llama with the layer shape of Llama-2-7B (hidden 4096, FFN 11008, 32 heads; weights do not
change memory) is built with 2 and with 4 blocks, and each pass is run on a fresh copy with its peak memory measured:

* ``fisher``: Fisher head/neuron scores (one backward pass over the whole model per calibration batch);
* ``refit``: Fisher scores, then the 1.5x width cut with the least-squares refit (block by block);
* ``depth``: angular-distance block selection (forward passes only);
* ``obs``: 50% unstructured sparsity with the OBS weight update (block by block, SparseGPT-style).

Peak memory above the weights is fitted as ``fixed + per_block x blocks`` through the two depths and projected to
32 blocks; the weights of the 7B model are added. On a GPU the peak is ``torch.cuda.max_memory_allocated``; on a CPU
each pass runs in its own process and the peak is its resident memory (``ru_maxrss``) above what it held after
building the model.

``--shape llama3-8b`` builds Llama-3-8B's layers instead (FFN 14336, 8 key/value heads, a 128256-token vocabulary).
On a GPU the Fisher and Taylor passes recompute block activations in the backward pass (hf_prune's default there,
``hf_prune.scoring.criteria.recomputed_blocks``), so their peak no longer grows with every block's activations.

    python benchmarks/memory.py [--blocks 2 4] [--calibration 32] [--seq-len 2048] [--dtype bfloat16]
                                [--shape llama2-7b|llama3-8b] [--quick]
"""

from __future__ import annotations

import multiprocessing
import resource
import sys
import time
from typing import Any

import torch
import transformers as tf

from hf_prune import PruningConfig, prune

from common import Run, bench_parser
from results import add_run, commands, publish, section, table

SHAPE_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32}
BLOCKS_7B = 32
VOCAB_7B = 32000
#: ``--shape``: the layer shapes and vocabularies projected to (both have 32 blocks)
SHAPES = {
    "llama2-7b": (SHAPE_7B, VOCAB_7B),
    "llama3-8b": (
        {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8},
        128256,
    ),
}
PASSES = {
    "fisher": {"target_flops": 1.0, "criterion": "fisher", "scope": "global"},  # scores; a 1.0 target cuts nothing
    "refit": {"target_flops": 0.67, "criterion": "fisher", "scope": "global", "reconstruct": True},
    "depth": {"layers": 0.5, "layer_criterion": "angular"},
    "obs": {"sparsity": 0.5, "sparsity_criterion": "activation", "sparsity_scope": "row", "reconstruct": True},
}


def build(blocks: int, shape: dict[str, int], vocab: int, dtype: torch.dtype, device: str) -> torch.nn.Module:
    config = tf.LlamaConfig(vocab_size=vocab, num_hidden_layers=blocks, max_position_embeddings=4096, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        return tf.LlamaForCausalLM(config).to(dtype).eval()


def run_pass(name: str, blocks: int, args: dict[str, Any]) -> dict[str, Any]:
    """One pass on a fresh model; peak bytes above the model's weights (and, on CPU, above the process baseline)."""
    dtype = getattr(torch, args["dtype"])
    device = args["device"]
    model = build(blocks, args["shape"], args["vocab"], dtype, device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    calibration = [
        {"input_ids": torch.randint(100, args["vocab"], (args["seq_len"],), generator=g)}
        for _ in range(args["calibration"])
    ]
    config = dict(PASSES[name])
    config.update(max_samples=args["calibration"], batch_size=args["batch_size"], seq_len=args["seq_len"])
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.time()
    prune(model, PruningConfig(**config), calibration_data=calibration)
    seconds = time.time() - start
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {
        "pass": name,
        "blocks": blocks,
        "weights_bytes": weights,
        "peak_above_weights_bytes": peak,
        "seconds": seconds,
    }


def _child(queue: Any, name: str, blocks: int, args: dict[str, Any]) -> None:
    queue.put(run_pass(name, blocks, args))


def measure(name: str, blocks: int, args: dict[str, Any]) -> dict[str, Any]:
    if args["device"] == "cuda":
        row = run_pass(name, blocks, args)
        torch.cuda.empty_cache()
        return row
    # a process of its own: ru_maxrss never goes down, so a pass's peak is only visible from a fresh process.
    # Forked from a server that imported torch and transformers once (not spawned: each spawn re-imported them,
    # seconds a pass); the peak is still measured above the child's own baseline after building its model.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "hf_prune"])
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, name, blocks, args))
    proc.start()
    row = queue.get()
    proc.join()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "memory", data=False)
    parser.add_argument("--blocks", type=int, nargs=2, default=[2, 4])
    parser.add_argument("--calibration", type=int, default=32, help="calibration sequences")
    parser.add_argument("--batch-size", type=int, default=4, help="calibration batch size")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--passes", nargs="*", default=list(PASSES))
    parser.add_argument("--shape", choices=list(SHAPES), default="llama2-7b", help="the model shape projected to")
    parser.add_argument("--quick", action="store_true", help="smoke run: a narrow model, few short sequences")
    args = parser.parse_args(argv)
    run = Run("memory.py", argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape, vocab = dict(SHAPES[args.shape][0]), SHAPES[args.shape][1]
    if args.quick:
        shape = {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4, "num_key_value_heads": 4}
        vocab, args.calibration, args.seq_len, args.batch_size = 1000, 4, 128, 2
    settings = {
        "device": device,
        "dtype": args.dtype,
        "shape": shape,
        "vocab": vocab,
        "calibration": args.calibration,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
    }
    rows = []
    for name in args.passes:
        if name not in PASSES:
            parser.error(f"unknown pass {name!r}; allowed: {', '.join(PASSES)}")
        measured = [measure(name, b, settings) for b in args.blocks]
        for row in measured:
            print(row, flush=True)
        (b1, p1), (b2, p2) = ((r["blocks"], r["peak_above_weights_bytes"]) for r in measured)
        per_block = (p2 - p1) / (b2 - b1)
        fixed = p1 - per_block * b1
        rows.append(
            {
                "pass": name,
                "config": PASSES[name],
                "measured": measured,
                "fixed_bytes": fixed,
                "per_block_bytes": per_block,
                "projected_peak_above_weights_bytes_32_blocks": fixed + per_block * BLOCKS_7B,
            }
        )
    weights_7b = build_free_count(shape, vocab) * torch.finfo(getattr(torch, args.dtype)).bits // 8
    result = {
        "benchmark": "memory",
        "settings": settings,
        "weights_bytes_32_blocks": weights_7b,
        "rows": rows,
        "quick": args.quick,
    }
    add_run(result, run.record(), rows)
    publish(args.output, result)
    print(f"wrote {args.output} in {run.elapsed():.0f} s", flush=True)
    return 0


def build_free_count(shape: dict[str, int], vocab: int) -> int:
    """Parameters of the 32-block model, counted from its shapes (it is never built)."""
    h, f = shape["hidden_size"], shape["intermediate_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    block = h * h * 2 + h * kv * 2 + 3 * h * f + 2 * h
    return BLOCKS_7B * block + 2 * vocab * h + h


GIB = 1024**3


def render(result: dict[str, Any]) -> list[str]:
    """The RESULTS.md section: each pass's measured peaks, the fit and its projection to 32 blocks."""
    s, shape, weights = result["settings"], result["settings"]["shape"], result["weights_bytes_32_blocks"]
    lines = section(
        "Peak memory of one-shot pruning, projected to a 7B Llama",
        result,
        f"A random Llama with hidden {shape['hidden_size']}, FFN {shape['intermediate_size']}, "
        f"{shape['num_attention_heads']} heads ({shape['num_key_value_heads']} key/value), vocabulary {s['vocab']} "
        f"({s['dtype']}, on {s['device']}), built with "
        f"{' and '.join(str(m['blocks']) for m in result['rows'][0]['measured'])} blocks; "
        f"{s['calibration']} calibration sequences of {s['seq_len']} tokens, batch {s['batch_size']}. Peak memory "
        "above the weights is fitted as fixed + per-block through the two depths and projected to 32 blocks, where "
        f"the weights take {weights / GIB:.1f} GiB.",
    )
    rows = []
    for r in result["rows"]:
        measured = ", ".join(
            f"{m['peak_above_weights_bytes'] / GIB:.2f} GiB ({m['blocks']} blocks)" for m in r["measured"]
        )
        projected = r["projected_peak_above_weights_bytes_32_blocks"]
        rows.append(
            f"{r['pass']} | {measured} | {r['fixed_bytes'] / GIB:.2f} GiB | {r['per_block_bytes'] / GIB:.3f} GiB "
            f"| {projected / GIB:.1f} GiB | {(projected + weights) / GIB:.1f} GiB"
        )
    head = "pass | measured peak above weights | fixed | per block | projected peak above weights, 32 blocks "
    return [*lines, *table(head + "| projected total, 32 blocks", rows), ""]


def headline(result: dict[str, Any]) -> list[str]:
    s, weights = result["settings"], result["weights_bytes_32_blocks"]
    parts = ", ".join(
        f"{x['pass']} {(x['projected_peak_above_weights_bytes_32_blocks'] + weights) / GIB:.1f} GiB"
        for x in result["rows"]
    )
    return [
        f"| Peak memory per pass, Llama-2-7B shape ({s['dtype']}, {s['calibration']} x {s['seq_len']} calibration "
        f"tokens), projected from 2 and 4 blocks on {s['device']} | {parts} | {commands(result)} |"
    ]


if __name__ == "__main__":
    sys.exit(main())
