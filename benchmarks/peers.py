"""hf_prune vs peer pruning tools on the same model, data and budget, one-shot (no retraining).

Model: all-MiniLM-L6-v2 fine-tuned 1 epoch on 8,000 SST-2 sentences (cached by ``common.finetuned_minilm_sst2``);
metric: SST-2 dev accuracy (872 sentences). Budget: a 2x cut of the encoder FLOPs, i.e. half of the heads and half
of the FFN neurons of every layer (hf_prune fisher: the same FLOPs target, allocated globally). Every row starts
from a fresh copy of the fine-tuned model:

* hf_prune magnitude (layer scope) and fisher (global, 512 calibration sentences), with and without the
  least-squares refit; fisher in layer scope (Torch-Pruning's exact shapes); and ``target_latency=0.5``, which
  allocates against a latency table measured on this machine at the benchmark's batch shape instead of FLOPs
  (its FLOPs cut may differ from 2x: the row shows it);
* Torch-Pruning ``MetaPruner`` with L2 magnitude importance, whole heads + FFN neurons, hidden size untouched;
* TextPruner ``TransformerPruner`` (iterative, first-order importance on 512 sentences) to 6 heads / 768 neurons;
  with ``keep_shape=True`` as well (weights zeroed in place: TextPruner's choice, no structural change);
* ``torch.nn.utils.prune`` L1 unstructured at 50% of the encoder Linear weights, global and per layer.

Latency: one fixed random batch of 32 x 64 tokens on CPU, dense and pruned interleaved in the same process
(``hf_prune.compare_latency``). A peer that raises is recorded with its error, not dropped.

    python benchmarks/peers.py [--data-dir data] [--repeats 24] [--output benchmarks/results/peers.json]
"""

from __future__ import annotations

import copy
import importlib.metadata
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import hf_prune
from hf_prune import PruningConfig
from hf_prune.utils import random_token_ids

from common import Run, accuracy, bench_parser, finetuned_minilm_sst2, torch_pruning_step
from results import (
    add_run,
    commands,
    machine_groups,
    previous_result,
    publish,
    rows_of_other_machines,
    section,
    table,
)

N_TRAIN = 8000
CALIBRATION = 512
BATCH, SEQ_LEN = 32, 64  # latency batch; FLOPs are counted for SEQ_LEN-token sequences too
HEADS_FRACTION = FFN_FRACTION = 0.5  # removed in every layer: a 2x cut of the encoder FLOPs
SPARSITY = 0.5  # unstructured rows: the same fraction of the encoder Linear weights

PruneFn = Callable[[nn.Module, Any], dict[str, Any] | None]


@dataclass(frozen=True)
class Peer:
    """One row: ``prune(model, data)`` prunes ``model`` in place and may return extra fields for the row."""

    tool: str
    method: str
    prune: PruneFn
    catch: bool = False  # record a raised exception as the row's error (peers) instead of failing the run


# ---- measurements ------------------------------------------------------------------------------------------


def encoder_linears(model: nn.Module) -> list[nn.Linear]:
    """The Linear layers of the transformer blocks (attention q/k/v/o and FFN), embeddings/pooler/head excluded."""
    layers = hf_prune.get_adapter(model).layers(model)
    return [m for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)]


def flops_from_shapes(model: nn.Module, seq_len: int) -> int:
    """Block FLOPs counted from the BERT Linear shapes alone (an independent check of ``hf_prune.encoder_flops``)."""
    total = 0
    for layer in hf_prune.get_adapter(model).layers(model):
        linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
        total += sum(2 * seq_len * m.in_features * m.out_features for m in linears)
        total += 2 * 2 * seq_len * seq_len * layer.attention.self.query.out_features  # scores + weighted values
    return total


def weight_counts(model: nn.Module) -> tuple[int, int]:
    """(all, non-zero) weights of the encoder Linear layers."""
    weights = [m.weight.detach() for m in encoder_linears(model)]
    return sum(w.numel() for w in weights), sum(int(w.count_nonzero()) for w in weights)


def latency_inputs(vocab_size: int) -> dict[str, torch.Tensor]:
    return {
        "input_ids": random_token_ids(vocab_size, BATCH, SEQ_LEN),
        "attention_mask": torch.ones(BATCH, SEQ_LEN, dtype=torch.long),
        "token_type_ids": torch.zeros(BATCH, SEQ_LEN, dtype=torch.long),
    }


