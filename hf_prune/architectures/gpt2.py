"""GPT-2: ``Conv1D`` weights stored (in, out) and a fused ``c_attn`` holding q, k and v side by side."""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from .base import ArchAdapter, Proj, register


@register
class GPT2Adapter(ArchAdapter):
    model_types = ("gpt2",)
    layers_path = "h"
    attention_module = "attn"
    attention_out = "c_proj"
    attention_projs = (
        Proj("attn.c_attn", "out", parts=3),
        Proj("attn.c_proj", "in"),
    )
    ffn_module = "mlp"
    ffn_out = "c_proj"
    ffn_projs = (Proj("mlp.c_fc", "out"), Proj("mlp.c_proj", "in"))
    layer_count_field = "n_layer"
    ffn_config_field = "n_inner"

    def hidden_size(self, config: PretrainedConfig) -> int:
        return int(config.n_embd)

    def num_heads(self, config: PretrainedConfig) -> int:
        return int(config.n_head)

    def ffn_size(self, config: PretrainedConfig) -> int:
        # n_inner=None means the GPT-2 default of 4 * hidden size.
        return int(config.n_inner) if config.n_inner is not None else 4 * int(config.n_embd)

    def set_attention_attrs(self, module: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
        module.num_heads = heads
        # c_attn output is split into q, k, v blocks of split_size each.
        module.split_size = heads * head_dim
