"""PruningConfig: what to prune and how, validated on construction.

Errors name the field, the bad value and what is allowed, and unknown keys (typos in a recipe) suggest the
closest valid name, so a bad config fails before any model is loaded.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

from .utils import JsonMixin

GRADIENT_CRITERIA = ("taylor", "fisher")  # scored from mask gradients on calibration data
CRITERIA = ("magnitude", *GRADIENT_CRITERIA, "random")
SPARSITY_CRITERIA = ("magnitude", "activation")
SCOPES = ("layer", "global")
HEAD_UNITS = ("auto", "group", "query")
LAYER_CRITERIA = ("influence", "angular", "last")
KEEP_TARGETS = ("target_flops", "target_params", "target_latency")
SPARSITY_SCOPES = ("layer", "global", "row")
SCHEDULES = ("oneshot", "iterative", "cubic")
LAYOUTS = ("free", "servable", "uniform")  # block shapes serving engines run: see hf_prune.structure.layout
_NM = re.compile(r"^(\d+):(\d+)$")


# ---- field checks shared by PruningConfig, the recipe schema and the latency tables ---------------------
def is_int(value: Any) -> bool:
    """An integer that is not a bool (``True`` is an ``int`` to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def type_ok(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits a dataclass field annotation (unions, ``list[...]``, ``dict``, scalars; a string
    annotation names a scalar). Annotations it cannot read pass: their owner validates them itself."""
    if isinstance(annotation, str):
        annotation = {"int": int, "float": float, "str": str, "bool": bool}.get(annotation, Any)
    if annotation is Any or annotation is None:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, a) for a in typing.get_args(annotation))
    checks = {type(None): lambda v: v is None, bool: lambda v: isinstance(v, bool), int: is_int, float: is_number}
    if annotation in checks:
        return checks[annotation](value)
    if origin is list:
        (inner,) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and all(type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # enums, callables: validated by their owner


def type_name(annotation: Any) -> str:
    """A readable name for an annotation (``int``, ``float | None``)."""
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def check_int(where: str, value: Any, minimum: int, extra: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` is an integer (not a bool) >= ``minimum``; ``where`` names the field."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"{where}={value!r} is invalid; allowed: an integer >= {minimum}{extra}")


def check_number(
    where: str, value: Any, low: float, high: float | None = None, low_open: bool = False, high_open: bool = False
) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number (not a bool) within the bounds; ``where`` names the
    field (``PruningConfig.heads``), and the message states the allowed range."""
    lt_low, lt_high = ("<" if low_open else "<="), ("<" if high_open else "<=")
    if high is None:
        allowed = f"a finite number {'>' if low_open else '>='} {low}"
    else:
        allowed = f"a number with {low} {lt_low} {where.rsplit('.', 1)[-1]} {lt_high} {high}"
    ok = is_number(value) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        raise ValueError(f"{where}={value!r} is invalid; allowed: {allowed}")


def closest(name: str, allowed: list[str] | tuple[str, ...]) -> str:
    """`` (did you mean 'x'?)`` for the closest allowed name, or an empty string."""
    match = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


class UnknownKeyError(TypeError, ValueError):
    """A misspelt or unknown field name. A ``TypeError`` like any unexpected keyword argument, and a ``ValueError``
    like every other config problem, so either ``except`` catches it."""


def check_keys(keys: Iterable[Any], allowed: list[str] | tuple[str, ...], where: str) -> None:
    """Raise :class:`UnknownKeyError` for the first key not in ``allowed``, suggesting the closest valid one."""
    for key in keys:
        if key not in allowed:
            raise UnknownKeyError(
                f"{where}: unknown key {key!r}{closest(str(key), allowed)}; allowed: {', '.join(allowed)}"
            )


def _suggest_keywords(cls: type) -> type:
    """Wrap a dataclass's generated ``__init__`` so a misspelt keyword (``PruningConfig(hedas=0.5)``) names the
    closest field instead of Python's bare "unexpected keyword argument"; valid calls are passed through as they
    are, and the signature stays the dataclass's own (``functools.wraps``)."""
    init = cls.__init__
    names = tuple(f.name for f in fields(cls) if f.init)

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        check_keys(kwargs, names, type(self).__name__)
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@_suggest_keywords
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
            pruning can reach there raises :class:`hf_prune.LatencyTargetError` before any change.
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
        layout: block shapes the plan may produce (:mod:`hf_prune.structure.layout`): ``"free"`` (any per-block
            shapes; transformers only), ``"servable"`` (the same query-head count in every block that keeps
            attention, FFN widths free per block; vLLM's nemotron-nas and llama.cpp's deci run it) or ``"uniform"``
            (every block the same shape; a stock config, every engine).
        attention_layers: fraction of the blocks whose *attention sublayer* is removed (the MLP stays), chosen by
            ``layer_criterion`` (``influence``/``angular``: attention outputs that change the block's input least on
            calibration data; ``last``: those before the final block); before width, counted by a keep-target.

    Unstructured:
        sparsity: fraction of the blocks' linear weights set to zero, ``0 <= sparsity < 1``.
        sparsity_scope: ``"layer"`` (threshold per matrix), ``"global"`` (one threshold for all), ``"row"``
            (per output row, as Wanda).
        sparsity_criterion: ``"magnitude"`` (|W|) or ``"activation"`` (|W| * ||X||, Wanda; needs calibration data).
        pattern: ``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``: in every M consecutive inputs keep N); an N:M
            pattern fixes the sparsity at ``1 - N/M`` (leave ``sparsity`` at 0; another value is an error).
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

    Every field is validated on construction; an unknown keyword raises :class:`UnknownKeyError` naming the
    closest field. :meth:`coerce` is the check the entry points run on the config they are given.
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
    layout: str = "free"
    attention_layers: float = 0.0
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
        check_number(f"PruningConfig.{name}", value, 0, 1, low_open, high_open)

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            hint = closest(value, choices) if isinstance(value, str) else ""
            raise ValueError(f"PruningConfig.{name}={value!r} is invalid{hint}; allowed: {', '.join(choices)}")

    def _check_int(self, name: str, minimum: int) -> None:
        extra = " or 'epoch'" if name == "frequency" else ""
        check_int(f"PruningConfig.{name}", getattr(self, name), minimum, extra)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field, its value and what is allowed."""
        self._check_amounts()
        for name, choices in (
            ("criterion", CRITERIA),
            ("schedule", SCHEDULES),
            ("scope", SCOPES),
            ("head_unit", HEAD_UNITS),
            ("layer_criterion", LAYER_CRITERIA),
            ("layout", LAYOUTS),
            ("sparsity_scope", SPARSITY_SCOPES),
            ("sparsity_criterion", SPARSITY_CRITERIA),
        ):
            self._check_choice(name, choices)
        self._check_schedule()
        if not isinstance(self.reconstruct, bool):
            self._fail("reconstruct", "true or false")
        for name, minimum in (
            ("min_heads_per_layer", 0),
            ("ffn_multiple", 1),
            ("max_samples", 1),
            ("batch_size", 1),
            ("seq_len", 1),
            ("latency_batch_size", 1),
            ("seed", 0),
        ):
            self._check_int(name, minimum)
        self._check_combinations()
        self._check_pattern()

    def _check_amounts(self) -> None:
        """What to remove: fractions removed in [0, 1), keep-targets in (0, 1]."""
        for name in ("heads", "ffn", "layers", "max_layers", "attention_layers", "sparsity"):
            self._check_fraction(name, low_open=False, high_open=True)
        for name in KEEP_TARGETS:
            self._check_fraction(name, low_open=True, high_open=False, optional=True)

    def _check_schedule(self) -> None:
        """The trainer's pruning window, event frequency and distillation weights."""
        for name in ("start_step", "end_step"):
            if getattr(self, name) is not None:
                self._check_int(name, 0)
        for name in ("start_epoch", "end_epoch"):
            if getattr(self, name) is not None:
                check_number(f"PruningConfig.{name}", getattr(self, name), 0)
        if self.start_step is not None and self.start_epoch is not None:
            raise ValueError("PruningConfig: set start_step or start_epoch, not both")
        if self.end_step is not None and self.end_epoch is not None:
            raise ValueError("PruningConfig: set end_step or end_epoch, not both")
        if self.frequency != "epoch":
            self._check_int("frequency", 1)
        self._check_fraction("distill_alpha", low_open=False, high_open=False)
        check_number("PruningConfig.distill_temperature", self.distill_temperature, 0, low_open=True)
        check_number("PruningConfig.distill_hidden", self.distill_hidden, 0)

    def _check_combinations(self) -> None:
        """Targets that exclude each other."""
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
        if self.attention_layers and self.layout == "uniform":
            raise ValueError(
                f"PruningConfig: attention_layers={self.attention_layers} removes attention from some blocks, which "
                "layout='uniform' (every block the same shape) excludes; use layout='servable' or 'free'"
            )
        if self.max_layers and self.keep_target is None:
            raise ValueError(
                f"PruningConfig.max_layers={self.max_layers} needs a keep-target (target_flops, target_params or "
                "target_latency) to trade blocks against heads and neurons"
            )

    def _check_pattern(self) -> None:
        """An N:M pattern: well formed, chosen per row, and the sparsity it fixes not contradicted."""
        if self.pattern == "unstructured":
            return
        m = _NM.match(str(self.pattern))
        if not m or not 0 < int(m.group(1)) < int(m.group(2)):
            raise ValueError(
                f"PruningConfig.pattern={self.pattern!r} is invalid; allowed: 'unstructured' or 'N:M' with "
                "0 < N < M, e.g. '2:4'"
            )
        if self.sparsity_scope not in ("layer", "row"):
            raise ValueError(
                f"PruningConfig.sparsity_scope={self.sparsity_scope!r} cannot be combined with pattern="
                f"{self.pattern!r}; N:M patterns are chosen within each row (use 'layer' or 'row')"
            )
        fixed = 1 - int(m.group(1)) / int(m.group(2))
        if self.sparsity and not math.isclose(self.sparsity, fixed):
            raise ValueError(
                f"PruningConfig.sparsity={self.sparsity!r} contradicts pattern={self.pattern!r}: an N:M pattern "
                f"fixes the sparsity at 1 - N/M = {fixed:g}; leave sparsity at 0 (or set it to {fixed:g}), or use "
                "pattern='unstructured' for any other sparsity"
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
        return self.structured or self.prunes_depth

    @property
    def prunes_depth(self) -> bool:
        """Whole blocks or attention sublayers go (the depth step, before width)."""
        return bool(self.layers or self.max_layers or self.attention_layers)

    @property
    def needs_gradients(self) -> bool:
        """The structured criterion is scored from mask gradients on calibration data (taylor/fisher)."""
        return self.criterion in GRADIENT_CRITERIA

    @property
    def needs_data(self) -> bool:
        structured_data = self.structured and (self.needs_gradients or self.reconstruct)
        sparse_data = self.effective_sparsity > 0 and (self.sparsity_criterion == "activation" or self.reconstruct)
        depth_data = (self.prunes_depth and self.layer_criterion != "last") or bool(self.max_layers)
        return structured_data or sparse_data or depth_data

    # ---- serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "PruningConfig") -> PruningConfig:
        """Build from a dict; unknown keys raise :class:`UnknownKeyError` (a ``ValueError``) naming the closest
        valid key."""
        if not isinstance(data, dict):
            raise TypeError(f"{where} must be a mapping, got {type(data).__name__}")
        check_keys(data, [f.name for f in fields(cls)], where)
        return cls(**data)

    @classmethod
    def coerce(cls, config: Any, where: str = "config") -> PruningConfig:
        """The one check every entry point (``prune``, ``allocate``, the trainer and its callback) runs on the
        config it is given: a :class:`PruningConfig` is returned as is, a dict of its fields is built (and
        validated) through :meth:`from_dict`, anything else raises ``TypeError`` saying what is accepted."""
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            return cls.from_dict(config, where)
        shown = repr(config) if len(repr(config)) <= 80 else repr(config)[:77] + "..."
        raise TypeError(
            f"{where} must be a PruningConfig or a dict of its fields (e.g. {{'target_flops': 0.5}}); got "
            f"{type(config).__name__} {shown}"
        )