def one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


# ---- the pruning methods -----------------------------------------------------------------------------------


def dense(model: nn.Module, data: Any) -> None:
    """The fine-tuned model as is (its latency row measures dense vs an identical copy: the noise floor)."""


def hf_prune_row(**options: Any) -> PruneFn:
    """An hf_prune row: ``prune()`` with ``PruningConfig(max_samples=CALIBRATION, **options)``."""

    def run(model: nn.Module, data: Any) -> dict[str, Any]:
        config = PruningConfig(max_samples=CALIBRATION, **options)
        calibration = data["train"].select(range(CALIBRATION)) if config.needs_data else None
        report = hf_prune.prune(model, config, calibration_data=calibration)
        extra: dict[str, Any] = {"config": report.config}
        if config.keep_target == "latency":
            meta = report.plan["meta"]
            keys = ("achieved_keep", "measured_keep", "latency_searches", "latency_table")
            extra["latency_plan"] = {k: meta[k] for k in keys}
        return extra

    return run


def torch_pruning_l2(model: nn.Module, data: Any) -> dict[str, Any]:
    """Torch-Pruning MetaPruner on the BertModel: whole heads (head dims kept) + FFN neurons, L2 magnitude.

    The hidden (residual) size is protected by ignoring every Linear whose output is the residual stream
    (attention output and FFN output projections), plus the pooler; the classifier lives outside the BertModel.
    Torch-Pruning slices the weights but leaves ``BertSelfAttention``'s head attributes at their dense values,
    so they are set by hand afterwards.
    """
    from transformers.models.bert.modeling_bert import BertSelfAttention

    bert = model.bert
    hidden = model.config.hidden_size
    num_heads: dict[nn.Module, int] = {}
    ignored: list[nn.Module] = [bert.pooler]
    for layer in bert.encoder.layer:
        attention = layer.attention.self
        for proj in (attention.query, attention.key, attention.value):
            num_heads[proj] = attention.num_attention_heads
        ignored += [layer.attention.output.dense, layer.output.dense]
    example = {k: v[:2, :16] for k, v in latency_inputs(model.config.vocab_size).items()}
    pruner = torch_pruning_step(
        bert,
        example,
        ignored,
        pruning_ratio=FFN_FRACTION,
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=HEADS_FRACTION,
        output_transform=lambda out: out.pooler_output.sum(),
    )
    attrs_before = []
    for module in bert.modules():
        if isinstance(module, BertSelfAttention):
            attrs_before.append(module.num_attention_heads)
            module.num_attention_heads = pruner.num_heads[module.query]
            module.attention_head_size = module.query.out_features // module.num_attention_heads
            module.all_head_size = module.query.out_features
    residual = [bert.embeddings.word_embeddings.embedding_dim, bert.pooler.dense.in_features]
    for layer in bert.encoder.layer:
        residual += [layer.attention.output.dense.out_features, layer.output.dense.out_features]
        residual += [layer.attention.self.query.in_features, layer.intermediate.dense.in_features]
    if set(residual) != {hidden}:
        raise RuntimeError(f"Torch-Pruning changed the hidden size: {sorted(set(residual))} != {hidden}")
    return {
        "num_attention_heads_attr_before_patch": attrs_before,
        "note": "BertSelfAttention head attributes patched by hand; hidden size intact",
    }


def textpruner_taylor(keep_shape: bool) -> PruneFn:
    """TextPruner's iterative pruning (first-order importance of heads and FFN neurons) to 6 heads / 768 neurons."""

    def run(model: nn.Module, data: Any) -> dict[str, Any]:
        import textpruner

        shape = hf_prune.get_adapter(model).layer_shapes(model)[0]
        config = textpruner.TransformerPruningConfig(
            target_ffn_size=round(shape.ffn * (1 - FFN_FRACTION)),
            target_num_of_heads=round(shape.heads * (1 - HEADS_FRACTION)),
            pruning_method="iterative",
            n_iters=1,
        )
        loader = torch.utils.data.DataLoader(data["train"].select(range(CALIBRATION)), batch_size=32)
        with tempfile.TemporaryDirectory() as tmp:  # TextPruner caches importance scores in output_dir
            pruner = textpruner.TransformerPruner(
                model,
                transformer_pruning_config=config,
                general_config=textpruner.GeneralConfig(use_device="cpu", output_dir=tmp),
            )
            pruner.prune(dataloader=loader, keep_shape=keep_shape, save_model=False)
        return {"note": "weights zeroed in place (keep_shape=True): no FLOPs removed"} if keep_shape else {}

    return run


