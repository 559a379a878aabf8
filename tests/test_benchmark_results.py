"""Every benchmark figure is rendered from the committed JSON results (no hand-typed numbers)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
README = BENCH.parent / "README.md"


def _results_module():
    spec = importlib.util.spec_from_file_location("bench_results", BENCH / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_md_is_rendered_from_json(tmp_path):
    module = _results_module()
    rendered = module.render_results(BENCH / "results", tmp_path / "RESULTS.md")
    assert list((BENCH / "results").glob("*.json")), "no benchmark results committed"
    assert (BENCH / "RESULTS.md").read_text() == rendered


def test_readme_headline_table_is_rendered_from_json():
    module = _results_module()
    text = README.read_text()
    assert module.HEADLINE_START in text and module.HEADLINE_END in text
    block = text.split(module.HEADLINE_START, 1)[1].split(module.HEADLINE_END, 1)[0].strip("\n")
    expected = "\n".join(module.headline(module.load_results(BENCH / "results")))
    assert block == expected
    assert len(expected.splitlines()) >= 5


def test_recovery_rows_average_over_seeds_and_replace_a_rerun_seed():
    spec = importlib.util.spec_from_file_location("bench_recovery", BENCH / "recovery.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    legacy = {"variant": "2x", "accuracy": 0.80, "recovery_wall_s": 100.0, "command": "first", "config": {}}
    run = {**legacy, "accuracy": 0.90, "recovery_wall_s": 50.0, "flops_ratio": 2.1}
    row = module.merge_run(legacy, run, seed=1, description="d", command="second")
    assert list(row["runs"]) == ["0", "1"] and row["runs"]["0"]["command"] == "first"
    assert row["runs"]["1"]["flops_ratio"] == 2.1 and "flops_ratio" not in row["runs"]["0"]
    assert abs(row["accuracy"] - 0.85) < 1e-12 and row["recovery_wall_s"] == 75.0
    assert abs(row["accuracy_std"] - 0.0707107) < 1e-6
    row = module.merge_run(row, {**run, "accuracy": 0.70}, seed=1, description="d", command="third")
    assert abs(row["accuracy"] - 0.75) < 1e-12 and row["runs"]["1"]["command"] == "third"


def test_recovery_keeps_rows_whose_config_only_lacks_newer_defaults():
    spec = importlib.util.spec_from_file_location("bench_recovery", BENCH / "recovery.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config, _ = module.variants()["2x"]
    current = config.to_dict()
    older = {k: v for k, v in current.items() if k not in ("target_latency", "latency_batch_size")}
    assert module._config({"config": older}) == current  # written before the latency options existed: kept
    assert module._config({"config": {**older, "criterion": "taylor"}}) != current  # measured differently: dropped
    assert module._config({"config": {**older, "removed_option": 1}}) == "outdated"
    assert module._config({"config": None}) is None
