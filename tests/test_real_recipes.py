"""Every shipped offline recipe runs end to end (shortened with --set), so none can break silently: a recipe that
only passes --dry-run is not known to work. Hub-dataset recipes need network and are checked by --dry-run only
(tests/test_recipes.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import transformers as tf

import hf_prune
from hf_prune.recipes import cli
from hf_prune.recipes.schema import load_recipe

pytestmark = pytest.mark.real
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
OFFLINE = [p for p in sorted(RECIPES.glob("*.yaml")) if not load_recipe(p).data.dataset]


def _shortened(path: Path) -> list[str]:
    recipe = load_recipe(path)
    causal = recipe.model.task == "causal-lm"
    sets = {
        "data.max_train_samples": 48 if causal else 64,
        "data.max_eval_samples": 48 if causal else 32,
        "data.calibration_samples": 8,
        "training.max_steps": 2,
        "training.logging_steps": 1,
        "evaluation.latency_repeats": 2,
    }
    if causal:
        sets["data.max_length"] = 64  # 48 text lines make a few 64-token blocks (512 would make none)
    if recipe.dense_training is not None:
        sets["dense_training.max_steps"] = 2
    return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]


def test_every_shipped_offline_recipe_is_listed():
    names = {p.name for p in OFFLINE}
    assert {"demo.yaml", "minilm_sst2.yaml", "minilm_rte.yaml", "smollm2_wikitext2.yaml"} <= names


@pytest.mark.parametrize("path", OFFLINE, ids=lambda p: p.stem)
def test_shipped_recipe_runs_end_to_end(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative data paths resolve against the recipe file, not the working directory
    out = tmp_path / "out"
    assert cli.main(["run", str(path), *_shortened(path), "--output-dir", str(out)]) == 0
    report = json.loads((out / "pruning_report.json").read_text())
    metrics = report["metrics"]
    assert {"dense", "after_recovery"} <= set(metrics)
    assert all(math.isfinite(v) for stage in metrics.values() for v in stage.values())
    recipe = load_recipe(path)
    cls = tf.AutoModelForCausalLM if recipe.model.task == "causal-lm" else tf.AutoModelForSequenceClassification
    model = hf_prune.from_pretrained(out, cls)
    assert hf_prune.count_parameters(model) == report["params"]["pruned"]
    assert "What was removed" in (out / "README.md").read_text()
