"""Metrics through ``evaluate``, with an offline fallback under the same names.

``evaluate.load("accuracy")`` downloads its script from the Hub. Offline (``HF_HUB_OFFLINE=1``) or when the Hub
cannot be reached, the same metric names load from small ``evaluate.Metric`` modules shipped in
``hf_prune/recipes/metric_modules/`` (``evaluate.load`` accepts a local folder), so recipes run unchanged everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import evaluate
from transformers.utils import logging

logger = logging.get_logger(__name__)

LOCAL_DIR = Path(__file__).resolve().parent / "metric_modules"
CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews_correlation")
LM_METRICS = ("perplexity",)
SUPPORTED = CLASSIFICATION_METRICS + LM_METRICS


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
        "HF_EVALUATE_OFFLINE", "0"
    ).lower() in ("1", "true", "yes")


@cache
def load_metric(name: str) -> evaluate.EvaluationModule:
    """The ``evaluate`` metric ``name``: from the Hub when online, else the shipped module of the same name.

    ``perplexity`` always uses the shipped module: the Hub metric of that name runs a model by id, while recipes
    already hold per-token losses.
    """
    local = LOCAL_DIR / name
    if name not in SUPPORTED and not local.exists() and _offline():
        raise ValueError(f"metric {name!r} is not available offline; offline metrics: {', '.join(SUPPORTED)}")
    if name != "perplexity" and not _offline():
        try:
            return evaluate.load(name)
        except Exception as err:  # Hub unreachable or script failing: fall back to the shipped module
            if not local.exists():
                raise
            logger.warning("evaluate.load(%r) failed (%s); using hf_prune's offline module", name, err)
    if not local.exists():
        raise ValueError(f"unknown metric {name!r}; offline metrics: {', '.join(SUPPORTED)}")
    return evaluate.load(str(local))


def classification_metrics(
    names: Sequence[str], predictions: Sequence[int], references: Sequence[int], num_labels: int = 2
) -> dict[str, float]:
    """Compute each named classification metric; f1 is binary for 2 labels, macro-averaged otherwise."""
    out: dict[str, Any] = {}
    for name in names:
        kwargs = {"average": "binary" if num_labels == 2 else "macro"} if name == "f1" else {}
        out.update(load_metric(name).compute(predictions=list(predictions), references=list(references), **kwargs))
    return out


def perplexity(losses: Sequence[float], token_counts: Sequence[int]) -> float:
    """Perplexity from per-window mean token NLLs and their token counts."""
    return load_metric("perplexity").compute(predictions=list(losses), references=list(token_counts))["perplexity"]