def torch_l1_global(model: nn.Module, data: Any) -> None:
    linears = encoder_linears(model)
    torch_prune.global_unstructured(
        [(m, "weight") for m in linears], pruning_method=torch_prune.L1Unstructured, amount=SPARSITY
    )
    for m in linears:
        torch_prune.remove(m, "weight")


def torch_l1_layer(model: nn.Module, data: Any) -> None:
    for m in encoder_linears(model):
        torch_prune.l1_unstructured(m, "weight", amount=SPARSITY)
        torch_prune.remove(m, "weight")


PEERS = (
    Peer("dense", "fine-tuned MiniLM, no pruning", dense),
    Peer(
        "hf_prune",
        "magnitude, layer scope, 50% heads + 50% FFN",
        hf_prune_row(heads=HEADS_FRACTION, ffn=FFN_FRACTION, criterion="magnitude", scope="layer"),
    ),
    Peer(
        "hf_prune",
        f"fisher, global, target_flops=0.5, {CALIBRATION} calibration",
        hf_prune_row(target_flops=0.5, criterion="fisher", scope="global"),
    ),
    Peer(
        "hf_prune",
        f"fisher, global, target_flops=0.5, {CALIBRATION} calibration, least-squares reconstruction",
        hf_prune_row(target_flops=0.5, criterion="fisher", scope="global", reconstruct=True),
    ),
    Peer(
        "hf_prune",
        f"fisher, layer scope, 50% heads + 50% FFN (Torch-Pruning's shapes), {CALIBRATION} calibration, "
        "least-squares reconstruction",
        hf_prune_row(heads=HEADS_FRACTION, ffn=FFN_FRACTION, criterion="fisher", scope="layer", reconstruct=True),
    ),
    Peer(
        "hf_prune",
        f"fisher, global, target_latency=0.5 (table measured at {BATCH} x {SEQ_LEN}), {CALIBRATION} calibration, "
        "least-squares reconstruction",
        # the table is measured at the benchmark's own batch shape
        hf_prune_row(
            target_latency=0.5,
            latency_batch_size=BATCH,
            seq_len=SEQ_LEN,
            criterion="fisher",
            scope="global",
            reconstruct=True,
        ),
    ),
    Peer("Torch-Pruning", "MetaPruner, L2 magnitude, 50% heads + 50% FFN per layer", torch_pruning_l2, catch=True),
    Peer(
        "TextPruner",
        f"TransformerPruner iterative, 6 heads / 768 FFN, {CALIBRATION} calibration",
        textpruner_taylor(keep_shape=False),
        catch=True,
    ),
    Peer(
        "TextPruner",
        f"same, keep_shape=True (zeroed, not removed), {CALIBRATION} calibration",
        textpruner_taylor(keep_shape=True),
        catch=True,
    ),
    Peer("torch.nn.utils.prune", "L1 unstructured, global, 50% of encoder Linear weights", torch_l1_global),
    Peer("torch.nn.utils.prune", "L1 unstructured, per layer, 50% of encoder Linear weights", torch_l1_layer),
)


