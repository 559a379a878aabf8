"""Parameters, FLOPs, on-disk size and latency: one implementation shared by reports, tests and benchmarks."""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from .architectures import ArchAdapter, LayerShape, get_adapter
from .architectures.generic import block_lists
from .scoring.calibration import to_device
from .sparsity.masks import sparsity_report
from .structure.state import pruning_state
from .utils import model_device


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once): ``PreTrainedModel.num_parameters()`` for
    transformers models, the same sum over ``model.parameters()`` (which yields a shared tensor once) otherwise."""
    if isinstance(model, PreTrainedModel):
        return model.num_parameters()
    return sum(p.numel() for p in model.parameters())


def layer_flops(shape: LayerShape, hidden: int, head_dim: int, ffn_in_mats: int, seq_len: int, tokens: int = 1) -> int:
    """Multiply-add FLOPs (2 per MAC) of one transformer block for ``tokens`` tokens attending ``seq_len`` keys.

    Counts the q/k/v/o projections, attention scores and the weighted value sum, and the FFN matrices. Norms,
    activations, softmax and residual adds are ignored (they are < 2% of a block and not removed by pruning).
    """
    q, kv = shape.heads * head_dim, shape.kv_heads * head_dim
    projections = 2 * hidden * (q + 2 * kv) + 2 * q * hidden
    attention = 2 * 2 * q * seq_len
    ffn = 2 * hidden * shape.ffn * ffn_in_mats + 2 * shape.ffn * hidden
    return tokens * (projections + attention + ffn)


def layer_params(shape: LayerShape, hidden: int, head_dim: int, ffn_in_mats: int) -> int:
    """Weights of the prunable projections of one block (biases excluded)."""
    q, kv = shape.heads * head_dim, shape.kv_heads * head_dim
    return hidden * (q + 2 * kv) + q * hidden + hidden * shape.ffn * ffn_in_mats + shape.ffn * hidden


@dataclass
class FlopsReport:
    """Block FLOPs per sequence of ``seq_len`` tokens (``total``) and per layer."""

    total: int
    per_layer: list[int]
    seq_len: int


def _config_dims(adapter: ArchAdapter, model: nn.Module) -> tuple[int, int]:
    # Surgery never changes the hidden size or the head dimension, so the config's values stay valid.
    return adapter.hidden_size(model.config), adapter.head_dim(model.config)


def encoder_flops(model: nn.Module, seq_len: int = 128) -> FlopsReport:
    """FLOPs of all transformer blocks for one sequence of ``seq_len`` tokens (embeddings/heads excluded).

    These are the FLOPs structured pruning can remove; ratios of this number are what the benchmarks compare
    measured speedups against.
    """
    adapter = get_adapter(model, structural=False)
    if not adapter.structural:  # no adapter: the blocks' linear layers only (attention scores are not counted)
        per_layer = [
            sum(2 * seq_len * m.weight.numel() for m in adapter.block_linears(block))
            for _, blocks in block_lists(model)
            for block in blocks
        ]
        return FlopsReport(total=sum(per_layer), per_layer=per_layer, seq_len=seq_len)
    hidden, head_dim = _config_dims(adapter, model)
    per_layer = [
        layer_flops(s, hidden, head_dim, adapter.ffn_in_mats, seq_len, tokens=seq_len)
        for s in adapter.layer_shapes(model)
    ]
    return FlopsReport(total=sum(per_layer), per_layer=per_layer, seq_len=seq_len)


def prunable_parameters(model: nn.Module) -> int:
    """Weights of the attention and FFN projections of all blocks (what structured pruning can remove; for a
    family without an adapter, the weights of its blocks' linear layers)."""
    adapter = get_adapter(model, structural=False)
    if not adapter.structural:
        return sum(m.weight.numel() for m in adapter.all_block_linears(model))
    hidden, head_dim = _config_dims(adapter, model)
    return sum(layer_params(s, hidden, head_dim, adapter.ffn_in_mats) for s in adapter.layer_shapes(model))


def layer_sparsity(per_module: Mapping[str, float], index: int, layers_path: str) -> float:
    """Mean zero fraction of the prunable matrices of block ``index`` (``per_module``: ``sparsity_report``'s)."""
    values = [v for k, v in per_module.items() if f"{layers_path.split('.')[-1]}.{index}." in k]
    return sum(values) / len(values) if values else 0.0


def model_summary(model: nn.Module, seq_len: int = 128) -> dict[str, Any]:
    """What a model is, as measured: the one summary behind ``PruningReport``, the recipe report, the trainer's
    pruning logs and ``hf-prune inspect``, so they can never disagree.

    Keys: ``model_type``, ``class``, ``parameters`` (:func:`count_parameters`), ``seq_len`` and ``encoder_flops``
    (:func:`encoder_flops` at ``seq_len``), ``num_layers`` (blocks), ``layers`` (per block ``heads``, ``kv_heads``,
    ``ffn``; empty for a family without an adapter), ``sparsity`` (zero fraction of the blocks' weights),
    ``sparsity_per_module`` and ``sparsity_per_layer``, and from the recorded pruning state ``kept_layers`` (original
    indices of the remaining blocks, ``None`` when none was removed), ``original`` (the sizes before pruning),
    ``kept_original_head_ids`` and ``pruned_by_hf_prune``.
    """
    adapter = get_adapter(model, structural=False)
    shapes = adapter.layer_shapes(model)
    sparsity = sparsity_report(model)
    state = pruning_state(model) or {}
    config = getattr(model, "config", None)
    return {
        "model_type": getattr(config, "model_type", None),
        "class": type(model).__name__,
        "parameters": count_parameters(model),
        "seq_len": seq_len,
        "encoder_flops": encoder_flops(model, seq_len).total,
        "num_layers": len(adapter.layers(model)),
        "layers": [s.to_dict() for s in shapes],
        "sparsity": sparsity["overall"],
        "sparsity_per_module": sparsity["per_module"],
        "sparsity_per_layer": [
            layer_sparsity(sparsity["per_module"], i, adapter.layers_path) for i in range(len(shapes))
        ],
        "kept_layers": state.get("kept_layers"),
        "original": state.get("original"),
        "kept_original_head_ids": state.get("kept_heads"),
        "pruned_by_hf_prune": bool(state),
    }


def saved_size_bytes(model: nn.Module) -> int:
    """Bytes on disk of ``model.save_pretrained`` (safetensors + config)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())


@dataclass
class LatencyResult:
    """Wall-clock latency of repeated forward passes, in milliseconds."""

    median_ms: float
    p90_ms: float
    min_ms: float
    repeats: int
    samples_ms: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "median_ms": self.median_ms,
            "p90_ms": self.p90_ms,
            "min_ms": self.min_ms,
            "repeats": self.repeats,
        }


def cpu_name() -> str:
    """The CPU model: ``/proc/cpuinfo``'s ``model name`` on Linux (``platform.processor()`` there is often just the
    architecture), else ``platform.processor()``, else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    """The hardware a timing on ``device`` belongs to: the GPU's name, else :func:`cpu_name`. Latency tables are
    cached per this name, since a table timed on one chip says nothing about another."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return device.type
    return cpu_name()


def _timing_device(model: nn.Module | Callable[..., Any], inputs: Mapping[str, Any]) -> torch.device | None:
    if isinstance(model, nn.Module):
        return model_device(model)
    return next((v.device for v in inputs.values() if isinstance(v, torch.Tensor)), None)


def _sync(device: torch.device | None) -> None:
    # CUDA kernels run asynchronously: without waiting, the clock would time the kernel launches only.
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    model: nn.Module | Callable[..., Any],
    inputs: Mapping[str, torch.Tensor],
    repeats: int = 20,
    warmup: int = 3,
) -> LatencyResult:
    """Median latency of ``model(**inputs)`` under ``torch.inference_mode`` (eval mode is the caller's job).

    Tensors in ``inputs`` are moved to the model's device first, and on a GPU each sample waits for the queued
    kernels, so the numbers are wall-clock forward times on whatever device the model lives on.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = _timing_device(model, inputs)
    inputs = to_device(inputs, device)
    samples = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(**inputs)
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            model(**inputs)
            _sync(device)
            samples.append((time.perf_counter() - start) * 1000.0)
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return LatencyResult(
        median_ms=statistics.median(samples), p90_ms=p90, min_ms=ordered[0], repeats=repeats, samples_ms=samples
    )


def compare_latency(
    dense: nn.Module,
    pruned: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    repeats: int = 20,
    warmup: int = 3,
    rounds: int = 3,
    round_warmup: int | None = None,
) -> dict[str, Any]:
    """Dense vs pruned latency measured in interleaved rounds, so drift (thermal, other load) hits both.

    ``warmup`` untimed passes precede each model's first round and ``round_warmup`` (default: ``warmup``) its later
    ones. Returns medians over all samples and ``speedup = dense_median / pruned_median``. Both models must live on
    the same device: a ratio across devices says nothing about pruning.
    """
    devices = {str(model_device(m)) for m in (dense, pruned) if isinstance(m, nn.Module)}
    if len(devices) > 1:
        raise ValueError(f"compare_latency: the dense and pruned models are on different devices {sorted(devices)}")
    dense_samples: list[float] = []
    pruned_samples: list[float] = []
    per_round = max(1, repeats // rounds)
    for i in range(rounds):
        w = warmup if i == 0 or round_warmup is None else round_warmup
        dense_samples += measure_latency(dense, inputs, per_round, w).samples_ms
        pruned_samples += measure_latency(pruned, inputs, per_round, w).samples_ms
    d, p = statistics.median(dense_samples), statistics.median(pruned_samples)
    return {
        "dense_ms": d,
        "pruned_ms": p,
        "speedup": d / p,
        "repeats": len(dense_samples),
    }
