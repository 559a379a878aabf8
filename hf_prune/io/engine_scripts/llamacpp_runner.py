"""llama.cpp runner for hf_prune's engine protocol (see ``hf_prune/io/engines.py``); runs in ``.venv-llamacpp``.

Standalone on purpose: it imports nothing of hf_prune, only ``llama_cpp`` (llama-cpp-python) and numpy. It reads one
JSON request on stdin and prints one JSON answer as the last line of stdout:

* ``prompts`` + ``max_tokens``: greedy generation from token ids, exactly ``max_tokens`` tokens per prompt (EOS does
  not stop it), by the low-level loop (evaluate, take the argmax of the last logits, feed it back): the same
  tokens as ``argmax`` decoding in transformers, which a sampler chain with stop conditions would not guarantee.
* ``windows``: per window, the summed negative log-likelihood of every token after the first given the ones before
  (log-softmax in float64) and the number of tokens scored.
* ``timing`` (``batch``, ``prompt_len``, ``new_tokens``, ``repeats``): llama-cpp-python holds one sequence, so
  ``batch`` must be 1 (larger values are answered for batch 1, with a ``note``); per repeat, the prefill latency of
  a ``prompt_len`` prompt and the decode rate of ``new_tokens`` tokens after it, one token per step.

Request extras: ``threads`` (default 2), ``n_ctx`` (default: the longest sequence asked for, at least 64),
``extra_buffers`` (default true: llama.cpp's own default, which lets it repack quantized weights for AMX or
AVX kernels). The work runs in a child process: where such a kernel crashes the process (llama.cpp's AMX matmul
segfaults on some virtual machines that report AMX), it is run again without extra buffer types, and the answer's
``note`` says so.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np


def _needed_context(request: dict[str, Any]) -> int:
    lengths = [64]
    lengths += [len(p) + int(request.get("max_tokens", 0)) for p in request.get("prompts") or []]
    lengths += [len(w) for w in request.get("windows") or []]
    timing = request.get("timing") or {}
    if timing:
        lengths.append(int(timing.get("prompt_len", 128)) + int(timing.get("new_tokens", 32)))
    return int(request.get("n_ctx") or max(lengths))


def _last_logits(llm: Any, llama_cpp: Any) -> np.ndarray:
    """The logits after the last evaluated token (read from the context: ``Llama.scores`` is only filled with
    ``logits_all``)."""
    pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).copy()


def generate(llm: Any, llama_cpp: Any, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy continuations of ``prompts``, exactly ``max_tokens`` tokens each."""
    out = []
    for prompt in prompts:
        llm.reset()
        llm.eval(list(prompt))
        tokens: list[int] = []
        for _ in range(max_tokens):
            token = int(np.argmax(_last_logits(llm, llama_cpp)))
            tokens.append(token)
            if len(tokens) < max_tokens:
                llm.eval([token])
        out.append(tokens)
    return out


def score(llm: Any, windows: list[list[int]]) -> tuple[list[float], list[int]]:
    """Summed NLL of tokens ``1..n-1`` of each window given the tokens before them, and how many were scored."""
    nll, scored = [], []
    for window in windows:
        llm.reset()
        llm.eval(list(window))
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        log_z = (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[:, 0]
        targets = np.asarray(window[1:], dtype=np.int64)
        nll.append(float((log_z - logits[np.arange(len(targets)), targets]).sum()))
        scored.append(len(targets))
    return nll, scored


def timing(llm: Any, llama_cpp: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Prefill latency and decode tokens/s per repeat (one warm-up run first, not reported)."""
    prompt_len, new_tokens = int(spec.get("prompt_len", 128)), int(spec.get("new_tokens", 32))
    repeats, batch = int(spec.get("repeats", 3)), int(spec.get("batch", 1))
    rng = np.random.default_rng(0)
    vocab = llm.n_vocab()
    prompt = rng.integers(min(1000, vocab - 1), vocab, size=prompt_len).tolist()
    prefill, decode = [], []
    for run in range(repeats + 1):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        _last_logits(llm, llama_cpp)
        middle = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([int(np.argmax(_last_logits(llm, llama_cpp)))])
        end = time.perf_counter()
        if run:  # run 0 warms caches and thread pools
            prefill.append(middle - start)
            decode.append(new_tokens / (end - middle))
    answer: dict[str, Any] = {"decode_tokens_per_s": decode, "prefill_s": prefill, "batch": 1}
    if batch != 1:
        answer["note"] = f"llama-cpp-python runs one sequence; batch={batch} was timed as batch=1"
    return answer


def _load(request: dict[str, Any]) -> Any:
    import llama_cpp
    import llama_cpp.llama_cpp as low_level

    if not request.get("extra_buffers", True):
        default_params = low_level.llama_model_default_params

        def without_extra_buffers() -> Any:
            params = default_params()
            params.use_extra_bufts = False
            return params

        low_level.llama_model_default_params = without_extra_buffers  # what Llama.__init__ calls
    return llama_cpp.Llama(
        model_path=str(request["model"]),
        n_ctx=_needed_context(request),
        logits_all=bool(request.get("windows")),
        n_threads=int(request.get("threads") or 2),
        n_threads_batch=int(request.get("threads") or 2),
        seed=0,
        verbose=False,
    )


def work(request: dict[str, Any]) -> dict[str, Any]:
    """Answer ``request`` in this process."""
    import llama_cpp

    llm = _load(request)
    answer: dict[str, Any] = {"engine_version": f"llama-cpp-python {llama_cpp.__version__}"}
    if request.get("prompts"):
        answer["generated"] = generate(llm, llama_cpp, request["prompts"], int(request.get("max_tokens", 16)))
    if request.get("windows"):
        answer["nll"], answer["scored"] = score(llm, request["windows"])
    if request.get("timing"):
        answer["timing"] = timing(llm, llama_cpp, request["timing"])
    llm.close()
    return answer


def _child(request: dict[str, Any]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_PRUNE_LLAMACPP_CHILD": "1"}
    return subprocess.run(
        [sys.executable, __file__], input=json.dumps(request), capture_output=True, text=True, env=env
    )


def main() -> None:
    request = json.loads(sys.stdin.read())
    if os.environ.get("HF_PRUNE_LLAMACPP_CHILD"):
        print(json.dumps(work(request)), flush=True)
        return
    proc = _child(request)
    note = None
    if proc.returncode < 0 and request.get("extra_buffers", True):  # killed by a signal inside llama.cpp
        note = (
            f"llama.cpp crashed with {signal.Signals(-proc.returncode).name} using its extra buffer types "
            f"(AMX / repacked kernels); answered without them"
        )
        proc = _child({**request, "extra_buffers": False})
    sys.stderr.write(proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.exit(proc.returncode if proc.returncode > 0 else 1)
    answer = json.loads(lines[-1])
    if note:
        answer["note"] = note
    print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
