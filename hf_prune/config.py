"""PruningConfig: what to prune and how, validated on construction.

Errors name the field, the bad value and what is allowed, and unknown keys (typos in a recipe) suggest the
closest valid name, so a bad config fails before any model is loaded.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from .utils import JsonMixin

CRITERIA = ("magnitude", "taylor", "fisher", "random")
SPARSITY_CRITERIA = ("magnitude", "activation")
SCOPES = ("layer", "global")
HEAD_UNITS = ("auto", "group", "query")
LAYER_CRITERIA = ("influence", "angular", "last")
KEEP_TARGETS = ("target_flops", "target_params", "target_latency")
SPARSITY_SCOPES = ("layer", "global", "row")
SCHEDULES = ("oneshot", "iterative", "cubic")
_NM = re.compile(r"^(\d+):(\d+)$")


def check_int(where: str, value: Any, minimum: int, extra: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` is an integer (not a bool) >= ``minimum``; ``where`` names the field."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}={value!r} is invalid; allowed: an integer >= {minimum}{extra}")


def closest(name: str, allowed: list[str] | tuple[str, ...]) -> str:
    """`` (did you mean 'x'?)`` for the closest allowed name, or an empty string."""
    match = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


@dataclass
class PruningConfig(JsonMixin):
    """How much to prune and how to choose what goes.

    Structured targets (pick fractions *or* one keep-target):
        heads: fraction of attention heads to remove, ``0 <= heads < 1``.
        ffn: fraction of FFN neurons to remove, ``0 <= ffn < 1``.
        target_flops: fraction of the transformer blocks' FLOPs to *keep*, ``0 < x <= 1`` (0.5 = a 2x cut).
        target_params: fraction of the blocks' prunable parameters to keep, ``0 < x <= 1``.
        target_latency: fraction of the model's *measured* forward latency to keep, ``0 < x <= 1`` (0.5 = twice as
            fast on this machine at ``latency_batch_size`` x ``seq_len``). A latency table is timed on copies of
            the model on its own device (:func:`~hf_prune.planning.latency_table.profile_latency`), the allocation keeps
            the most important heads/neurons whose predicted latency fits, and the chosen shapes are timed and
            the budget searched until the measurement is within 5% (:func:`hf_prune.step.plan_structure`). Widths
            past a slow kernel threshold are avoided, which a FLOPs target cannot see. A target below what width
            pruning can reach there raises :class:`~hf_prune.step.LatencyTargetError` before any change.
        latency_batch_size: batch size the latency table is measured at (match your serving batch).
        criterion: ``"magnitude"`` (weights only), ``"taylor"`` (first-order head/neuron mask gradients,
            Michel et al. 2019), ``"fisher"`` (mask Fisher information, Kwon et al. 2022) or ``"random"``.
        scope: ``"layer"`` (same fraction in every layer) or ``"global"`` (rank across layers; scores are
            normalised per layer so layers compare fairly; with taylor/fisher and a keep-target, heads and neurons
            are traded against each other by FLOPs/param cost as in Kwon et al.).
        min_heads_per_layer: every layer keeps at least this many heads (0 allows removing a whole layer's
            attention).
        layers: fraction of whole transformer blocks to remove (depth pruning), ``0 <= layers < 1``, before any
            width pruning; see :mod:`hf_prune.scoring.depth`. A keep-target counts both: ``layers=0.25,
            target_flops=0.5``
            keeps half of the dense block FLOPs, the width step removing what the blocks did not.
        max_layers: let the allocator choose the depth under a ``target_flops`` / ``target_params`` /
            ``target_latency``: it tries block counts from none to this fraction of the blocks (at most 9 counts,
            evenly spaced; blocks chosen by ``layer_criterion``), fills the rest of the target with heads and
            neurons for each, and keeps the count whose pruned model stays closest to the dense one on the
            calibration data (KL divergence of the outputs). Under ``target_latency`` each count's blocks are timed,
            so at small batches, where a block's fixed cost (op dispatch, norms) survives any width cut, removing
            blocks buys more width back. Needs calibration data and one model copy at a time.
        layer_criterion: which blocks: ``"influence"`` (ShortGPT's Block Influence, 1 - cos between a block's input
            and output; needs calibration data), ``"angular"`` (the consecutive run whose span changes the hidden
            states least, Gromov et al.; needs calibration data) or ``"last"`` (the blocks before the final one).
        head_unit: under grouped-query attention, remove whole key/value groups (``"group"``), the same number of
            query heads from every group (``"query"``, the key/value heads stay), or ``"auto"``: whichever gives the
            model more units to choose from, ``"query"`` on a tie (SmolLM2: 3 groups of 3; Gemma-3-1B: one group
            of 4; Llama-3-8B: 8 groups of 4 -> groups). See :mod:`hf_prune.planning.units`.
        ffn_multiple: kept FFN sizes are rounded to a multiple of this (fast kernels); 1 disables rounding.

    Unstructured:
        sparsity: fraction of the blocks' linear weights set to zero, ``0 <= sparsity < 1``.
        sparsity_scope: ``"layer"`` (threshold per matrix), ``"global"`` (one threshold for all), ``"row"``
            (per output row, as Wanda).
        sparsity_criterion: ``"magnitude"`` (|W|) or ``"activation"`` (|W| * ||X||, Wanda; needs calibration data).
        pattern: ``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``: in every M consecutive inputs keep N); an N:M
            pattern sets the sparsity to ``1 - N/M`` itself.
        reconstruct: needs calibration data. Structured: after removing heads/neurons, refit the kept columns
            and bias of each shrunk branch's output projection by least squares so its output on calibration
            data matches the dense one (``prune()`` and every structural event of the PruningTrainer).
            Unstructured: after masking, update the kept weights block by block to reconstruct each layer's
            dense output (SparseGPT's OBS update; one-shot ``prune()`` only).

    Schedule (used by :class:`~hf_prune.training.trainer.PruningTrainer`; ``prune()`` is always one-shot):
        schedule: ``"oneshot"`` (prune at ``start_step``, then recover), ``"iterative"`` (equal increments every
            ``frequency`` steps or at each epoch boundary) or ``"cubic"`` (Zhu & Gupta 2017 gradual schedule).
        start_step / end_step or start_epoch / end_epoch: the pruning window (default: the first half of
            training, leaving the second half for recovery).
        frequency: steps between pruning events, or ``"epoch"``.

    Distillation from the dense model during recovery:
        distill_alpha: weight of the logits KL term (0 disables; the task loss gets ``1 - alpha``).
        distill_temperature: softmax temperature of the KL term.
        distill_hidden: weight of an extra MSE between the last hidden states (0 disables).

    Calibration:
        max_samples: examples drawn from the calibration data for data-driven criteria.
        batch_size: calibration batch size.
        seq_len: sequence length used to count FLOPs for ``target_flops`` and to time blocks for ``target_latency``.
        seed: seed of the ``random`` criterion.
    """

    heads: float = 0.0
    ffn: float = 0.0
    target_flops: float | None = None
    target_params: float | None = None
    target_latency: float | None = None
    latency_batch_size: int = 8
    criterion: str = "magnitude"
    scope: str = "layer"
    min_heads_per_layer: int = 1
    head_unit: str = "auto"
    layers: float = 0.0
    max_layers: float = 0.0
    layer_criterion: str = "influence"
    ffn_multiple: int = 8
    sparsity: float = 0.0
    sparsity_scope: str = "layer"
    sparsity_criterion: str = "magnitude"
    pattern: str = "unstructured"
    reconstruct: bool = False
    schedule: str = "oneshot"
    start_step: int | None = None
    end_step: int | None = None
    start_epoch: float | None = None
    end_epoch: float | None = None
    frequency: int | str = "epoch"
    distill_alpha: float = 0.0
    distill_temperature: float = 2.0
    distill_hidden: float = 0.0
    max_samples: int = 512
    batch_size: int = 16
    seq_len: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    # ---- validation ---------------------------------------------------------------------------------------
    def _fail(self, name: str, allowed: str) -> None:
        raise ValueError(f"PruningConfig.{name}={getattr(self, name)!r} is invalid; allowed: {allowed}")

    def _check_fraction(self, name: str, low_open: bool, high_open: bool, optional: bool = False) -> None:
        value = getattr(self, name)
        if value is None and optional:
            return
        low, high = ("<" if low_open else "<="), ("<" if high_open else "<=")
        allowed = f"a number with 0 {low} {name} {high} 1"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self._fail(name, allowed)
        ok_low = value > 0 if low_open else value >= 0
        ok_high = value < 1 if high_open else value <= 1
        if not (ok_low and ok_high):
            self._fail(name, allowed)

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            hint = closest(value, choices) if isinstance(value, str) else ""
            raise ValueError(f"PruningConfig.{name}={value!r} is invalid{hint}; allowed: {', '.join(choices)}")

    def _check_int(self, name: str, minimum: int) -> None:
        extra = " or 'epoch'" if name == "frequency" else ""
        check_int(f"PruningConfig.{name}", getattr(self, name), minimum, extra)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        self._check_fraction("heads", low_open=False, high_open=True)
        self._check_fraction("ffn", low_open=False, high_open=True)
        self._check_fraction("layers", low_open=False, high_open=True)
        self._check_fraction("max_layers", low_open=False, high_open=True)
        self._check_fraction("target_flops", low_open=True, high_open=False, optional=True)
        self._check_fraction("target_params", low_open=True, high_open=False, optional=True)
        self._check_fraction("target_latency", low_open=True, high_open=False, optional=True)
        self._check_fraction("sparsity", low_open=False, high_open=True)
        self._check_choice("criterion", CRITERIA)
        self._check_choice("schedule", SCHEDULES)
        self._check_fraction("distill_alpha", low_open=False, high_open=False)
        for name in ("start_step", "end_step"):
            if getattr(self, name) is not None:
                self._check_int(name, 0)
        for name in ("start_epoch", "end_epoch"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                self._fail(name, "a number >= 0")
        if self.start_step is not None and self.start_epoch is not None:
            raise ValueError("PruningConfig: set start_step or start_epoch, not both")
        if self.end_step is not None and self.end_epoch is not None:
            raise ValueError("PruningConfig: set end_step or end_epoch, not both")
        if self.frequency != "epoch":
            self._check_int("frequency", 1)
        for name in ("distill_temperature",):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                self._fail(name, "a number > 0")
        value = self.distill_hidden
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            self._fail("distill_hidden", "a number >= 0")
        self._check_choice("scope", SCOPES)
        self._check_choice("head_unit", HEAD_UNITS)
        self._check_choice("layer_criterion", LAYER_CRITERIA)
        self._check_choice("sparsity_scope", SPARSITY_SCOPES)
        self._check_choice("sparsity_criterion", SPARSITY_CRITERIA)
        if not isinstance(self.reconstruct, bool):
            self._fail("reconstruct", "true or false")
        self._check_int("min_heads_per_layer", 0)
        self._check_int("ffn_multiple", 1)
        self._check_int("max_samples", 1)
        self._check_int("batch_size", 1)
        self._check_int("seq_len", 1)
        self._check_int("latency_batch_size", 1)
        self._check_int("seed", 0)
        targets = {k: getattr(self, k) for k in KEEP_TARGETS if getattr(self, k) is not None}
        if len(targets) > 1:
            raise ValueError(f"PruningConfig: set at most one of {', '.join(KEEP_TARGETS)}; got {targets}")
        if targets and (self.heads or self.ffn):
            raise ValueError(
                f"PruningConfig: heads/ffn fractions and {'/'.join(KEEP_TARGETS)} are alternatives; "
                f"got heads={self.heads}, ffn={self.ffn}, " + ", ".join(f"{k}={v}" for k, v in targets.items())
            )
        if self.max_layers and self.layers:
            raise ValueError(
                f"PruningConfig: layers={self.layers} fixes the depth and max_layers={self.max_layers} searches it; "
                "set one of them"
            )
        if self.max_layers and self.keep_target is None:
            raise ValueError(
                f"PruningConfig.max_layers={self.max_layers} needs a keep-target (target_flops, target_params or "
                "target_latency) to trade blocks against heads and neurons"
            )
        if self.pattern != "unstructured":
            m = _NM.match(str(self.pattern))
            if not m or not 0 < int(m.group(1)) < int(m.group(2)):
                raise ValueError(
                    f"PruningConfig.pattern={self.pattern!r} is invalid; allowed: 'unstructured' or 'N:M' with "
                    "0 < N < M, e.g. '2:4'"
                )
            if self.sparsity_scope != "layer" and self.sparsity_scope != "row":
                raise ValueError(
                    f"PruningConfig.sparsity_scope={self.sparsity_scope!r} cannot be combined with pattern="
                    f"{self.pattern!r}; N:M patterns are chosen within each row (use 'layer' or 'row')"
                )

    # ---- derived ----------------------------------------------------------------------------------------
    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` for an N:M pattern, else ``None``."""
        m = _NM.match(str(self.pattern))
        return (int(m.group(1)), int(m.group(2))) if m else None

    @property
    def effective_sparsity(self) -> float:
        nm = self.nm
        return 1 - nm[0] / nm[1] if nm else self.sparsity

    @property
    def keep_target(self) -> str | None:
        """``"flops"``, ``"params"`` or ``"latency"`` for the keep-target that is set, else ``None``."""
        return next((k.removeprefix("target_") for k in KEEP_TARGETS if getattr(self, k) is not None), None)

    @property
    def structured(self) -> bool:
        return bool(self.heads or self.ffn or self.keep_target)

    @property
    def removes_structure(self) -> bool:
        """Heads, neurons or blocks are removed: the model's family needs an adapter (weight sparsity does not)."""
        return self.structured or bool(self.layers or self.max_layers)

    @property
    def needs_data(self) -> bool:
        structured_data = self.structured and (self.criterion in ("taylor", "fisher") or self.reconstruct)
        sparse_data = self.effective_sparsity > 0 and (self.sparsity_criterion == "activation" or self.reconstruct)
        depth_data = (bool(self.layers) and self.layer_criterion != "last") or bool(self.max_layers)
        return structured_data or sparse_data or depth_data

    # ---- serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "PruningConfig") -> PruningConfig:
        """Build from a dict; unknown keys raise ``ValueError`` naming the closest valid key."""
        if not isinstance(data, dict):
            raise TypeError(f"{where} must be a mapping, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        for key in data:
            if key not in names:
                raise ValueError(f"{where}: unknown key {key!r}{closest(str(key), names)}; allowed: {', '.join(names)}")
        return cls(**data)
