"""Every benchmark figure is rendered from the committed JSON results (no hand-typed numbers)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
README = BENCH.parent / "README.md"


def _load(name: str):
    """A benchmark module loaded from its file; its siblings (common, results) import from ``benchmarks/``, as when
    the script runs."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _results_module():
    return _load("results")


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
    module = _load("recovery")
    first = {"variant": "2x", "accuracy": 0.80, "recovery_wall_s": 100.0, "flops_ratio": 2.0, "params": 5, "config": {}}
    row = module.merge_run(None, first, seed=0, description="d", run_id="r1")
    second = {**first, "accuracy": 0.90, "recovery_wall_s": 50.0, "flops_ratio": 2.1, "train_loss": 0.3}
    row = module.merge_run(row, second, seed=1, description="d", run_id="r2")
    assert list(row["runs"]) == ["0", "1"] and row["runs"]["0"]["run"] == "r1" and row["runs"]["1"]["run"] == "r2"
    assert row["runs"]["1"]["flops_ratio"] == 2.1 and row["runs"]["0"]["flops_ratio"] == 2.0
    assert row["runs"]["1"]["train_loss"] == 0.3 and row["runs"]["0"]["params"] == 5
    assert abs(row["accuracy"] - 0.85) < 1e-12 and row["recovery_wall_s"] == 75.0
    assert abs(row["accuracy_std"] - 0.0707107) < 1e-6
    row = module.merge_run(row, {**second, "accuracy": 0.70}, seed=1, description="d", run_id="r3")
    assert abs(row["accuracy"] - 0.75) < 1e-12 and row["runs"]["1"]["run"] == "r3"


def test_recovery_keeps_rows_whose_config_only_lacks_newer_defaults():
    module = _load("recovery")
    config, _ = module.variants()["2x"]
    current = config.to_dict()
    older = {k: v for k, v in current.items() if k not in ("target_latency", "latency_batch_size")}
    assert module._config({"config": older}) == current  # written before the latency options existed: kept
    assert module._config({"config": {**older, "criterion": "taylor"}}) != current  # measured differently: dropped
    assert module._config({"config": {**older, "removed_option": 1}}) == "outdated"
    assert module._config({"config": None}) is None


