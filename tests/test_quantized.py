"""Models marked as quantized whose weights are float (GGUF loaded dequantized) are ordinary models to hf_prune;
packed weights are refused with a clear error. The real GGUF SmolLM2 round trip is in test_real_gguf.py."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from datasets import Dataset
from torch import nn
from transformers import GgufConfig
from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

import hf_prune
from hf_prune import PruningConfig, PruningTrainer
from hf_prune.compat import float_weights, quant_method


def _llama() -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return tf.LlamaForCausalLM(config).eval()


def _mark_gguf(model: nn.Module) -> nn.Module:
    """The marks transformers leaves on a GGUF checkpoint it dequantized at load time."""
    config = GgufConfig(dequantize=True)
    model.hf_quantizer = GgufHfQuantizer(config)
    model.is_quantized = True
    model.quantization_method = config.quant_method
    model.config.quantization_config = config
    return model


def _lm_data(n: int = 8) -> Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, 16), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def test_stock_transformers_refuses_a_dequantized_gguf_model_that_hf_prune_trains_and_saves(tmp_path):
    model = _mark_gguf(_llama())
    args = tf.TrainingArguments(
        str(tmp_path / "t"),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
    )
    with pytest.raises(ValueError, match="purely quantized"):  # what users hit without hf_prune
        tf.Trainer(model=model, args=args, train_dataset=_lm_data())
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "stock")
    assert quant_method(model) == "gguf"
    trainer = PruningTrainer(
        model=model,
        args=args,
        train_dataset=_lm_data(),
        pruning_config=PruningConfig(ffn=0.25, heads=0.5, criterion="magnitude"),
    )
    assert quant_method(model) is None and getattr(model, "hf_quantizer", None) is None
    trainer.train()
    assert [s.ffn for s in hf_prune.get_adapter(model).layer_shapes(model)] == [48, 48]
    hf_prune.save_pretrained(model, tmp_path / "pruned")
    saved = (tmp_path / "pruned" / "config.json").read_text()
    assert "quantization_config" not in saved
    reloaded = hf_prune.from_pretrained(tmp_path / "pruned", tf.AutoModelForCausalLM).eval()
    ids = torch.arange(10).unsqueeze(0)
    model.eval()
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_prune_and_save_drop_the_marks_of_a_float_gguf_model(tmp_path):
    model = _mark_gguf(_llama())
    hf_prune.prune(model, PruningConfig(ffn=0.5, criterion="magnitude"))
    assert quant_method(model) is None
    model.save_pretrained(tmp_path / "stock")  # the stock save works again: it is a float model
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "stock")
    assert reloaded.config.intermediate_size == 32 and not getattr(reloaded, "is_quantized", False)
    other = _mark_gguf(_llama())
    hf_prune.save_pretrained(other, tmp_path / "direct")  # saving alone drops them too
    assert "quantization_config" not in (tmp_path / "direct" / "config.json").read_text()


def test_packed_or_other_quantized_weights_are_refused_by_name():
    class GgufLinear(nn.Linear):  # stands for transformers' packed GGUF layer (kernel present)
        pass

    model = _mark_gguf(_llama())
    model.model.layers[0].mlp.down_proj = GgufLinear(64, 32, bias=False)
    # what GgufHfQuantizer records for every layer it swapped in to keep the weight packed
    model.hf_quantizer.packed_modules = {"model.layers.0.mlp.down_proj.weight": model.model.layers[0].mlp.down_proj}
    with pytest.raises(
        ValueError, match=r"packed weights \(e\.g\. model\.layers\.0\.mlp\.down_proj\).*dequantize=True"
    ):
        float_weights(model)
    with pytest.raises(ValueError, match="packed weights"):
        hf_prune.prune(model, PruningConfig(ffn=0.5, criterion="magnitude"))
    assert model.model.layers[1].mlp.down_proj.in_features == 64  # refused before anything changed

    bnb = _llama()
    bnb.is_quantized = True
    bnb.config.quantization_config = {"quant_method": "bitsandbytes"}
    with pytest.raises(ValueError, match=r"quantized with bitsandbytes.*model\.dequantize\(\)"):
        float_weights(bnb)
    plain = _llama()
    assert float_weights(plain) is plain and quant_method(plain) is None
