"""Llama-family decoders (Llama, Mistral, Qwen2/3, Gemma 1/2/3): separate q/k/v/o and a gated MLP.

Qwen3's and Gemma-3's q/k norms normalise each head over ``head_dim`` with one shared weight, so they need no
slicing; Gemma-2/3's sandwich norms act on the block's hidden size and their attention soft-capping and sliding
windows (``layer_types``) do not depend on the head count.

Grouped-query attention: ``num_key_value_groups`` query heads share one key/value head. Heads are removed in whole
groups, or the same number from every group of a layer (the forward needs equal groups; each layer's attention keeps
its own ``num_key_value_groups``).
"""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from .base import ArchAdapter, Proj, register


@register
class LlamaAdapter(ArchAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
    layers_path = "layers"
    attention_module = "self_attn"
    attention_out = "o_proj"
    attention_projs = (
        Proj("self_attn.q_proj", "out", heads="q"),
        Proj("self_attn.k_proj", "out", heads="kv"),
        Proj("self_attn.v_proj", "out", heads="kv"),
        Proj("self_attn.o_proj", "in", heads="q"),
    )
    ffn_module = "mlp"
    ffn_out = "down_proj"
    ffn_projs = (Proj("mlp.gate_proj", "out"), Proj("mlp.up_proj", "out"), Proj("mlp.down_proj", "in"))
    ffn_config_field = "intermediate_size"
    head_dim_in_config = True

    def num_kv_heads(self, config: PretrainedConfig) -> int:
        kv = getattr(config, "num_key_value_heads", None)
        return int(kv) if kv is not None else self.num_heads(config)

    def head_dim(self, config: PretrainedConfig) -> int:
        head_dim = getattr(config, "head_dim", None)
        return int(head_dim) if head_dim else self.hidden_size(config) // self.num_heads(config)

    def set_attention_attrs(self, module: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
        # query heads removed inside the groups change how many share each key/value head (repeat_kv reads it)
        if kv_heads:
            module.num_key_value_groups = heads // kv_heads

    def set_ffn_attrs(self, module: nn.Module, size: int) -> None:
        module.intermediate_size = size
