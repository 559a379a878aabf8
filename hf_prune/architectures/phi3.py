"""Phi-3: a fused ``qkv_proj`` (query, key and value heads side by side, with grouped-query attention) and a fused
``gate_up_proj``. Everything except where the fused parts lie is Llama's, so this adapter is the Llama one with
other projection paths: a fused family is data, not code."""

from __future__ import annotations

from torch import nn

from .base import LayerConfig, Proj, register
from .llama import LlamaAdapter


@register
class Phi3Adapter(LlamaAdapter):
    model_types = ("phi3",)
    attention_projs = (
        Proj("self_attn.qkv_proj", "out", parts=("q", "kv", "kv")),
        Proj("self_attn.o_proj", "in"),
    )
    ffn_projs = (Proj("mlp.gate_up_proj", "out", parts=("ffn", "ffn")), Proj("mlp.down_proj", "in"))

    def set_attention_attrs(self, module: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
        super().set_attention_attrs(module, heads, kv_heads, head_dim)
        module.num_key_value_heads = kv_heads
        # the forward splits qkv at config.num_attention_heads * head_dim: give this layer its own count
        module.config = LayerConfig(module.config, num_attention_heads=heads, num_key_value_heads=kv_heads)

    def set_ffn_attrs(self, module: nn.Module, size: int) -> None:
        """The fused MLP splits ``gate_up_proj``'s output in two halves itself; nothing to update."""
