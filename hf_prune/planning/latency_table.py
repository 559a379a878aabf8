"""Measured latency: a lookup table so allocation can target wall time on the user's hardware, not FLOPs.

Why not FLOPs: wall time is not proportional to FLOPs. Kernels change speed in steps at size thresholds and every
layer pays a fixed overhead whatever its width, so a FLOPs-optimal allocation that leaves some layers wide and others
narrow can run slower than a uniform cut of the same FLOPs.

The table: a copy of the model is timed end to end, on its own device and dtype, with every layer cut to each
key/value-unit count (FFN whole), and a second copy with every layer cut to a grid of FFN widths (attention whole).
Per layer, ``attention(u)`` and ``ffn(n)`` are the model's latency differences divided by the layer count, and a
model of per-layer shapes ``(u_l, n_l)`` is predicted as ``T_dense + sum_l [attention(u_l) - attention(U)] +
sum_l [ffn(n_l) - ffn(N)]`` with linear interpolation between grid widths. Kwon et al. (2022) build a per-module
lookup table for their latency-constrained mask search; here the sweeps time the whole model in its real context,
because a module or block timed in isolation runs at another speed than inside the model (it overestimates wide
blocks), which makes such predictions useless. ``torch.utils.benchmark`` is not used because it times one statement,
not a sweep of resized models; the loop is :func:`hf_prune.measure.measure_latency`'s median. Tables are cached in
memory and on disk (:mod:`hf_prune.planning.latency_cache`).
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from ..architectures import LayerShape, get_adapter
from ..config import check_int
from ..measure import device_name, measure_latency
from ..scoring.calibration import no_cache
from ..structure.surgery import apply_layer_shapes
from ..utils import JsonMixin, eval_mode, model_device
from ..utils import dummy_inputs as token_inputs
from .latency_cache import read_cached, write_cached
from .units import HeadUnits, head_unit_mode

logger = logging.get_logger(__name__)

_CACHE: dict[str, LatencyTable] = {}
TABLE_FORMAT = 2  # bump when the sweep changes, so tables measured the old way are not reused


def clear_cache() -> None:
    """Forget the tables held in memory, so the next lookup reads the disk cache or measures (a cold start)."""
    _CACHE.clear()


def _interp(xs: list[int], ys: list[float], x: float) -> float:
    """Piecewise-linear interpolation; beyond the grid the nearest segment is extended."""
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass
class LatencyTable(JsonMixin):
    """Measured forward latency (ms) of a model with every layer cut to one head count or one FFN width.

    Attributes:
        num_layers: transformer blocks of the profiled model.
        units, unit_ms: model latency with every layer at ``units[i]`` head units (:mod:`hf_prune.planning.units`:
            one head; under GQA one key/value group, or one query head per group) and its FFN whole; ascending,
            ``units[-1]`` is the full count.
        ffn, ffn_ms: model latency with every layer at ``ffn[i]`` FFN neurons and its attention whole; ascending.
        batch_size, seq_len: the input the model was timed on.
        device, dtype, threads: where it was timed (``threads`` is ``torch.get_num_threads()``).
        head_unit: the head-unit layout ``units`` count in (``"group"`` or ``"query"``).
        observed: ``[predicted, measured]`` keep of the last plans timed against this table (mixed per-layer shapes
            run at another speed than the uniform sweeps predict, by a machine-specific amount); the next search
            starts from them (:meth:`first_budget`).
    """

    num_layers: int
    units: list[int]
    unit_ms: list[float]
    ffn: list[int]
    ffn_ms: list[float]
    batch_size: int
    seq_len: int
    device: str
    dtype: str
    threads: int
    head_unit: str = "group"  # tables saved before query-head units existed counted groups
    observed: list[list[float]] = field(default_factory=list)

    @property
    def full_ms(self) -> float:
        """Measured latency of the profiled model at full width."""
        return self.unit_ms[-1]

    def attention_ms(self, units: float) -> float:
        """Per-layer cost of keeping ``units`` key/value units, relative to keeping none."""
        return (_interp(self.units, self.unit_ms, units) - _interp(self.units, self.unit_ms, 0)) / self.num_layers

    def ffn_part_ms(self, neurons: float) -> float:
        """Per-layer cost of keeping ``neurons`` FFN neurons, relative to keeping none."""
        return (_interp(self.ffn, self.ffn_ms, neurons) - _interp(self.ffn, self.ffn_ms, 0)) / self.num_layers

    @property
    def base_ms(self) -> float:
        """Per-layer share of everything pruning cannot remove (embeddings, norms, residuals, task head)."""
        return self.full_ms / self.num_layers - self.attention_ms(self.units[-1]) - self.ffn_part_ms(self.ffn[-1])

    def block_ms(self, shape: LayerShape) -> float:
        """One layer's share of the predicted model latency at ``shape``."""
        return self.base_ms + self.attention_ms(HeadUnits(self.head_unit).count(shape)) + self.ffn_part_ms(shape.ffn)

    def model_ms(self, shapes: list[LayerShape]) -> float:
        """Predicted model latency (ms) with per-layer ``shapes``."""
        return sum(self.block_ms(s) for s in shapes)

    def summary(self) -> dict[str, Any]:
        """A short description for plan metadata and model cards."""
        return {
            "device": self.device,
            "dtype": self.dtype,
            "threads": self.threads,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "dense_ms": round(self.full_ms, 3),
            "attention_ms_per_layer": round(self.attention_ms(self.units[-1]), 3),
            "ffn_ms_per_layer": round(self.ffn_part_ms(self.ffn[-1]), 3),
        }

    def for_depth(self, num_layers: int, full_ms: float) -> LatencyTable:
        """The table of this model with ``num_layers`` of its blocks left, whose dense latency measured ``full_ms``.

        A sweep point is the full latency minus what cutting every layer saved, and each layer saves the same, so
        with fewer layers the savings scale by ``num_layers / self.num_layers`` around the new full latency (the
        measured one: removing a block also removes its fixed cost, which no width sweep sees). No timing needed:
        the depth search prices each of its candidates with it.
        """
        check_int("LatencyTable.for_depth: num_layers", num_layers, 1)
        scale, full = num_layers / self.num_layers, self.full_ms
        return dataclasses.replace(
            self,
            num_layers=num_layers,
            unit_ms=[full_ms - scale * (full - v) for v in self.unit_ms],
            ffn_ms=[full_ms - scale * (full - v) for v in self.ffn_ms],
            observed=[],
        )

    def first_budget(self, keep: float) -> float:
        """The allocation budget a latency search tries first for a measured ``keep``: ``keep`` corrected by the
        earlier plan measured nearest to it (``keep x predicted / measured``), or ``keep`` with no observation."""
        if not self.observed:
            return keep
        predicted, measured = min(self.observed, key=lambda o: abs(o[1] - keep))
        return min(1.0, max(keep / 4, keep * predicted / measured))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyTable:
        return cls(**data)