def run_peer(peer: Peer, base: nn.Module, data: Any, inputs: dict[str, torch.Tensor], repeats: int) -> dict[str, Any]:
    row: dict[str, Any] = {"tool": peer.tool, "method": peer.method}
    model = copy.deepcopy(base)
    start = time.perf_counter()
    try:
        extra = peer.prune(model, data) or {}
    except Exception as error:
        if not peer.catch:
            raise
        row.update(error=one_line(error), prune_time_s=time.perf_counter() - start)
        print(f"{peer.tool:20s} {peer.method}: FAILED {row['error']}")
        return row
    elapsed = time.perf_counter() - start
    model.eval()
    dense_weights, _ = weight_counts(base)
    all_weights, nonzero = weight_counts(model)
    shapes = hf_prune.get_adapter(model).layer_shapes(model)
    flops_ratio = hf_prune.encoder_flops(base, SEQ_LEN).total / hf_prune.encoder_flops(model, SEQ_LEN).total
    timing = hf_prune.compare_latency(base, model, inputs, repeats=repeats)
    row.update(
        accuracy=accuracy(model, data["validation"]),
        params=hf_prune.count_parameters(model),
        flops_ratio=flops_ratio,
        flops_ratio_from_shapes=flops_from_shapes(base, SEQ_LEN) / flops_from_shapes(model, SEQ_LEN),
        sparsity=1 - nonzero / all_weights,
        weights_removed=1 - nonzero / dense_weights,
        hidden_size=model.bert.embeddings.word_embeddings.embedding_dim,
        heads_per_layer=[s.heads for s in shapes],
        ffn_per_layer=[s.ffn for s in shapes],
        dense_ms=timing["dense_ms"],
        pruned_ms=timing["pruned_ms"],
        speedup=timing["speedup"],
        latency_repeats=timing["repeats"],
        prune_time_s=elapsed,
        **extra,
    )
    print(
        f"{peer.tool:20s} {peer.method}: acc {row['accuracy']:.4f} FLOPs {flops_ratio:.2f}x "
        f"sparsity {row['sparsity']:.2f} speedup {row['speedup']:.2f}x ({elapsed:.1f} s)"
    )
    return row


def peer_versions(found: dict[str, str]) -> dict[str, str]:
    """``found`` plus the peers' versions, read from the installed distributions: torch_pruning.__version__ of 1.6.1
    still says 1.6.0."""
    found = dict(found)
    for dist in ("torch-pruning", "textpruner"):
        try:
            found[dist.replace("-", "_")] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist.replace("-", "_")] = "not installed"
    return found


def _note(row: dict[str, Any]) -> str:
    plan = row.get("latency_plan")
    if not plan:
        return row.get("note", "")
    table = plan["latency_table"]
    return (
        f"latency table: dense {table['dense_ms']:.0f} ms at {table['batch_size']} x {table['seq_len']}; plan "
        f"predicted at {plan['achieved_keep']:.3f} and timed at {plan['measured_keep']:.3f} of dense latency "
        f"({plan['latency_searches']} searches; profiling included in the prune time)"
    )


def render(result: dict[str, Any]) -> list[str]:
    """The RESULTS.md section: one table row per entry and machine kind, failed peers with their error."""
    lines = section(
        "Peers: hf_prune vs Torch-Pruning, TextPruner and torch.nn.utils.prune (MiniLM on SST-2, 2x FLOPs cut)",
        result,
        f"Every row prunes a fresh copy of all-MiniLM-L6-v2 fine-tuned 1 epoch on {result['n_train']} SST-2 "
        f"sentences (dense dev accuracy {result['dense_accuracy']:.2%}) one-shot, no retraining: half of the heads "
        "and half of the FFN neurons of every layer (hf_prune fisher/global: the same FLOPs target allocated "
        "across layers; fisher/layer: exactly Torch-Pruning's shapes; target_latency=0.5: half the latency measured "
        "on this machine, whatever FLOPs that takes, shown in its FLOPs column), or 50% of the encoder Linear "
        "weights for unstructured rows. Latency: one batch of "
        f"{result['latency_batch']} x {result['latency_seq_len']} tokens on CPU, dense and pruned interleaved.",
    )
    rows = []
    for kind, group in machine_groups(result):
        for r in group:
            start = f"{kind} | {r['tool']} | {r['method']}"
            if "error" in r:
                rows.append(f"{start} | failed | | | | | | | {r['prune_time_s']:.1f} s | `{r['error']}`")
                continue
            rows.append(
                f"{start} | {r['accuracy']:.2%} | {r['params'] / 1e6:.1f}M | {r['flops_ratio']:.2f}x "
                f"| {r['weights_removed']:.0%} | {r['dense_ms']:.0f} | {r['pruned_ms']:.0f} | {r['speedup']:.2f}x "
                f"| {r['prune_time_s']:.1f} s | {_note(r)}"
            )
    head = "machine | tool | method | dev accuracy | params | encoder FLOPs ratio | weights removed | dense ms "
    lines += table(head + "| pruned ms | speedup | prune time | notes", rows)
    lines += [
        "",
        "Weights removed: zero or sliced-away weights of the encoder Linear layers relative to the dense model. "
        "FLOPs ratio: dense / pruned FLOPs of the transformer blocks, read from the module shapes (unstructured "
        "zeros remove none).",
        "",
    ]
    floors = [
        f"{d['speedup']:.2f}x ({kind})"
        for kind, group in machine_groups(result)
        for d in group
        if d.get("tool") == "dense" and "speedup" in d
    ]
    if floors:
        lines += [
            f"The dense row times the model against an identical copy: its {', '.join(floors)} is the noise "
            "floor of the speedup column.",
            "",
        ]
    return lines


