"""Depth pruning: prune_layers is exact (removed blocks == blocks turned into the identity), and the block criteria
(ShortGPT's Block Influence, Gromov et al.'s angular distance, the drop-the-last baseline) pick what they should."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

import hf_prune
from hf_prune import PruningConfig
from hf_prune.scoring.depth import block_statistics, choose_blocks, select_blocks


def _llama(layers: int = 4) -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return tf.LlamaForCausalLM(config).eval()


def _identity(model, blocks: list[int]) -> None:
    """A pre-norm residual block whose o_proj and down_proj are zero hands its input through."""
    with torch.no_grad():
        for i in blocks:
            layer = model.model.layers[i]
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()


def _batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 64, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0  # padding on the right of the second row
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_prune_layers_equals_the_blocks_turned_into_identity_and_reloads_stock(tmp_path):
    model, reference = _llama(), _llama()
    _identity(reference, [1, 2])
    hf_prune.prune_layers(model, [1, 2])
    ids = torch.randint(1, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))
    assert model.config.num_hidden_layers == 2 and model.config.hf_prune["kept_layers"] == [0, 3]
    hf_prune.save_pretrained(model, tmp_path / "shallow")
    stock = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "shallow").eval()
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, model(ids).logits)


def test_choose_blocks_by_each_criterion():
    cos = torch.tensor([0.2, 0.9, 0.95, 0.5, 0.3])
    assert choose_blocks("influence", 6, 2, cos) == [1, 2]  # smallest 1 - cos
    # angular: cos[l] is between the input of block l and the output of block l + 1 (span 2): the best run
    assert choose_blocks("angular", 6, 2, cos) == [2, 3]
    assert choose_blocks("last", 6, 2) == [3, 4]  # the blocks before the final one
    assert choose_blocks("influence", 6, 0, cos) == []
    with pytest.raises(ValueError, match="cannot remove 6 of 6 blocks"):
        choose_blocks("last", 6, 6)
    with pytest.raises(ValueError, match="needs block statistics"):
        choose_blocks("angular", 6, 2)


def test_block_influence_finds_a_block_that_does_nothing():
    model = _llama()
    _identity(model, [2])
    cos = block_statistics(model, _batches())
    assert cos.shape == (4,) and float(cos[2]) == pytest.approx(1.0, abs=1e-6)
    assert float(cos.max()) == float(cos[2])
    removed, scores = select_blocks(model, "influence", 0.25, _batches())
    assert removed == [2] and scores[2] == pytest.approx(0.0, abs=1e-6)
    _identity(model, [1])  # two consecutive do-nothing blocks: the angular run of two is exactly them
    assert select_blocks(model, "angular", 0.5, _batches())[0] == [1, 2]


def test_padding_tokens_do_not_count():
    model = _llama()
    batches = _batches(1)
    padded = block_statistics(model, batches)
    # change what sits in the padded positions: the statistics must not move
    batches[0]["input_ids"][1, 9:] = 5
    assert torch.allclose(block_statistics(model, batches), padded, atol=1e-6)


def test_prune_with_depth_and_width_reports_and_reloads(tmp_path):
    model = _llama(layers=6)
    config = PruningConfig(layers=1 / 3, layer_criterion="angular", ffn=0.25, criterion="magnitude")
    report = hf_prune.prune(model, config, calibration_data=_batches())
    assert len(report.layers_removed) == 2 and report.layers_removed[1] == report.layers_removed[0] + 1
    assert len(report.layers_before) == 6 and len(report.layers_after) == 4
    assert report.flops_ratio > 1.5 and model.config.num_hidden_layers == 4
    hf_prune.save_pretrained(model, tmp_path / "m")
    reloaded = hf_prune.from_pretrained(tmp_path / "m", tf.AutoModelForCausalLM).eval()
    ids = torch.randint(1, 64, (1, 8))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_depth_errors_are_early_and_clear(tmp_path):
    with pytest.raises(ValueError, match=r"layer_criterion='influense' is invalid \(did you mean 'influence'\?\)"):
        PruningConfig(layers=0.25, layer_criterion="influense")
    with pytest.raises(ValueError, match="layers"):
        PruningConfig(layers=1.0)
    model = _llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="needs calibration_data"):
        hf_prune.prune(model, PruningConfig(layers=0.5))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert hf_prune.prune(model, PruningConfig(layers=0.5, layer_criterion="last")).layers_removed == [1, 2]
    args = tf.TrainingArguments(str(tmp_path), report_to="none", use_cpu=True, max_steps=1)
    with pytest.raises(ValueError, match="not scheduled by the trainer"):
        config = PruningConfig(layers=0.25, layer_criterion="last")
        hf_prune.PruningTrainer(model=_llama(), args=args, pruning_config=config)


@pytest.mark.parametrize("target", ["flops", "params"])
def test_a_keep_target_covers_depth_and_width_together(target):
    from hf_prune.measure import encoder_flops, prunable_parameters

    measure = {"flops": lambda m: encoder_flops(m, 128).total, "params": prunable_parameters}[target]
    model = _llama(layers=6)
    dense = measure(model)
    config = PruningConfig(layers=1 / 3, layer_criterion="last", criterion="magnitude", **{f"target_{target}": 0.5})
    report = hf_prune.prune(model, config)
    assert report.layers_removed == [3, 4]
    # two of six blocks keep 2/3; the width step cut the rest, so the whole model keeps half (not 2/3 * 1/2)
    assert measure(model) / dense == pytest.approx(0.5, abs=0.01)
    assert any(s["ffn"] < 48 or s["heads"] < 4 for s in report.layers_after)


def test_blocks_alone_past_the_target_remove_no_width(caplog):
    from hf_prune.measure import encoder_flops

    model = _llama(layers=4)
    dense = encoder_flops(model, 128).total
    caplog.set_level("WARNING")
    config = PruningConfig(layers=0.5, layer_criterion="last", target_flops=0.6, criterion="magnitude")
    report = hf_prune.prune(model, config)
    assert report.layers_after == [{"heads": 4, "kv_heads": 2, "ffn": 48}] * 2
    assert encoder_flops(model, 128).total / dense == pytest.approx(0.5)
    assert "layers=0.5 alone keeps 0.500 of the flops, at or below target_flops=0.6" in caplog.text


def test_depth_search_trades_blocks_against_width_by_calibration_loss(caplog):
    from hf_prune.measure import encoder_flops
    from hf_prune.planning.depth_search import depth_candidates, divergence_from, reference_logits

    model = _llama(layers=6)
    _identity(model, [2, 3])  # two blocks that do nothing: removing them is free, any width cut is not
    dense = copy.deepcopy(model)
    caplog.set_level("INFO")
    config = PruningConfig(target_flops=2 / 3, max_layers=0.5, criterion="magnitude", layer_criterion="influence")
    report = hf_prune.prune(model, config, calibration_data=_batches())
    assert report.layers_removed == [2, 3]
    assert report.layers_after == [{"heads": 4, "kv_heads": 2, "ffn": 48}] * 4  # the target needed no width
    assert encoder_flops(dense, 128).total / encoder_flops(model, 128).total == pytest.approx(1.5)
    assert divergence_from(dense, model, _batches()) == pytest.approx(0.0, abs=1e-6)  # what was removed did nothing
    assert divergence_from(dense, _llama(layers=6), _batches()) > 1e-3  # (a different model is not close)
    # the search computes the dense logits once when they fit the budget, with the same result
    other = _llama(layers=6)
    _identity(other, [1])
    cached = reference_logits(dense, _batches())
    assert divergence_from(dense, other, _batches(), cached) == pytest.approx(divergence_from(dense, other, _batches()))
    assert reference_logits(dense, _batches(), max_bytes=1000) is None
    assert "depth search (blocks removed -> KL from the dense model): 0 -> " in caplog.text and "chose 2" in caplog.text
    assert depth_candidates(6, 0.5) == [0, 1, 2, 3]
    assert depth_candidates(40, 0.5) == [0, 2, 5, 8, 10, 12, 15, 18, 20]


def test_depth_search_with_real_blocks_still_meets_the_target(caplog):
    import re

    from hf_prune.measure import encoder_flops

    model = _llama(layers=6)
    dense_flops = encoder_flops(model, 128).total
    caplog.set_level("INFO")
    config = PruningConfig(target_flops=0.5, max_layers=0.5, criterion="magnitude", layer_criterion="last")
    report = hf_prune.prune(model, config, calibration_data=_batches())
    # every candidate (0 to 3 of 6 blocks) was compared, and the one closest to the dense model is the one removed
    found = re.search(r"KL from the dense model\): (.*); chose (\d+)", caplog.text)
    assert found is not None, caplog.text
    losses = {int(k): float(v) for k, v in (item.split(" -> ") for item in found.group(1).split(", "))}
    assert sorted(losses) == [0, 1, 2, 3] and int(found.group(2)) == min(losses, key=losses.get)
    k = int(found.group(2))
    assert report.layers_removed == list(range(5 - k, 5))  # "last": the blocks before the final one
    assert encoder_flops(model, 128).total / dense_flops == pytest.approx(0.5, abs=0.01)


def test_depth_search_errors_are_early_and_clear(tmp_path):
    with pytest.raises(ValueError, match=r"layers=0\.25 fixes the depth and max_layers=0\.5 searches it"):
        PruningConfig(layers=0.25, max_layers=0.5, target_flops=0.5)
    PruningConfig(max_layers=0.5, target_latency=0.5)  # the depth search prices blocks by their timing
    with pytest.raises(ValueError, match=r"max_layers=0.5 needs a keep-target \(target_flops, target_params or"):
        PruningConfig(max_layers=0.5, heads=0.5)
    with pytest.raises(ValueError, match="max_layers"):
        PruningConfig(max_layers=1.0, target_flops=0.5)
    model = _llama()
    with pytest.raises(ValueError, match="needs calibration_data"):
        hf_prune.prune(model, PruningConfig(max_layers=0.5, target_flops=0.5, layer_criterion="last"))
    args = tf.TrainingArguments(str(tmp_path), report_to="none", use_cpu=True, max_steps=1)
    with pytest.raises(ValueError, match=r"max_layers=0\.5 .*not scheduled by the trainer"):
        config = PruningConfig(max_layers=0.5, target_flops=0.5)
        hf_prune.PruningTrainer(model=_llama(), args=args, pruning_config=config, calibration_dataset=_batches())


# ---- depth under a latency target (timing stubbed by an additive cost model: the rule is tested, not the clock) --
FIXED_MS, BLOCK_MS, HEAD_MS, NEURON_MS = 10.0, 2.0, 1.5, 0.05


def _bert(layers: int = 4) -> tf.BertForSequenceClassification:
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=48
    )
    return tf.BertForSequenceClassification(config).eval()


def _model_ms(shapes) -> float:
    """Latency of a model whose every block costs a fixed part plus its heads and neurons, plus a fixed rest."""
    return FIXED_MS + sum(BLOCK_MS + HEAD_MS * s.heads + NEURON_MS * s.ffn for s in shapes)


def _additive_table(layers: int, heads: int = 4, ffn: int = 48):
    from hf_prune.planning.latency_table import LatencyTable

    full = [hf_prune.LayerShape(heads, heads, ffn)] * layers
    return (
        LatencyTable(
            num_layers=layers,
            units=list(range(heads + 1)),
            unit_ms=[_model_ms([hf_prune.LayerShape(u, u, ffn)] * layers) for u in range(heads + 1)],
            ffn=list(range(0, ffn + 1, 8)),
            ffn_ms=[_model_ms([hf_prune.LayerShape(heads, heads, n)] * layers) for n in range(0, ffn + 1, 8)],
            batch_size=1,
            seq_len=12,
            device="cpu",
            dtype="float32",
            threads=1,
        )
        if full
        else None
    )


def test_a_latency_table_for_fewer_blocks_is_the_shallower_models_table():
    deep, shallow = _additive_table(4), _additive_table(2)
    derived = deep.for_depth(2, shallow.full_ms)
    assert derived.num_layers == 2 and derived.observed == []
    assert derived.unit_ms == pytest.approx(shallow.unit_ms) and derived.ffn_ms == pytest.approx(shallow.ffn_ms)
    shapes = [hf_prune.LayerShape(1, 1, 16), hf_prune.LayerShape(3, 3, 40)]
    assert derived.model_ms(shapes) == pytest.approx(_model_ms(shapes))


def test_max_layers_under_target_latency_prices_each_depth_with_its_timed_blocks(monkeypatch):
    """Each candidate block count is timed (its fixed cost goes with it) and its width is allocated against the
    table of the shallower model; the pruned model lands on the target."""
    from hf_prune import step
    from hf_prune.planning import depth_search, latency_search

    model = _bert()
    adapter = hf_prune.get_adapter(model)
    dense_ms = _model_ms(adapter.layer_shapes(model))

    for module in (step, depth_search):  # the depth search's table, and the width step's after the cut
        monkeypatch.setattr(module, "profile_latency", lambda m, *a, **k: _additive_table(len(adapter.layers(m))))
    monkeypatch.setattr(
        depth_search,
        "depth_keep",
        lambda m, removed, config, attention=(): 1 - len(removed) * (dense_ms - FIXED_MS) / 4 / dense_ms,
    )
    monkeypatch.setattr(
        latency_search,
        "measure_keep",
        lambda m, shapes, *a, **k: _model_ms(shapes) / _model_ms(hf_prune.get_adapter(m).layer_shapes(m)),
    )
    priced = []
    real_allocate = depth_search.allocate

    def allocate(m, scores, config, latency=None, **kw):
        if latency is not None:
            priced.append((len(adapter.layers(m)), latency.num_layers, latency.full_ms))
        return real_allocate(m, scores, config, latency, **kw)

    for module in (depth_search, latency_search):  # the candidates' width, and the final width search
        monkeypatch.setattr(module, "allocate", allocate)
    config = PruningConfig(target_latency=0.6, max_layers=0.5, criterion="magnitude", layer_criterion="last")
    report = hf_prune.prune(model, config, calibration_data=_batches())
    assert report.layers_removed in ([2], [1, 2])  # "last": the blocks before the final one
    # candidates 1 block (width fills the rest, priced for 3 blocks); 2 blocks alone already reach 0.597
    assert (3, 3, pytest.approx(_model_ms([hf_prune.LayerShape(4, 4, 48)] * 3))) in priced
    assert all(layers == table_layers for layers, table_layers, _ in priced)
    kept = _model_ms(adapter.layer_shapes(model)) / dense_ms
    assert abs(kept - 0.6) <= latency_search.LATENCY_TOLERANCE * 0.6
    assert (4, 4, pytest.approx(dense_ms)) in priced  # no block removed: the model's own table
