"""The adapter conformance kit (hf_prune.testing.check_adapter) on every registered model type, and proof that the
kit fails an adapter whose description is wrong."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

import hf_prune
from hf_prune.architectures import base
from hf_prune.architectures.granite import GraniteSWAAdapter
from hf_prune.architectures.phi3 import Phi3Adapter
from hf_prune.testing import check_adapter

from .families import FAMILIES, make_inputs, make_model


def test_every_registered_model_type_has_a_tiny_family_here():
    assert set(hf_prune.supported_model_types()) <= set(FAMILIES)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_passes_the_conformance_kit(name):
    family = FAMILIES[name]
    for cls in family.classes:
        causal = family.causal and cls.__name__.endswith(("ForCausalLM", "LMHeadModel"))
        check_adapter(lambda cls=cls: make_model(family, cls), make_inputs(family, padded=True), causal=causal)


class WrongPhi3(Phi3Adapter):
    """Phi-3 described as if its fused qkv held three equal query-sized parts (GPT-2's layout)."""

    model_types = ("phi3",)
    attention_projs = (hf_prune.Proj("self_attn.qkv_proj", "out", parts=3), hf_prune.Proj("self_attn.o_proj", "in"))


class SinklessGraniteSWA(GraniteSWAAdapter):
    """GraniteSWA without its per-head sink parameter: the sinks of removed heads would stay."""

    model_types = ("granite_swa",)
    attention_params = ()


@pytest.mark.parametrize(("adapter", "family"), [(WrongPhi3, "phi3"), (SinklessGraniteSWA, "granite_swa")])
def test_the_kit_fails_an_adapter_whose_description_is_wrong(monkeypatch, adapter, family):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    base.register(adapter)
    fam = FAMILIES[family]
    cls = next(c for c in fam.classes if c.__name__.endswith("ForCausalLM"))
    with pytest.raises((AssertionError, RuntimeError)):
        check_adapter(lambda: make_model(fam, cls), make_inputs(fam), causal=True)


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"attention_projs": (hf_prune.Proj("a", "out", parts=("q", "ffn")), hf_prune.Proj("o", "in"))}, "may only"),
        ({"attention_projs": (hf_prune.Proj("a", "out"),)}, "needs the branch's output projection"),
        ({"ffn_projs": (hf_prune.Proj("f", "sideways"), hf_prune.Proj("d", "in"))}, "side must be"),
        ({"attention_params": (hf_prune.Param("x.weight", 0, unit="heads"),)}, "unit must be"),
    ],
)
def test_register_rejects_malformed_descriptions(monkeypatch, attrs, message):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    bad = type("Bad", (Phi3Adapter,), {"model_types": ("bad",), **attrs})
    with pytest.raises(ValueError, match=message):
        base.register(bad)
    assert "bad" not in base._REGISTRY


def test_per_layer_config_views_follow_the_models_own_config():
    """Phi-3's attention reads its head count from the config: each pruned layer gets a LayerConfig view whose other
    fields are read live from the model's own config, through own_config's copy and through deepcopy."""
    family = FAMILIES["phi3"]
    shared = family.make_config()
    a, b = tf.Phi3ForCausalLM(shared), tf.Phi3ForCausalLM(shared)
    hf_prune.prune_heads(a, {0: [0, 1]})
    view = a.model.layers[0].self_attn.config
    assert isinstance(view, base.LayerConfig) and view.num_attention_heads == 2
    assert view._base is a.config and a.config is not shared and shared.num_attention_heads == 4
    assert b.model.layers[0].self_attn.config is shared
    a.config._attn_implementation = "eager"
    assert view._attn_implementation == "eager"
    twin = copy.deepcopy(a)
    assert twin.model.layers[0].self_attn.config._base is twin.config
    inputs = make_inputs(family)
    with torch.no_grad():
        assert torch.equal(twin.eval()(**inputs).logits, a.eval()(**inputs).logits)
