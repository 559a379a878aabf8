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
    training:   any TrainingArguments field (recovery), and ``lora`` (r, alpha, dropout, target_modules,
                modules_to_save, extra): recover with LoRA adapters that keep the masks, merged at the end
    evaluation: metrics, latency_batch, latency_seq_len, latency_repeats
    output:     dir, push_to_hub, repo_id, private, sparse, export (onnx | onnx-int8)
    seed
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainingArguments

from ..config import PruningConfig, check_int, closest, type_name, type_ok
from ..io.onnx import check_export_format
from ..training.lora import LoraArguments
from .metrics import SUPPORTED as SUPPORTED_METRICS

TASKS = ("sequence-classification", "causal-lm")
FORMATS = ("csv", "tsv", "json", "text", "parquet")
DTYPES = ("float32", "bfloat16", "float16", "float64")  # the torch dtypes a recipe may load the model in


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
    lora: LoraArguments | None = None
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
# the smallest value each integer key may take (counts of at least one; seeds from 0, as numpy requires)
MINIMUMS: dict[tuple[str, str], int] = {
    ("model", "num_labels"): 1,
    ("data", "max_length"): 1,
    ("data", "max_train_samples"): 1,
    ("data", "max_eval_samples"): 1,
    ("data", "calibration_samples"): 1,
    ("data", "shuffle_seed"): 0,
    ("evaluation", "latency_batch"): 1,
    ("evaluation", "latency_seq_len"): 1,
    ("evaluation", "latency_repeats"): 1,
}


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
# key, type and range checks
# ---------------------------------------------------------------------------------------------------------
def _field_types(cls: type) -> dict[str, Any]:
    if cls is TrainingArguments:  # its annotations are not all resolvable: check what can be, it validates the rest
        return {f.name: f.type for f in dataclasses.fields(cls)}
    return typing.get_type_hints(cls)


def _check_section(
    name: str, values: Any, cls: type, source: str, lines: dict, path: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The section's keys (each a field of ``cls``), their types and the :data:`MINIMUMS` of integer keys.
    ``path``: where the section sits when it is nested (``("training", "lora")``); ``name`` is then its dotted name."""
    path = path or (name,)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise RecipeError(f"{_where(source, lines, path)}: section '{name}' must be a mapping, got {values!r}")
    hints = _field_types(cls)
    allowed = [f.name for f in dataclasses.fields(cls) if f.init]
    for key, value in values.items():
        where = _where(source, lines, (*path, str(key)))
        if key not in allowed:
            raise RecipeError(f"{where}: unknown key '{key}' in section '{name}'{closest(str(key), allowed)}")
        annotation = hints.get(key, Any)
        if not type_ok(value, annotation):
            raise RecipeError(f"{where}: {name}.{key} must be {type_name(annotation)}, got {value!r}")
        if (name, key) in MINIMUMS and value is not None:
            try:
                check_int(f"{name}.{key}", value, MINIMUMS[name, key])
            except ValueError as err:
                raise RecipeError(f"{where}: {err}") from None
    return dict(values)


def _check_choice(where: str, dotted: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        hint = closest(value, allowed) if isinstance(value, str) else ""
        raise RecipeError(f"{where}: {dotted}={value!r}{hint}; allowed: {', '.join(allowed)}")


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
def _read(path_or_dict: str | os.PathLike | dict[str, Any]) -> tuple[Any, str, dict[tuple[str, ...], int]]:
    """The recipe's data, its source name and the line of every key."""
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict), "<dict>", {}
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
    return data, source, (_line_map(node) if node is not None else {})


