"""Run a recipe end to end: data -> (dense fine-tune) -> prune and recover -> evaluate -> report -> save/push."""

from __future__ import annotations

import contextlib
import copy
import csv
import math
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
from datasets import DatasetDict, load_dataset
from transformers.utils import logging

from .. import __version__
from ..architectures import get_adapter
from ..compat import float_weights
from ..config import closest
from ..evaluation import mean_loss, predict_logits
from ..io.save import save_pretrained, write_atomic_dir
from ..measure import compare_latency, count_parameters, encoder_flops, measure_latency, saved_size_bytes
from ..scoring.calibration import calibration_set, model_device
from ..sparsity.masks import sparsity_report
from ..step import depth_step
from ..training.trainer import PruningTrainer
from .metrics import classification_metrics, perplexity
from .offline import minilm_path, smollm2_path
from .report import latency_device, write_report
from .schema import FORMATS, Recipe, RecipeError

logger = logging.get_logger(__name__)

# The offline packages carry these Hub models; reports and model cards name the Hub id.
OFFLINE_MODELS = {
    "offline:minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "offline:smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------
def resolve_path(recipe: Recipe, path: str) -> str:
    """Relative data paths are relative to the recipe file's folder, then to the working directory."""
    p = Path(path)
    if p.is_absolute() or recipe.source == "<dict>":
        return str(p)
    beside = Path(recipe.source).resolve().parent / p
    return str(beside if beside.exists() else p)


COMPRESSION_SUFFIXES = (".gz", ".xz", ".bz2", ".zst")  # datasets decompresses these itself


SUFFIX_FORMATS = {"tsv": "tsv", "csv": "csv", "json": "json", "jsonl": "json", "txt": "text", "parquet": "parquet"}


def data_format(path: str) -> str:
    """The recipe format of a data file from its name (``.jsonl`` is json, ``.txt`` text), compression aside."""
    p = Path(path)
    if p.suffix in COMPRESSION_SUFFIXES:
        p = p.with_suffix("")
    suffix = p.suffix.lstrip(".").lower()
    return SUFFIX_FORMATS.get(suffix, suffix)


def load_data(recipe: Recipe) -> DatasetDict:
    """Load the recipe's data and check its columns, before any model is loaded."""
    d = recipe.data
    if d.files:
        files = {split: resolve_path(recipe, f) for split, f in d.files.items()}
        missing = [f for f in files.values() if not Path(f).exists()]
        if missing:
            raise RecipeError(f"{recipe.where('data', 'files')}: data file(s) not found: {missing}")
        fmt = d.format or data_format(next(iter(files.values())))
        if fmt not in FORMATS:
            raise RecipeError(
                f"{recipe.where('data', 'files')}: cannot tell the format of {next(iter(files.values()))!r} from its "
                f"name; set data.format to one of {', '.join(FORMATS)}"
            )
        kwargs: dict[str, Any] = {}
        if fmt in ("tsv", "csv"):
            kwargs = {"delimiter": "\t" if fmt == "tsv" else ",", "quoting": csv.QUOTE_NONE if fmt == "tsv" else 0}
            if d.column_names:
                kwargs["column_names"] = d.column_names
            ds = load_dataset("csv", data_files=files, **kwargs)
        else:
            ds = load_dataset(fmt, data_files=files)
    else:
        ds = load_dataset(d.dataset, d.config)
    for split in (d.train_split, d.eval_split):
        if split not in ds:
            raise RecipeError(
                f"{recipe.where('data')}: split '{split}' not in the data{closest(split, list(ds))}; "
                f"available: {', '.join(ds)}"
            )
    columns = ds[d.train_split].column_names
    wanted = [("text_columns", c) for c in d.text_columns]
    if recipe.model.task == "sequence-classification":
        wanted.append(("label_column", d.label_column))
    for key, column in wanted:
        if column not in columns:
            raise RecipeError(
                f"{recipe.where('data', key)}: column '{column}' (data.{key}) not in the data"
                f"{closest(str(column), columns)}; columns: {', '.join(columns)}"
            )
    return ds


def _subset(ds, n: int | None, seed: int):
    return ds if n is None or n >= len(ds) else ds.shuffle(seed=seed).select(range(n))


def tokenize(recipe: Recipe, ds: DatasetDict, tokenizer) -> tuple[Any, Any]:
    d = recipe.data
    train = _subset(ds[d.train_split], d.max_train_samples, d.shuffle_seed)
    evaluation = _subset(ds[d.eval_split], d.max_eval_samples, d.shuffle_seed)
    if recipe.model.task == "causal-lm":
        return _lm_blocks(train, d, tokenizer), _lm_blocks(evaluation, d, tokenizer)
    label_map = {name: i for i, name in enumerate(d.label_names)} if d.label_names else None

    def encode(batch):
        texts = [batch[c] for c in d.text_columns]
        enc = tokenizer(*texts, truncation=True, max_length=d.max_length)
        labels = batch[d.label_column]
        enc["labels"] = [label_map[v] for v in labels] if label_map else [int(v) for v in labels]
        return enc

    remove = train.column_names
    return (
        train.map(encode, batched=True, remove_columns=remove),
        evaluation.map(encode, batched=True, remove_columns=evaluation.column_names),
    )


def _lm_blocks(split, d, tokenizer):
    """Concatenate the text and cut it into ``max_length`` token blocks (labels = inputs)."""
    column = d.text_columns[0]
    text = "\n".join(t for t in split[column] if t is not None)
    ids = tokenizer(text)["input_ids"]
    n = len(ids) // d.max_length
    blocks = [ids[i * d.max_length : (i + 1) * d.max_length] for i in range(n)]
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


# ---------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------
def load_model_and_tokenizer(recipe: Recipe):
    m = recipe.model
    path, gguf = m.name_or_path, m.gguf_file
    if path == "offline:minilm":
        path = minilm_path()
    elif path == "offline:smollm2":
        path, gguf = smollm2_path()
    elif path.startswith("offline:"):
        raise RecipeError(
            f"{recipe.where('model', 'name_or_path')}: unknown offline model '{path}'"
            f"{closest(path, sorted(OFFLINE_MODELS))}; allowed: {', '.join(sorted(OFFLINE_MODELS))}"
        )
    extra = {"gguf_file": gguf} if gguf else {}
    tokenizer = tf.AutoTokenizer.from_pretrained(path, trust_remote_code=m.trust_remote_code, **extra)
    if gguf:  # unpacked to float at load time, whatever kernels are installed: hf_prune slices float weights
        extra["quantization_config"] = tf.GgufConfig(dequantize=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = getattr(torch, m.dtype)
    if m.task == "sequence-classification":
        num_labels = m.num_labels or (len(recipe.data.label_names) if recipe.data.label_names else 2)
        model = tf.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, dtype=dtype, trust_remote_code=m.trust_remote_code, **extra
        )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = tf.AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=m.trust_remote_code, **extra
        )
    return float_weights(model), tokenizer, path


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
    ev = recipe.evaluation
    seq = ev.latency_seq_len or recipe.data.max_length
    g = torch.Generator().manual_seed(0)
    vocab = min(tokenizer.vocab_size or 1000, model.config.vocab_size)
    ids = torch.randint(5, max(6, vocab - 1), (ev.latency_batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# ---------------------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _timed(walls: dict[str, float], key: str) -> Iterator[None]:
    start = time.time()
    yield
    walls[key] = time.time() - start


def run_recipe(recipe: Recipe, output_dir: str | None = None, push: bool | None = None) -> dict[str, Any]:
    """Run ``recipe``; write the output folder atomically; return the report dict."""
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
        with _timed(walls, "evaluate_pruned"):
            metrics_final = evaluate_model(recipe, model, evaluation, tokenizer)
        model.eval()
        # The Trainer moved the model to its device (a GPU where there is one); time both models there.
        dense.to(model_device(model))
        latency_inputs = _latency_inputs(recipe, tokenizer, model)
        with _timed(walls, "latency"):
            latency = compare_latency(dense, model, latency_inputs, repeats=recipe.evaluation.latency_repeats)
        report = _report(recipe, dense, model, resolved_path, trainer, latency)
        report["metrics"] = {"dense": metrics_dense, "after_pruning": after_pruning, "after_recovery": metrics_final}
        report["wall_time_s"] = {**walls, "total": time.time() - start}
        _write_output(recipe, model, tokenizer, report, out_dir, evaluation, latency_inputs)
    if push if push is not None else recipe.output.push_to_hub:
        push_folder(out_dir, recipe.output.repo_id, recipe.output.private)
    report["output_dir"] = str(out_dir)
    return report


def _prune_and_recover(recipe: Recipe, model, train, evaluation, tokenizer, collator, work: str):
    """Run the PruningTrainer; return it and the metrics measured right after the last pruning event."""
    after_pruning: dict[str, Any] = {}

    class EvaluateAfterPruning(tf.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            self._check(state)

        def on_train_begin(self, args, state, control, **kwargs):
            self._check(state)

        def _check(self, state):
            events = trainer.pruning_callback.events
            if events and state.global_step == events[-1].step and not after_pruning:
                after_pruning.update(evaluate_model(recipe, trainer.model, evaluation, tokenizer, trainer=trainer))

    config = recipe.pruning
    calibration = train.select(range(min(len(train), recipe.data.calibration_samples)))
    if config.layers or config.max_layers:
        # depth is decided once, before training (the trainer schedules widths and masks, not blocks); a keep-target
        # covers depth and width together, so the trainer gets what the removed blocks leave of it
        batches = None
        if config.needs_data:
            batches = calibration_set(calibration, model, config.batch_size, config.max_samples, collator)
        _, config = depth_step(model, config, batches)
        if not (config.structured or config.effective_sparsity):  # nothing else to prune: measure it now
            after_pruning.update(evaluate_model(recipe, model, evaluation, tokenizer))
    trainer = PruningTrainer(
        model=model,
        args=_training_args(recipe, f"{work}/recovery", recipe.training),
        train_dataset=train,
        data_collator=collator,
        pruning_config=config,
        calibration_dataset=calibration,
    )
    trainer.add_callback(EvaluateAfterPruning())
    trainer.train()
    return trainer, after_pruning


def _report(recipe: Recipe, dense, model, resolved_path: str, trainer, latency: dict[str, Any]) -> dict[str, Any]:
    """The report's description of what was pruned and measured (metrics and wall times are added by the caller)."""
    seq_len = recipe.pruning.seq_len  # FLOPs are reported at the length the targets were set for
    shapes = get_adapter(model, structural=False).layer_shapes(model)
    state = getattr(model.config, "hf_prune", None) or {}
    flops = {
        "seq_len": seq_len,
        "dense": encoder_flops(dense, seq_len).total,
        "pruned": encoder_flops(model, seq_len).total,
    }
    flops["ratio"] = flops["dense"] / max(1, flops["pruned"])
    return {
        "hf_prune_version": __version__,
        "recipe": recipe.raw,
        "recipe_file": recipe.source,
        "base_model": OFFLINE_MODELS.get(recipe.model.name_or_path, recipe.model.name_or_path),
        "base_model_path": resolved_path,
        "seed": recipe.seed,
        "plan": {
            "kept_heads": [s.heads for s in shapes],
            "kept_kv_heads": [s.kv_heads for s in shapes],
            "kept_ffn": [s.ffn for s in shapes],
            "kept_layers": state.get("kept_layers"),  # None: no block was removed
            "original_layers": len(get_adapter(dense, structural=False).layers(dense)),
            "original": state.get("original"),
            "kept_original_head_ids": state.get("kept_heads"),
        },
        "pruning_config": recipe.pruning.to_dict(),
        "params": {"dense": count_parameters(dense), "pruned": count_parameters(model)},
        "encoder_flops": flops,
        "size_bytes": {"dense": saved_size_bytes(dense), "pruned": saved_size_bytes(model)},
        "sparsity": sparsity_report(model)["overall"],
        "latency": {
            "batch": recipe.evaluation.latency_batch,
            "seq_len": recipe.evaluation.latency_seq_len or recipe.data.max_length,
            "device": str(model_device(model)),
            **latency,
        },
        "versions": {"torch": torch.__version__, "transformers": tf.__version__, "python": platform.python_version()},
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "train_log": [h for h in trainer.state.log_history if "loss" in h][-5:],
    }


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.endswith(".safetensors"))


def _export(recipe: Recipe, model, tokenizer, evaluation, folder: Path, latency_inputs) -> dict[str, Any]:
    """``output.export``: write ``folder/onnx``, evaluate it on the evaluation split and time it against PyTorch."""
    from ..io.onnx import export_onnx, onnx_logits, onnx_session, time_onnx

    cpu_model = copy.deepcopy(model).float().cpu().eval()
    result = export_onnx(cpu_model, folder / "onnx", int8=recipe.output.export == "onnx-int8", tokenizer=tokenizer)
    session = onnx_session(result.path)
    collate = tf.DataCollatorWithPadding(tokenizer) if recipe.model.task != "causal-lm" else tf.default_data_collator
    columns = [c for c in evaluation.column_names if c in ("input_ids", "attention_mask", "token_type_ids", "labels")]
    loader = torch.utils.data.DataLoader(evaluation.select_columns(columns), batch_size=32, collate_fn=collate)
    if recipe.model.task == "causal-lm":
        nll, tokens = 0.0, 0
        for logits, batch in onnx_logits(session, loader):
            labels = batch["input_ids"][:, 1:]
            flat = logits[:, :-1].flatten(0, 1).float()
            loss = torch.nn.functional.cross_entropy(flat, labels.flatten(), reduction="sum")
            nll, tokens = nll + float(loss), tokens + labels.numel()
        metrics = {"perplexity": math.exp(nll / tokens)} if "perplexity" in recipe.evaluation.metrics else {}
    else:
        preds, labels = [], []
        for logits, batch in onnx_logits(session, loader):
            preds += logits.argmax(-1).tolist()
            labels += batch["labels"].tolist()
        names = [m for m in recipe.evaluation.metrics if m != "perplexity"]
        metrics = classification_metrics(names, preds, labels, num_labels=model.config.num_labels)
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


def _write_output(
    recipe: Recipe, model, tokenizer, report: dict[str, Any], out_dir: Path, evaluation=None, latency_inputs=None
) -> None:
    """Build the whole output folder in a temporary sibling, then move it into place in one rename."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_pretrained(model, tmp / "model-staging", tokenizer=tokenizer, sparse=recipe.output.sparse)
        report["size_bytes"]["saved"] = _weights_bytes(tmp / "model-staging")
        report["size_bytes"]["saved_format"] = "sparse (values + bitmask)" if recipe.output.sparse else "dense"
        report["loading"] = _loading(tmp / "model-staging")
        for item in (tmp / "model-staging").iterdir():
            shutil.move(str(item), tmp / item.name)
        (tmp / "model-staging").rmdir()
        if recipe.output.export:
            with _timed(report["wall_time_s"], "export"):
                report["export"] = _export(recipe, model, tokenizer, evaluation, tmp, latency_inputs)
        write_report(tmp, report, recipe)
        write_atomic_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
