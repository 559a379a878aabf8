"""The package layout stays readable: the README's map matches the tree, and no room or function outgrows it.

The limits are the ones the layout was reshaped to (a newcomer reads one screen of map, then modules and functions
that fit in a head); a change that breaks one should split the module or function, not raise the number.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import hf_prune

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_prune"
MAX_TOP_LEVEL_MODULES = 12
MIN_SUBPACKAGES = 4
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "metric_modules" not in p.parts)


def _design_map() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Design", 1)[1]
    return section.split("```", 2)[1]


def test_every_public_name_imports():
    missing = [name for name in hf_prune.__all__ if not hasattr(hf_prune, name)]
    assert not missing, f"hf_prune.__all__ names that do not import: {missing}"


def test_top_level_is_a_few_modules_and_the_stages_are_subpackages():
    top = [p.name for p in PACKAGE.glob("*.py")]
    subpackages = [p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()]
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"{len(top)} modules directly in hf_prune/: {sorted(top)}"
    assert len(subpackages) >= MIN_SUBPACKAGES, subpackages


def test_readme_map_names_every_module_and_nothing_else():
    """Each module appears in the README's map under its folder (adapters are summed up by their folder's line)."""
    listed: set[str] = set()
    folder = ""
    for line in _design_map().splitlines():
        entry = re.match(r"^  (?:(\w+)/)?\s*((?:\w+/)*\w+\.py)\s", line)
        if re.match(r"^  \w", line):
            folder = entry.group(1) + "/" if entry and entry.group(1) else ""
        if entry:
            listed.add(folder + entry.group(2))
    actual = {
        p.relative_to(PACKAGE).as_posix()
        for p in _modules()
        if (p.name != "__init__.py" or p.parent == PACKAGE) and p.parent.name != "architectures"
    }
    listed = {name for name in listed if not name.startswith("architectures/")}
    assert actual - listed == set(), f"modules missing from the README map: {sorted(actual - listed)}"
    assert listed - actual == set(), f"README map names modules that do not exist: {sorted(listed - actual)}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_module_and_function_sizes(path: Path):
    source = path.read_text()
    lines = len(source.splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.name}: {lines} lines (split it by concern)"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {long}"
