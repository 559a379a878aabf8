"""Recovering a pruned decoder with LoRA instead of full fine-tuning: SmolLM2-135M at the 1.5x width cut.

The route most LLM users take to recover a pruned model is LoRA; this measures what it costs and what it recovers
against full fine-tuning on the same tokens, and checks that LoRA on a sparse model keeps its zeros.

One dense SmolLM2 is cut once with the shipped 1.5x config (``recipes/smollm2_structured.yaml``:
``PruningConfig(target_flops=0.67, criterion="fisher", scope="global", reconstruct=True)``, calibrated on WikiText-2
train windows) and saved with ``hf_prune.save_pretrained``; every variant reloads that same pruned model with
``hf_prune.from_pretrained`` and trains on the same packed WikiText-2 train blocks in the same order (``--steps`` x
``--batch`` x ``--seq-len`` tokens, AdamW with linear decay, seed 0) under ``PruningTrainer``:

* ``full``: full fine-tuning, lr 5e-5 (the recipe's);
* ``lora-r8`` / ``lora-r32``: ``hf_prune.get_peft_model`` with LoRA on q/k/v/o/gate/up/down (alpha = 2 r, no
  dropout), lr 5e-4 (``recipes/smollm2_lora.yaml``'s: adapters start at zero and take a 10x higher rate), merged
  with ``hf_prune.merge_and_unload`` before evaluation;
* ``lora-r8-distill``: ``lora-r8`` with ``PruningConfig(distill_alpha=0.5)``, the dense model as ``teacher_model``;
* ``obs50-lora-r8``: not the width cut but the dense model made 50% sparse per output row with the OBS update
  (``PruningConfig(sparsity=0.5, sparsity_scope="row", sparsity_criterion="activation", reconstruct=True)``), then
  ``lora-r8``'s recovery, merged; the fraction of exactly-zero block weights before and after must stay 0.5 on the
  same positions (asserted).

Per variant: WikiText-2 test perplexity (512-token windows), trainable parameters, wall time of ``train()``, tokens
trained on, and peak memory: each variant runs in a process of its own (ru_maxrss never goes down), whose peak
resident memory is reset after its models are loaded (``/proc/self/clear_refs``), so the training peak is read both
as a total and above what the loaded models held. The dense and the pruned-before-recovery perplexities are the
reference rows. Every run replaces the file.

    python benchmarks/lora.py [--steps 50] [--batch 4] [--seq-len 256] [--variants full lora-r8 ...] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import gc
import multiprocessing
import os
import queue as queues
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from decoder import UNSTRUCTURED, train_blocks, zero_masks
from torch import nn
from transformers import AutoModelForCausalLM

import hf_prune
from hf_prune import PruningConfig, PruningTrainer, prune
from hf_prune.compat import KEEP_MASK_ATTR
from hf_prune.evaluation import window_perplexity
from hf_prune.training.lora import is_peft_model, lora_layers

from common import Run, bench_args, bench_parser, load_smollm2, token_windows, wikitext_ids
from results import RESULTS_DIR, add_run, commands, publish, section, table

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FULL_LR, LORA_LR = 5e-5, 5e-4
# name: (starting model, LoRA rank or None for full fine-tuning, distill_alpha, what it is)
VARIANTS = {
    "full": ("width", None, 0.0, "full fine-tuning"),
    "lora-r8": ("width", 8, 0.0, "LoRA r 8"),
    "lora-r32": ("width", 32, 0.0, "LoRA r 32"),
    "lora-r8-distill": ("width", 8, 0.5, "LoRA r 8, distilling from the dense model"),
    "obs50-lora-r8": ("obs", 8, 0.0, "50% row-wise OBS sparsity, then LoRA r 8 (zeros kept)"),
}
STARTS = {"width": "1.5x width cut", "obs": "50% OBS"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser(__doc__, "lora")
    parser.add_argument("--steps", type=int, default=50, help="training steps of every variant")
    parser.add_argument("--batch", type=int, default=4, help="packed blocks per step")
    parser.add_argument("--seq-len", type=int, default=256, help="block length (training and calibration)")
    parser.add_argument("--calibration", type=int, default=64, help="calibration blocks (the recipe's 64)")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="WikiText-2 test tokens (512-token windows)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 steps of 2 short blocks, few tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.seq_len, args.calibration, args.eval_tokens = 2, 2, 128, 4, 1024
        if args.output == RESULTS_DIR / "lora.json":  # a smoke run never overwrites the committed result
            args.output = RESULTS_DIR / "quick" / "lora.json"
    return args


def width_config(args: argparse.Namespace) -> PruningConfig:
    """``recipes/smollm2_structured.yaml``'s pruning section (its distillation belongs to the recovery here)."""
    return PruningConfig(
        target_flops=0.67,
        criterion="fisher",
        scope="global",
        reconstruct=True,
        schedule="oneshot",
        batch_size=4,
        max_samples=args.calibration,
        seq_len=args.seq_len,
    )


