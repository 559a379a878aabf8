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
