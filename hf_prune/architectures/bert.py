"""BERT and the BERT clones that share its module layout (RoBERTa, XLM-R, CamemBERT, ELECTRA)."""

from __future__ import annotations

from torch import nn

from .base import ArchAdapter, Proj, register


@register
class BertAdapter(ArchAdapter):
    model_types = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
    layers_path = "encoder.layer"
    attention_module = "attention.self"
    attention_out = None  # BERT applies the output projection in BertSelfOutput, outside attention.self
    attention_projs = (
        Proj("attention.self.query", "out"),
        Proj("attention.self.key", "out"),
        Proj("attention.self.value", "out"),
        Proj("attention.output.dense", "in"),
    )
    ffn_module = "intermediate"
    ffn_out = None
    ffn_projs = (Proj("intermediate.dense", "out"), Proj("output.dense", "in"))
    ffn_config_field = "intermediate_size"

    def set_attention_attrs(self, module: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
        module.num_attention_heads = heads
        module.all_head_size = heads * head_dim
