"""Head units under grouped-query attention: whole groups, or query heads inside every group
(hf_prune.planning.units)."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers as tf

import hf_prune
from hf_prune import PruningConfig
from hf_prune.planning.allocate import allocate
from hf_prune.planning.units import HeadUnits, head_unit_mode
from hf_prune.scoring.criteria import Scores
from hf_prune.testing import zero_heads_and_neurons


def _llama(heads: int, kv: int, layers: int = 2) -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=64,
        hidden_size=8 * heads,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=64,
    )
    return tf.LlamaForCausalLM(config).eval()


def _scores(model, heads: list[list[float]]) -> Scores:
    shapes = hf_prune.get_adapter(model).layer_shapes(model)
    ffn = [torch.arange(s.ffn, dtype=torch.float32) for s in shapes]
    return Scores(heads=[torch.tensor(h) for h in heads], ffn=ffn, criterion="magnitude")


@pytest.mark.parametrize(
    ("heads", "kv", "mode"),
    [(9, 3, "query"), (4, 1, "query"), (32, 8, "group"), (8, 8, "group"), (6, 2, "query"), (4, 2, "query")],
)
def test_auto_picks_the_layout_with_more_units(heads, kv, mode):
    # SmolLM2 (3 groups of 3) and Gemma-3-1B (1 group of 4) prune inside groups; Llama-3-8B-like (8 of 4) whole groups
    assert head_unit_mode(_llama(heads, kv, 1)) == mode


def test_query_units_remove_the_weakest_head_of_every_group():
    model = _llama(6, 2)  # groups [0, 1, 2] and [3, 4, 5]
    scores = _scores(model, [[5, 1, 3, 0.5, 4, 6], [1, 2, 3, 4, 5, 6]])
    plan = allocate(model, scores, PruningConfig(heads=1 / 3, criterion="magnitude"))
    assert plan.heads == {0: [1, 3], 1: [0, 3]}
    assert plan.meta["head_unit"] == "query"
    assert [(s.heads, s.kv_heads) for s in plan.shapes_after(model)] == [(4, 2), (4, 2)]
    plan.apply(model)
    assert model.config.num_attention_heads == 4 and model.config.num_key_value_heads == 2  # uniform: stock config


def test_group_units_are_still_available_and_keep_their_old_choice():
    model = _llama(6, 2)
    scores = _scores(model, [[5, 1, 3, 0.5, 4, 6], [9, 9, 9, 1, 1, 1]])
    plan = allocate(model, scores, PruningConfig(heads=0.5, criterion="magnitude", head_unit="group"))
    assert plan.heads == {0: [0, 1, 2], 1: [3, 4, 5]} and plan.meta["head_unit"] == "group"


def test_a_single_group_model_prunes_heads_inside_it(caplog):
    model = _llama(4, 1)  # Gemma-3-1B's layout: one key/value head for four query heads
    scores = _scores(model, [[1, 4, 2, 3], [4, 3, 2, 1]])
    plan = allocate(model, scores, PruningConfig(heads=0.5, criterion="magnitude"))
    assert plan.heads == {0: [0, 2], 1: [2, 3]}
    with caplog.at_level(logging.WARNING):  # whole groups cannot remove the only group: nothing, and it says so
        plan = allocate(model, scores, PruningConfig(heads=0.5, criterion="magnitude", head_unit="group"))
    assert plan.heads == {}
    assert any("heads=0.5 removes 0.000 of the heads" in r.getMessage() for r in caplog.records), caplog.text


def test_unmet_keep_target_is_reported(caplog):
    model = _llama(4, 1)
    scores = _scores(model, [[1, 4, 2, 3], [4, 3, 2, 1]])
    config = PruningConfig(target_params=0.05, criterion="magnitude", min_heads_per_layer=4)
    with caplog.at_level(logging.WARNING):
        allocate(model, scores, config)
    assert any("target_params=0.05 not reached" in r.getMessage() for r in caplog.records), caplog.text


def test_oneshot_prune_of_a_gqa_model_is_exact_against_zeroed_heads():
    model = _llama(6, 2, layers=3)
    reference = _llama(6, 2, layers=3)
    report = hf_prune.prune(model, PruningConfig(heads=1 / 3, criterion="magnitude"))
    removed = {int(k): v for k, v in report.plan["heads"].items()}
    assert all(len(v) == 2 and {h // 3 for h in v} == {0, 1} for v in removed.values())
    zero_heads_and_neurons(reference, removed, {})
    ids = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


def test_head_units_shape_and_count_round_trip():
    from hf_prune.architectures import LayerShape

    layer = LayerShape(9, 3, 10)
    for mode, count in (("query", 3), ("group", 3)):
        units = HeadUnits(mode)
        assert units.count(layer) == count
        for u in range(count + 1):
            assert units.count(units.shape(layer, u, 10)) == u
    assert HeadUnits("query").shape(layer, 2, 4) == LayerShape(6, 3, 4)
    assert HeadUnits("group").shape(layer, 2, 4) == LayerShape(6, 2, 4)
    assert HeadUnits("query").shape(layer, 0, 4) == LayerShape(0, 0, 4)
    with pytest.raises(ValueError, match="head_unit='row' is invalid"):
        PruningConfig(head_unit="row")
