"""What the engine tests compare vLLM and llama.cpp against: transformers' window log-likelihoods on WikiText-2 and
the prompts both generate from (shared by ``test_serve_vllm.py`` and ``test_serve_gguf.py``)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, in a small village,"]


def nll(model: torch.nn.Module, windows: list[list[int]]) -> list[float]:
    """Each window's summed negative log-likelihood of its tokens after the first (float64 log-softmax)."""
    with torch.inference_mode():
        ids = torch.tensor(windows)
        logp = torch.log_softmax(model(ids).logits[:, :-1].double(), -1)
        return (-logp.gather(-1, ids[:, 1:, None])).sum((1, 2)).tolist()


def ppl(nll: list[float], scored: list[int]) -> float:
    return math.exp(sum(nll) / sum(scored))


def wikitext_windows(tokenizer, n: int = 4, length: int = 128) -> list[list[int]]:
    """``n`` consecutive windows of ``length`` tokens from the start of WikiText-2 test (shipped in ``data/``)."""
    ids = tokenizer((ROOT / "data" / "wikitext2" / "test_head.txt").read_text()).input_ids
    assert len(ids) >= n * length
    return [ids[i * length : (i + 1) * length] for i in range(n)]
