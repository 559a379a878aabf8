"""Recipes: a strict YAML schema for a whole prune-and-recover job.

Every key is checked before anything heavy happens: an unknown or misspelt key, a wrong type or a missing required
key raises :class:`RecipeError` naming the key, its line in the file and the closest valid name. Columns are
checked against the loaded data before any model loads.

Sections (see ``recipes/demo.yaml`` for a complete example)::

    model:      name_or_path, task, num_labels, gguf_file, dtype, trust_remote_code
    data:       dataset, config, files, format, column_names, text_columns, label_column, label_names,
                max_length, train_split, eval_split, max_train_samples, max_eval_samples, calibration_samples,
                shuffle_seed
    dense_training:  optional TrainingArguments overrides for a dense fine-tune before pruning (the teacher)
    pruning:    any PruningConfig field
    training:   any TrainingArguments field (recovery)
    evaluation: metrics, latency_batch, latency_seq_len, latency_repeats
    output:     dir, push_to_hub, repo_id, private, sparse, export (onnx | onnx-int8)
    seed
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainingArguments

from ..config import PruningConfig, closest
from ..io.onnx import check_export_format
from .metrics import SUPPORTED as SUPPORTED_METRICS

TASKS = ("sequence-classification", "causal-lm")
FORMATS = ("csv", "tsv", "json", "text", "parquet")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; recipes mean a float, as YAML 1.2 and Python do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


class RecipeError(ValueError):
    """A recipe problem, with the file and line where it is."""


@dataclass
class ModelSection:
    name_or_path: str = ""
    task: str = "sequence-classification"
    num_labels: int | None = None
    gguf_file: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False


@dataclass
class DataSection:
    dataset: str | None = None
    config: str | None = None
    files: dict[str, str] | None = None
    format: str | None = None
    column_names: list[str] | None = None
    text_columns: list[str] = field(default_factory=lambda: ["sentence"])
    label_column: str | None = "label"
    label_names: list[str] | None = None
    max_length: int = 128
    train_split: str = "train"
    eval_split: str = "validation"
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    calibration_samples: int = 512
    shuffle_seed: int = 0


@dataclass
class EvaluationSection:
    metrics: list[str] = field(default_factory=lambda: ["accuracy"])
    latency_batch: int = 32
    latency_seq_len: int | None = None
    latency_repeats: int = 10


@dataclass
class OutputSection:
    dir: str = "outputs/run"
    push_to_hub: bool = False
    repo_id: str | None = None
    private: bool = True
    sparse: bool = False  # store sparse weights as values + bitmask (hf_prune.save_pretrained(sparse=True))
    export: str | None = None  # "onnx" or "onnx-int8": also write onnx/model.onnx, evaluated and timed


@dataclass
class Recipe:
    """A validated recipe. Build it with :func:`load_recipe`."""

    model: ModelSection
    data: DataSection
    pruning: PruningConfig
    training: dict[str, Any]
    dense_training: dict[str, Any] | None
    evaluation: EvaluationSection
    output: OutputSection
    seed: int = 0
    source: str = "<dict>"
    raw: dict[str, Any] = field(default_factory=dict)
    lines: dict[tuple[str, ...], int] = field(default_factory=dict)

    def where(self, *path: str) -> str:
        return _where(self.source, self.lines, path)


SECTIONS: dict[str, type | None] = {
    "model": ModelSection,
    "data": DataSection,
    "dense_training": None,
    "pruning": PruningConfig,
    "training": None,
    "evaluation": EvaluationSection,
    "output": OutputSection,
    "seed": None,
}
REQUIRED = (("model", "name_or_path"), ("output", "dir"))


# ---------------------------------------------------------------------------------------------------------
# YAML with line numbers
# ---------------------------------------------------------------------------------------------------------
def _line_map(node: yaml.Node, path: tuple[str, ...] = (), out: dict | None = None) -> dict[tuple[str, ...], int]:
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = (*path, str(key.value))
            out[sub] = key.start_mark.line + 1
            _line_map(value, sub, out)
    return out


def _where(source: str, lines: dict[tuple[str, ...], int], path: tuple[str, ...]) -> str:
    for n in range(len(path), 0, -1):
        if path[:n] in lines:
            return f"{source}:{lines[path[:n]]}"
    return source


# ---------------------------------------------------------------------------------------------------------
# type checks
# ---------------------------------------------------------------------------------------------------------
def _type_ok(value: Any, annotation: Any) -> bool:
    if annotation is Any or annotation is None:
        return True
    if isinstance(annotation, str):
        annotation = {"int": int, "float": float, "str": str, "bool": bool}.get(annotation, Any)
        if annotation is Any:
            return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin is list:
        (inner,) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # complex annotations (enums, callables): TrainingArguments validates them itself


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _check_section(name: str, values: Any, cls: type, source: str, lines: dict) -> dict[str, Any]:
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise RecipeError(f"{_where(source, lines, (name,))}: section '{name}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls) if cls is not TrainingArguments else {}
    allowed = [f.name for f in dataclasses.fields(cls) if f.init]
    if cls is TrainingArguments:
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in allowed:
            raise RecipeError(
                f"{_where(source, lines, (name, str(key)))}: unknown key '{key}' in section '{name}'"
                f"{closest(str(key), allowed)}"
            )
        annotation = hints.get(key, Any)
        if not _type_ok(value, annotation):
            raise RecipeError(
                f"{_where(source, lines, (name, key))}: {name}.{key} must be {_type_name(annotation)}, got {value!r}"
            )
    return dict(values)


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if parts[0] not in SECTIONS:
        raise RecipeError(f"--set {dotted}: unknown section '{parts[0]}'{closest(parts[0], list(SECTIONS))}")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML, so ``1e-4``, ``true``, ``[a, b]`` work)."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set expects key=value (e.g. training.learning_rate=1e-4), got {item!r}")
        key, raw = item.split("=", 1)
        _set(data, key.strip(), _yaml_load(raw))
    return data


# ---------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------
def load_recipe(path_or_dict: str | os.PathLike | dict[str, Any], overrides: list[str] | None = None) -> Recipe:
    """Parse and validate a recipe file (or dict). Raises :class:`RecipeError` on any schema problem."""
    if isinstance(path_or_dict, dict):
        data, source, lines = dict(path_or_dict), "<dict>", {}
    else:
        source = str(path_or_dict)
        try:
            text = Path(path_or_dict).read_text()
        except FileNotFoundError:
            raise RecipeError(f"recipe file not found: {source}") from None
        try:
            node = yaml.compose(text, Loader=_Loader)
            data = _yaml_load(text) or {}
        except yaml.YAMLError as err:
            raise RecipeError(f"{source}: invalid YAML: {err}") from None
        lines = _line_map(node) if node is not None else {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    for key in data:
        if key not in SECTIONS:
            raise RecipeError(
                f"{_where(source, lines, (str(key),))}: unknown section '{key}'{closest(str(key), list(SECTIONS))}; "
                f"allowed: {', '.join(SECTIONS)}"
            )
    for section, key in REQUIRED:
        if not isinstance(data.get(section), dict) or not data[section].get(key):
            raise RecipeError(f"{source}: missing required key '{section}.{key}'")

    model = ModelSection(**_check_section("model", data.get("model"), ModelSection, source, lines))
    if model.task not in TASKS:
        raise RecipeError(
            f"{_where(source, lines, ('model', 'task'))}: model.task={model.task!r}{closest(model.task, TASKS)}; "
            f"allowed: {', '.join(TASKS)}"
        )
    data_section = DataSection(**_check_section("data", data.get("data"), DataSection, source, lines))
    if data_section.dataset is None and not data_section.files:
        raise RecipeError(f"{_where(source, lines, ('data',))}: data needs either 'dataset' (Hub) or 'files'")
    if data_section.format is not None and data_section.format not in FORMATS:
        raise RecipeError(
            f"{_where(source, lines, ('data', 'format'))}: data.format={data_section.format!r}"
            f"{closest(data_section.format, FORMATS)}; allowed: {', '.join(FORMATS)}"
        )
    evaluation = EvaluationSection(
        **_check_section("evaluation", data.get("evaluation"), EvaluationSection, source, lines)
    )
    for metric in evaluation.metrics:
        if metric not in SUPPORTED_METRICS:
            raise RecipeError(
                f"{_where(source, lines, ('evaluation', 'metrics'))}: unknown metric '{metric}'"
                f"{closest(metric, SUPPORTED_METRICS)}; allowed: {', '.join(SUPPORTED_METRICS)}"
            )
    output = OutputSection(**_check_section("output", data.get("output"), OutputSection, source, lines))
    if output.push_to_hub and not output.repo_id:
        raise RecipeError(f"{_where(source, lines, ('output', 'push_to_hub'))}: push_to_hub needs output.repo_id")
    try:
        output.export = check_export_format(output.export)
    except ValueError as err:
        raise RecipeError(f"{_where(source, lines, ('output', 'export'))}: {err}") from None
    pruning_values = _check_section("pruning", data.get("pruning"), PruningConfig, source, lines)
    # FLOPs targets are counted at the task's sequence length unless the recipe says otherwise
    pruning_values.setdefault("seq_len", data_section.max_length)
    try:
        pruning = PruningConfig(**pruning_values)
    except ValueError as err:
        bad = next((k for k in pruning_values if f"PruningConfig.{k}=" in str(err)), None)
        where = _where(source, lines, ("pruning", bad) if bad else ("pruning",))
        raise RecipeError(f"{where}: {err}") from None
    training = _check_section("training", data.get("training"), TrainingArguments, source, lines)
    dense = data.get("dense_training")
    dense_training = None
    if dense is not None:
        dense_training = _check_section("dense_training", dense, TrainingArguments, source, lines)
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise RecipeError(f"{_where(source, lines, ('seed',))}: seed must be an integer, got {seed!r}")
    return Recipe(
        model=model,
        data=data_section,
        pruning=pruning,
        training=training,
        dense_training=dense_training,
        evaluation=evaluation,
        output=output,
        seed=seed,
        source=source,
        raw=data,
        lines=lines,
    )
