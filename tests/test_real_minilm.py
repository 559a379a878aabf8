"""Surgery on the real all-MiniLM-L6-v2 weights (offline pip package)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import hf_prune
from hf_prune.recipes.offline import minilm_path

from .families import zero_heads_and_neurons

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def minilm():
    path = minilm_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    return model, AutoTokenizer.from_pretrained(path)


def test_real_minilm_non_uniform_surgery_is_exact_and_reloads(minilm, tmp_path):
    base, tokenizer = minilm
    model = copy.deepcopy(base)
    assert model.config.num_hidden_layers == 6 and model.config.num_attention_heads == 12
    g = torch.Generator().manual_seed(0)
    heads = {i: torch.randperm(12, generator=g)[: 2 * i].tolist() for i in range(6)}  # 0..10 heads per layer
    heads[5] = list(range(12))  # a layer with no attention left
    neurons = {i: torch.randperm(1536, generator=g)[: 256 * i].tolist() for i in range(6)}
    reference = copy.deepcopy(model)
    zero_heads_and_neurons(reference, heads, neurons)
    before = hf_prune.count_parameters(model)
    hf_prune.prune_heads(model, heads)
    hf_prune.prune_ffn(model, neurons)

    sentences = ["a gripping , beautifully made film .", "the plot is thin and the jokes fall flat ."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        got = model(**batch, output_hidden_states=True)
        expected = reference(**batch, output_hidden_states=True)
    torch.testing.assert_close(got.hidden_states[-1], expected.hidden_states[-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)

    removed_heads = sum(len(v) for v in heads.values())
    removed_neurons = sum(len(v) for v in neurons.values())
    # per head: q,k,v rows (384 weights + 1 bias each, 32 rows) + o columns (32 x 384); per neuron: 384+1+384
    expected_drop = removed_heads * 32 * (3 * 385 + 384) + removed_neurons * (385 + 384)
    assert before - hf_prune.count_parameters(model) == expected_drop
    assert [s.heads for s in hf_prune.get_adapter(model).layer_shapes(model)] == [12, 10, 8, 6, 4, 0]

    out = hf_prune.save_pretrained(model, tmp_path / "pruned", tokenizer=tokenizer)
    loaded = hf_prune.from_pretrained(out, AutoModelForSequenceClassification).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, got.logits, atol=0, rtol=0)

    # the same folder in a process where hf_prune cannot be imported: transformers alone, through the saved
    # hf_prune_modeling.py, gives hf_prune's own reload bit for bit, and a pipeline runs on it
    with torch.no_grad():
        torch.save({"batch": dict(batch), "logits": loaded(**batch).logits}, tmp_path / "io.pt")
    code = f"""
import sys; sys.modules["hf_prune"] = None
import torch, transformers as tf
io = torch.load({str(tmp_path / "io.pt")!r})
model = tf.AutoModelForSequenceClassification.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
with torch.no_grad():
    print(torch.equal(model(**io["batch"]).logits, io["logits"]))
classify = tf.pipeline("text-classification", model={str(out)!r}, trust_remote_code=True)
print(classify("a gripping , beautifully made film .")[0]["label"])
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split()
    assert lines[0] == "True" and lines[1] in ("LABEL_0", "LABEL_1")
