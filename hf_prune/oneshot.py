"""One-shot pruning to a target without training: score -> allocate -> surgery -> unstructured masks (baked)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .architectures import get_adapter
from .compat import float_weights
from .config import PruningConfig
from .measure import model_summary
from .planning.depth_search import depth_step
from .planning.plan import PruningPlan
from .scoring.calibration import calibration_set
from .sparsity.reconstruct import sequential_prune
from .step import mask_step, structural_step
from .training.lora import base_model, check_maskable, keep_masks

logger = logging.get_logger(__name__)


@dataclass
class PruningReport:
    """What ``prune`` did, with numbers measured on the model before and after."""

    config: dict[str, Any]
    plan: dict[str, Any]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    layers_before: list[dict[str, int]]
    layers_after: list[dict[str, int]]
    sparsity: float
    sparsity_per_module: dict[str, float] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    layers_removed: list[int] = field(default_factory=list)  # blocks removed (indices before pruning), see depth.py
    attention_removed: list[int] = field(default_factory=list)  # blocks that lost their attention sublayer (same)
    # what the width and sparsity steps work to after the blocks went: ``config`` without its depth fields,
    # a keep-target rescaled to the model the blocks left (equal to ``config`` when no block was removed)
    width_config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_summaries(
        cls, config: dict[str, Any], plan: dict[str, Any], before: dict[str, Any], after: dict[str, Any], **extra: Any
    ) -> PruningReport:
        """The report of a run from :func:`~hf_prune.measure.model_summary` of the model before and after it."""
        return cls(
            config=config,
            plan=plan,
            params_before=before["parameters"],
            params_after=after["parameters"],
            flops_before=before["encoder_flops"],
            flops_after=after["encoder_flops"],
            layers_before=before["layers"],
            layers_after=after["layers"],
            sparsity=after["sparsity"],
            sparsity_per_module=after["sparsity_per_module"],
            **extra,
        )

    @property
    def flops_ratio(self) -> float:
        """Dense / pruned block FLOPs (2.0 = a 2x cut)."""
        return self.flops_before / self.flops_after if self.flops_after else float("inf")

    @property
    def params_ratio(self) -> float:
        return self.params_before / self.params_after

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flops_ratio"] = self.flops_ratio
        d["params_ratio"] = self.params_ratio
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        kept_heads = [layer["heads"] for layer in self.layers_after]
        kept_ffn = [layer["ffn"] for layer in self.layers_after]
        return (
            f"params {self.params_before / 1e6:.2f}M -> {self.params_after / 1e6:.2f}M "
            f"({self.params_ratio:.2f}x), block FLOPs {self.flops_before / 1e9:.2f}G -> "
            f"{self.flops_after / 1e9:.2f}G ({self.flops_ratio:.2f}x), sparsity {self.sparsity:.1%}\n"
            f"kept heads per layer {kept_heads}\nkept FFN per layer {kept_ffn}"
        )


def _check_model(model: Any) -> None:
    """A name or path is not a model: say how to load it (rather than fail later reading it as a model type)."""
    if isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"prune() takes a loaded model; got the {type(model).__name__} {str(model)!r}. Load it first, e.g. "
            f"AutoModelForSequenceClassification.from_pretrained({str(model)!r}) (or hf_prune.from_pretrained for a "
            "pruned checkpoint), then pass the model"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune() takes a loaded model (a torch nn.Module); got {type(model).__name__}")


def prune(
    model: nn.Module,
    config: PruningConfig | dict[str, Any],
    calibration_data: Any = None,
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]] | None = None,
    *,
    depth_only: bool = False,
) -> PruningReport:
    """Prune ``model`` in place to ``config``'s targets in one shot, and report what changed.

    Args:
        model: a model of a supported family, or a peft model of one (adapters cut along, deltas keep the zeros).
        config: a :class:`PruningConfig` (or its dict form).
        calibration_data: needed by ``taylor``/``fisher``, ``reconstruct`` and activation-aware sparsity. Any form
            :func:`~hf_prune.scoring.calibration.calibration_set` accepts: tokenized examples (a ``datasets.Dataset``
            or a list of dicts, ragged lengths padded, batched with ``collate_fn``), ready batches of any padded
            lengths (a list, generator or DataLoader). At most ``config.max_samples`` examples are drawn, once,
            and reused by every pass.
        depth_only: remove only the blocks (``config.layers`` / ``max_layers``) and leave width and sparsity to a
            later step, typically the :class:`~hf_prune.PruningTrainer`'s schedule (which does not remove blocks):
            train with ``PruningConfig.from_dict(report.width_config)``, which holds the rest of a keep-target.

    Raises:
        ValueError: unsupported architecture, or a data-driven criterion without calibration data (raised
            before anything is computed).
        TypeError: a model that is not a loaded ``nn.Module`` (e.g. a name to load), a config that is neither a
            :class:`PruningConfig` nor a dict of its fields, or calibration data in a form that is not accepted (the
            message lists the accepted forms).
    """
    _check_model(model)
    model = base_model(model)  # a peft model: its base, adapters inside, is cut (adapters along)
    config = PruningConfig.coerce(config, "prune(config=...)")
    # weight sparsity alone works on any family; removing heads, neurons or blocks needs its adapter
    get_adapter(model, structural=config.removes_structure)
    if depth_only and not config.prunes_depth:
        raise ValueError(
            f"prune(depth_only=True) removes blocks only, but the config sets layers={config.layers} and "
            f"max_layers={config.max_layers} and attention_layers={config.attention_layers}; set one of them (a "
            "fraction of the blocks in (0, 1))"
        )
    float_weights(model)  # a dequantized GGUF model: packed weights refused here, marks dropped so it saves and trains
    if config.effective_sparsity > 0:  # LoRA variants whose deltas cannot keep masks: refused before any change
        check_maskable(model)
    if config.needs_data and calibration_data is None:
        raise ValueError(
            f"criterion={config.criterion!r} / sparsity_criterion={config.sparsity_criterion!r}"
            + (f" / layer_criterion={config.layer_criterion!r}" if config.layers or config.attention_layers else "")
            + (f" / max_layers={config.max_layers}" if config.max_layers else "")
            + " needs calibration_data (tokenized examples or batches)"
        )
    # drawn once, before anything changes: every pass below (scores, refit, OBS update, norms) sees the same tokens,
    # and a generator or stream is read only here
    calibration = None
    if calibration_data is not None and config.needs_data:
        calibration = calibration_set(calibration_data, model, config.batch_size, config.max_samples, collate_fn)

    timings: dict[str, float] = {}
    before = model_summary(model, config.seq_len)
    removed_blocks: list[int] = []
    removed_attention: list[int] = []
    width = config
    # depth first; a keep-target covers both, the width step gets what the removed blocks leave of it
    if config.prunes_depth:
        start = time.perf_counter()
        removed_blocks, removed_attention, width = depth_step(model, config, calibration)
        timings["depth"] = time.perf_counter() - start
    plan = PruningPlan() if depth_only else _width_and_sparsity(model, config, width, calibration, timings)
    result = PruningReport.from_summaries(
        config.to_dict(),
        plan.to_dict(),
        before,
        model_summary(model, config.seq_len),
        timings_s=timings,
        layers_removed=removed_blocks,
        attention_removed=removed_attention,
        width_config=width.to_dict(),
    )
    logger.info("hf_prune.prune: %s", str(result).replace("\n", "; "))
    return result


def _width_and_sparsity(
    model: nn.Module,
    config: PruningConfig,
    width: PruningConfig,
    calibration: Any,
    timings: dict[str, float],
) -> PruningPlan:
    """The steps after depth: heads and neurons to ``width`` (what the depth step left of the target), then the
    unstructured masks to ``config``'s sparsity, baked into the weights. Returns the applied plan."""
    plan = PruningPlan()
    if width.structured:
        plan = structural_step(model, width, calibration, timings=timings)
    sparsity = config.effective_sparsity
    if sparsity > 0:
        start = time.perf_counter()
        if config.reconstruct:  # masks chosen block by block with the OBS update of the kept weights
            sequential_prune(model, calibration, sparsity, config.sparsity_scope, config.sparsity_criterion, config.nm)
        else:
            mask_step(model, config, sparsity, config.nm, calibration)
        keep_masks(model, min_zero_fraction=0.0)  # LoRA layers, if any, add mask * BA from now on
        timings["unstructured"] = time.perf_counter() - start
    return plan
