"""Invariants every architecture family must satisfy (one mixin, one subclass per family)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf

import hf_prune
from hf_prune.measure import count_parameters

from .families import FAMILIES, Family, make_inputs, make_model, output_tensor, zero_heads_and_neurons

ATOL = 1e-5


def heads_request(model) -> dict[int, list[int]]:
    """Non-uniform: layer 0 loses some heads (one whole KV group under GQA), layer 1 loses all, layer 2 one
    (or none under GQA, where a single head would be a partial group)."""
    adapter = hf_prune.get_adapter(model)
    shape = adapter.layer_shape(model, 0)
    group = shape.heads // shape.kv_heads
    if group > 1:
        return {0: list(range(group)), 1: list(range(shape.heads))}
    return {0: [1, 3], 1: list(range(shape.heads)), 2: [2]}


def neurons_request(model) -> dict[int, list[int]]:
    size = hf_prune.get_adapter(model).layer_shape(model, 0).ffn
    g = torch.Generator().manual_seed(3)
    return {0: torch.randperm(size, generator=g)[: size // 4].tolist(), 2: list(range(size))}


def removed_weight_count(model, heads, neurons) -> int:
    """Parameters the surgery must remove, computed from the module shapes before surgery."""
    adapter = hf_prune.get_adapter(model)
    head_dim = adapter.head_dim(model.config)
    total = 0
    for layer, hs in heads.items():
        shape = adapter.layer_shape(model, layer)
        group = shape.heads // shape.kv_heads
        gone = {"q": len(hs), "kv": len({h // group for h in hs})}
        for proj in adapter.attention_projs:
            module = adapter.layers(model)[layer].get_submodule(proj.path)
            features = sum(gone[u] for u in proj.units()) * head_dim
            total += features * _other_dim(module, proj.side)
            if proj.side == "out" and getattr(module, "bias", None) is not None:
                total += features
        total += _param_count(model, layer, adapter.attention_params, gone, head_dim)
    for layer, ns in neurons.items():
        for proj in adapter.ffn_projs:
            module = adapter.layers(model)[layer].get_submodule(proj.path)
            features = len(ns) * len(proj.units())
            total += features * _other_dim(module, proj.side)
            if proj.side == "out" and getattr(module, "bias", None) is not None:
                total += features
        total += _param_count(model, layer, adapter.ffn_params, {"ffn": len(ns)}, 1)
    return total


def _param_count(model, layer, params, gone: dict[str, int], head_dim: int) -> int:
    """Entries of non-projection per-unit parameters that go with the removed units."""
    adapter = hf_prune.get_adapter(model)
    total = 0
    for param in params:
        tensor = adapter.layers(model)[layer].get_parameter(param.path)
        width = param.width or (head_dim if param.unit != "ffn" else 1)
        total += gone[param.unit] * width * (tensor.numel() // tensor.shape[param.dim])
    return total


def _other_dim(module, side) -> int:
    if isinstance(module, torch.nn.Linear):
        return module.in_features if side == "out" else module.out_features
    return module.nx if side == "out" else module.nf


class FamilyInvariants:
    """Shared invariants; subclasses set ``family``."""

    family: Family

    # ---- exactness --------------------------------------------------------------------------------------
    @pytest.mark.parametrize("padded", [False, True])
    def test_pruned_equals_zeroed_for_every_class(self, padded):
        for cls in self.family.classes:
            model = make_model(self.family, cls)
            heads, neurons = heads_request(model), neurons_request(model)
            reference = copy.deepcopy(model)
            zero_heads_and_neurons(reference, heads, neurons)
            hf_prune.prune_heads(model, heads)
            hf_prune.prune_ffn(model, neurons)
            inputs = make_inputs(self.family, padded=padded)
            with torch.no_grad():
                expected = output_tensor(reference(**inputs))
                got = output_tensor(model(**inputs))
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=f"{cls.__name__}")

    def test_pruning_actually_changes_outputs(self):
        # Guards the exactness test against a reference that silently ignores the zeroing.
        model = make_model(self.family)
        inputs = make_inputs(self.family)
        with torch.no_grad():
            before = model(**inputs, output_hidden_states=True).hidden_states[-1]
            hf_prune.prune_heads(model, heads_request(model))
            after = model(**inputs, output_hidden_states=True).hidden_states[-1]
        assert (before - after).abs().max() > 1e-2

    # ---- structure --------------------------------------------------------------------------------------
    def test_parameter_count_drops_by_removed_weights(self):
        model = make_model(self.family)
        heads, neurons = heads_request(model), neurons_request(model)
        expected = removed_weight_count(model, heads, neurons)
        before = count_parameters(model)
        hf_prune.prune_heads(model, heads)
        hf_prune.prune_ffn(model, neurons)
        assert before - count_parameters(model) == expected
        assert expected > 0

    def test_config_records_per_layer_shapes(self):
        model = make_model(self.family)
        adapter = hf_prune.get_adapter(model)
        hf_prune.prune_heads(model, heads_request(model))
        hf_prune.prune_ffn(model, neurons_request(model))
        state = model.config.hf_prune
        assert [s.to_dict() for s in adapter.layer_shapes(model)] == state["layers"]
        assert state["layers"][1]["heads"] == 0
        assert state["layers"][2]["ffn"] == 0
        json.dumps(model.config.to_dict())  # stays JSON-serialisable

    def test_repeated_pruning_indices_refer_to_current_model(self):
        model = make_model(self.family)
        adapter = hf_prune.get_adapter(model)
        shape = adapter.layer_shape(model, 0)
        group = shape.heads // shape.kv_heads
        reference = copy.deepcopy(model)
        # Removing "the first group" twice removes original groups 0 and 1.
        hf_prune.prune_heads(model, {0: list(range(group))})
        hf_prune.prune_heads(model, {0: list(range(group))})
        hf_prune.prune_ffn(model, {0: [0, 1]})
        hf_prune.prune_ffn(model, {0: [0]})  # original neuron 2
        zero_heads_and_neurons(reference, {0: list(range(2 * group))}, {0: [0, 1, 2]})
        assert model.config.hf_prune["kept_heads"][0] == list(range(2 * group, shape.heads))
        inputs = make_inputs(self.family)
        with torch.no_grad():
            torch.testing.assert_close(
                output_tensor(model(**inputs)), output_tensor(reference(**inputs)), atol=ATOL, rtol=0
            )

    def test_training_step_runs_after_pruning(self):
        model = make_model(self.family, self.family.classes[-1]).train()
        hf_prune.prune_heads(model, heads_request(model))
        hf_prune.prune_ffn(model, neurons_request(model))
        inputs = make_inputs(self.family)
        out = output_tensor(model(**inputs))
        out.float().pow(2).mean().backward()
        no_grad = [n for n, p in model.named_parameters() if p.numel() > 0 and p.grad is None]
        # Only the pre-norm of an emptied branch (GPT-2/Llama ln_1/ln_2) is left without a gradient.
        assert all("ln_" in n or "norm" in n.lower() for n in no_grad), no_grad
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    # ---- save / reload ----------------------------------------------------------------------------------
    def test_save_and_reload_exactly(self, tmp_path):
        for i, cls in enumerate(self.family.classes):
            model = make_model(self.family, cls)
            hf_prune.prune_heads(model, heads_request(model))
            hf_prune.prune_ffn(model, neurons_request(model))
            path = tmp_path / f"m{i}"
            model.save_pretrained(path)
            assert not list(path.glob("*.bin")), "only safetensors may be written"
            assert list(path.glob("*.safetensors"))
            inputs = make_inputs(self.family)
            with torch.no_grad():
                expected = output_tensor(model(**inputs))
            auto = _auto_class_for(cls)
            for load_cls in (cls, auto):
                loaded = hf_prune.from_pretrained(path, load_cls).eval()
                assert type(loaded) is cls
                assert loaded.config.hf_prune == model.config.hf_prune
                with torch.no_grad():
                    got = output_tensor(loaded(**inputs))
                torch.testing.assert_close(got, expected, atol=0, rtol=0)
                want, have = model.state_dict(), loaded.state_dict()
                assert list(have) == list(want)
                different = [k for k in want if have[k].dtype != want[k].dtype or not torch.equal(have[k], want[k])]
                assert not different, f"{cls.__name__}: reloaded tensors differ: {different}"

    def test_atomic_save_helper_and_resave(self, tmp_path):
        model = make_model(self.family)
        hf_prune.prune_heads(model, heads_request(model))
        out = hf_prune.save_pretrained(model, tmp_path / "out")
        loaded = hf_prune.from_pretrained(out, type(model))
        # a pruned model that was reloaded can be pruned further, saved and reloaded again
        hf_prune.prune_ffn(loaded, {0: [0, 1, 2]})
        hf_prune.save_pretrained(loaded, out)
        again = hf_prune.from_pretrained(out, type(model)).eval()
        inputs = make_inputs(self.family)
        with torch.no_grad():
            torch.testing.assert_close(
                output_tensor(again(**inputs)), output_tensor(loaded.eval()(**inputs)), atol=0, rtol=0
            )
        want, have = loaded.state_dict(), again.state_dict()
        assert list(have) == list(want) and all(torch.equal(have[k], want[k]) for k in want)
        assert [p.name for p in tmp_path.iterdir()] == ["out"]

    def test_uniform_ffn_loads_with_stock_from_pretrained(self, tmp_path):
        model = make_model(self.family)
        adapter = hf_prune.get_adapter(model)
        size = adapter.layer_shape(model, 0).ffn
        hf_prune.prune_ffn(model, {i: list(range(0, size, 2)) for i in range(len(adapter.layers(model)))})
        model.save_pretrained(tmp_path)
        stock = type(model).from_pretrained(tmp_path).eval()
        inputs = make_inputs(self.family)
        with torch.no_grad():
            torch.testing.assert_close(output_tensor(stock(**inputs)), output_tensor(model(**inputs)), atol=0, rtol=0)

    # ---- bad input --------------------------------------------------------------------------------------
    def test_bad_requests_raise_before_touching_the_model(self):
        model = make_model(self.family)
        n_layers = len(hf_prune.get_adapter(model).layers(model))
        snapshot = {k: v.clone() for k, v in model.state_dict().items()}
        cases = [
            (lambda: hf_prune.prune_heads(model, {n_layers: [0]}), f"layer index {n_layers} is out of range"),
            (lambda: hf_prune.prune_heads(model, {-1: [0]}), "out of range"),
            (lambda: hf_prune.prune_heads(model, {0: [99]}), "out-of-range [99]"),
            (lambda: hf_prune.prune_heads(model, {"x": [0]}), "not an integer layer index"),
            (lambda: hf_prune.prune_ffn(model, {0: [10_000]}), "out-of-range [10000]"),
            (lambda: hf_prune.prune_ffn(model, {0: [1.5]}), "indices must be integers"),
            (lambda: hf_prune.prune_ffn(model, [0, 1]), "must be a mapping"),
            # valid heads part, invalid FFN part: nothing may be applied
            (lambda: hf_prune.PruningPlan(heads={0: [0, 1, 2, 3]}, ffn={0: [10_000]}).apply(model), "10000"),
        ]
        for call, message in cases:
            with pytest.raises((ValueError, TypeError)) as err:
                call()
            assert message in str(err.value), (message, str(err.value))
        after = model.state_dict()
        assert all(torch.equal(snapshot[k], after[k]) for k in snapshot)
        assert getattr(model.config, "hf_prune", None) is None


def _auto_class_for(cls: type) -> type:
    name = cls.__name__
    for suffix, auto in (
        ("ForSequenceClassification", tf.AutoModelForSequenceClassification),
        ("ForTokenClassification", tf.AutoModelForTokenClassification),
        ("ForQuestionAnswering", tf.AutoModelForQuestionAnswering),
        ("ForMaskedLM", tf.AutoModelForMaskedLM),
        ("ForCausalLM", tf.AutoModelForCausalLM),
        ("LMHeadModel", tf.AutoModelForCausalLM),
    ):
        if name.endswith(suffix):
            return auto
    return tf.AutoModel


class DecoderInvariants(FamilyInvariants):
    """Extra invariants for causal LMs."""

    def test_generate_with_kv_cache_matches_zeroed(self):
        cls = next(c for c in self.family.classes if c.__name__.endswith(("LMHeadModel", "ForCausalLM")))
        model = make_model(self.family, cls)
        heads, neurons = heads_request(model), neurons_request(model)
        reference = copy.deepcopy(model)
        zero_heads_and_neurons(reference, heads, neurons)
        hf_prune.prune_heads(model, heads)
        hf_prune.prune_ffn(model, neurons)
        inputs = make_inputs(self.family, padded=True)
        kwargs = {
            "max_new_tokens": 6,
            "do_sample": False,
            "pad_token_id": 0,
            "output_logits": True,
            "return_dict_in_generate": True,
        }
        with torch.no_grad():
            ref = reference.generate(**inputs, **kwargs)
            got = model.generate(**inputs, **kwargs)
        assert torch.equal(got.sequences, ref.sequences)
        for g, r in zip(got.logits, ref.logits, strict=True):
            torch.testing.assert_close(g, r, atol=ATOL, rtol=0)

    def test_generate_when_the_first_block_has_no_attention(self):
        # generate() reads the cached length from layer 0's cache: a first block without attention must still keep it
        cls = next(c for c in self.family.classes if c.__name__.endswith(("LMHeadModel", "ForCausalLM")))
        model = make_model(self.family, cls)
        heads = {0: list(range(hf_prune.get_adapter(model).layer_shape(model, 0).heads))}
        reference = copy.deepcopy(model)
        zero_heads_and_neurons(reference, heads, {})
        hf_prune.prune_heads(model, heads)
        inputs = make_inputs(self.family, padded=True)
        kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "output_logits": True}
        with torch.no_grad():
            ref = reference.generate(**inputs, **kwargs, return_dict_in_generate=True)
            got = model.generate(**inputs, **kwargs, return_dict_in_generate=True)
        assert torch.equal(got.sequences, ref.sequences)
        for g, r in zip(got.logits, ref.logits, strict=True):
            torch.testing.assert_close(g, r, atol=ATOL, rtol=0)


class TestBert(FamilyInvariants):
    family = FAMILIES["bert"]


class TestRoberta(FamilyInvariants):
    family = FAMILIES["roberta"]


class TestXLMRoberta(FamilyInvariants):
    family = FAMILIES["xlm-roberta"]


class TestElectra(FamilyInvariants):
    family = FAMILIES["electra"]


class TestDistilBert(FamilyInvariants):
    family = FAMILIES["distilbert"]


class TestGPT2(DecoderInvariants):
    family = FAMILIES["gpt2"]


class TestLlama(DecoderInvariants):
    family = FAMILIES["llama"]


class TestMistral(DecoderInvariants):
    family = FAMILIES["mistral"]


class TestQwen2(DecoderInvariants):
    family = FAMILIES["qwen2"]


class TestQwen3(DecoderInvariants):
    family = FAMILIES["qwen3"]


class TestGemma(DecoderInvariants):
    family = FAMILIES["gemma"]


class TestPhi3(DecoderInvariants):
    family = FAMILIES["phi3"]


class TestModernBert(FamilyInvariants):
    family = FAMILIES["modernbert"]


class TestGraniteSWA(DecoderInvariants):
    family = FAMILIES["granite_swa"]


# ---- family-specific behaviour --------------------------------------------------------------------------
def test_gqa_unequal_groups_name_the_heads_that_even_or_complete_them():
    model = make_model(FAMILIES["llama"])  # 4 query heads on 2 key/value heads: groups [0, 1] and [2, 3]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unequal = (
        r"groups of \[1, 2\] query heads.*even them out, also remove heads \[3\].*whole groups: also remove heads \[1\]"
    )
    with pytest.raises(ValueError, match=unequal):
        hf_prune.prune_heads(model, {0: [0]})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    hf_prune.prune_heads(model, {0: [0, 3], 1: [0, 1, 3]})  # one from each group; group 0 whole + one from group 1
    adapter = hf_prune.get_adapter(model)
    assert [(s.heads, s.kv_heads) for s in adapter.layer_shapes(model)][:2] == [(2, 2), (1, 1)]
    attention = adapter.layers(model)[0].self_attn
    assert attention.num_key_value_groups == 1 and model.config.hf_prune["kept_heads"][:2] == [[1, 2], [2]]


def test_unknown_architecture_lists_supported_types():
    model = tf.T5Model(tf.T5Config(vocab_size=VOCAB_T5, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="model_type='t5'") as err:
        hf_prune.prune_heads(model, {0: [0]})
    for supported in ("bert", "distilbert", "gpt2", "llama"):
        assert supported in str(err.value)


VOCAB_T5 = 32


def test_llama_uniform_heads_load_with_stock_from_pretrained(tmp_path):
    family = FAMILIES["llama"]
    model = make_model(family)
    hf_prune.prune_heads(model, {i: [2, 3] for i in range(3)})  # second KV group everywhere
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1
    model.save_pretrained(tmp_path)
    stock = tf.LlamaForSequenceClassification.from_pretrained(tmp_path).eval()
    inputs = make_inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(stock(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)


def test_non_uniform_model_refuses_stock_loading(tmp_path):
    # Stock loading must fail loudly rather than silently load a wrong model.
    model = make_model(FAMILIES["bert"], tf.BertForSequenceClassification)
    hf_prune.prune_heads(model, {0: [0]})
    model.save_pretrained(tmp_path)
    with pytest.raises(Exception, match=r"(?i)size|shape"):
        tf.BertForSequenceClassification.from_pretrained(tmp_path)


def test_plan_round_trips_through_json():
    plan = hf_prune.PruningPlan(heads={"0": [3, 1]}, ffn={2: [5]}, meta={"criterion": "magnitude"})
    again = hf_prune.PruningPlan.from_json(plan.to_json())
    assert again == plan and again.heads == {0: [1, 3]}
    with pytest.raises(ValueError, match="unknown PruningPlan keys"):
        hf_prune.PruningPlan.from_dict({"head": {}})


# ---- depth --------------------------------------------------------------------------------------------
def test_prune_layers_errors_leave_the_model_untouched():
    model = make_model(FAMILIES["llama"])
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    for bad, message in (([3], r"out-of-range \[3\]"), ([0, 1, 2], "keep at least one"), (["1"], "integers")):
        with pytest.raises((ValueError, TypeError), match=message):
            hf_prune.prune_layers(model, bad)
    with pytest.raises(TypeError, match="list of integer indices"):
        hf_prune.prune_layers(model, {0: [1]})
    after = model.state_dict()
    assert set(snapshot) == set(after) and all(torch.equal(snapshot[k], after[k]) for k in snapshot)
    assert getattr(model.config, "hf_prune", None) is None


def test_depth_and_width_pruning_combine_and_reload(tmp_path):
    family = FAMILIES["qwen3"]
    model = make_model(family, tf.Qwen3ForCausalLM)
    hf_prune.prune_heads(model, {2: [0, 1]})  # original block 2 loses a KV group
    hf_prune.prune_layers(model, [0])
    hf_prune.prune_ffn(model, {0: [1, 2, 3]})  # now block 0 is original block 1
    state = model.config.hf_prune
    assert state["kept_layers"] == [1, 2] and model.config.num_hidden_layers == 2
    assert [(s["heads"], s["ffn"]) for s in state["layers"]] == [(4, 37), (2, 40)]
    assert state["kept_heads"] == [[0, 1, 2, 3], [2, 3]]
    model.save_pretrained(tmp_path)
    loaded = hf_prune.from_pretrained(tmp_path, tf.AutoModelForCausalLM).eval()
    inputs = make_inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)
    assert loaded.config.hf_prune == state
