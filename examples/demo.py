"""Offline demo: physically prune the real all-MiniLM-L6-v2 and show what it buys.

Removes the lowest-magnitude 50% of attention heads and 50% of FFN neurons in every layer, then prints
parameters, on-disk size, CPU latency and how close the pruned sentence embeddings stay to the dense ones on
real SST-2 sentences (no training yet: this shows the surgery, recovery comes with the PruningTrainer).

    make demo            # or: python examples/demo.py [--heads 0.5 --ffn 0.5]
"""

from __future__ import annotations

import argparse
import copy
import csv
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

import hf_prune
from hf_prune.measure import compare_latency, count_parameters, encoder_flops, saved_size_bytes
from hf_prune.recipes.offline import minilm_path
from hf_prune.scoring.criteria import magnitude_scores

REPO = Path(__file__).resolve().parents[1]


def lowest(scores: torch.Tensor, fraction: float) -> list[int]:
    k = round(fraction * scores.numel())
    return sorted(torch.argsort(scores)[:k].tolist())


def mean_pool(model, batch) -> torch.Tensor:
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=float, default=0.5, help="fraction of heads removed per layer")
    parser.add_argument("--ffn", type=float, default=0.5, help="fraction of FFN neurons removed per layer")
    parser.add_argument("--sentences", type=int, default=64, help="SST-2 dev sentences used for checks")
    args = parser.parse_args()

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    with open(REPO / "data" / "sst2" / "dev.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    sentences = [r["sentence"] for r in rows[: args.sentences]]
    batch = tokenizer(sentences, padding="max_length", truncation=True, max_length=64, return_tensors="pt")

    start = time.perf_counter()
    pruned = copy.deepcopy(dense)
    scores = magnitude_scores(pruned)
    plan = hf_prune.PruningPlan(
        heads={i: lowest(s, args.heads) for i, s in enumerate(scores.heads)},
        ffn={i: lowest(s, args.ffn) for i, s in enumerate(scores.ffn)},
    )
    plan.apply(pruned)
    prune_s = time.perf_counter() - start

    similarity = (mean_pool(dense, batch) * mean_pool(pruned, batch)).sum(-1)
    timing = compare_latency(dense, pruned, batch, repeats=12, warmup=2)
    with tempfile.TemporaryDirectory() as tmp:
        saved = hf_prune.save_pretrained(pruned, Path(tmp) / "minilm-pruned", tokenizer=tokenizer)
        reloaded = hf_prune.from_pretrained(saved, AutoModel).eval()
        with torch.inference_mode():
            exact = torch.equal(reloaded(**batch).last_hidden_state, pruned(**batch).last_hidden_state)

    flops_d, flops_p = encoder_flops(dense, 64).total, encoder_flops(pruned, 64).total
    rows_out = [
        ("parameters", f"{count_parameters(dense) / 1e6:.2f}M", f"{count_parameters(pruned) / 1e6:.2f}M"),
        ("size on disk", f"{saved_size_bytes(dense) / 2**20:.1f} MiB", f"{saved_size_bytes(pruned) / 2**20:.1f} MiB"),
        ("encoder GFLOPs / sentence (64 tok)", f"{flops_d / 1e9:.2f}", f"{flops_p / 1e9:.2f}"),
        (f"CPU latency, batch {len(sentences)} x 64", f"{timing['dense_ms']:.0f} ms", f"{timing['pruned_ms']:.0f} ms"),
    ]
    print(f"\nall-MiniLM-L6-v2: removed {args.heads:.0%} heads + {args.ffn:.0%} FFN neurons per layer (magnitude)")
    print(f"{'':38s} {'dense':>12s} {'pruned':>12s}")
    for name, d, p in rows_out:
        print(f"{name:38s} {d:>12s} {p:>12s}")
    print(f"speedup {timing['speedup']:.2f}x for a {flops_d / flops_p:.2f}x FLOPs cut; surgery took {prune_s:.2f} s")
    print(
        f"sentence-embedding cosine(dense, pruned) on {len(sentences)} SST-2 sentences: "
        f"mean {similarity.mean():.3f}, min {similarity.min():.3f} (before any recovery training)"
    )
    print(f"save -> hf_prune.from_pretrained reload bit-exact: {exact}")
    print("per-layer kept heads:", [s.heads for s in hf_prune.get_adapter(pruned).layer_shapes(pruned)])


if __name__ == "__main__":
    main()
