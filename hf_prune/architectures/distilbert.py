"""DistilBERT: ``attention.{q,k,v,out}_lin`` and ``ffn.{lin1,lin2}``."""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from .base import ArchAdapter, Proj, register


@register
class DistilBertAdapter(ArchAdapter):
    model_types = ("distilbert",)
    layers_path = "transformer.layer"
    attention_module = "attention"
    attention_out = "out_lin"
    attention_projs = (
        Proj("attention.q_lin", "out"),
        Proj("attention.k_lin", "out"),
        Proj("attention.v_lin", "out"),
        Proj("attention.out_lin", "in"),
    )
    ffn_module = "ffn"
    ffn_out = "lin2"
    ffn_projs = (Proj("ffn.lin1", "out"), Proj("ffn.lin2", "in"))
    layer_count_field = "n_layers"
    ffn_config_field = "hidden_dim"

    def hidden_size(self, config: PretrainedConfig) -> int:
        return int(config.dim)

    def num_heads(self, config: PretrainedConfig) -> int:
        return int(config.n_heads)

    def set_attention_attrs(self, module: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
        module.n_heads = heads