MAX_OBSERVED = 16


def record_observations(table: LatencyTable, pairs: list[tuple[float, float]]) -> None:
    """Append ``(predicted, measured)`` keeps of timed plans to ``table`` (the last :data:`MAX_OBSERVED` stay) and
    rewrite its disk-cache entry, so the next run on this machine starts its search from them."""
    table.observed = [*table.observed, *([round(p, 4), round(m, 4)] for p, m in pairs)][-MAX_OBSERVED:]
    memory_key = next((k for k, t in _CACHE.items() if t is table), None)
    if memory_key is not None:
        write_cached(json.loads(memory_key), table.to_dict())


def dummy_inputs(model: nn.Module, batch_size: int, seq_len: int, device: torch.device) -> dict[str, Any]:
    """Seeded token inputs of ``batch_size`` x ``seq_len`` on ``device`` for timing ``model``
    (:func:`hf_prune.utils.dummy_inputs`), with the KV cache off: token values do not change the cost, a cache
    would."""
    return {**token_inputs(model, batch_size, seq_len, device=device), **no_cache(model)}


def _median_ms(model: nn.Module, inputs: dict[str, Any], repeats: int, warmup: int) -> float:
    return measure_latency(model, inputs, repeats=repeats, warmup=warmup).median_ms


def _grid(full: int, points: int, multiple: int) -> list[int]:
    """``0``, the smallest non-zero width, ``full`` and about ``points`` evenly spaced values between them, rounded
    to ``multiple``.

    Why the smallest width: zero means the branch is gone (no kernels at all, :mod:`hf_prune.structure.remote_code`),
    while one head or ``multiple`` neurons pay every kernel launch, norm and activation of the branch. Interpolating
    between 0 and the next grid point would price such a sliver at a small fraction of that step, and plans that
    leave a layer with one head or a handful of neurons would run slower than the table says.
    """
    if full <= points:
        return list(range(full + 1))
    values = {min(full, multiple * round(full * i / points / multiple)) for i in range(points + 1)}
    return sorted(values | {0, min(multiple, full), full})


