"""LoRA recovery on the real offline models (issue 30's bar, shortened): SmolLM2 with 50% row-wise magnitude sparsity
keeps its zeros through LoRA training and the merge; MiniLM cut to half its FLOPs, recovered with LoRA, merged, saved
and reloaded by stock transformers gives the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf
from datasets import Dataset

import hf_prune
from hf_prune import PruningConfig, PruningTrainer
from hf_prune.recipes.offline import minilm_path, smollm2_path

from .test_real_trainer import _sst2
from .test_trainer import args

pytestmark = pytest.mark.real
DATA = Path(__file__).resolve().parents[1] / "data"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_smollm2_half_sparse_lora_merge_keeps_every_pruned_weight_zero(tmp_path):
    folder, gguf = smollm2_path()
    tokenizer = tf.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    ids = tokenizer((DATA / "wikitext2" / "test_head.txt").read_text(), return_tensors="pt").input_ids[0]
    windows = [ids[i * 64 : (i + 1) * 64].tolist() for i in range(12)]
    data = Dataset.from_dict({"input_ids": windows, "labels": windows})
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}

    peft_model = hf_prune.get_peft_model(model, {"r": 8, "alpha": 16, "target_modules": PROJECTIONS})
    config = PruningConfig(sparsity=0.5, sparsity_scope="row", sparsity_criterion="magnitude", schedule="oneshot")
    trainer = PruningTrainer(
        model=peft_model,
        args=args(tmp_path, max_steps=3, per_device_train_batch_size=4),
        train_dataset=data,
        pruning_config=config,
    )
    trainer.train()
    masks = trainer.pruning_callback.masks
    assert len(masks) == 7 * model.config.num_hidden_layers

    merged = hf_prune.merge_and_unload(peft_model)
    assert not [n for n, _ in merged.named_parameters() if "lora" in n]
    moved = 0
    for name, keep in masks.items():
        weight = merged.get_submodule(name).weight
        assert bool((weight[~keep] == 0).all()), name
        assert float((~keep).float().mean()) == pytest.approx(0.5, abs=1e-3)  # row-wise: half of every row
        moved += int((weight[keep] != before[f"{name}.weight"][keep]).sum())
    assert moved > 0.5 * sum(int(k.sum()) for k in masks.values())  # LoRA moved most kept weights


def test_minilm_half_flops_lora_merged_reloads_with_stock_transformers(tmp_path):
    path = minilm_path()
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    train = _sst2(tokenizer, "train_8k.tsv", 64)
    hf_prune.prune(
        model,
        PruningConfig(target_flops=0.5, criterion="fisher", scope="global", seq_len=48),
        calibration_data=train,
    )
    flops = hf_prune.encoder_flops(model, 48).total
    peft_model = hf_prune.get_peft_model(model, {"r": 8})
    trainer = PruningTrainer(
        model=peft_model, args=args(tmp_path, max_steps=4, per_device_train_batch_size=16), train_dataset=train
    )
    trainer.train()
    merged = hf_prune.merge_and_unload(peft_model).eval()
    assert hf_prune.encoder_flops(merged, 48).total == flops
    batch = _sst2(tokenizer, "dev.tsv", 16).with_format("torch")[:]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        expected = merged(**inputs).logits
    hf_prune.save_pretrained(merged, tmp_path / "merged", tokenizer=tokenizer)
    reloaded = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", trust_remote_code=True)
    assert "hf_prune" not in type(reloaded).__module__.split(".")[0]  # the copied remote code, not the library
    with torch.no_grad():
        got = reloaded.eval()(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
