"""A recipe's data and model: files or Hub datasets read and checked, tokenized (classification examples or
causal-LM blocks), and the model with its tokenizer loaded (``offline:`` aliases resolved)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from datasets import Dataset, DatasetDict, load_dataset

from ..compat import float_weights
from ..config import closest
from .offline import resolve_offline
from .schema import FORMATS, Recipe, RecipeError


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


def _subset(ds: Dataset, n: int | None, seed: int) -> Dataset:
    return ds if n is None or n >= len(ds) else ds.shuffle(seed=seed).select(range(n))


def tokenize(recipe: Recipe, ds: DatasetDict, tokenizer: Any) -> tuple[Dataset, Dataset]:
    """The training and evaluation splits, subsampled (``max_train_samples`` / ``max_eval_samples``, shuffled with
    ``shuffle_seed``) and tokenized: classification examples with integer ``labels``, or for a causal LM the text
    cut into ``max_length`` token blocks."""
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


def _lm_blocks(split: Dataset, d: Any, tokenizer: Any) -> Dataset:
    """Concatenate the text and cut it into ``max_length`` token blocks (labels = inputs)."""
    column = d.text_columns[0]
    text = "\n".join(t for t in split[column] if t is not None)
    ids = tokenizer(text)["input_ids"]
    n = len(ids) // d.max_length
    blocks = [ids[i * d.max_length : (i + 1) * d.max_length] for i in range(n)]
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def load_model_and_tokenizer(recipe: Recipe) -> tuple[tf.PreTrainedModel, Any, str]:
    """``(model, tokenizer, resolved path)`` for the recipe's model and task, in float weights (a GGUF file is
    unpacked at load time); the tokenizer gets the EOS token as padding where it has none."""
    m = recipe.model
    try:
        path, gguf = resolve_offline(m.name_or_path)
    except ValueError as err:
        raise RecipeError(f"{recipe.where('model', 'name_or_path')}: {err}") from None
    gguf = gguf or m.gguf_file
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
