"""Tiny random configs of every supported family, and helpers shared by the tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers as tf
from torch import nn

from hf_prune import get_adapter
from hf_prune.surgery import head_feature_index

VOCAB = 97


@dataclass
class Family:
    name: str
    make_config: Callable[[], tf.PretrainedConfig]
    classes: tuple[type, ...]
    causal: bool = False
    extra_inputs: dict = field(default_factory=dict)


def _bert_like(config_cls, **kw):
    def make():
        return config_cls(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=40,
            max_position_embeddings=80,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            **kw,
        )

    return make


def _llama_like(config_cls, **kw):
    def make():
        base = {
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "intermediate_size": 40,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 80,
            "pad_token_id": 0,
            "tie_word_embeddings": False,
        }
        base.update(kw)
        return config_cls(**base)

    return make


FAMILIES: dict[str, Family] = {
    "bert": Family(
        "bert",
        _bert_like(tf.BertConfig),
        (tf.BertModel, tf.BertForSequenceClassification, tf.BertForMaskedLM, tf.BertForQuestionAnswering),
    ),
    "roberta": Family(
        "roberta",
        _bert_like(tf.RobertaConfig, pad_token_id=1),
        (tf.RobertaModel, tf.RobertaForSequenceClassification, tf.RobertaForTokenClassification),
    ),
    "xlm-roberta": Family(
        "xlm-roberta", _bert_like(tf.XLMRobertaConfig, pad_token_id=1), (tf.XLMRobertaForSequenceClassification,)
    ),
    "electra": Family(
        "electra", _bert_like(tf.ElectraConfig, embedding_size=16), (tf.ElectraForSequenceClassification,)
    ),
    "distilbert": Family(
        "distilbert",
        lambda: tf.DistilBertConfig(
            vocab_size=VOCAB,
            dim=32,
            n_layers=3,
            n_heads=4,
            hidden_dim=40,
            max_position_embeddings=80,
            dropout=0.0,
            attention_dropout=0.0,
        ),
        (tf.DistilBertModel, tf.DistilBertForSequenceClassification, tf.DistilBertForMaskedLM),
    ),
    "gpt2": Family(
        "gpt2",
        lambda: tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=3,
            n_head=4,
            n_inner=40,
            n_positions=80,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        (tf.GPT2Model, tf.GPT2LMHeadModel, tf.GPT2ForSequenceClassification),
        causal=True,
    ),
    "llama": Family(
        "llama",
        _llama_like(tf.LlamaConfig),
        (tf.LlamaModel, tf.LlamaForCausalLM, tf.LlamaForSequenceClassification),
        causal=True,
    ),
    "mistral": Family("mistral", _llama_like(tf.MistralConfig), (tf.MistralForCausalLM,), causal=True),
    "qwen2": Family("qwen2", _llama_like(tf.Qwen2Config), (tf.Qwen2ForCausalLM,), causal=True),
    # head_dim deliberately != hidden / heads: the adapter must read it from the config
    "qwen3": Family("qwen3", _llama_like(tf.Qwen3Config, head_dim=12), (tf.Qwen3ForCausalLM,), causal=True),
    "gemma": Family("gemma", _llama_like(tf.GemmaConfig, head_dim=8), (tf.GemmaForCausalLM,), causal=True),
}


def make_model(family: Family, cls: type | None = None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = (cls or family.classes[-1])(family.make_config())
    # Random init leaves biases at zero; non-zero biases make the exactness checks meaningful.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def make_inputs(family: Family, batch: int = 3, seq: int = 11, padded: bool = True, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padded:
        # right padding for encoders, left padding for decoders (as generate() expects)
        for row, pad in enumerate(range(batch)):
            if pad == 0:
                continue
            if family.causal:
                mask[row, : pad * 2] = 0
                input_ids[row, : pad * 2] = 0
            else:
                mask[row, seq - pad * 2 :] = 0
                input_ids[row, seq - pad * 2 :] = 0
    return {"input_ids": input_ids, "attention_mask": mask}


def output_tensor(out) -> torch.Tensor:
    for key in ("logits", "start_logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise AssertionError(f"no tensor output in {type(out)}")


def zero_heads_and_neurons(model: nn.Module, heads: dict[int, list[int]], neurons: dict[int, list[int]]) -> None:
    """Reference for exactness: silence heads by zeroing their value rows (and bias), neurons by zeroing the
    rows (and bias) that feed the activation. Indices refer to the current model."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    with torch.no_grad():
        for layer, hs in heads.items():
            shape = adapter.layer_shape(model, layer)
            group = shape.heads // shape.kv_heads
            head_dim = adapter.head_dim(model.config)
            for proj in adapter.value_projs:
                ids = sorted({h // group for h in hs}) if proj.heads == "kv" else hs
                idx = head_feature_index(ids, head_dim)
                if proj.parts > 1:
                    idx = idx + proj.value_part * shape.heads * head_dim
                _zero_out_features(layers[layer].get_submodule(proj.path), idx)
        for layer, ns in neurons.items():
            for proj in adapter.ffn_input_projs:
                _zero_out_features(layers[layer].get_submodule(proj.path), torch.tensor(ns, dtype=torch.long))


def _zero_out_features(module: nn.Module, idx: torch.Tensor) -> None:
    if isinstance(module, nn.Linear):
        module.weight[idx, :] = 0
    else:  # Conv1D: (in, out)
        module.weight[:, idx] = 0
    if getattr(module, "bias", None) is not None:
        module.bias[idx] = 0