def test_results_check_passes_on_the_committed_tree():
    """What CI runs: RESULTS.md and the README agree with the JSON, every row names its run, no hand-typed figure."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "results.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "results check: 0 error(s)" in proc.stdout


def _copy_results(tmp_path: Path) -> tuple[Path, Path, Path]:
    results = tmp_path / "results"
    shutil.copytree(BENCH / "results", results, ignore=shutil.ignore_patterns("quick"))
    md, readme = tmp_path / "RESULTS.md", tmp_path / "README.md"
    shutil.copy(BENCH / "RESULTS.md", md)
    shutil.copy(README, readme)
    return results, md, readme


def test_check_fails_when_a_number_changes_in_the_json_only(tmp_path):
    module = _results_module()
    results, md, readme = _copy_results(tmp_path)
    assert module.check(results, md, readme)[0] == []
    path = results / "oneshot.json"
    data = json.loads(path.read_text())
    data["minilm"]["rows"][0]["accuracy"] += 0.01
    path.write_text(json.dumps(data))
    errors, _ = module.check(results, md, readme)
    assert any("RESULTS.md differs" in e for e in errors)
    assert any("headline table differs" in e for e in errors)


def test_check_fails_on_a_row_without_a_run_and_on_hand_typed_readme_figures(tmp_path):
    module = _results_module()
    results, md, readme = _copy_results(tmp_path)
    path = results / "latency.json"
    data = json.loads(path.read_text())
    del data["rows"][0]["run"]
    path.write_text(json.dumps(data))
    md.write_text(module.render_markdown(results))
    readme.write_text(readme.read_text() + "\nOn our machine it ran 1.85x faster, ~4 ms per layer.\n")
    errors, _ = module.check(results, md, readme)
    assert any("latency: row" in e and "names no run" in e for e in errors), errors
    assert any("1.85x faster" in e for e in errors), errors
    assert not any("RESULTS.md differs" in e for e in errors)


def test_stale_rows_are_listed_by_commit():
    module = _results_module()
    root = subprocess.run(
        ["git", "rev-list", "--max-parents=0", "HEAD"], cwd=BENCH.parent, capture_output=True, text=True
    ).stdout.split()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCH.parent, capture_output=True, text=True).stdout
    if not root or not head.strip():
        pytest.fail("the tests run from a git checkout (CI clones the repository)")
    machine = {"cpu_cores": 2}
    runs = {
        "r1": {"command": "c", "commit": root[-1], "dirty": False, "machine": machine},
        "r2": {"command": "c", "commit": head.strip(), "dirty": False, "machine": machine},
        "r3": {"command": "c", "commit": head.strip(), "dirty": True, "machine": machine},
        "r4": {"command": "c", "commit": None, "machine": machine},
    }
    result = {"benchmark": "latency", "runs": runs, "rows": [{"model": m, "run": m} for m in runs]}
    stale = module.stale_runs(result)
    assert any(line.startswith("latency run r1") and "later change(s) to hf_prune" in line for line in stale)
    assert not any(line.startswith("latency run r2") for line in stale)
    assert any(line.startswith("latency run r3") and "dirty" in line for line in stale)
    assert any(line.startswith("latency run r4") and "no commit recorded" in line for line in stale)
    # seeds are pooled into one mean only when measured on the same code
    assert module.same_code(runs["r2"], head.strip(), "recovery")
    assert not module.same_code(runs["r1"], head.strip(), "recovery")
    assert not module.same_code(runs["r3"], head.strip(), "recovery")
    assert not module.same_code(runs["r4"], head.strip(), "recovery")


def test_add_and_prune_runs_keep_each_runs_header_with_its_rows():
    module = _results_module()
    result = {"benchmark": "oneshot"}
    first = module.add_run(result, {"command": "a"})
    result["minilm"] = {"rows": [{"criterion": "fisher", "scope": "global", "cut": 2, "run": first}]}
    second = module.add_run(result, {"command": "b"})
    result["llm"] = {"rows": [{"criterion": "activation", "scope": "row", "pattern": "2:4", "run": second}]}
    assert (first, second) == ("r1", "r2")
    assert set(module.prune_runs(result)["runs"]) == {"r1", "r2"}
    result["minilm"]["rows"][0]["run"] = module.add_run(result, {"command": "c"})  # part re-measured
    assert set(module.prune_runs(result)["runs"]) == {"r2", "r3"}
    assert module.add_run(result, {"command": "d"}) == "r4"  # ids are never reused


def test_run_record_names_commit_data_checksums_seeds_and_wall_time(tmp_path):
    common = _load("common")
    data = tmp_path / "sst2"
    data.mkdir()
    (data / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    run = common.Run("x.py", ["--flag", "1"], seeds=[0, 3])
    found = common.data_file(tmp_path, "sst2/dev.tsv")
    record = run.record()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCH.parent, capture_output=True, text=True).stdout
    assert record["command"] == "python benchmarks/x.py --flag 1"
    assert record["commit"] == head.strip() and isinstance(record["dirty"], bool)
    assert record["seeds"] == [0, 3] and record["wall_time_s"] >= 0
    assert record["data"][str(found.resolve())] == hashlib.sha256(found.read_bytes()).hexdigest()
    assert {"cpu_model", "cpu_cores", "torch_threads", "platform"} <= set(record["machine"])
    assert {"python", "torch", "transformers", "datasets", "accelerate"} <= set(record["versions"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["date"])


@pytest.mark.real
def test_a_benchmark_script_writes_rows_that_name_their_run(tmp_path):
    """trainer_overhead, shortened: the JSON it writes passes the same row/run checks, and the committed results are
    not touched (an --output elsewhere does not re-render RESULTS.md)."""
    before = (BENCH / "RESULTS.md").read_text()
    out = tmp_path / "trainer_overhead.json"
    cmd = [sys.executable, str(BENCH / "trainer_overhead.py"), "--steps", "3", "--warmup", "1", "--rounds", "2"]
    proc = subprocess.run([*cmd, "--output", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    module = _results_module()
    rows = list(module.iter_rows(result))
    assert len(rows) == 1 and rows[0][1]["run"] in result["runs"]
    record = result["runs"][rows[0][1]["run"]]
    assert record["command"].startswith("python benchmarks/trainer_overhead.py --steps 3")
    assert record["commit"] and len(rows[0][1]["round_ratios"]) == 2
    assert (BENCH / "RESULTS.md").read_text() == before
    assert any("PruningTrainer ms/step" in line for line in _load("trainer_overhead").render(result))


def test_neutral_commits_are_not_counted_as_changes_and_bad_entries_fail(tmp_path, monkeypatch):
    module = _results_module()
    deps = module.depends_on("latency")
    last = subprocess.run(
        ["git", "log", "-1", "--format=%H", "--", *deps], cwd=BENCH.parent, capture_output=True, text=True
    ).stdout.strip()
    parent = subprocess.run(
        ["git", "rev-parse", f"{last}^"], cwd=BENCH.parent, capture_output=True, text=True
    ).stdout.strip()
    if not last or not parent:
        pytest.fail("the tests run from a git checkout with history (CI clones the repository)")
    listed = tmp_path / "neutral_commits.txt"
    listed.write_text("# none\n")
    monkeypatch.setattr(module, "NEUTRAL_FILE", listed)
    assert last in module.later_changes(parent, "latency")
    run = {"commit": parent, "dirty": False}
    assert not module.same_code(run, last, "latency")
    listed.write_text(f"{last[:10]} only how the command is recorded\n")
    assert module.neutral_commits() == {last: "only how the command is recorded"}
    assert last not in module.later_changes(parent, "latency")
    assert module.same_code(run, last, "latency")
    listed.write_text("0123456789abcdef only reporting\n")
    with pytest.raises(ValueError, match="0123456789abcdef"):
        module.neutral_commits()
    listed.write_text(f"{last}\n")
    with pytest.raises(ValueError, match="no reason"):
        module.neutral_commits()


def test_latency_rows_of_every_machine_kind_stay_side_by_side():
    """A latency run on one machine replaces that machine's rows only; RESULTS.md lists every machine's rows."""
    module = _results_module()
    epyc = {"cpu_model": "AMD EPYC 7B13", "cpu_cores": 2, "torch_threads": 2, "platform": "Linux"}
    xeon = {"cpu_model": "Intel Xeon 8481C", "cpu_cores": 2, "torch_threads": 2, "platform": "Linux"}
    header = {"command": "python benchmarks/latency.py", "commit": "abc", "dirty": False}

    def row(model: str, batch: int, run: str) -> dict:
        return {
            "model": model,
            "plan": "width",
            "batch": batch,
            "seq_len": 32,
            "params_dense": 1e8,
            "params_pruned": 6e7,
            "dense_ms": 10.0,
            "pruned_ms": 6.0,
            "speedup": 1.67,
            "flops_ratio": 2.0,
            "speedup_over_flops_ratio": 0.83,
            "run": run,
        }

    previous = {
        "benchmark": "latency",
        "runs": {"r1": {**header, "machine": epyc}, "r2": {**header, "machine": xeon}},
        "rows": [row("bert-base", 1, "r1"), row("llama-style", 1, "r1"), row("bert-base", 1, "r2")],
    }
    kept = module.rows_of_other_machines(previous, {"machine": epyc})
    assert kept == [previous["rows"][2]]  # the Xeon's row; the EPYC's are re-measured
    kept = module.rows_of_other_machines(previous, {"machine": epyc}, also=lambda r: r["model"] == "llama-style")
    assert kept == previous["rows"][1:]
    # another thread count is another kind, and a CUDA run never replaces CPU rows
    assert len(module.rows_of_other_machines(previous, {"machine": {**epyc, "torch_threads": 4}})) == 3
    assert len(module.rows_of_other_machines(previous, {"machine": {**epyc, "gpu": "H100"}}, device="cuda")) == 3
    text = "\n".join(_load("latency").render(previous))
    assert "| AMD EPYC 7B13, 2 threads | bert-base |" in text and "| Intel Xeon 8481C, 2 threads | bert-base |" in text


def test_latency_breakdown_and_latency_target_headline_are_rendered_from_the_rows():
    """`--breakdown` rows get the per-category table; the README headline states each latency target's re-timed
    keep, how many met 5%, and what prune() cost, per machine kind, model and shape."""
    module = _results_module()
    epyc = {"cpu_model": "AMD EPYC 7B13", "cpu_cores": 2, "torch_threads": 2, "platform": "Linux"}
    header = {"command": "python benchmarks/latency.py --breakdown", "commit": "abc", "dirty": False, "machine": epyc}
    split = {"matmul": 90.0, "norm": 4.0, "activation": 6.0, "python + dispatch": 10.0}
    latency = {
        "benchmark": "latency",
        "runs": {"r1": header},
        "rows": [
            {
                "model": "bert-base",
                "plan": "width+depth",
                "batch": 1,
                "seq_len": 32,
                "params_dense": 1e8,
                "params_pruned": 6e7,
                "dense_ms": 110.0,
                "pruned_ms": 55.0,
                "speedup": 2.0,
                "flops_ratio": 2.0,
                "speedup_over_flops_ratio": 1.0,
                "breakdown_ms": {"dense": split, "pruned": {**split, "matmul": 45.0, "python + dispatch": 7.5}},
                "run": "r1",
            }
        ],
    }
    latency_module = _load("latency")
    text = "\n".join(latency_module.render(latency))
    assert (
        "| AMD EPYC 7B13, 2 threads | bert-base | width+depth | 1 x 32 | 90.0 -> 45.0 | 10.0 -> 10.0 | 10.0 -> 7.5 |"
        in text
    )
    del latency["rows"][0]["breakdown_ms"]
    assert "Where a forward's time goes" not in "\n".join(latency_module.render(latency))

    def target(t: float, keep: float, cache: str, prune_s: float) -> dict:
        return {
            "model": "minilm-sst2",
            "device": "cpu",
            "batch": 32,
            "seq_len": 64,
            "target": t,
            "refused": None,
            "search_keep": t,
            "keep": keep,
            "met": abs(keep - t) <= 0.05 * t,
            "flops_ratio": 1 / t,
            "searches": 2,
            "prune_s": prune_s,
            "table_cache": cache,
            "run": "r1",
        }

    targets = {
        "benchmark": "latency_targets",
        "runs": {"r1": {**header, "command": "python benchmarks/latency_targets.py"}},
        "rows": [target(0.5, 0.46, "cold", 60.2), target(0.5, 0.49, "cached", 36.6)],
    }
    line = next(x for x in module.headline({"latency_targets": targets}) if "target_latency" in x)
    assert "0.5 -> 0.460, 0.5 -> 0.490 (cached table); 1 of 2 within 5%; `prune()` 37-60 s" in line
    assert "AMD EPYC 7B13, 2 threads, minilm-sst2, 32 x 64" in line


def test_decoder_dense_recovery_row_is_the_reference_in_the_table_and_headline():
    """With a recovered `dense` row, the headline reads every cut's recovered perplexity against it."""
    module = _results_module()
    header = {"command": "python benchmarks/decoder.py", "commit": "abc", "dirty": False, "machine": {"cpu_cores": 2}}

    def row(cut: float, method: str, oneshot: float, recovered: float) -> dict:
        shape = {"flops_keep": 1 / cut, "params": 1e8, "blocks": 30}
        return {
            "cut": cut,
            "method": method,
            "oneshot": {**shape, "perplexity": oneshot, "seconds": 10.0},
            "recovered": {**shape, "perplexity": recovered},
            "recovery_seconds": 300.0,
            "run": "r1",
        }

    result = {
        "benchmark": "decoder",
        "runs": {"r1": header},
        "dense_perplexity": 26.15,
        "eval_tokens": 1024,
        "settings": {
            "seq_len": 256,
            "calibration_blocks": 32,
            "recovery_steps": 30,
            "recovery_batch": 4,
            "recovery_tokens": 30720,
            "learning_rate": 1e-4,
            "distill_alpha": 0.5,
        },
        "rows": [row(1.0, "dense", 26.15, 21.5), row(1.5, "width", 70.0, 30.0), row(1.5, "ShortGPT", 150.0, 40.0)],
        "unstructured": [],
        "peak_rss_mb": 1000,
    }
    table = "\n".join(_load("decoder").render(result))
    assert "| 1x | dense | 30 | 1.000 | 100.0M | 26.15 | n/a | 21.50 |  | 300 s |" in table
    lines = [x for x in module.headline({"decoder": result}) if "block-FLOPs cut" in x]
    assert len(lines) == 1  # no headline line for the dense row's own "cut"
    assert "width 30.0" in lines[0] and "ShortGPT 40.0 (dense 26.1; dense with the same recovery 21.5)" in lines[0]


def test_decoder_keeps_earlier_runs_when_the_dense_perplexity_differs_only_by_cpu_rounding():
    """The same dense model read 26.149222 on one CPU and 26.149447 on another: earlier rows must stay (exact
    equality once dropped every earlier run from the file); a real change of the evaluation must not merge."""
    decoder = _load("decoder")
    assert decoder.same_dense(26.149221969658996, 26.149447190508912)
    assert not decoder.same_dense(26.149221969658996, 26.2)
    assert not decoder.same_dense(None, 26.15)
