"""Layouts (``PruningConfig.layout``) and attention-sublayer removal (``attention_layers``).

The allocator must produce shapes of the layout it was asked for under every target, meet the target as closely as
the free layout's rules allow, and leave the free layout's plans untouched; attention sublayers are chosen by a
statistic checked against a hand-computed forward and removed exactly (a block with its ``o_proj`` zeroed).
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

import hf_prune
from hf_prune import LayerShape, PruningConfig
from hf_prune.planning.units import TOLERANCE
from hf_prune.scoring.depth import attention_statistics, select_attention
from hf_prune.structure.layout import check_layout, layout_of, layout_problems


def _llama(layers: int = 6, ffn: int = 256) -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
    )
    return tf.LlamaForCausalLM(config).eval()


def _data(n: int = 8, seq: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": (ids := torch.randint(0, 96, (seq,), generator=g)), "labels": ids} for _ in range(n)]


def _shapes(model) -> list[LayerShape]:
    return hf_prune.get_adapter(model).layer_shapes(model)


# ---- the classification itself --------------------------------------------------------------------------------
def test_layout_of_names_the_most_constrained_layout_and_the_blocks_at_fault():
    same = [LayerShape(8, 2, 64)] * 3
    assert layout_of(same) == "uniform"
    servable = [LayerShape(8, 2, 64), LayerShape(0, 0, 32), LayerShape(8, 4, 16)]
    assert layout_of(servable) == "servable"
    assert any("block 1" in p for p in layout_problems(servable, "uniform"))
    free = [LayerShape(8, 2, 64), LayerShape(6, 2, 64)]
    assert layout_of(free) == "free"
    with pytest.raises(ValueError, match=r"block 1 has 6 query heads.*layout='servable'"):
        check_layout(free, "servable", "vLLM")
    with pytest.raises(ValueError, match="allowed: free, servable, uniform"):
        layout_problems(same, "stock")


def test_bad_layout_and_uniform_attention_removal_are_refused():
    with pytest.raises(ValueError, match=r"layout='stack'.*allowed: free, servable, uniform"):
        PruningConfig(layout="stack")
    with pytest.raises(ValueError, match=r"attention_layers=0\.25.*layout='uniform'"):
        PruningConfig(attention_layers=0.25, layout="uniform")


def _projection_weights(model) -> int:
    """What ``target_params`` counts, counted off the modules: the blocks' attention and MLP projection weights."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return sum(m.weight.numel() for n, m in model.named_modules() if n.split(".")[-1] in names)


# ---- allocation under each layout -----------------------------------------------------------------------------
TARGETS = [
    {"target_flops": 0.6, "criterion": "fisher", "scope": "global"},
    {"target_params": 0.55, "criterion": "taylor", "scope": "global"},
    {"target_flops": 0.6, "criterion": "magnitude"},
    {"heads": 0.25, "ffn": 0.4, "criterion": "magnitude", "scope": "global"},
]


@pytest.mark.parametrize("layout", ["servable", "uniform"])
@pytest.mark.parametrize("targets", TARGETS, ids=lambda t: "-".join(f"{k}={v}" for k, v in t.items()))
def test_each_layout_meets_its_target_in_its_own_shapes(layout, targets):
    base = _llama()
    model = copy.deepcopy(base)
    report = hf_prune.prune(model, PruningConfig(layout=layout, max_samples=8, batch_size=4, **targets), _data())
    shapes = _shapes(model)
    assert layout_problems(shapes, layout) == [], shapes
    if "heads" in targets:  # the uniform head count nearest the fraction: 8 heads -> 6 (2 groups of 3)
        assert {s.heads for s in shapes} == {6}
        assert sum(s.ffn for s in shapes) < 0.75 * 256 * 6
        return
    name = next(k for k in targets if k.startswith("target_"))
    kept = 1 / report.flops_ratio if name == "target_flops" else _projection_weights(model) / _projection_weights(base)
    # one shared FFN width moves every block at once: the uniform layout gets that granularity as slack
    step = 8 / 256 if layout == "uniform" else 0
    assert targets[name] * (1 - TOLERANCE - step) <= kept <= targets[name] * (1 + TOLERANCE), kept


def test_a_layout_only_ties_counts_the_scores_still_choose_which_units_go():
    """Servable under fisher keeps at least as much importance as uniform at the same budget (it may choose FFN
    widths per block), and the heads each block keeps are that block's best by its own scores."""
    data = _data()
    kept = {}
    for layout in ("servable", "uniform"):
        model = _llama()
        config = PruningConfig(target_flops=0.6, criterion="fisher", scope="global", layout=layout, max_samples=8)
        scores = hf_prune.structured_scores(model, "fisher", hf_prune.calibration_set(data, model, 4, 8))
        plan = hf_prune.allocate(model, scores, config)
        total = 0.0
        for i, s in enumerate(_shapes(model)):
            removed = set(plan.heads.get(i, []))
            total += sum(float(scores.ffn[i][j]) for j in range(s.ffn) if j not in set(plan.ffn.get(i, [])))
            total += sum(float(scores.heads[i][h]) for h in range(s.heads) if h not in removed)
        kept[layout] = total
    assert kept["servable"] >= kept["uniform"] * (1 - 1e-6)


