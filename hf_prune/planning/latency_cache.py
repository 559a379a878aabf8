"""The on-disk cache of measured latency tables, so a second run on the same kind of machine skips the profiling.

One JSON file per table key (model family and shapes, hardware, device, dtype, threads, torch version, input size;
built by :func:`hf_prune.planning.latency_table.profile_latency`), named by a digest of the key and holding the key
itself, so a digest collision or a hand-edited file is never taken for another table. Files are written whole and
renamed into place, so two runs profiling at once never read a half-written table; a cache that cannot be read or
written is skipped with a warning, never an error: it only saves time.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from transformers.utils import logging

from ..utils import atomic_write_json

logger = logging.get_logger(__name__)

CACHE_ENV = "HF_PRUNE_LATENCY_CACHE"
T = TypeVar("T")


def latency_cache_dir() -> Path | None:
    """Where measured latency tables are kept between runs: ``$HF_PRUNE_LATENCY_CACHE`` if set (``0``, ``off`` or
    an empty value turns the disk cache off), else ``$HF_HOME/hf_prune/latency`` (``~/.cache/huggingface/...``)."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "false", "none") else Path(value).expanduser()
    from huggingface_hub.constants import HF_HOME

    return Path(HF_HOME) / "hf_prune" / "latency"


def _cache_file(key: dict[str, Any]) -> Path | None:
    folder = latency_cache_dir()
    if folder is None:
        return None
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return folder / f"{key['model_type']}-{key['device']}-{digest}.json"


def read_cached(key: dict[str, Any], parse: Callable[[dict[str, Any]], T]) -> T | None:
    """The table cached under ``key``, built by ``parse`` from its stored dict; ``None`` when the cache is off, holds
    no file for ``key``, or holds one that cannot be read or parsed (a warning says which)."""
    path = _cache_file(key)
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:  # a digest collision or a hand-edited file
            return None
        table = parse(data["table"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning(f"hf_prune: ignoring the unreadable latency table {path} ({exc})")
        return None
    logger.info(f"hf_prune: latency table read from {path} (measured {data.get('measured', '?')})")
    return table


def write_cached(key: dict[str, Any], table: dict[str, Any]) -> None:
    """Store ``table`` (a table's dict) under ``key``; a cache that cannot be written only warns."""
    path = _cache_file(key)
    if path is None:
        return
    record = {"key": key, "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "table": table}
    try:
        # written whole then renamed: two runs profiling at once never leave a half-written table to the other
        atomic_write_json(path, record, indent=1)
    except OSError as exc:  # a read-only home must not fail the pruning
        logger.warning(f"hf_prune: could not cache the latency table in {path.parent} ({exc})")
