"""One-shot pruning on the real offline models: MiniLM (BERT) and SmolLM2-135M (Llama, GQA)."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import hf_prune
from hf_prune import PruningConfig, prune
from hf_prune.recipes.offline import minilm_path, smollm2_path

pytestmark = pytest.mark.real
DATA = Path(__file__).resolve().parents[1] / "data"


def test_minilm_fisher_global_meets_a_2x_flops_target(tmp_path):
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    with open(DATA / "sst2" / "train_8k.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:64]
    enc = tokenizer([r["sentence"] for r in rows], padding="max_length", truncation=True, max_length=48)
    examples = [
        {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "label": int(r["label"])}
        for i, r in enumerate(rows)
    ]
    report = prune(model, PruningConfig(target_flops=0.5, criterion="fisher", scope="global"), examples)
    assert report.flops_after / report.flops_before == pytest.approx(0.5, abs=0.01)
    assert all(layer["ffn"] % 8 == 0 for layer in report.layers_after)
    assert all(layer["heads"] >= 1 for layer in report.layers_after)
    model.save_pretrained(tmp_path)
    again = hf_prune.from_pretrained(tmp_path, AutoModelForSequenceClassification)
    assert hf_prune.count_parameters(again) == report.params_after


def _ppl(model, ids: torch.Tensor, window: int = 256) -> float:
    nll, n = 0.0, 0
    with torch.inference_mode():
        for s in range(0, ids.numel() - 1, window):
            chunk = ids[s : s + window].unsqueeze(0)
            nll += float(model(input_ids=chunk, labels=chunk).loss) * (chunk.shape[1] - 1)
            n += chunk.shape[1] - 1
    return math.exp(nll / n)


def test_smollm2_activation_aware_beats_magnitude_at_half_sparsity():
    folder, gguf = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    assert base.config.num_key_value_heads == 3 and base.config.num_attention_heads == 9
    ids = tokenizer((DATA / "wikitext2" / "test_head.txt").read_text(), return_tensors="pt").input_ids[0]
    calibration = [{"input_ids": ids[i * 256 : (i + 1) * 256]} for i in range(8)]
    evaluation = ids[4096 : 4096 + 2048]  # disjoint from the calibration tokens
    dense = _ppl(base, evaluation)

    results = {}
    for name, config in {
        "magnitude": PruningConfig(sparsity=0.5, sparsity_scope="layer"),
        "activation": PruningConfig(sparsity=0.5, sparsity_scope="row", sparsity_criterion="activation"),
    }.items():
        model = copy.deepcopy(base)
        report = prune(model, config, calibration_data=calibration)
        assert report.sparsity == pytest.approx(0.5, abs=0.005)
        results[name] = _ppl(model, evaluation)
    assert dense < results["activation"] < results["magnitude"], (dense, results)

    # structured: a third of the query heads, by default one from each of the three groups (the key/value heads
    # stay), or with head_unit="group" one whole group; the model still works either way
    for unit, kv in (("auto", 3), ("group", 2)):
        model = copy.deepcopy(base)
        report = prune(model, PruningConfig(heads=0.34, criterion="magnitude", head_unit=unit))
        assert [layer["heads"] for layer in report.layers_after] == [6] * 30
        assert [layer["kv_heads"] for layer in report.layers_after] == [kv] * 30
        assert math.isfinite(_ppl(model, evaluation[:512]))
