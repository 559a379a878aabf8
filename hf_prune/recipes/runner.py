"""Run a recipe end to end: data -> (dense fine-tune) -> prune and recover -> save -> evaluate -> report -> push.

Pruning itself is the library's: blocks are removed once by :func:`hf_prune.prune` (``depth_only``), heads, neurons
and weight masks on the recipe's schedule by the :class:`~hf_prune.PruningTrainer`, which also recovers. This module
only runs the job and records it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from transformers.utils import logging

from .. import __version__
from ..architectures import get_adapter
from ..config import PruningConfig
from ..evaluation import mean_loss, onnx_perplexity, onnx_predict_logits, predict_logits
from ..io.save import save_pretrained
from ..measure import compare_latency, measure_latency, model_summary, saved_size_bytes
from ..oneshot import prune
from ..training.lora import get_peft_model, merge_and_unload
from ..training.trainer import PruningTrainer
from ..utils import dummy_inputs, model_device, staged_dir
from .data import data_format, load_data, load_model_and_tokenizer, resolve_path, tokenize
from .metrics import classification_metrics, perplexity
from .offline import OFFLINE_MODELS
from .report import latency_device, write_report
from .schema import Recipe, RecipeError

logger = logging.get_logger(__name__)

__all__ = [
    "data_format",
    "evaluate_model",
    "load_data",
    "load_model_and_tokenizer",
    "push_folder",
    "resolve_path",
    "run_recipe",
    "summary_table",
    "tokenize",
]


# ---------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------
def evaluate_model(
    recipe: Recipe, model, data, tokenizer, batch_size: int = 64, trainer: tf.Trainer | None = None
) -> dict[str, float]:
    """The recipe's metrics on ``data``, through the Trainer's evaluation loop (``trainer``: the running one)."""
    if recipe.model.task == "causal-lm":
        if "perplexity" not in recipe.evaluation.metrics:
            return {}
        # the blocks all hold max_length tokens, so the mean loss is the token-weighted NLL
        loss = mean_loss(model, data, batch_size=max(1, batch_size // 8), trainer=trainer)
        tokens = len(data) * (recipe.data.max_length - 1)
        return {"perplexity": perplexity([loss], [tokens])}
    logits, labels = predict_logits(
        model, data, tf.DataCollatorWithPadding(tokenizer), batch_size=batch_size, trainer=trainer
    )
    names = [m for m in recipe.evaluation.metrics if m != "perplexity"]
    return classification_metrics(
        names, logits.argmax(-1).tolist(), labels.astype(int).tolist(), num_labels=model.config.num_labels
    )


def _training_args(recipe: Recipe, output_dir: str, overrides: dict[str, Any]) -> tf.TrainingArguments:
    base = {"output_dir": output_dir, "report_to": "none", "save_strategy": "no", "seed": recipe.seed}
    try:
        return tf.TrainingArguments(**{**base, **overrides})
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{recipe.where('training')}: invalid training arguments: {err}") from None


def _latency_inputs(recipe: Recipe, tokenizer, model) -> dict[str, torch.Tensor]:
    """Seeded token inputs for the before/after timings, drawn from the ids both the tokenizer and the model know."""
    ev = recipe.evaluation
    seq = ev.latency_seq_len or recipe.data.max_length
    vocab = min(tokenizer.vocab_size or 1000, model.config.vocab_size)
    return dummy_inputs(model, ev.latency_batch, seq, low=5, vocab_size=max(6, vocab - 1))


# ---------------------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _timed(walls: dict[str, float], key: str) -> Iterator[None]:
    start = time.time()
    yield
    walls[key] = time.time() - start


def run_recipe(recipe: Recipe, output_dir: str | None = None, push: bool | None = None) -> dict[str, Any]:
    """Run ``recipe`` and return its report (also written to ``pruning_report.json``).

    The output folder appears once the pruned model is trained: model, tokenizer and report, built in a staging
    sibling and moved into place in one rename, so it is never half-written (a failure before that leaves nothing).
    The steps after it (evaluation, latency, export) add to the folder, each piece written atomically. A step that
    fails there keeps everything finished on disk, records the error in the report (``error``; ``pending`` lists
    what did not run) and re-raises: a failure never discards a trained model.
    """
    out_dir = Path(output_dir or recipe.output.dir)
    start = time.time()
    walls: dict[str, float] = {}
    torch.manual_seed(recipe.seed)
    with _timed(walls, "load"):
        raw = load_data(recipe)  # columns are checked here, before the model loads
        model, tokenizer, resolved_path = load_model_and_tokenizer(recipe)
        get_adapter(model, structural=recipe.pruning.removes_structure)
        train, evaluation = tokenize(recipe, raw, tokenizer)

    with tempfile.TemporaryDirectory() as work:
        collator = tf.DataCollatorWithPadding(tokenizer) if recipe.model.task != "causal-lm" else None
        if recipe.dense_training is not None:
            with _timed(walls, "dense_training"):
                args = _training_args(recipe, f"{work}/dense", {"disable_tqdm": False, **recipe.dense_training})
                tf.Trainer(model=model, args=args, train_dataset=train, data_collator=collator).train()
        with _timed(walls, "evaluate_dense"):
            metrics_dense = evaluate_model(recipe, model, evaluation, tokenizer)
        logger.warning("dense: %s", metrics_dense)
        dense = copy.deepcopy(model).eval()
        with _timed(walls, "prune_and_recover"):
            trainer, after_pruning = _prune_and_recover(recipe, model, train, evaluation, tokenizer, collator, work)
        model.eval()
        report = _report(recipe, dense, model, resolved_path, trainer)
        report["metrics"] = {"dense": metrics_dense, "after_pruning": after_pruning}
        report["wall_time_s"] = walls
        report["pending"] = ["evaluate_pruned", "latency", *(["export"] if recipe.output.export else [])]
        with _timed(walls, "save"):
            _save(recipe, model, tokenizer, report, out_dir)
        with _failure_recorded(recipe, report, out_dir):
            _finish(recipe, dense, model, tokenizer, evaluation, report, out_dir)
    del report["pending"]
    walls["total"] = time.time() - start
    write_report(out_dir, report, recipe)
    if push if push is not None else recipe.output.push_to_hub:
        push_folder(out_dir, recipe.output.repo_id, recipe.output.private)
    report["output_dir"] = str(out_dir)
    return report


class _EvaluateAfterPruning(tf.TrainerCallback):
    """Measures the recipe's metrics once, right after the trainer's last pruning event (before recovery)."""

    def __init__(self, recipe: Recipe, trainer: PruningTrainer, evaluation, tokenizer, into: dict[str, Any]):
        self.recipe, self.trainer, self.evaluation, self.tokenizer = recipe, trainer, evaluation, tokenizer
        self.into = into

    def on_train_begin(self, args, state, control, **kwargs):
        self._check(state)

    def on_step_end(self, args, state, control, **kwargs):
        self._check(state)

    def _check(self, state) -> None:
        events = self.trainer.pruning_callback.events
        if events and state.global_step == events[-1].step and not self.into:
            t = self.trainer
            self.into.update(evaluate_model(self.recipe, t.model, self.evaluation, self.tokenizer, trainer=t))


def _prune_and_recover(recipe: Recipe, model, train, evaluation, tokenizer, collator, work: str):
    """Prune and recover; return the trainer and the metrics measured right after the last pruning event.

    Blocks go first, once, through :func:`hf_prune.prune` with ``depth_only=True`` (the trainer does not schedule
    depth); a keep-target covers depth and width together, so the trainer gets the report's ``width_config``, what
    the removed blocks leave of it.
    """
    after_pruning: dict[str, Any] = {}
    config = recipe.pruning
    calibration = train.select(range(min(len(train), recipe.data.calibration_samples)))
    if config.prunes_depth:
        depth = prune(model, config, calibration, collate_fn=collator, depth_only=True)
        config = PruningConfig.from_dict(depth.width_config)
        if not (config.structured or config.effective_sparsity):  # nothing else to prune: measure it now
            after_pruning.update(evaluate_model(recipe, model, evaluation, tokenizer))
    # LoRA: adapters whose deltas keep the masks; cuts made while they exist take their rows/columns along
    trained = get_peft_model(model, recipe.lora) if recipe.lora is not None else model
    trainer = PruningTrainer(
        model=trained,
        args=_training_args(recipe, f"{work}/recovery", recipe.training),
        train_dataset=train,
        data_collator=collator,
        pruning_config=config,
        calibration_dataset=calibration,
    )
    trainer.add_callback(_EvaluateAfterPruning(recipe, trainer, evaluation, tokenizer, after_pruning))
    trainer.train()
    if trained is not model:
        # one plain model is saved, evaluated and exported; peft merges into the modules of `model` itself
        merged = merge_and_unload(trained)
        if merged is not model:
            raise RuntimeError("peft's merge returned another model object than the one it wrapped")
    return trainer, after_pruning


def _report(recipe: Recipe, dense, model, resolved_path: str, trainer) -> dict[str, Any]:
    """What was pruned, measured by :func:`~hf_prune.measure.model_summary` on both models (metrics, latency and
    wall times are added by the caller)."""
    seq_len = recipe.pruning.seq_len  # FLOPs are reported at the length the targets were set for
    before, after = model_summary(dense, seq_len), model_summary(model, seq_len)
    flops = {"seq_len": seq_len, "dense": before["encoder_flops"], "pruned": after["encoder_flops"]}
    flops["ratio"] = flops["dense"] / max(1, flops["pruned"])
    return {
        "hf_prune_version": __version__,
        "recipe": recipe.raw,
        "recipe_file": recipe.source,
        "base_model": OFFLINE_MODELS.get(recipe.model.name_or_path, recipe.model.name_or_path),
        "base_model_path": resolved_path,
        "seed": recipe.seed,
        "plan": {
            "kept_heads": [layer["heads"] for layer in after["layers"]],
            "kept_kv_heads": [layer["kv_heads"] for layer in after["layers"]],
            "kept_ffn": [layer["ffn"] for layer in after["layers"]],
            "kept_layers": after["kept_layers"],  # None: no block was removed
            "original_layers": before["num_layers"],
            "original": after["original"],
            "kept_original_head_ids": after["kept_original_head_ids"],
        },
        "pruning_config": recipe.pruning.to_dict(),
        "params": {"dense": before["parameters"], "pruned": after["parameters"]},
        "encoder_flops": flops,
        "size_bytes": {"dense": saved_size_bytes(dense), "pruned": saved_size_bytes(model)},
        "sparsity": after["sparsity"],
        "versions": {"torch": torch.__version__, "transformers": tf.__version__, "python": platform.python_version()},
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "train_log": [h for h in trainer.state.log_history if "loss" in h][-5:],
    }


# ---------------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------------
def _save(recipe: Recipe, model, tokenizer, report: dict[str, Any], out_dir: Path) -> None:
    """Write the model, its tokenizer and the report so far: built in a staging sibling, moved into place in one
    rename (an existing folder is replaced only then)."""
    with staged_dir(out_dir) as tmp:
        save_pretrained(model, tmp / "model-staging", tokenizer=tokenizer, sparse=recipe.output.sparse)
        report["size_bytes"]["saved"] = _weights_bytes(tmp / "model-staging")
        report["size_bytes"]["saved_format"] = "sparse (values + bitmask)" if recipe.output.sparse else "dense"
        report["loading"] = _loading(tmp / "model-staging")
        for item in (tmp / "model-staging").iterdir():
            shutil.move(str(item), tmp / item.name)
        (tmp / "model-staging").rmdir()
        write_report(tmp, report, recipe)


@contextlib.contextmanager
def _step(report: dict[str, Any], name: str) -> Iterator[None]:
    """Time one of the steps after saving and strike it from ``report["pending"]`` when it finishes."""
    with _timed(report["wall_time_s"], name):
        yield
    report["pending"].remove(name)


@contextlib.contextmanager
def _failure_recorded(recipe: Recipe, report: dict[str, Any], out_dir: Path) -> Iterator[None]:
    """On a failure, add it to the saved report (the model and everything finished stay) and re-raise it."""
    try:
        yield
    except BaseException as err:
        step = report["pending"][0] if report["pending"] else None
        report["error"] = {"step": step, "type": type(err).__name__, "message": str(err)}
        try:
            write_report(out_dir, report, recipe)
        except Exception as write_err:  # the step's error is the one to raise
            logger.error("hf_prune: could not record the failure in %s: %s", out_dir, write_err)
        raise


def _finish(recipe: Recipe, dense, model, tokenizer, evaluation, report: dict[str, Any], out_dir: Path) -> None:
    """The steps after saving: evaluate the pruned model, time both models, export (``output.export``)."""
    with _step(report, "evaluate_pruned"):
        report["metrics"]["after_recovery"] = evaluate_model(recipe, model, evaluation, tokenizer)
    # The Trainer moved the model to its device (a GPU where there is one); time both models there.
    dense.to(model_device(model))
    latency_inputs = _latency_inputs(recipe, tokenizer, model)
    with _step(report, "latency"):
        latency = compare_latency(dense, model, latency_inputs, repeats=recipe.evaluation.latency_repeats)
    report["latency"] = {
        "batch": recipe.evaluation.latency_batch,
        "seq_len": recipe.evaluation.latency_seq_len or recipe.data.max_length,
        "device": str(model_device(model)),
        **latency,
    }
    if recipe.output.export:
        with _step(report, "export"):
            stage = Path(tempfile.mkdtemp(prefix=".onnx.tmp-", dir=out_dir))
            try:
                report["export"] = _export(recipe, model, tokenizer, evaluation, stage, latency_inputs)
                os.replace(stage / "onnx", out_dir / "onnx")  # the finished export appears in one rename
            finally:
                shutil.rmtree(stage, ignore_errors=True)


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.endswith(".safetensors"))


def _export(recipe: Recipe, model, tokenizer, evaluation, folder: Path, latency_inputs) -> dict[str, Any]:
    """``output.export``: write ``folder/onnx``, evaluate it on the evaluation split and time it against PyTorch."""
    from ..io.onnx import export_onnx, onnx_session, time_onnx

    cpu_model = copy.deepcopy(model).float().cpu().eval()
    result = export_onnx(cpu_model, folder / "onnx", int8=recipe.output.export == "onnx-int8", tokenizer=tokenizer)
    session = onnx_session(result.path)
    if recipe.model.task == "causal-lm":
        ppl = onnx_perplexity(session, evaluation, tf.default_data_collator, batch_size=32)
        metrics = {"perplexity": ppl} if "perplexity" in recipe.evaluation.metrics else {}
    else:
        logits, labels = onnx_predict_logits(session, evaluation, tf.DataCollatorWithPadding(tokenizer), batch_size=32)
        names = [m for m in recipe.evaluation.metrics if m != "perplexity"]
        preds, refs = logits.argmax(-1).tolist(), labels.tolist()
        metrics = classification_metrics(names, preds, refs, num_labels=model.config.num_labels)
    inputs = {k: v.cpu() for k, v in latency_inputs.items()}
    onnx_ms = statistics.median(time_onnx(session, inputs, repeats=recipe.evaluation.latency_repeats))
    torch_ms = measure_latency(cpu_model, inputs, recipe.evaluation.latency_repeats).median_ms
    return {
        "format": recipe.output.export,
        "path": "onnx/model.onnx",
        "size_bytes": result.size_bytes,
        "metrics": metrics,
        "check": {"max_abs_diff": result.max_abs_diff, "atol": result.atol, "agreement": result.agreement},
        "latency_ms": {"onnxruntime_cpu": onnx_ms, "pytorch_cpu": torch_ms, "speedup": torch_ms / onnx_ms},
        "exporter": result.exporter,
    }


def _loading(folder: Path) -> str:
    """How the saved model folder loads: ``stock`` (plain from_pretrained), ``remote-code`` (stock auto classes with
    trust_remote_code, through hf_prune_modeling.py) or ``hf_prune`` (hf_prune.from_pretrained only: sparse layout)."""
    from ..sparsity.sparse_io import sparse_files
    from ..structure.remote_code import MODELING_FILE

    if sparse_files(folder):
        return "hf_prune"
    return "remote-code" if (folder / MODELING_FILE).exists() else "stock"


def push_folder(folder: Path, repo_id: str | None, private: bool = True) -> str:
    """Upload exactly ``folder`` (model, tokenizer, report, card) to ``repo_id`` on the Hub."""
    if not repo_id:
        raise RecipeError("push_to_hub needs output.repo_id")
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload pruned model (hf_prune)")
    return str(getattr(info, "commit_url", info))


def summary_table(report: dict[str, Any]) -> str:
    """A short before/after table for the terminal."""
    m = report["metrics"]
    rows = [("", "dense", "pruned")]
    for name, value in m["dense"].items():
        after = m["after_recovery"].get(name)
        rows.append((name, f"{value:.4f}", f"{after:.4f}" if after is not None else "-"))
        if name in m.get("after_pruning", {}):
            rows.append((f"{name} (before recovery)", "", f"{m['after_pruning'][name]:.4f}"))
    p, f, s, lat = report["params"], report["encoder_flops"], report["size_bytes"], report["latency"]
    rows += [
        ("parameters", f"{p['dense'] / 1e6:.2f}M", f"{p['pruned'] / 1e6:.2f}M"),
        (f"encoder GFLOPs (seq {f['seq_len']})", f"{f['dense'] / 1e9:.2f}", f"{f['pruned'] / 1e9:.2f}"),
        ("size on disk", f"{s['dense'] / 2**20:.1f} MiB", f"{s['pruned'] / 2**20:.1f} MiB"),
        (
            f"{latency_device(lat)} latency (batch {lat['batch']})",
            f"{lat['dense_ms']:.1f} ms",
            f"{lat['pruned_ms']:.1f} ms",
        ),
        ("sparsity", "0%", f"{report['sparsity']:.0%}"),
    ]
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{a:<{width}}{b:>12}{c:>12}" for a, b, c in rows]
    lines.append(
        f"FLOPs cut {f['ratio']:.2f}x, speedup {lat['speedup']:.2f}x, wall time {report['wall_time_s']['total']:.0f} s"
    )
    return "\n".join(lines)
