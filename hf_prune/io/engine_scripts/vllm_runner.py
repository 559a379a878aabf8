"""Serve one exported folder in vLLM and answer one request (the protocol of ``hf_prune/io/engines.py``).

Runs inside vLLM's own environment (``.venv-vllm``) and imports nothing of hf_prune. It reads one JSON request on
stdin and prints one JSON answer as the last line of stdout:

* ``prompts`` (lists of token ids) with ``max_tokens``: greedy generation (temperature 0, ``ignore_eos``), one
  batched call; answer ``generated``, the new token ids per prompt.
* ``windows`` (lists of token ids): each window's summed negative log-likelihood of its tokens after the first
  (vLLM's ``prompt_logprobs``, the raw model log-probabilities of the actual tokens); answer ``nll`` and ``scored``.
* ``timing`` (``batch``, ``prompt_len``, ``new_tokens``, ``repeats``): after a warm-up of both calls, per repeat,
  prefill = the time of a one-token generation for ``batch`` seeded random prompts of ``prompt_len`` tokens, decode
  tokens/s = ``batch x (new_tokens - 1)`` over the time a ``new_tokens`` generation of the same prompts takes beyond
  that prefill. Prefix caching is off, so every repeat computes its prompts afresh.

Other keys: ``dtype`` (float32 unless given: the precision transformers' reference runs in), ``enforce_eager``
(true unless given: no torch.compile, so the engine starts in seconds), ``threads`` (cores the CPU backend binds its
threads to), ``max_model_len``. Token ids in, token ids out: the tokenizer is not loaded.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any


def _max_model_len(request: dict[str, Any]) -> int:
    """The context the requests need (rounded up to 64): small, so the KV cache stays small."""
    needed = [16]
    needed += [len(p) + int(request.get("max_tokens", 16)) for p in request.get("prompts", [])]
    needed += [len(w) + 1 for w in request.get("windows", [])]
    if request.get("timing"):
        needed.append(int(request["timing"].get("prompt_len", 64)) + int(request["timing"].get("new_tokens", 64)))
    longest = int(request.get("max_model_len") or max(needed))
    return -(-longest // 64) * 64


def _vocab_size(model: str) -> int:
    config = json.loads((Path(model) / "config.json").read_text())
    return int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size"))


def _generate(llm: Any, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outputs]


def _score(llm: Any, windows: list[list[int]]) -> tuple[list[float], list[int]]:
    """Summed NLL of each window's tokens after the first, from vLLM's prompt log-probabilities."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(w)) for w in windows], params, use_tqdm=False)
    nll, scored = [], []
    for window, out in zip(windows, outputs, strict=True):
        entries = out.prompt_logprobs  # one per prompt token; the first is None (nothing predicts it)
        total = 0.0
        for token, entry in zip(window[1:], entries[1:], strict=True):
            total -= float(entry[token].logprob)
        nll.append(total)
        scored.append(len(window) - 1)
    return nll, scored


def _time(llm: Any, timing: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """Prefill seconds and decode tokens/s per repeat (see the module docstring), after a warm-up."""
    batch, prompt_len = int(timing.get("batch", 1)), int(timing.get("prompt_len", 64))
    new_tokens, repeats = int(timing.get("new_tokens", 64)), int(timing.get("repeats", 3))
    rng = random.Random(0)
    low = min(1000, vocab_size - 1)
    prompts = [[rng.randrange(low, vocab_size) for _ in range(prompt_len)] for _ in range(batch)]
    # warm both calls up: the first one-token call after a long one can be slow once (seen with nemotron-nas on
    # CPU), and decode is the difference of the two, so a cold prefill would inflate it
    _generate(llm, prompts, new_tokens)
    _generate(llm, prompts, 1)
    result: dict[str, Any] = {"decode_tokens_per_s": [], "prefill_s": [], "batch": batch}
    for _ in range(repeats):
        start = time.perf_counter()
        _generate(llm, prompts, 1)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        _generate(llm, prompts, new_tokens)
        total = time.perf_counter() - start
        result["prefill_s"].append(prefill)
        result["decode_tokens_per_s"].append(batch * (new_tokens - 1) / max(total - prefill, 1e-9))
    return result


def serve(request: dict[str, Any]) -> dict[str, Any]:
    """Start vLLM on ``request["model"]`` and answer every part of the request."""
    import vllm

    model = str(request["model"])
    options: dict[str, Any] = {
        "model": model,
        "dtype": request.get("dtype", "float32"),
        "max_model_len": _max_model_len(request),
        # no graph capture or compilation unless asked: the CPU backend's start stays short
        "enforce_eager": bool(request.get("enforce_eager", True)),
        "skip_tokenizer_init": True,
        "trust_remote_code": True,  # the nemotron-nas config class ships beside the weights
        "enable_prefix_caching": False,
        "seed": 0,
    }
    llm = vllm.LLM(**options)
    answer: dict[str, Any] = {"engine_version": vllm.__version__}
    if request.get("prompts"):
        answer["generated"] = _generate(llm, request["prompts"], int(request.get("max_tokens", 16)))
    if request.get("windows"):
        answer["nll"], answer["scored"] = _score(llm, request["windows"])
    if request.get("timing"):
        answer["timing"] = _time(llm, request["timing"], _vocab_size(model))
    return answer


def main() -> None:
    """Read the request, configure the CPU backend through its environment variables, serve, print the answer."""
    request = json.loads(sys.stdin.read())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: the requests are small
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if request.get("threads"):  # the first cores this process may run on (vLLM's default leaves one to its frontend)
        cores = sorted(os.sched_getaffinity(0))[: max(1, int(request["threads"]))]
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
    answer = serve(request)
    sys.stdout.flush()
    print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
