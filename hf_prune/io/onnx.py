"""Export a (pruned) model to ONNX, optionally int8, and check it against PyTorch.

``hf-prune export MODEL_DIR --output OUT [--int8]`` and :func:`export_onnx` write ``OUT/model.onnx`` with dynamic
batch and sequence axes, next to the model's config and tokenizer and an ``export_report.json``. The graph comes from
``torch.onnx.export``; ``--int8`` then applies ONNX Runtime's dynamic quantization (int8 weights, activations
quantized per batch at run time), the usual CPU deployment path for BERT-style models. Structured pruning needs
nothing special here: the graph simply has smaller matrices.

Every export is checked: ONNX Runtime runs the graph on inputs of a *different* batch and sequence length than the
trace (so the dynamic axes are exercised) and the outputs must match PyTorch within ``atol`` (relative to the output
scale) for float32; int8 outputs cannot match exactly, so their deviation and the agreement of the predicted class /
next token are reported instead, and accuracy is re-measured where a task is at hand (the recipe's ``output.export``
evaluates the ONNX model on the evaluation split; ``benchmarks/deploy.py`` on SST-2).

Why torch.onnx rather than optimum's exporter: optimum-onnx pins its own transformers range and adds a large
dependency tree for what is, for the encoder and decoder classes hf_prune prunes, one ``torch.onnx.export`` call.
Needs the ``onnx`` extra: ``pip install "hf_prune[onnx]"`` (onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from ..config import check_int, check_number
from ..utils import eval_mode, random_token_ids, staged_dir

logger = logging.get_logger(__name__)

ONNX_FILE = "model.onnx"
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_OUTPUTS = ("logits", "start_logits", "end_logits", "last_hidden_state")
_EXPORT_FORMATS = ("onnx", "onnx-int8")


class ExportError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how closely ONNX Runtime reproduces PyTorch."""

    path: str
    int8: bool
    inputs: list[str]
    outputs: list[str]
    size_bytes: int
    max_abs_diff: float
    output_scale: float
    atol: float | None
    agreement: float | None
    exporter: str
    seconds: float
    checked_shapes: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _require_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ImportError(
            f"ONNX export needs onnx and onnxruntime ({exc}); install them with: pip install 'hf_prune[onnx]'"
        ) from None
    return onnx, onnxruntime


class _Outputs(nn.Module):
    """The model with positional inputs and a tuple of tensor outputs, as the exporter wants."""

    def __init__(self, model: nn.Module, inputs: list[str], outputs: list[str]) -> None:
        super().__init__()
        self.model, self.inputs, self.outputs = model, inputs, outputs

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kwargs = dict(zip(self.inputs, args, strict=True))
        if "use_cache" in inspect.signature(self.model.forward).parameters:
            kwargs["use_cache"] = False  # no KV cache in the graph: one forward over the whole sequence
        out = self.model(**kwargs)
        return tuple(out[name] for name in self.outputs)


def model_inputs(model: nn.Module) -> list[str]:
    """The standard text inputs ``model.forward`` accepts, in export order."""
    params = inspect.signature(model.forward).parameters
    names = [n for n in _INPUTS if n in params]
    if "input_ids" not in names:
        raise ValueError(f"{type(model).__name__}.forward takes no input_ids; only text models are exported")
    if not getattr(model.config, "type_vocab_size", 0):
        # GPT-2 accepts token_type_ids but looks them up in its word embeddings: zeros are not "no segment ids"
        names = [n for n in names if n != "token_type_ids"]
    return names