def _isotonic(values: list[float]) -> list[float]:
    """The closest non-decreasing sequence (least squares; pool-adjacent-violators).

    Timing noise can make a narrower shape look slower. A table that rewards keeping more would let the search keep
    it for free, so the sweep must be monotone; pooling averages a noisy pair instead of lifting every later entry
    to one spike (as a running maximum would: one slow sample would flatten the table for every wider shape). Not
    ``sklearn.isotonic``: hf_prune does not depend on scikit-learn for ten lines.
    """
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(int(count))]


def _table_key(model: nn.Module, head_units: HeadUnits, **sizes: int) -> dict[str, Any]:
    """What a table depends on: the model's family and shapes, the head unit, where it runs and the timed sizes."""
    adapter = get_adapter(model)
    device, dtype = model_device(model), next(model.parameters()).dtype
    return {
        "format": TABLE_FORMAT,
        "model_type": model.config.model_type,
        "hidden_size": adapter.hidden_size(model.config),
        "head_unit": head_units.mode,
        "shapes": [[s.heads, s.kv_heads, s.ffn] for s in adapter.layer_shapes(model)],
        "device": device.type,
        "hardware": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        **sizes,
    }


def _time_sweeps(
    model: nn.Module,
    sweeps: tuple[list[Callable[[LayerShape], LayerShape]], ...],
    inputs: dict[str, Any],
    repeats: int,
    warmup: int,
    progress: bool,
) -> tuple[list[float], list[list[float]]]:
    """Time ``model`` (before, between and after the sweeps) and, per sweep, a copy cut to each of its shapes but
    the first (the full width, which the model's own timings stand for); returns the model's timings and each
    sweep's, narrowest first."""
    shapes = get_adapter(model).layer_shapes(model)
    bar = tqdm(total=sum(len(s) - 1 for s in sweeps), desc="latency table", disable=not progress, leave=False)
    timings: list[list[float]] = []
    reference: list[float] = []
    try:
        with eval_mode(model), torch.inference_mode():
            reference.append(_median_ms(model, inputs, repeats, warmup + 1))
            for sweep in sweeps:
                work = copy.deepcopy(model)
                measured = []
                for shape_of in sweep[1:]:  # widest first, as a copy can only shrink
                    apply_layer_shapes(work, [shape_of(s) for s in shapes])
                    measured.append(_median_ms(work, inputs, repeats, warmup))
                    bar.update()
                del work
                reference.append(_median_ms(model, inputs, repeats, warmup))
                timings.append(measured[::-1])
    finally:
        bar.close()
    return reference, timings


