"""Granite (IBM): Llama's layout. GraniteSWA adds a learnable attention-sink logit per query head (``sinks``), a
per-head parameter that is not a projection: it is described as a :class:`Param` and sliced with its heads."""

from __future__ import annotations

from .base import Param, register
from .llama import LlamaAdapter


@register
class GraniteAdapter(LlamaAdapter):
    model_types = ("granite",)


@register
class GraniteSWAAdapter(LlamaAdapter):
    model_types = ("granite_swa",)
    attention_params = (Param("self_attn.sinks", dim=0, unit="q", width=1),)