# ---- memory of this process (Linux) ---------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset this process's peak resident memory to its current one (Linux 4.0+); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_mib() -> float:
    """Peak resident memory of this process (since the last :func:`reset_peak`), MiB."""
    hwm = _status_kib("VmHWM")
    return (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def rss_mib() -> float:
    rss = _status_kib("VmRSS")
    return (rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


# ---- one variant, in its own process ---------------------------------------------------------------------------
def zero_fraction(masks: dict[str, torch.Tensor]) -> float:
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def load(folder: Path) -> nn.Module:
    return hf_prune.from_pretrained(folder, AutoModelForCausalLM, dtype=torch.float32).eval()


def train(model: nn.Module, teacher: nn.Module | None, spec: dict[str, Any], lr: float, alpha: float) -> Any:
    """``spec``'s steps over its blocks under PruningTrainer (nothing pruned; distillation when ``alpha``).

    A LoRA student with a teacher is handed over as its base model (the transformers model holding the LoRA layers,
    trainable parameters the same): PruningTrainer refuses a ``PeftModel`` student next to a plain teacher
    (``_check_teacher``: "distillation needs the same task head"). The computation is the same either way.
    """
    student = model.get_base_model() if teacher is not None and is_peft_model(model) else model
    blocks = Dataset.from_dict({"input_ids": spec["blocks"], "labels": spec["blocks"]})
    with tempfile.TemporaryDirectory() as tmp:
        training = bench_args(
            tmp,
            max_steps=spec["steps"],
            per_device_train_batch_size=spec["batch"],
            learning_rate=lr,
            lr_scheduler_type="linear",
            warmup_steps=0,
            logging_steps=max(1, spec["steps"] // 5),
        )
        torch.manual_seed(0)
        trainer = PruningTrainer(
            model=student,
            args=training,
            train_dataset=blocks,
            pruning_config=PruningConfig(distill_alpha=alpha),
            teacher_model=teacher,
        )
        trainer.train()
    return trainer


def run_variant(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Load the variant's starting model (and teacher), train it, merge LoRA, measure: the variant's row."""
    start, rank, alpha, _ = VARIANTS[name]
    test_ids = torch.tensor(spec["test_ids"])
    model = load(spec["folders"][start])
    row: dict[str, Any] = {"variant": name, "start": start, "rank": rank, "distill_alpha": alpha}
    zeros_before = zero_masks(model)
    teacher = load(spec["folders"]["dense"]) if alpha else None
    if rank is not None:
        model = hf_prune.get_peft_model(model, {"r": rank, "alpha": 2 * rank, "target_modules": TARGETS})
        row["masked_lora_layers"] = sum(hasattr(m, KEEP_MASK_ATTR) for m in lora_layers(model).values())
    row["learning_rate"] = FULL_LR if rank is None else LORA_LR
    row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gc.collect()
    row["peak_reset"] = reset_peak()
    row["loaded_rss_mb"] = rss_mib()
    began, load_before = time.time(), os.getloadavg()[0]
    trainer = train(model, teacher, spec, row["learning_rate"], alpha)
    row["train_seconds"] = time.time() - began
    # 1-minute load average before and after training: above the torch threads, other work shared the cores
    row["load_average"] = [load_before, os.getloadavg()[0]]
    row["student_passed_as_base_model"] = teacher is not None and rank is not None  # see train()
    row["peak_rss_mb"] = peak_mib()
    row["peak_above_loaded_mb"] = row["peak_rss_mb"] - row["loaded_rss_mb"]
    row["tokens"] = trainer.state.global_step * spec["batch"] * len(spec["blocks"][0])
    row["train_loss"] = trainer.state.log_history[-1].get("train_loss")
    model.eval()
    if rank is not None:
        probe = test_ids[: len(spec["blocks"][0])].unsqueeze(0)
        with torch.inference_mode():
            trained = model(input_ids=probe).logits
        model = hf_prune.merge_and_unload(model)
        with torch.inference_mode():  # the merged model is the one trained (the masked delta, merged)
            row["merge_max_logit_diff"] = float((model(input_ids=probe).logits - trained).abs().max())
    row["perplexity"] = window_perplexity(model, test_ids)
    row["params"] = hf_prune.count_parameters(model)
    if start == "obs":
        zeros_after = zero_masks(model)
        row["zero_fraction_before"], row["zero_fraction_after"] = map(zero_fraction, (zeros_before, zeros_after))
        row["same_zeros"] = all(bool(torch.equal(zeros_before[n], zeros_after[n])) for n in zeros_before)
        assert abs(row["zero_fraction_before"] - 0.5) < 1e-3, row["zero_fraction_before"]
        assert row["same_zeros"] and row["zero_fraction_after"] == row["zero_fraction_before"], row
    return row


def _child(out: Any, name: str, spec: dict[str, Any]) -> None:
    out.put(run_variant(name, spec))


def measure(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`run_variant` in a fresh process (forked from a server that imported torch, transformers, peft and
    hf_prune once, as in memory.py), so its peak memory is its own."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "peft", "datasets", "hf_prune"])
    out = ctx.Queue()
    proc = ctx.Process(target=_child, args=(out, name, spec))
    proc.start()
    while True:
        try:
            row = out.get(timeout=10)
            break
        except queues.Empty:
            if not proc.is_alive():
                raise RuntimeError(
                    f"variant {name} failed (exit code {proc.exitcode}); its traceback is above"
                ) from None
    proc.join()
    return row


# ---- the shared start: dense model, pruned models, data -------------------------------------------------------
def prepare(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Cut the dense model once (and sparsify it once, for the OBS variant), save every starting model under
    ``work``; returns the spec the variants share and the reference rows (dense, pruned before recovery)."""
    dense, tokenizer = load_smollm2()
    test_ids = wikitext_ids(tokenizer, args.data_dir, "test", args.eval_tokens)
    train_ids = wikitext_ids(tokenizer, args.data_dir, "train")
    calibration = token_windows(train_ids, args.seq_len, args.calibration)
    blocks = train_blocks(train_ids, args.seq_len, args.steps * args.batch)["input_ids"]
    refs = [{"variant": "dense", "start": "dense", "perplexity": window_perplexity(dense, test_ids)}]
    refs[0]["params"] = hf_prune.count_parameters(dense)
    folders = {"dense": work / "dense"}
    hf_prune.save_pretrained(dense, folders["dense"])
    starts = {"width": width_config(args), "obs": UNSTRUCTURED["obs"](args.calibration)}
    needed = {VARIANTS[v][0] for v in args.variants}
    for start, config in starts.items():
        if start not in needed:
            continue
        model, began = copy.deepcopy(dense), time.time()
        report = prune(model, config, calibration_data=calibration)
        row = {"variant": f"{STARTS[start]}, before recovery", "start": start, "prune_seconds": time.time() - began}
        row.update(perplexity=window_perplexity(model, test_ids), params=hf_prune.count_parameters(model))
        if start == "obs":
            row["sparsity"] = report.sparsity
        refs.append(row)
        folders[start] = work / start
        hf_prune.save_pretrained(model, folders[start])
        print(row, flush=True)
        del model
    spec = {"folders": folders, "test_ids": test_ids.tolist(), "blocks": blocks}
    spec.update(steps=args.steps, batch=args.batch)
    print(f"dense perplexity {refs[0]['perplexity']:.2f} on {test_ids.numel()} tokens", flush=True)
    return spec, refs


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "width_config": width_config(args).to_dict(),
        "obs_config": UNSTRUCTURED["obs"](args.calibration).to_dict(),
        "calibration_blocks": args.calibration,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "batch": args.batch,
        "tokens": args.steps * args.batch * args.seq_len,
        "full_lr": FULL_LR,
        "lora_lr": LORA_LR,
        "lora_targets": TARGETS,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run("lora.py", argv)
    with tempfile.TemporaryDirectory(prefix="hf_prune_lora_") as tmp:
        spec, refs = prepare(args, Path(tmp))
        rows = []
        for name in args.variants:
            row = measure(name, spec)
            # the starting model's perplexity, measured once before it was saved
            row["perplexity_before"] = next(r["perplexity"] for r in refs[1:] if r["start"] == row["start"])
            print(row, flush=True)
            rows.append(row)
    result = {
        "benchmark": "lora",
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)",
        "eval_tokens": len(spec["test_ids"]),
        "settings": settings_of(args),
        "rows": [*refs, *rows],
        "quick": args.quick,
    }
    add_run(result, run.record(), result["rows"])
    publish(args.output, result)
    print("\n".join(render(result)))
    print(f"wrote {args.output} in {run.elapsed():.0f} s", flush=True)
    return 0


# ---- RESULTS.md and README ----------------------------------------------------------------------------------
def _intro(result: dict[str, Any]) -> str:
    s = result["settings"]
    return (
        f"SmolLM2-135M (float32), WikiText-2 test perplexity over {result['eval_tokens']:,} tokens (512-token "
        "windows). Every trained row starts from the same saved model: the 1.5x width cut "
        "(`PruningConfig(target_flops=0.67, criterion='fisher', scope='global', reconstruct=True)`, "
        f"{s['calibration_blocks']} calibration blocks of {s['seq_len']} train tokens) or, for `obs50-lora-r8`, the "
        "dense model 50% sparse per output row with the OBS update; and trains on the same "
        f"{s['tokens']:,} WikiText-2 train tokens ({s['steps']} steps x {s['batch']} packed blocks of "
        f"{s['seq_len']}, same order) under PruningTrainer, AdamW with linear decay: full fine-tuning at lr "
        f"{_lr(s['full_lr'])} (the recipe's), LoRA (alpha 2r, on {', '.join(s['lora_targets'])}) at lr "
        f"{_lr(s['lora_lr'])}, merged with `hf_prune.merge_and_unload` before evaluation; `-distill`: loss 0.5 x "
        "cross-entropy + 0.5 x token-level KL to the dense model. Each variant runs in its own process; peak = its "
        "peak resident memory during `train()` (reset after loading), and above what the loaded models (with the "
        "teacher, where there is one) held. `masked LoRA layers`: layers whose delta hf_prune multiplies by the "
        "keep-mask of their sparse base weight. `load average`: the machine's 1-minute load "
        f"before and after training; above {s['threads']} (the torch threads) other work shared the cores."
    ) + (
        " The LoRA student of a `-distill` row is handed to PruningTrainer as its peft base model (the same "
        "computation): PruningTrainer refuses a `PeftModel` student beside a plain teacher."
        if any(r.get("student_passed_as_base_model") for r in result["rows"])
        else ""
    )


def _mb(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f} MiB"


def _load(row: dict[str, Any]) -> str:
    """The 1-minute load average before -> after training (above the torch threads: the cores were shared)."""
    return " -> ".join(f"{x:.1f}" for x in row["load_average"]) if "load_average" in row else ""


def _lr(value: float) -> str:
    return f"{value:g}".replace("e-0", "e-")


def render(result: dict[str, Any]) -> list[str]:
    """The RESULTS.md section: reference rows, then every recovery variant; the OBS variant's zeros below."""
    lines = section("LoRA vs full fine-tuning: recovering SmolLM2-135M at the 1.5x width cut", result, _intro(result))
    cells = []
    for r in result["rows"]:
        trained = "train_seconds" in r
        before = f"{r['perplexity_before']:.2f}" if trained else ""
        masked = str(r.get("masked_lora_layers", "")) if trained else ""
        cells.append(
            f"{r['variant']} | {STARTS.get(r['start'], r['start'])} | {r['perplexity']:.2f} | {before} "
            f"| {r['params'] / 1e6:.1f}M | {r['trainable_params'] / 1e6:.2f}M | {masked} "
            f"| {r['train_seconds']:.0f} s | {r['tokens']:,} | {_mb(r['peak_rss_mb'])} "
            f"| {_mb(r['peak_above_loaded_mb'])} | {_load(r)}"
            if trained
            else f"{r['variant']} | {STARTS.get(r['start'], r['start'])} | {r['perplexity']:.2f} | | "
            f"{r['params'] / 1e6:.1f}M | | | | | | |"
        )
    head = "variant | starts from | perplexity | before recovery | params | trainable | masked LoRA layers "
    lines += table(head + "| train time | tokens | peak memory | peak above loaded | load average", cells)
    for r in result["rows"]:
        if "zero_fraction_after" in r:
            lines += [
                "",
                f"`{r['variant']}`: {r['zero_fraction_before']:.2%} of the block weights exactly zero before the "
                f"recovery, {r['zero_fraction_after']:.2%} after the LoRA merge, "
                f"{'on the same positions' if r['same_zeros'] else 'NOT on the same positions'}.",
            ]
    return [*lines, ""]


def headline(result: dict[str, Any]) -> list[str]:
    """Perplexity after the same recovery, full fine-tuning against LoRA, with trainable parameters and peak
    memory; the OBS model's zeros through LoRA."""
    rows = {r["variant"]: r for r in result["rows"] if "train_seconds" in r}
    start = next((r for r in result["rows"] if r["start"] == "width" and "train_seconds" not in r), None)
    if not rows or start is None:
        return []
    parts = "; ".join(
        f"{name} {r['perplexity']:.1f} ({r['trainable_params'] / 1e6:.1f}M trainable, "
        f"peak {r['peak_rss_mb'] / 1024:.1f} GiB, {r['train_seconds']:.0f} s)"
        for name, r in rows.items()
        if r["start"] == "width"
    )
    obs = next((r for r in rows.values() if "zero_fraction_after" in r), None)
    if obs is not None:
        parts += (
            f"; 50% OBS + LoRA r 8 {obs['perplexity_before']:.1f} -> {obs['perplexity']:.1f}, "
            f"{obs['zero_fraction_after']:.1%} zeros after the merge"
        )
    return [
        f"| SmolLM2-135M WikiText-2, 1.5x width cut recovered on {result['settings']['tokens']:,} tokens: full "
        f"fine-tuning vs LoRA (perplexity, one-shot {start['perplexity']:.1f}) | {parts} | {commands(result)} |"
    ]


if __name__ == "__main__":
    sys.exit(main())
