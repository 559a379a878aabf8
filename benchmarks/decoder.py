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
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_prune import LayerShape, PruningConfig, PruningTrainer, encoder_flops, get_adapter, prune, prune_layers
from hf_prune.compat import float_weights
from hf_prune.measure import layer_flops
from hf_prune.recipes.offline import smollm2_path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import DEFAULT_DATA_DIR, Run, bench_args, perplexity, wikitext_ids  # noqa: E402
from results import add_run, decoder_unstructured, publish  # noqa: E402

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


def load_smollm2() -> tuple[nn.Module, Any]:
    folder, gguf = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    return float_weights(model).eval(), tokenizer


def block_flops(model: nn.Module, seq_len: int) -> float:
    return float(encoder_flops(model, seq_len).total)


# ---- baselines ---------------------------------------------------------------------------------------------
def torch_pruning_uniform(model: nn.Module, keep: float, seq_len: int) -> dict[str, Any]:
    """Torch-Pruning's MetaPruner, L2 magnitude, uniform FFN-channel ratio chosen to keep ``keep`` of the block
    FLOPs (attention whole, see the module docstring); the hidden size is untouched, as in hf_prune's cut."""
    import torch_pruning as tp

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
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=ignored,
        global_pruning=False,
        round_to=8,
        output_transform=lambda out: out.logits,
    )
    pruner.step()
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
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuts", type=float, nargs="+", default=list(CUTS))
    parser.add_argument("--recover-cuts", type=float, nargs="*", default=list(CUTS), help="cuts that get recovery")
    parser.add_argument("--steps", type=int, default=30, help="recovery steps")
    parser.add_argument("--batch", type=int, default=4, help="recovery blocks per step")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seq-len", type=int, default=256, help="block length (training, calibration, FLOPs)")
    parser.add_argument("--calibration", type=int, default=32, help="calibration blocks")
    parser.add_argument("--eval-tokens", type=int, default=32768, help="WikiText-2 test tokens (512-token windows)")
    parser.add_argument(
        "--methods", nargs="*", default=None, help="subset of the method names (given empty: none, e.g. dense only)"
    )
    parser.add_argument(
        "--dense-recovery", action="store_true", help="also give the dense model the same recovery (a 1x 'dense' row)"
    )
    parser.add_argument(
        "--unstructured", nargs="*", default=list(UNSTRUCTURED), help=f"50%% sparse models: {list(UNSTRUCTURED)}"
    )
    parser.add_argument("--skip-unstructured", action="store_true", help="the same as --unstructured with nothing")
    parser.add_argument("--quick", action="store_true", help="smoke run: one cut, few steps, few tokens")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "decoder.json")
    args = parser.parse_args(argv)
    if args.skip_unstructured:
        args.unstructured = []
    unknown = sorted(set(args.unstructured) - set(UNSTRUCTURED))
    if unknown:
        parser.error(f"unknown --unstructured {unknown}; allowed: {list(UNSTRUCTURED)}")
    if args.quick:  # every pass once, on as few tokens as exercise them (the refit is underdetermined here)
        args.cuts, args.recover_cuts, args.steps, args.batch = [1.5], [1.5], 2, 2
        args.seq_len, args.calibration, args.eval_tokens = 128, 2, 1024
        args.unstructured = ["obs"]
        # no separate width row: width+depth runs the same width cut after its depth search (which may keep every block)
        if args.methods is None:
            args.methods = ["depth", "width+depth", "Torch-Pruning uniform", "ShortGPT"]
    run = Run("decoder.py", argv)
    base, tokenizer = load_smollm2()
    test_ids = wikitext_ids(tokenizer, args.data_dir, "test", args.eval_tokens)
    train_ids = wikitext_ids(tokenizer, args.data_dir, "train")
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, train_ids.numel() - args.seq_len - 1, (args.calibration,), generator=g).tolist()
    calibration = [{"input_ids": train_ids[s : s + args.seq_len]} for s in starts]
    blocks = train_blocks(train_ids, args.seq_len, args.steps * args.batch)
    dense_flops = block_flops(base, args.seq_len)
    dense_ppl = perplexity(base, test_ids)
    print(f"dense perplexity {dense_ppl:.2f} on {test_ids.numel()} tokens", flush=True)
    common = {"criterion": "fisher", "scope": "global", "max_samples": args.calibration, "batch_size": 4}
    common["seq_len"] = args.seq_len
    methods = {
        "width": lambda keep, refit: PruningConfig(target_flops=keep, reconstruct=refit, **common),
        "depth": lambda keep, refit: PruningConfig(
            layers=round((1 - keep) * len(base.model.layers)) / len(base.model.layers),
            layer_criterion="angular",
            max_samples=args.calibration,
            batch_size=4,
            seq_len=args.seq_len,
        ),
        "width+depth": lambda keep, refit: PruningConfig(
            target_flops=keep, max_layers=0.5 * (1 - keep), layer_criterion="angular", reconstruct=refit, **common
        ),
    }
    baselines = {
        "Torch-Pruning uniform": lambda m, keep: torch_pruning_uniform(m, keep, args.seq_len),
        "ShortGPT": lambda m, keep: shortgpt(m, keep, calibration),
    }
    names = [*methods, *baselines]
    unknown = sorted(set(args.methods or []) - set(names))
    if unknown:
        parser.error(f"unknown --methods {unknown}; allowed: {names}")
    chosen = names if args.methods is None else args.methods
    rows = []
    # the trainer freezes its teacher's parameters: a copy of its own, so ``base`` stays trainable for the next copy
    teacher = copy.deepcopy(base).eval()

    def measure(model: nn.Module) -> dict[str, Any]:
        return {
            "perplexity": perplexity(model, test_ids),
            "flops_keep": block_flops(model, args.seq_len) / dense_flops,
            "params": sum(p.numel() for p in model.parameters()),
            "blocks": len(model.model.layers),
        }

    if args.dense_recovery:
        # the reference for every recovered row: the same recovery with nothing removed (its teacher is itself)
        model = copy.deepcopy(base)
        oneshot = {"perplexity": dense_ppl, "flops_keep": 1.0, "params": sum(p.numel() for p in model.parameters())}
        ref = {"cut": 1.0, "method": "dense", "oneshot": {**oneshot, "blocks": len(model.model.layers), "seconds": 0.0}}
        ref["recovery_seconds"] = round(recover(model, teacher, blocks, args), 1)
        ref["recovered"] = measure(model)
        print("dense recovered", ref["recovered"], flush=True)
        rows.append(ref)
        del model

    for cut in args.cuts:
        keep = 1 / cut
        for name in chosen:
            row: dict[str, Any] = {"cut": cut, "method": name}
            start = time.time()
            refit_options = (False, True) if name in ("width", "width+depth") else (False,)
            pruned = None
            for refit in refit_options:
                model = copy.deepcopy(base)
                if name in methods:
                    report = prune(model, methods[name](keep, refit), calibration_data=calibration)
                    info = {"removed_blocks": report.layers_removed}
                else:
                    info = baselines[name](model, keep)
                key = "refit" if refit else "oneshot"
                row[key] = {**measure(model), **info, "seconds": round(time.time() - start, 1)}
                print(cut, name, key, {k: v for k, v in row[key].items() if k != "removed_blocks"}, flush=True)
                start = time.time()
                pruned = model
            row["peak_rss_mb"] = round(peak_rss_mb())
            if cut in args.recover_cuts:
                row["recovery_seconds"] = round(recover(pruned, teacher, blocks, args), 1)
                row["recovered"] = measure(pruned)
                print(cut, name, "recovered", row["recovered"], flush=True)
            rows.append(row)
            del pruned

    unstructured = []
    for criterion in args.unstructured:
        model = copy.deepcopy(base)
        start = time.time()
        config = UNSTRUCTURED[criterion](args.calibration)
        report = prune(model, config, calibration_data=calibration)
        entry: dict[str, Any] = {"criterion": criterion, "sparsity": report.sparsity, "oneshot": measure(model)}
        entry["oneshot"]["seconds"] = round(time.time() - start, 1)
        if args.recover_cuts:
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
            entry["recovery_seconds"] = round(recover(model, teacher, blocks, args, keep_zeros), 1)
            entry["recovered"] = measure(model)
            after = zero_masks(model)
            entry["recovered_sparsity"] = sum(int(a.sum()) for a in after.values()) / sum(
                a.numel() for a in after.values()
            )
            # the masks the recovery kept are the one-shot model's zeros (checked, not assumed)
            entry["zeros_kept"] = all(bool((before[n] <= after[n]).all()) for n in before)
        unstructured.append(entry)
        print("unstructured", entry, flush=True)
        del model

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
    previous = json.loads(args.output.read_text()) if args.output.exists() else {}
    kept: list[dict[str, Any]] = []
    if all(previous.get(k) == result[k] for k in ("settings", "eval_tokens", "quick")) and same_dense(
        previous.get("dense_perplexity"), dense_ppl
    ):
        # rows of earlier runs, measured the same way and not re-measured now, stay with the run that measured them
        measured = {(r["cut"], r["method"]) for r in rows}
        kept = [r for r in previous.get("rows", []) if (r["cut"], r["method"]) not in measured]
        result["runs"] = previous.get("runs", {})
        redone = {u["criterion"] for u in unstructured}
        kept_u = [u for u in decoder_unstructured(previous) if u["criterion"] not in redone]
        result["unstructured"] = kept_u + unstructured
        result["peak_rss_mb"] = max(result["peak_rss_mb"], previous.get("peak_rss_mb", 0))
    # each run keeps the dense perplexity it measured: the top-level one is the latest run's
    run_id = add_run(result, {**run.record(), "dense_perplexity": dense_ppl})
    for row in [*rows, *unstructured]:
        row["run"] = run_id
    order = {name: i for i, name in enumerate(["dense", *names])}
    result["rows"] = sorted(kept + rows, key=lambda r: (r["cut"], order.get(r["method"], len(order))))
    publish(args.output, result)
    print(f"wrote {args.output} in {run.elapsed():.0f} s", flush=True)
    return 0


def same_dense(previous: float | None, current: float) -> bool:
    """Whether an earlier run's dense perplexity is this run's, so its rows can stand beside this run's.

    Not exact equality: the same model and evaluation read 26.149222 on an AMD EPYC and 26.149447 on an Intel
    Xeon (float32 kernels differ per CPU), and exact equality dropped every earlier run's rows from the file.
    A relative 1e-4 is ten times that difference and far below any gap between two methods' perplexities.
    """
    return previous is not None and abs(previous - current) <= 1e-4 * current


if __name__ == "__main__":
    sys.exit(main())
