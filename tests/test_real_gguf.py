"""The real SmolLM2-135M from its GGUF file: prunes, trains two steps in PruningTrainer, saves and reloads."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from datasets import Dataset

import hf_prune
from hf_prune import PruningConfig, PruningTrainer
from hf_prune.recipes.offline import smollm2_path

pytestmark = pytest.mark.real


def test_gguf_smollm2_prunes_trains_saves_and_reloads(tmp_path):
    folder, gguf = smollm2_path()
    model = hf_prune.from_pretrained(folder, tf.AutoModelForCausalLM, gguf_file=gguf, dtype=torch.float32)
    assert not getattr(model, "is_quantized", False)  # loaded as the float model it is
    tokenizer = tf.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    text = "The quick brown fox jumps over the lazy dog. " * 8
    ids = tokenizer([text] * 4, return_tensors="pt", truncation=True, max_length=48).input_ids
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = tf.TrainingArguments(
        str(tmp_path / "t"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-5,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
    )
    config = PruningConfig(ffn=0.25, criterion="magnitude")
    trainer = PruningTrainer(model=model, args=args, train_dataset=data, pruning_config=config)
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    # a quarter of 1536 neurons from every layer: uniform, so the stock config describes it (stock reload below)
    assert {s.ffn for s in hf_prune.get_adapter(model).layer_shapes(model)} == {1152}
    assert model.config.intermediate_size == 1152
    hf_prune.save_pretrained(model, tmp_path / "pruned", tokenizer=tokenizer)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()  # uniform widths: stock loads
    model.eval()
    with torch.inference_mode():
        assert torch.equal(model(ids[:1]).logits, reloaded(ids[:1]).logits)
    out = reloaded.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)