@dataclass
class _Sections:
    """Builds each section of one recipe's data, raising :class:`RecipeError` with the file and line."""

    data: dict[str, Any]
    source: str
    lines: dict[tuple[str, ...], int]

    def where(self, *path: str) -> str:
        return _where(self.source, self.lines, path)

    def values(self, name: str, cls: type) -> dict[str, Any]:
        return _check_section(name, self.data.get(name), cls, self.source, self.lines)

    def top_level(self) -> None:
        for key in self.data:
            if key not in SECTIONS:
                raise RecipeError(
                    f"{self.where(str(key))}: unknown section '{key}'{closest(str(key), list(SECTIONS))}; "
                    f"allowed: {', '.join(SECTIONS)}"
                )
        for section, key in REQUIRED:
            if not isinstance(self.data.get(section), dict) or not self.data[section].get(key):
                raise RecipeError(f"{self.source}: missing required key '{section}.{key}'")
        seed = self.data.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise RecipeError(f"{self.where('seed')}: seed must be an integer, got {seed!r}")
        if seed < 0:
            raise RecipeError(f"{self.where('seed')}: seed={seed} is invalid; allowed: an integer >= 0")

    def model(self) -> ModelSection:
        model = ModelSection(**self.values("model", ModelSection))
        _check_choice(self.where("model", "task"), "model.task", model.task, TASKS)
        _check_choice(self.where("model", "dtype"), "model.dtype", model.dtype, DTYPES)
        return model

    def data_section(self, task: str) -> DataSection:
        section = DataSection(**self.values("data", DataSection))
        if section.dataset is None and not section.files:
            raise RecipeError(f"{self.where('data')}: data needs either 'dataset' (Hub) or 'files'")
        if section.format is not None:
            _check_choice(self.where("data", "format"), "data.format", section.format, FORMATS)
        if not section.text_columns:
            raise RecipeError(f"{self.where('data', 'text_columns')}: data.text_columns needs at least one column")
        if task == "causal-lm" and section.max_length < 2:
            raise RecipeError(
                f"{self.where('data', 'max_length')}: data.max_length={section.max_length} is invalid for "
                "causal-lm; allowed: an integer >= 2 (each block predicts its tokens after the first)"
            )
        return section

    def evaluation(self) -> EvaluationSection:
        evaluation = EvaluationSection(**self.values("evaluation", EvaluationSection))
        for metric in evaluation.metrics:
            if metric not in SUPPORTED_METRICS:
                raise RecipeError(
                    f"{self.where('evaluation', 'metrics')}: unknown metric '{metric}'"
                    f"{closest(metric, SUPPORTED_METRICS)}; allowed: {', '.join(SUPPORTED_METRICS)}"
                )
        return evaluation

    def output(self) -> OutputSection:
        output = OutputSection(**self.values("output", OutputSection))
        if output.push_to_hub and not output.repo_id:
            raise RecipeError(f"{self.where('output', 'push_to_hub')}: push_to_hub needs output.repo_id")
        try:
            output.export = check_export_format(output.export)
        except ValueError as err:
            raise RecipeError(f"{self.where('output', 'export')}: {err}") from None
        return output

    def pruning(self, max_length: int) -> PruningConfig:
        values = self.values("pruning", PruningConfig)
        # FLOPs targets are counted at the task's sequence length unless the recipe says otherwise
        values.setdefault("seq_len", max_length)
        try:
            return PruningConfig(**values)
        except ValueError as err:
            bad = next((k for k in values if f"PruningConfig.{k}=" in str(err)), None)
            raise RecipeError(f"{self.where('pruning', bad) if bad else self.where('pruning')}: {err}") from None

    def training(self, name: str) -> dict[str, Any] | None:
        if name == "dense_training" and self.data.get(name) is None:
            return None
        section = self.data.get(name)
        if name == "training" and isinstance(section, dict) and "lora" in section:
            section = {k: v for k, v in section.items() if k != "lora"}  # hf_prune's, not a TrainingArguments field
        return _check_section(name, section, TrainingArguments, self.source, self.lines)

    def lora(self) -> LoraArguments | None:
        section = self.data.get("training")
        if not isinstance(section, dict) or section.get("lora") is None:
            return None
        path = ("training", "lora")
        values = _check_section("training.lora", section["lora"], LoraArguments, self.source, self.lines, path)
        try:
            return LoraArguments(**values)
        except ValueError as err:
            bad = next((k for k in values if f"LoraArguments.{k}=" in str(err)), None)
            raise RecipeError(f"{self.where(*path, *([bad] if bad else []))}: {err}") from None


def load_recipe(path_or_dict: str | os.PathLike | dict[str, Any], overrides: list[str] | None = None) -> Recipe:
    """Parse and validate a recipe file (or dict): every key, type, choice and range, so a bad value fails here
    rather than after a download or a training run. Raises :class:`RecipeError` naming the key and its line."""
    data, source, lines = _read(path_or_dict)
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    sections = _Sections(data, source, lines)
    sections.top_level()
    model = sections.model()
    data_section = sections.data_section(model.task)
    return Recipe(
        model=model,
        data=data_section,
        evaluation=sections.evaluation(),
        output=sections.output(),
        pruning=sections.pruning(data_section.max_length),
        training=sections.training("training"),
        dense_training=sections.training("dense_training"),
        lora=sections.lora(),
        seed=data.get("seed", 0),
        source=source,
        raw=data,
        lines=lines,
    )