def sample_inputs(
    model: nn.Module, names: list[str], batch: int, seq_len: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Deterministic token batches with some padding (right for encoders, left for decoders)."""
    ids = random_token_ids(int(model.config.vocab_size), batch, seq_len, low=5, seed=seed)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    if batch > 1 and seq_len > 2:
        cut = seq_len // 3
        if getattr(model.config, "is_decoder", False) or "CausalLM" in type(model).__name__:
            mask[-1, :cut] = 0
        else:
            mask[-1, seq_len - cut :] = 0
    out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return {n: out[n] for n in names}


def _output_names(model: nn.Module, example: dict[str, torch.Tensor]) -> list[str]:
    with torch.no_grad():
        out = model(**example)
    names = [n for n in _OUTPUTS if isinstance(out.get(n) if hasattr(out, "get") else None, torch.Tensor)]
    if not names:
        raise ValueError(f"{type(model).__name__} returns none of {_OUTPUTS}; cannot choose what to export")
    if "logits" in names or "start_logits" in names:
        names = [n for n in names if n != "last_hidden_state"]
    return names


EXPORTERS = ("torchscript", "dynamo")


def _torch_export(
    wrapper: nn.Module, example: dict[str, torch.Tensor], path: Path, outputs: list[str], exporter: str
) -> None:
    names = list(example)
    args = tuple(example.values())
    if exporter == "torchscript":
        axes = {n: {0: "batch", 1: "sequence"} for n in names}
        with torch.no_grad():
            traced = wrapper(*args)
        for name, tensor in zip(outputs, traced, strict=True):
            # (batch, sequence, ...) outputs and span logits run along the sequence; a classifier's (batch, labels)
            per_token = tensor.dim() >= 3 or name in ("start_logits", "end_logits")
            axes[name] = {0: "batch", 1: "sequence"} if per_token else {0: "batch"}
        torch.onnx.export(
            wrapper, args, str(path), input_names=names, output_names=outputs, dynamic_axes=axes, dynamo=False
        )
        return
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    torch.onnx.export(
        wrapper,
        args,
        str(path),
        input_names=names,
        output_names=outputs,
        dynamic_shapes=tuple({0: batch, 1: seq} for _ in names),
        dynamo=True,
    )


def _session(path: Path, threads: int | None = None) -> Any:
    _, ort = _require_onnx()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feed(session: Any, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The graph's inputs as numpy arrays; ``token_type_ids`` / ``attention_mask`` default as in the PyTorch forward
    (zeros / ones) when the batch has none, since a graph input cannot be optional."""
    ids = inputs["input_ids"]
    defaults = {"token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids)}
    feed = {}
    for spec in session.get_inputs():
        value = inputs.get(spec.name, defaults.get(spec.name))
        if value is None:
            raise ValueError(f"the ONNX graph needs input {spec.name!r}; the batch has {sorted(inputs)}")
        feed[spec.name] = value.cpu().numpy()
    return feed


def run_onnx(session: Any, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Run an ONNX Runtime session on torch inputs (the ones the graph declares) and return torch outputs."""
    return [torch.from_numpy(o) for o in session.run(None, _feed(session, inputs))]


def _compare(session: Any, wrapper: nn.Module, check: dict[str, torch.Tensor]) -> tuple[float, float, float]:
    with torch.no_grad():
        want = wrapper(*check.values())
    got = run_onnx(session, check)
    mask = check.get("attention_mask")
    diffs, scale, agree = [], 0.0, []
    for w, g in zip(want, got, strict=True):
        w, g = w.float(), g.float()
        valid = mask.bool() if mask is not None and w.dim() >= 2 and w.shape[:2] == mask.shape else None
        d = (w - g).abs()
        if valid is not None:  # padded positions are not outputs anyone reads
            d, w_valid = d[valid], w[valid]
        else:
            w_valid = w
        diffs.append(float(d.max()) if d.numel() else 0.0)
        scale = max(scale, float(w_valid.abs().max()) if w_valid.numel() else 0.0)
        if w.dim() >= 2:
            pw, pg = w.argmax(-1), g.argmax(-1)
            if valid is not None:
                pw, pg = pw[valid], pg[valid]
            agree.append(float((pw == pg).float().mean()))
    return max(diffs), scale, (sum(agree) / len(agree) if agree else float("nan"))


def quantize_int8(src: Path, dst: Path) -> None:
    """ONNX Runtime dynamic quantization: int8 weights (per output channel), activations quantized at run time."""
    _require_onnx()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)


def torch_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with PyTorch dynamic int8 ``nn.Linear`` layers (``torch.ao`` dynamic quantization), for
    users who stay in PyTorch on CPU. Pruned shapes need nothing special: every Linear is quantized as it is."""
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(copy.deepcopy(model).float().cpu().eval(), {nn.Linear}, dtype=torch.qint8)


def _check_shape(where: str, shape: Any) -> None:
    if not isinstance(shape, (tuple, list)) or len(shape) != 2:
        raise ValueError(f"export_onnx: {where}={shape!r} is invalid; allowed: a (batch, sequence) pair of integers")
    for name, value in zip(("batch", "sequence"), shape, strict=True):
        check_int(f"export_onnx: {where} {name}", value, 1)


def _check_export_args(
    model: Any, output_dir: Any, int8: Any, atol: Any, trace_shape: Any, check_shapes: Any
) -> Path | None:
    """Validate :func:`export_onnx`'s arguments before anything loads or traces; returns the source folder (for a
    folder model) or None."""
    if not isinstance(model, (nn.Module, str, os.PathLike)):
        raise TypeError(f"export_onnx: model must be a torch model or a saved model folder; got {type(model).__name__}")
    if not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir):
        raise TypeError(f"export_onnx: output_dir must be a folder path (str or Path); got {output_dir!r}")
    if not isinstance(int8, bool):
        raise TypeError(f"export_onnx: int8={int8!r} is invalid; allowed: True or False")
    check_number("export_onnx: atol", atol, 0)
    _check_shape("trace_shape", trace_shape)
    if not isinstance(check_shapes, (tuple, list)) or not check_shapes:
        raise ValueError(f"export_onnx: check_shapes={check_shapes!r} is invalid; allowed: (batch, sequence) pairs")
    for shape in check_shapes:
        _check_shape("check_shapes", shape)
    if isinstance(model, nn.Module):
        return None
    source, target = Path(model).resolve(), Path(output_dir).resolve()
    if target == source or target in source.parents:
        # the finished export replaces output_dir as a whole: here that would delete the model it came from
        raise ValueError(
            f"export_onnx: output_dir={str(output_dir)!r} is the model folder or holds it, and is replaced by the "
            "export; choose a folder outside the model's"
        )
    return Path(model)


def _export_verified(
    wrapper: nn.Module,
    example: dict[str, torch.Tensor],
    path: Path,
    outputs: list[str],
    checks: list[dict[str, torch.Tensor]],
    atol: float,
) -> tuple[str, list[tuple[float, float, float]]]:
    """Write the float32 graph with the first exporter whose graph matches PyTorch on every check input within
    ``atol``: the exporter's name and the ``(max diff, output scale, agreement)`` per check."""
    failures = []
    for exporter in EXPORTERS:
        # TorchScript first: it exports an encoder far faster than the dynamo exporter; dynamo where TorchScript
        # fails or traces something that does not generalise (GPT-2's positions)
        try:
            _torch_export(wrapper, example, path, outputs, exporter)
        except Exception as exc:
            failures.append(f"{exporter}: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        results = [_compare(_session(path), wrapper, check) for check in checks]
        diff, scale = max(r[0] for r in results), max(r[1] for r in results)
        if diff <= atol * max(1.0, scale):
            if failures:
                logger.info(f"hf_prune: ONNX export used the {exporter} exporter ({'; '.join(failures)})")
            return exporter, results
        failures.append(f"{exporter}: off by {diff:.3g} (tolerance {atol} x {max(1.0, scale):.3g})")
    raise ExportError("no ONNX exporter reproduced the model: " + "; ".join(failures))


def _save_tokenizer(folder: Path, tokenizer: Any | None, source: Path | None) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    elif source is not None and source.is_dir():
        for f in source.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens_map", "vocab", "merges")) and f.is_file():
                shutil.copy2(f, folder / f.name)


def export_onnx(
    model: nn.Module | str | Path,
    output_dir: str | Path,
    int8: bool = False,
    atol: float = 1e-4,
    tokenizer: Any | None = None,
    trace_shape: tuple[int, int] = (2, 16),
    check_shapes: tuple[tuple[int, int], ...] = ((3, 11), (2, 23)),
) -> ExportReport:
    """Export ``model`` (a model, or a folder saved by :func:`hf_prune.save_pretrained`) to
    ``output_dir/model.onnx`` and check it with ONNX Runtime.

    Args:
        int8: quantize the graph with ONNX Runtime dynamic int8 quantization.
        atol: float32 exports must match PyTorch within ``atol`` x max(1, largest output magnitude); a finite
            number >= 0.
        tokenizer: saved next to the graph (a folder's own tokenizer files are copied).
        trace_shape / check_shapes: (batch, sequence) of the traced inputs and of the check runs (shorter and
            longer than traced, so the dynamic axes are tested).

    Raises:
        TypeError / ValueError: an argument of the wrong kind or out of range (before anything loads); an
            ``output_dir`` that is, or holds, the model folder being exported (the export replaces it).
        ExportError: the float32 graph does not reproduce PyTorch within ``atol``.
        ImportError: onnx / onnxruntime are not installed.
    """
    source = _check_export_args(model, output_dir, int8, atol, trace_shape, check_shapes)
    _require_onnx()
    start = time.time()
    if source is not None:
        model = load_for_export(source)
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        # the graph is traced and checked in float32 on CPU (where ONNX Runtime runs it here); a copy, so the
        # caller's GPU or half-precision model stays where and what it was
        model = copy.deepcopy(model).float().cpu()
    target = Path(output_dir).resolve()
    with eval_mode(model), staged_dir(target) as tmp:
        names = model_inputs(model)
        example = sample_inputs(model, names, *trace_shape)
        outputs = _output_names(model, example)
        wrapper = _Outputs(model, names, outputs).eval()
        fp32 = tmp / ("model_fp32.onnx" if int8 else ONNX_FILE)
        # checked on a shorter and a longer sequence than traced: a tracer that baked a length in fails one of them
        checks = [sample_inputs(model, names, *shape, seed=i + 1) for i, shape in enumerate(check_shapes)]
        exporter, results = _export_verified(wrapper, example, fp32, outputs, checks, atol)
        if int8:
            quantize_int8(fp32, tmp / ONNX_FILE)
            fp32.unlink()
            results = [_compare(_session(tmp / ONNX_FILE), wrapper, check) for check in checks]
        model.config.save_pretrained(tmp)
        _save_tokenizer(tmp, tokenizer, source)
        report = ExportReport(
            path=str(target / ONNX_FILE),
            int8=int8,
            inputs=names,
            outputs=outputs,
            size_bytes=(tmp / ONNX_FILE).stat().st_size,
            max_abs_diff=max(r[0] for r in results),
            output_scale=max(r[1] for r in results),
            atol=None if int8 else atol,
            agreement=min(r[2] for r in results),
            exporter=f"torch.onnx ({exporter})",
            seconds=round(time.time() - start, 1),
            checked_shapes=[list(c) for c in check_shapes],
        )
        (tmp / "export_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report


def load_for_export(folder: Path) -> nn.Module:
    """Load a saved folder with the class named in its config (``architectures``), pruned shapes and all."""
    import transformers

    from .load import from_pretrained

    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a saved model folder (no config.json); export a local folder")
    config = json.loads((folder / "config.json").read_text())
    names = config.get("architectures") or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        cls = transformers.AutoModel
    return from_pretrained(folder, cls)


def check_export_format(value: str | None) -> str | None:
    """Validate a recipe's ``output.export`` value."""
    if value in (None, "", "none"):
        return None
    if value not in _EXPORT_FORMATS:
        raise ValueError(f"output.export={value!r} is not allowed; use one of {', '.join(_EXPORT_FORMATS)} or none")
    return value


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for ``path`` (``threads``: intra-op threads, default ONNX Runtime's choice)."""
    return _session(Path(path), threads)


def onnx_logits(session: Any, batches: Any) -> Any:
    """Yield ``(logits, batch)`` for each batch (a dict of tensors, e.g. from a ``DataLoader`` with the task's
    collator) run through ``session``; the first output is taken as the logits."""
    for batch in batches:
        yield run_onnx(session, batch)[0], batch


def time_onnx(session: Any, inputs: dict[str, torch.Tensor], repeats: int = 10, warmup: int = 3) -> list[float]:
    """Wall-clock milliseconds of ``repeats`` runs of ``session`` on ``inputs`` (after ``warmup`` runs)."""
    feed = _feed(session, inputs)
    for _ in range(warmup):
        session.run(None, feed)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        samples.append((time.perf_counter() - start) * 1000)
    return samples
