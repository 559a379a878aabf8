"""Run an exported model in a serving engine that lives in its own virtual environment.

vLLM and llama-cpp-python pin their own ``transformers`` / ``torch``, so they cannot share hf_prune's environment
(``make serve-install`` creates ``.venv-vllm`` and ``.venv-llamacpp``). hf_prune talks to them through a small
runner script per engine (``hf_prune/io/engine_scripts/<engine>_runner.py``) that imports nothing of hf_prune: it
reads one JSON request on stdin and prints one JSON answer as the last line of stdout.

Request keys (all optional except ``model``): ``model`` (exported folder or ``.gguf`` file), ``prompts`` (lists of
token ids) with ``max_tokens`` (greedy tokens to generate for each), ``windows`` (lists of token ids whose
teacher-forced negative log-likelihood to return, for perplexity), ``timing`` (``{"batch": n, "prompt_len": p,
"new_tokens": t, "repeats": r}``: decode tokens/s and prefill latency), ``threads``.
Answer keys: ``generated`` (token ids per prompt), ``nll`` (summed NLL per window) and ``scored`` (tokens scored
per window), ``timing`` (``decode_tokens_per_s``, ``prefill_s`` lists, one entry per repeat), ``engine_version``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from transformers.utils import logging

ENGINES: dict[str, str] = {"vllm": ".venv-vllm", "llamacpp": ".venv-llamacpp"}
SCRIPTS = Path(__file__).with_name("engine_scripts")
REPO = Path(__file__).resolve().parents[2]

logger = logging.get_logger(__name__)


class EngineUnavailable(RuntimeError):
    """The engine's environment is not installed (``make serve-install``)."""


def engine_python(engine: str) -> Path:
    """The Python interpreter of ``engine``'s environment: ``$HF_PRUNE_<ENGINE>_PYTHON`` if set, else
    ``<checkout>/.venv-<engine>/bin/python``.

    Raises:
        ValueError: ``engine`` is not one of :data:`ENGINES`.
        EngineUnavailable: no such interpreter exists.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is invalid; allowed: {', '.join(ENGINES)}")
    variable = f"HF_PRUNE_{engine.upper()}_PYTHON"
    path = Path(os.environ[variable]) if os.environ.get(variable) else REPO / ENGINES[engine] / "bin" / "python"
    if not path.exists():
        raise EngineUnavailable(
            f"{engine} is not installed: {path} does not exist. Run `make serve-install` in the hf_prune checkout, "
            f"or point {variable} at a Python that has {engine} installed."
        )
    return path


def run_engine(engine: str, request: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Send ``request`` to ``engine``'s runner in its own environment and return its answer (see module docstring).

    The runner's stderr is passed through on failure, so an engine error reads as the engine wrote it. A runner the
    operating system killed by a signal (vLLM's CPU backend has aborted once in CI at start-up, right after loading
    weights: "terminate called without an active exception", a C++ thread torn down during initialisation) is started
    once more, with a warning that carries the first attempt's stderr; an error exit is never retried.
    """
    python = engine_python(engine)
    script = SCRIPTS / f"{engine}_runner.py"
    env = {**os.environ, "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)  # hf_prune's environment must not leak into the engine's
    for attempt in (1, 2):
        proc = subprocess.run(
            [str(python), str(script)],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode == 0 and lines:
            return json.loads(lines[-1])
        failure = f"{engine} runner failed (exit {proc.returncode}) on {request.get('model')}:\n{proc.stderr[-6000:]}"
        if proc.returncode >= 0 or attempt == 2:
            raise RuntimeError(failure)
        logger.warning(f"hf_prune: {failure}\nhf_prune: the runner was killed by a signal; starting it once more")
    raise AssertionError("unreachable")