def _measure_table(
    model: nn.Module,
    head_units: HeadUnits,
    batch_size: int,
    seq_len: int,
    points: int,
    repeats: int,
    warmup: int,
    multiple: int,
    progress: bool,
) -> LatencyTable:
    """Profile ``model`` (uncached; :func:`profile_latency` documents the arguments)."""
    device, dtype = model_device(model), next(model.parameters()).dtype
    shapes = get_adapter(model).layer_shapes(model)
    max_units, max_ffn = max(head_units.count(s) for s in shapes), max(s.ffn for s in shapes)
    if max_units == 0 or max_ffn == 0:
        raise ValueError("latency profiling needs a model with at least one head and one FFN neuron")
    units, widths = _grid(max_units, points, 1), _grid(max_ffn, points, multiple)

    def cut(s: LayerShape, u: int, ffn: int) -> LayerShape:
        return head_units.shape(s, u, min(ffn, s.ffn))

    sweeps = (
        [lambda s, u=u: cut(s, u, s.ffn) for u in reversed(units)],
        [lambda s, n=n: cut(s, head_units.count(s), n) for n in reversed(widths)],
    )
    inputs = dummy_inputs(model, batch_size, seq_len, device)
    reference, timings = _time_sweeps(model, sweeps, inputs, repeats, warmup, progress)
    full = sorted(reference)[len(reference) // 2]
    # a cut model timed slower than the full one is noise: cap it so both tables end at the same full latency
    unit_ms, ffn_ms = (_isotonic([*(min(v, full) for v in t), full]) for t in timings)
    table = LatencyTable(
        num_layers=len(shapes),
        units=units,
        unit_ms=unit_ms,
        ffn=widths,
        ffn_ms=ffn_ms,
        batch_size=batch_size,
        seq_len=seq_len,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        head_unit=head_units.mode,
    )
    summary = table.summary()
    logger.info(
        "hf_prune: latency on %s (batch %d x %d): %.2f ms; per layer, attention %.3f ms and FFN %.3f ms",
        device,
        batch_size,
        seq_len,
        summary["dense_ms"],
        summary["attention_ms_per_layer"],
        summary["ffn_ms_per_layer"],
    )
    return table


def profile_latency(
    model: nn.Module,
    batch_size: int = 8,
    seq_len: int = 128,
    points: int = 8,
    repeats: int = 2,
    warmup: int = 1,
    multiple: int = 8,
    use_cache: bool = True,
    progress: bool = True,
    head_unit: str = "auto",
) -> LatencyTable:
    """Time ``model`` with every layer cut to ~``points`` head counts and ~``points`` FFN widths; see the module doc.

    Two deep copies are made one after the other (memory: one extra model) and shrunk in place from full width
    down to zero, each shape timed ``repeats`` times (after ``warmup`` untimed passes) on dummy token inputs of
    ``batch_size`` x ``seq_len``; the full-width latency is the median of three timings of ``model`` itself (before,
    between and after the sweeps). Each sweep is made monotone by isotonic regression. FFN widths are rounded to
    ``multiple``. Head counts are swept in ``head_unit`` units (:mod:`hf_prune.planning.units`). A layer already
    narrower than a sweep's width keeps its own.

    Why few points and repeats: the table only prices options for the search; :func:`hf_prune.step.plan_structure`
    times the chosen shapes against the model itself and corrects the budget, so table noise costs at most a search,
    while every timed pass costs the user time.

    Cached per model family, layer shapes, head unit, hardware (:func:`~hf_prune.measure.device_name`), device,
    dtype, thread count, torch version and input size: in memory for the process (the PruningCallback measures once
    and reuses the table at every event) and, with ``use_cache``, as JSON files in
    :func:`~hf_prune.planning.latency_cache.latency_cache_dir`, so the next run on the same kind of machine skips the
    profiling.

    Raises:
        ValueError: a bad size, or a model with no head or no FFN neuron left in any layer.
    """
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("seq_len", seq_len, 1),
        ("points", points, 2),
        ("repeats", repeats, 1),
        ("warmup", warmup, 0),
        ("multiple", multiple, 1),
    ):
        check_int(f"profile_latency: {name}", value, low)
    head_units = HeadUnits(head_unit_mode(model, head_unit))
    sizes = {"batch_size": batch_size, "seq_len": seq_len, "points": points, "multiple": multiple, "repeats": repeats}
    key = _table_key(model, head_units, **sizes)
    memory_key = json.dumps(key, sort_keys=True)
    if use_cache:
        if memory_key in _CACHE:
            return _CACHE[memory_key]
        cached = read_cached(key, LatencyTable.from_dict)
        if cached is not None:
            _CACHE[memory_key] = cached
            return cached
    table = _measure_table(model, head_units, batch_size, seq_len, points, repeats, warmup, multiple, progress)
    if use_cache:
        _CACHE[memory_key] = table
        write_cached(key, table.to_dict())
    return table