def test_free_layout_plans_are_the_plans_without_the_field():
    data = _data()
    plans = []
    for kwargs in ({}, {"layout": "free"}):
        model = _llama()
        config = PruningConfig(target_flops=0.5, criterion="fisher", scope="global", max_samples=8, **kwargs)
        plans.append(hf_prune.prune(model, config, data).plan)
    assert plans[0]["heads"] == plans[1]["heads"] and plans[0]["ffn"] == plans[1]["ffn"]


# ---- attention sublayers --------------------------------------------------------------------------------------
def _reference_influence(model, ids: torch.Tensor) -> list[float]:
    """1 - cos(x, x + attention(x)) per block, from a forward written out by hand (no hooks)."""
    out = []
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
        positions = torch.arange(ids.shape[1])[None]
        for i, layer in enumerate(model.model.layers):
            x = hidden[i]
            rope = model.model.rotary_emb(x, positions)
            a = layer.self_attn(layer.input_layernorm(x), position_embeddings=rope, attention_mask=None)[0]
            cos = torch.nn.functional.cosine_similarity(x, x + a, dim=-1)
            out.append(float(1 - cos.mean()))
    return out


def test_attention_influence_matches_a_hand_written_forward_and_picks_the_smallest():
    model = _llama()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    measured = (1 - attention_statistics(model, [{"input_ids": ids}])).tolist()
    reference = _reference_influence(model, ids)
    assert measured == pytest.approx(reference, rel=1e-4, abs=1e-6)
    chosen = select_attention(model, "influence", 2, [{"input_ids": ids}])
    assert chosen == sorted(sorted(range(6), key=lambda i: reference[i])[:2])
    assert select_attention(model, "last", 2, None) == [3, 4]


def test_attention_removal_equals_zeroed_o_proj_and_reloads(tmp_path):
    model, reference = _llama(), _llama()
    data = _data()
    report = hf_prune.prune(model, PruningConfig(attention_layers=0.34, layer_criterion="last"), data)
    assert report.attention_removed == [3, 4]
    assert [s.heads for s in _shapes(model)] == [8, 8, 8, 0, 0, 8]
    with torch.no_grad():
        for i in (3, 4):
            reference.model.layers[i].self_attn.o_proj.weight.zero_()
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)
    hf_prune.save_pretrained(model, tmp_path)
    loaded = hf_prune.from_pretrained(tmp_path, tf.AutoModelForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-6, rtol=0)
    assert layout_of(_shapes(loaded)) == "servable"


def test_attention_removal_counts_towards_a_keep_target():
    model = _llama()
    config = PruningConfig(
        target_flops=0.6, attention_layers=0.34, layout="servable", criterion="fisher", scope="global", max_samples=8
    )
    report = hf_prune.prune(model, config, _data())
    assert len(report.attention_removed) == 2
    assert 0.6 * (1 - TOLERANCE) <= 1 / report.flops_ratio <= 0.6 * (1 + TOLERANCE)
    assert layout_of(_shapes(model)) == "servable"


def _linear_table(model, head_ms: float = 0.3, neuron_ms: float = 0.004, block_ms: float = 0.5):
    """A latency table of a machine where a block costs a fixed part plus its heads and neurons (no timing)."""
    from hf_prune.planning.latency_table import LatencyTable

    shapes = _shapes(model)
    n, s = len(shapes), shapes[0]
    units = list(range(s.heads // s.kv_heads + 1))  # query-head units: one head from each of the 2 groups

    def model_ms(heads: int, ffn: int) -> float:
        return 1.0 + n * (block_ms + head_ms * heads + neuron_ms * ffn)

    widths = list(range(0, s.ffn + 1, 8))
    return LatencyTable(
        num_layers=n,
        units=units,
        unit_ms=[model_ms(u * s.kv_heads, s.ffn) for u in units],
        ffn=widths,
        ffn_ms=[model_ms(s.heads, w) for w in widths],
        batch_size=1,
        seq_len=16,
        device="cpu",
        dtype="float32",
        threads=1,
        head_unit="query",
    )


@pytest.mark.parametrize("layout", ["servable", "uniform"])
@pytest.mark.parametrize("criterion", ["fisher", "magnitude"])
def test_a_latency_target_is_met_in_each_layout(layout, criterion):
    model = _llama()
    table = _linear_table(model)
    config = PruningConfig(target_latency=0.6, criterion=criterion, scope="global", layout=layout, max_samples=8)
    scores = hf_prune.structured_scores(model, criterion, hf_prune.calibration_set(_data(), model, 4, 8))
    plan = hf_prune.allocate(model, scores, config, latency=table)
    shapes = plan.shapes_after(model)
    assert layout_problems(shapes, layout) == []
    kept = table.model_ms(shapes) / table.model_ms(_shapes(model))
    step = 8 * 6 * 0.004 / table.model_ms(_shapes(model)) if layout == "uniform" else 0  # one shared FFN step
    assert 0.6 * (1 - TOLERANCE) - step <= kept <= 0.6 * (1 + TOLERANCE), kept
