"""A decoder LM pruned and recovered: SmolLM2-135M on WikiText-2 at 1.25x / 1.5x / 2x block-FLOPs cuts.

For each cut, perplexity on the WikiText-2 test split one-shot, with hf_prune's least-squares refit, and after the
same recovery (a fixed token budget of packed WikiText-2 train blocks, token-level distillation from the dense
model), for:

* ``width``: hf_prune, Fisher scores across layers, query heads inside the GQA groups and FFN neurons;
* ``depth``: hf_prune, whole blocks by angular distance (Gromov et al.: the consecutive run that changes the
  hidden states least);
* ``width+depth``: hf_prune, the allocator chooses how many blocks go (``max_layers``, angular) and fills the rest
  of the target with heads and neurons;
* baselines with the same budget and the same recovery: Torch-Pruning's uniform width pruning (``MetaPruner``, L2
  magnitude, the same fraction of FFN channels in every layer; its head pruning removes whole key/value groups,
  a third of the attention at a time on this model, so attention is left whole), and ShortGPT block dropping
  (Block Influence ``1 - cos(h_in, h_out)`` per block on the calibration tokens, lowest first), implemented here
  from the paper so that it shares nothing with hf_prune's depth criteria;
* ``dense`` (with ``--dense-recovery``): the unpruned model given the same recovery, the reference every recovered
  perplexity should be read against: the recovery trains on WikiText-2 train, which the dense model never saw, so a
  recovered model can end below the dense model's own perplexity and still have lost much;
* 50% unstructured models, one-shot and recovered with their zeros kept as masks: ``magnitude`` (per matrix) and
  ``obs`` (activation-aware per output row with the OBS weight update, SparseGPT-style: the best one-shot model,
  which the recovery starts from; the trainer's row-wise magnitude masks at step 0 are exactly its zeros).

    python benchmarks/decoder.py [--cuts 1.25 1.5 2] [--recover-cuts 1.25 1.5 2] [--steps 30] [--unstructured obs]
                                 [--dense-recovery] [--quick]
    python benchmarks/decoder.py --cuts 1.5 --methods --skip-unstructured --dense-recovery   # the dense row only

The recovery budget (steps x batch x block tokens) and every setting are stored with the results.
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hf_prune import LayerShape, PruningConfig, PruningTrainer, encoder_flops, get_adapter, prune, prune_layers
from hf_prune.evaluation import window_perplexity
from hf_prune.measure import layer_flops

from common import Run, bench_args, bench_parser, load_smollm2, token_windows, torch_pruning_step, wikitext_ids
from results import add_run, commands, previous_result, publish, run_ids, section, table

CUTS = (1.25, 1.5, 2.0)
UNSTRUCTURED = {  # 50% sparse one-shot models, by name; the argument is the number of calibration blocks
    "magnitude": lambda n: PruningConfig(sparsity=0.5, sparsity_scope="layer", sparsity_criterion="magnitude"),
    "obs": lambda n: PruningConfig(
        sparsity=0.5,
        sparsity_scope="row",
        sparsity_criterion="activation",
        reconstruct=True,
        max_samples=n,
        batch_size=4,
    ),
}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def block_flops(model: nn.Module, seq_len: int) -> float:
    return float(encoder_flops(model, seq_len).total)


# ---- baselines ---------------------------------------------------------------------------------------------
def torch_pruning_uniform(model: nn.Module, keep: float, seq_len: int) -> dict[str, Any]:
    """Torch-Pruning's MetaPruner, L2 magnitude, uniform FFN-channel ratio chosen to keep ``keep`` of the block
    FLOPs (attention whole, see the module docstring); the hidden size is untouched, as in hf_prune's cut."""
    adapter = get_adapter(model)
    shape = adapter.layer_shapes(model)[0]
    hidden, head_dim, mats = adapter.hidden_size(model.config), adapter.head_dim(model.config), adapter.ffn_in_mats
    attention = layer_flops(LayerShape(shape.heads, shape.kv_heads, 0), hidden, head_dim, mats, seq_len)
    ffn = layer_flops(LayerShape(shape.heads, shape.kv_heads, shape.ffn), hidden, head_dim, mats, seq_len) - attention
    ratio = (1 - keep) * (attention + ffn) / ffn
    if not 0 < ratio < 1:
        raise ValueError(f"keep={keep} needs an FFN ratio of {ratio:.3f}: out of Torch-Pruning's range")
    # roots only at the FFN's inner channels: every Linear writing the residual stream (o_proj, down_proj) and the
    # attention projections are ignored, so the hidden size and the heads stay whole
    ignored = [model.lm_head, model.model.embed_tokens]
    for block in model.model.layers:
        attn = block.self_attn
        ignored += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, block.mlp.down_proj]
    example = torch.randint(100, 1000, (1, 16))
    torch_pruning_step(
        model, example, ignored, pruning_ratio=ratio, round_to=8, output_transform=lambda out: out.logits
    )
    if model.model.embed_tokens.weight.shape[1] != hidden:
        raise RuntimeError("Torch-Pruning changed the hidden size")
    widths = sorted({block.mlp.gate_proj.out_features for block in model.model.layers})
    if len(widths) == 1:  # uniform, as asked: the stock config describes the model
        model.config.intermediate_size = widths[0]
    return {"ffn_ratio": ratio, "ffn_widths": widths}


