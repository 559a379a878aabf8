"""Tiny random configs of every supported family, and helpers shared by the tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers as tf
from torch import nn

from hf_prune.testing import zero_heads_and_neurons  # noqa: F401  (re-exported for the tests)
from hf_prune.utils import random_token_ids

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
    "camembert": Family(
        "camembert", _bert_like(tf.CamembertConfig, pad_token_id=1), (tf.CamembertForSequenceClassification,)
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
    # sandwich norms, soft-capping and per-layer sliding windows (Gemma 2), plus per-head q/k norms (Gemma 3)
    "gemma2": Family(
        "gemma2",
        _llama_like(
            tf.Gemma2Config,
            head_dim=8,
            sliding_window=6,
            attn_logit_softcapping=20.0,
            final_logit_softcapping=10.0,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
        (tf.Gemma2ForCausalLM,),
        causal=True,
    ),
    "gemma3_text": Family(
        "gemma3_text",
        _llama_like(
            tf.Gemma3TextConfig,
            head_dim=8,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
        (tf.Gemma3ForCausalLM,),
        causal=True,
    ),
    "granite": Family(
        "granite", _llama_like(tf.GraniteConfig, attention_multiplier=0.3), (tf.GraniteForCausalLM,), causal=True
    ),
    # a per-head parameter that is not a projection: GraniteSWA's attention-sink logits (made non-zero in make_model)
    "granite_swa": Family(
        "granite_swa",
        _llama_like(
            tf.GraniteSWAConfig,
            bos_token_id=1,
            eos_token_id=2,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
        (tf.GraniteSWAModel, tf.GraniteSWAForCausalLM),
        causal=True,
    ),
    # fused families: Phi-3 (qkv parts of different sizes under GQA, fused gate_up) and ModernBERT (fused Wqkv, GLU Wi)
    "phi3": Family(
        "phi3",
        _llama_like(
            tf.Phi3Config, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, bos_token_id=1, eos_token_id=2
        ),
        (tf.Phi3Model, tf.Phi3ForCausalLM, tf.Phi3ForSequenceClassification),
        causal=True,
    ),
    "modernbert": Family(
        "modernbert",
        lambda: tf.ModernBertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=80,
            global_attn_every_n_layers=2,
            local_attention=8,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
            attention_bias=True,
            mlp_bias=True,
            norm_bias=True,
        ),
        (
            tf.ModernBertModel,
            tf.ModernBertForSequenceClassification,
            tf.ModernBertForMaskedLM,
            tf.ModernBertForTokenClassification,
        ),
    ),
}


def make_model(family: Family, cls: type | None = None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = (cls or family.classes[-1])(family.make_config())
    # Random init leaves biases at zero; non-zero biases make the exactness checks meaningful.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "sinks")):
                p.normal_(0, 0.1 if name.endswith("bias") else 1.0)
    return model.eval()


def make_inputs(family: Family, batch: int = 3, seq: int = 11, padded: bool = True, seed: int = 1) -> dict:
    input_ids = random_token_ids(VOCAB, batch, seq, low=3, seed=seed)
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