def _label(row: dict[str, Any]) -> str:
    """A short name for an hf_prune row, from its recorded config."""
    c = row.get("config") or {}
    target = next((f"{k}={c[k]}" for k in ("target_latency", "target_flops", "target_params") if c.get(k)), None)
    parts = [f"{c.get('criterion', '?')}/{c.get('scope', '?')}", target or f"{c.get('heads')}/{c.get('ffn')}"]
    return " ".join(parts) + (" + LS" if c.get("reconstruct") else "")


def headline(result: dict[str, Any]) -> list[str]:
    """hf_prune's most accurate row, and its most accurate row at least as fast as the fastest structured peer,
    against every structured peer (or its failure)."""
    ours = [x for x in result["rows"] if x.get("tool") == "hf_prune" and "accuracy" in x]
    others = [x for x in result["rows"] if x.get("tool") not in ("hf_prune", "dense")]
    if not ours:
        return []
    parts = []
    for x in others:
        if x.get("error"):
            failed = f"{x['tool']} failed ({x['error'].split(':')[0]})"
            if failed not in parts:  # one line per tool and error, however many of its rows failed
                parts.append(failed)
        elif x.get("flops_ratio", 1.0) > 1.5:
            parts.append(f"{x['tool']} {x['accuracy']:.1%} ({x['speedup']:.2f}x)")
    best = max(ours, key=lambda x: x["accuracy"])
    text = f"hf_prune {_label(best)} {best['accuracy']:.1%} ({best['speedup']:.2f}x)"
    peer_speed = max((x["speedup"] for x in others if x.get("flops_ratio", 1.0) > 1.5), default=None)
    fast = [x for x in ours if peer_speed is not None and x["speedup"] >= peer_speed]
    m = max(fast, key=lambda x: x["accuracy"], default=None)
    if m is not None and m is not best:
        text += (
            f"; at peer speed or faster: {_label(m)} {m['accuracy']:.1%} ({m['speedup']:.2f}x, "
            f"{m['flops_ratio']:.2f}x fewer FLOPs)"
        )
    peers = "; ".join(parts)
    return [f"| Peers at a 2x FLOPs cut, MiniLM SST-2 one-shot | {text}; {peers} | {commands(result)} |"]


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, "peers")
    parser.add_argument("--repeats", type=int, default=24, help="latency repeats per model")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    this_run = Run("peers.py", argv)
    model, _, data = finetuned_minilm_sst2(args.data_dir, n_train=N_TRAIN)
    inputs = latency_inputs(model.config.vocab_size)
    rows = [run_peer(peer, model, data, inputs, args.repeats) for peer in PEERS]
    result = {
        "benchmark": "peers",
        "n_train": N_TRAIN,
        "dense_accuracy": rows[0]["accuracy"],
        "calibration_samples": CALIBRATION,
        "latency_batch": BATCH,
        "latency_seq_len": SEQ_LEN,
        "rows": rows,
    }
    record = this_run.record()
    record["versions"] = peer_versions(record["versions"])
    previous = previous_result(args.output)
    kept = rows_of_other_machines(previous, record)  # other machines' rows stay, side by side in RESULTS.md
    result["runs"] = previous.get("runs", {})
    add_run(result, record, rows)
    result["rows"] = kept + rows
    publish(args.output, result)
    print("\n".join(render(result)))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