def block_influence(model: nn.Module, calibration: list[dict[str, torch.Tensor]]) -> list[float]:
    """ShortGPT's Block Influence of every block: ``1 - cos(h_i, h_{i+1})`` averaged over all tokens."""
    total, count = None, 0
    with torch.inference_mode():
        for batch in calibration:
            hidden = model(input_ids=batch["input_ids"].unsqueeze(0), output_hidden_states=True).hidden_states
            # hidden_states[i] is block i's input; the last entry is the final block's output after the final norm,
            # which ShortGPT's reference code compares against too (cosine is scale-free, the norm is not)
            cos = nn.functional.cosine_similarity(torch.stack(hidden[:-1]).float(), torch.stack(hidden[1:]).float(), -1)
            cos = cos.flatten(1)  # [blocks, tokens]
            total = (1 - cos).sum(1) if total is None else total + (1 - cos).sum(1)
            count += cos.shape[1]
    return (total / count).tolist()


def shortgpt(model: nn.Module, keep: float, calibration: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    n = len(model.model.layers)
    n_remove = round((1 - keep) * n)
    influence = block_influence(model, calibration)
    remove = sorted(sorted(range(n), key=lambda i: influence[i])[:n_remove])
    prune_layers(model, remove)
    return {"removed_blocks": remove}


# ---- recovery ----------------------------------------------------------------------------------------------
def recover(
    model: nn.Module, teacher: nn.Module, blocks: Any, args: argparse.Namespace, config: PruningConfig | None = None
) -> float:
    """The same recovery for every model: ``args.steps`` steps of ``args.batch`` packed blocks, AdamW at
    ``args.lr`` with linear decay, loss = 0.5 x next-token cross-entropy + 0.5 x token-level KL to the dense model."""
    config = config or PruningConfig(distill_alpha=0.5)
    with tempfile.TemporaryDirectory() as tmp:
        training = bench_args(
            tmp,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch,
            learning_rate=args.lr,
            lr_scheduler_type="linear",
            warmup_steps=0,
            logging_steps=max(1, args.steps // 5),
        )
        torch.manual_seed(0)
        start = time.time()
        PruningTrainer(
            model=model, args=training, train_dataset=blocks, pruning_config=config, teacher_model=teacher
        ).train()
    model.eval()
    return time.time() - start


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Where every block Linear's weight is zero."""
    return {n: m.weight == 0 for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)}


def train_blocks(train_ids: torch.Tensor, seq_len: int, n: int) -> Any:
    from datasets import Dataset

    usable = train_ids[: (train_ids.numel() // seq_len) * seq_len].view(-1, seq_len)
    order = torch.randperm(usable.shape[0], generator=torch.Generator().manual_seed(1))[:n]
    blocks = usable[order].tolist()
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


# ---- main --------------------------------------------------------------------------------------------------
OURS = ("width", "depth", "width+depth")
METHODS = (*OURS, "Torch-Pruning uniform", "ShortGPT")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser(__doc__, "decoder")
    parser.add_argument("--cuts", type=float, nargs="+", default=list(CUTS))
    parser.add_argument("--recover-cuts", type=float, nargs="*", default=list(CUTS), help="cuts that get recovery")
    parser.add_argument("--steps", type=int, default=30, help="recovery steps")
    parser.add_argument("--batch", type=int, default=4, help="recovery blocks per step")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seq-len", type=int, default=256, help="block length (training, calibration, FLOPs)")
    parser.add_argument("--calibration", type=int, default=32, help="calibration blocks")
    parser.add_argument("--eval-tokens", type=int, default=32768, help="WikiText-2 test tokens (512-token windows)")
    parser.add_argument(
        "--methods", nargs="*", default=None, help=f"subset of {list(METHODS)} (given empty: none, e.g. dense only)"
    )
    parser.add_argument(
        "--dense-recovery", action="store_true", help="also give the dense model the same recovery (a 1x 'dense' row)"
    )
    parser.add_argument(
        "--unstructured", nargs="*", default=list(UNSTRUCTURED), help=f"50%% sparse models: {list(UNSTRUCTURED)}"
    )
    parser.add_argument("--skip-unstructured", action="store_true", help="the same as --unstructured with nothing")
    parser.add_argument("--quick", action="store_true", help="smoke run: one cut, few steps, few tokens")
    args = parser.parse_args(argv)
    if args.skip_unstructured:
        args.unstructured = []
    for option, allowed in (("unstructured", UNSTRUCTURED), ("methods", METHODS)):
        unknown = sorted(set(getattr(args, option) or []) - set(allowed))
        if unknown:
            parser.error(f"unknown --{option} {unknown}; allowed: {list(allowed)}")
    if args.quick:  # every pass once, on as few tokens as exercise them (the refit is underdetermined here)
        args.cuts, args.recover_cuts, args.steps, args.batch = [1.5], [1.5], 2, 2
        args.seq_len, args.calibration, args.eval_tokens = 128, 2, 1024
        args.unstructured = ["obs"]
        # no separate width row: width+depth runs the same width cut after its depth search (which may keep every block)
        if args.methods is None:
            args.methods = ["depth", "width+depth", "Torch-Pruning uniform", "ShortGPT"]
    return args


@dataclass
class Setup:
    """What every row shares: the dense model (and its frozen copy, the distillation teacher), the test tokens, the
    calibration windows, the recovery blocks and the dense block FLOPs."""

    args: argparse.Namespace
    base: nn.Module
    teacher: nn.Module
    test_ids: torch.Tensor
    calibration: list[dict[str, torch.Tensor]]
    blocks: Any
    dense_flops: float

    def measure(self, model: nn.Module) -> dict[str, Any]:
        return {
            "perplexity": window_perplexity(model, self.test_ids),
            "flops_keep": block_flops(model, self.args.seq_len) / self.dense_flops,
            "params": sum(p.numel() for p in model.parameters()),
            "blocks": len(model.model.layers),
        }

    def recover(self, model: nn.Module, config: PruningConfig | None = None) -> float:
        return round(recover(model, self.teacher, self.blocks, self.args, config), 1)


def hf_prune_config(name: str, keep: float, refit: bool, setup: Setup) -> PruningConfig:
    """hf_prune's config for ``name`` (one of ``OURS``) at ``keep`` of the block FLOPs."""
    args, n = setup.args, len(setup.base.model.layers)
    common = {"max_samples": args.calibration, "batch_size": 4, "seq_len": args.seq_len}
    if name == "depth":
        return PruningConfig(layers=round((1 - keep) * n) / n, layer_criterion="angular", **common)
    common.update(criterion="fisher", scope="global", reconstruct=refit)
    if name == "width":
        return PruningConfig(target_flops=keep, **common)
    return PruningConfig(target_flops=keep, max_layers=0.5 * (1 - keep), layer_criterion="angular", **common)


def dense_row(setup: Setup, dense_ppl: float) -> dict[str, Any]:
    """The reference for every recovered row: the same recovery with nothing removed (its teacher is itself)."""
    model = copy.deepcopy(setup.base)
    oneshot = {"perplexity": dense_ppl, "flops_keep": 1.0, "params": sum(p.numel() for p in model.parameters())}
    row = {"cut": 1.0, "method": "dense", "oneshot": {**oneshot, "blocks": len(model.model.layers), "seconds": 0.0}}
    row["recovery_seconds"] = setup.recover(model)
    row["recovered"] = setup.measure(model)
    print("dense recovered", row["recovered"], flush=True)
    return row


def method_row(setup: Setup, cut: float, name: str) -> dict[str, Any]:
    """``name`` at ``cut``: one-shot, with the refit where the method has one, and recovered (from the refit model
    where there is one) when ``cut`` is among ``--recover-cuts``."""
    row: dict[str, Any] = {"cut": cut, "method": name}
    start = time.time()
    for refit in (False, True) if name in ("width", "width+depth") else (False,):
        model = copy.deepcopy(setup.base)
        if name in OURS:
            report = prune(model, hf_prune_config(name, 1 / cut, refit, setup), calibration_data=setup.calibration)
            info = {"removed_blocks": report.layers_removed}
        elif name == "ShortGPT":
            info = shortgpt(model, 1 / cut, setup.calibration)
        else:
            info = torch_pruning_uniform(model, 1 / cut, setup.args.seq_len)
        key = "refit" if refit else "oneshot"
        row[key] = {**setup.measure(model), **info, "seconds": round(time.time() - start, 1)}
        print(cut, name, key, {k: v for k, v in row[key].items() if k != "removed_blocks"}, flush=True)
        start = time.time()
    row["peak_rss_mb"] = round(peak_rss_mb())
    if cut in setup.args.recover_cuts:
        row["recovery_seconds"] = setup.recover(model)
        row["recovered"] = setup.measure(model)
        print(cut, name, "recovered", row["recovered"], flush=True)
    return row


def unstructured_entry(setup: Setup, criterion: str) -> dict[str, Any]:
    """A 50% sparse model one-shot and, with any recovery asked for, recovered with its zeros kept as masks."""
    model = copy.deepcopy(setup.base)
    start = time.time()
    config = UNSTRUCTURED[criterion](setup.args.calibration)
    report = prune(model, config, calibration_data=setup.calibration)
    entry: dict[str, Any] = {"criterion": criterion, "sparsity": report.sparsity, "oneshot": setup.measure(model)}
    entry["oneshot"]["seconds"] = round(time.time() - start, 1)
    if setup.args.recover_cuts:
        # recovery starts from the one-shot model; the trainer's magnitude masks at step 0, in the same scope,
        # select exactly its zeros (half of each matrix or row is zero, and zeros are the smallest magnitudes)
        keep_zeros = PruningConfig(
            sparsity=0.5,
            sparsity_scope=config.sparsity_scope,
            sparsity_criterion="magnitude",
            start_step=0,
            distill_alpha=0.5,
        )
        before = zero_masks(model)
        entry["recovery_seconds"] = setup.recover(model, keep_zeros)
        entry["recovered"] = setup.measure(model)
        after = zero_masks(model)
        entry["recovered_sparsity"] = sum(int(a.sum()) for a in after.values()) / sum(a.numel() for a in after.values())
        # the masks the recovery kept are the one-shot model's zeros (checked, not assumed)
        entry["zeros_kept"] = all(bool((before[n] <= after[n]).all()) for n in before)
    print("unstructured", entry, flush=True)
    return entry


def keep_previous(result: dict[str, Any], previous: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of an earlier run measured the same way (settings, tokens, dense perplexity) and not re-measured now:
    they stay, with the run that measured them. Returns the kept method rows; merges the unstructured entries."""
    same = all(previous.get(k) == result[k] for k in ("settings", "eval_tokens", "quick"))
    if not same or not same_dense(previous.get("dense_perplexity"), result["dense_perplexity"]):
        return []
    measured = {(r["cut"], r["method"]) for r in result["rows"]}
    result["runs"] = previous.get("runs", {})
    redone = {u["criterion"] for u in result["unstructured"]}
    kept_u = [u for u in previous.get("unstructured", []) if u["criterion"] not in redone]
    result["unstructured"] = kept_u + result["unstructured"]
    result["peak_rss_mb"] = max(result["peak_rss_mb"], previous.get("peak_rss_mb", 0))
    return [r for r in previous.get("rows", []) if (r["cut"], r["method"]) not in measured]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run("decoder.py", argv)
    base, tokenizer = load_smollm2()
    test_ids = wikitext_ids(tokenizer, args.data_dir, "test", args.eval_tokens)
    train_ids = wikitext_ids(tokenizer, args.data_dir, "train")
    calibration = token_windows(train_ids, args.seq_len, args.calibration)
    blocks = train_blocks(train_ids, args.seq_len, args.steps * args.batch)
    dense_flops = block_flops(base, args.seq_len)
    dense_ppl = window_perplexity(base, test_ids)
    print(f"dense perplexity {dense_ppl:.2f} on {test_ids.numel()} tokens", flush=True)
    # the trainer freezes its teacher's parameters: a copy of its own, so ``base`` stays trainable for the next copy
    setup = Setup(args, base, copy.deepcopy(base).eval(), test_ids, calibration, blocks, dense_flops)
    rows = [dense_row(setup, dense_ppl)] if args.dense_recovery else []
    chosen = METHODS if args.methods is None else args.methods
    rows += [method_row(setup, cut, name) for cut in args.cuts for name in chosen]
    unstructured = [unstructured_entry(setup, criterion) for criterion in args.unstructured]
    settings = {
        "seq_len": args.seq_len,
        "calibration_blocks": args.calibration,
        "recovery_steps": args.steps,
        "recovery_batch": args.batch,
        "recovery_tokens": args.steps * args.batch * args.seq_len,
        "learning_rate": args.lr,
        "distill_alpha": 0.5,
    }
    result = {
        "benchmark": "decoder",
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)",
        "dense_perplexity": dense_ppl,
        "eval_tokens": int(test_ids.numel()),
        "settings": settings,
        "rows": rows,
        "unstructured": unstructured,
        "peak_rss_mb": round(peak_rss_mb()),
        "quick": args.quick,
    }
    kept = keep_previous(result, previous_result(args.output))
    # each run keeps the dense perplexity it measured: the top-level one is the latest run's
    add_run(result, {**run.record(), "dense_perplexity": dense_ppl}, [*rows, *unstructured])
    order = {name: i for i, name in enumerate(["dense", *METHODS])}
    result["rows"] = sorted(kept + rows, key=lambda r: (r["cut"], order.get(r["method"], len(order))))
    publish(args.output, result)
    print(f"wrote {args.output} in {run.elapsed():.0f} s", flush=True)
    return 0


def same_dense(previous: float | None, current: float) -> bool:
    """Whether an earlier run's dense perplexity is this run's, so its rows can stand beside this run's.

    Not exact equality: float32 kernels differ per CPU, so the same model and evaluation read slightly different
    perplexities on two machines, and exact equality would drop every earlier run's rows from the file. A relative
    1e-4 is well above that rounding and far below any gap between two methods' perplexities.
    """
    return previous is not None and abs(previous - current) <= 1e-4 * current


# ---- RESULTS.md and README ----------------------------------------------------------------------------------
def _intro(result: dict[str, Any]) -> str:
    s = result["settings"]
    text = (
        f"WikiText-2 test perplexity over {result['eval_tokens']} tokens (512-token windows); dense "
        f"{result['dense_perplexity']:.2f}. Cuts are of the transformer blocks' FLOPs at {s['seq_len']} tokens; "
        f"{s['calibration_blocks']} calibration blocks of {s['seq_len']} WikiText-2 train tokens. `refit` adds "
        "hf_prune's least-squares refit of the shrunk output projections (block by block). Recovery, the same for "
        f"every row: {s['recovery_steps']} steps x {s['recovery_batch']} packed train blocks "
        f"({s['recovery_tokens']:,} tokens), AdamW lr {s['learning_rate']:g} with linear decay, loss "
        f"{1 - s['distill_alpha']:g} x cross-entropy + {s['distill_alpha']:g} x token-level KL to the dense model; "
        "it starts from the refit model where there is one. Baselines (see `benchmarks/decoder.py`): Torch-Pruning "
        "MetaPruner with L2 magnitude and the same FFN-channel fraction in every layer; ShortGPT's Block Influence, "
        "lowest blocks dropped."
    )
    if any(r["method"] == "dense" for r in result["rows"]):
        text += (
            " The `1x dense` row is the dense model given the same recovery: the recovery trains on WikiText-2 "
            "train, which the dense model never saw, so recovered perplexities are read against it rather than "
            "against the dense model's own."
        )
    return text


def render(result: dict[str, Any]) -> list[str]:
    """The RESULTS.md section: every cut and method one-shot, refit and recovered, then the 50% sparse models."""
    lines = section(
        "Decoder LM: SmolLM2-135M width, depth and width+depth pruning with recovery", result, _intro(result)
    )
    cells = []
    for r in result["rows"]:
        last = r.get("refit", r["oneshot"])
        refit = f"{r['refit']['perplexity']:.2f}" if "refit" in r else "n/a"
        recovered = f"{r['recovered']['perplexity']:.2f}" if "recovered" in r else ""
        seconds = r["oneshot"]["seconds"] + (r["refit"]["seconds"] if "refit" in r else 0)
        cells.append(
            f"{r['cut']:g}x | {r['method']} | {last['blocks']} | {last['flops_keep']:.3f} "
            f"| {last['params'] / 1e6:.1f}M | {r['oneshot']['perplexity']:.2f} | {refit} | {recovered} "
            f"| {'' if r['method'] == 'dense' else format(seconds, '.0f') + ' s'} "
            f"| {'' if 'recovery_seconds' not in r else format(r['recovery_seconds'], '.0f') + ' s'}"
        )
    # the run column names each row's machine (runs table above): prune and recovery times are per machine
    head = "cut | method | blocks | FLOPs kept | params | one-shot ppl | refit ppl | recovered ppl | prune time "
    lines += table(head + "| recovery time", cells, run_ids(result, result["rows"]))
    described = {
        "magnitude": "magnitude, per matrix",
        "obs": "activation-aware per output row with the OBS weight update",
    }
    for u in result.get("unstructured", []):
        rec = ""
        if "recovered" in u:
            rec = (
                f", {u['recovered']['perplexity']:.2f} after the same recovery (masks kept: "
                f"{u['recovered_sparsity']:.1%} of the block weights zero, {u['recovery_seconds']:.0f} s)"
            )
        what = described.get(u["criterion"], u["criterion"])
        lines += ["", f"50% unstructured ({what}): {u['oneshot']['perplexity']:.2f} one-shot{rec}."]
    return [*lines, "", f"Peak resident memory of the run: {result['peak_rss_mb']} MB.", ""]


def headline(result: dict[str, Any]) -> list[str]:
    """Per recovered cut: the best hf_prune method against the baselines with the same budget (and the dense
    model given the same recovery, where measured)."""
    reference = next((x for x in result["rows"] if x["method"] == "dense" and "recovered" in x), None)
    dense = f"dense {result['dense_perplexity']:.1f}"
    if reference is not None:
        dense += f"; dense with the same recovery {reference['recovered']['perplexity']:.1f}"
    lines = []
    for cut in dict.fromkeys(x["cut"] for x in result["rows"] if "recovered" in x):
        rows = [x for x in result["rows"] if x["cut"] == cut and "recovered" in x]
        ours = [x for x in rows if x["method"] in OURS]
        if not ours:
            continue
        best = min(ours, key=lambda x: x["recovered"]["perplexity"])
        start = f"{best['oneshot']['perplexity']:.1f}"
        if "refit" in best:
            start += f", with refit {best['refit']['perplexity']:.1f}"
        others = "; ".join(f"{x['method']} {x['recovered']['perplexity']:.1f}" for x in rows if x["method"] not in OURS)
        lines.append(
            f"| SmolLM2-135M WikiText-2, {cut:g}x block-FLOPs cut + recovery "
            f"({result['settings']['recovery_tokens']:,} tokens, best of {len(ours)} hf_prune methods) "
            f"| perplexity {best['method']} {best['recovered']['perplexity']:.1f} (one-shot {start}); "
            f"same budget: {others} ({dense}) | {commands(result, rows if reference is None else [*rows, reference])} |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
