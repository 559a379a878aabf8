"""ModernBERT: fused ``Wqkv`` (q, k, v blocks of equal size) and a fused GLU input ``Wi`` (input and gate halves).
Its attention reads the head count off the tensor shapes, so the description is all it needs."""

from __future__ import annotations

from .base import ArchAdapter, Proj, register


@register
class ModernBertAdapter(ArchAdapter):
    model_types = ("modernbert",)
    layers_path = "layers"
    attention_module = "attn"
    attention_out = "Wo"
    attention_projs = (Proj("attn.Wqkv", "out", parts=3), Proj("attn.Wo", "in"))
    ffn_module = "mlp"
    ffn_out = "Wo"
    ffn_projs = (Proj("mlp.Wi", "out", parts=2), Proj("mlp.Wo", "in"))
    ffn_config_field = "intermediate_size"
