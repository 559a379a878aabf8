"""benchmarks/RESULTS.md must be exactly what the committed JSON results render to (no hand-typed numbers)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_results_md_is_rendered_from_json(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_results", BENCH / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rendered = module.render_results(BENCH / "results", tmp_path / "RESULTS.md")
    assert list((BENCH / "results").glob("*.json")), "no benchmark results committed"
    assert (BENCH / "RESULTS.md").read_text() == rendered
