"""Importance criteria checked against independent references on tiny float64 models.

Taylor and Fisher scores come from gradients of per-example head/neuron masks obtained by hooks in one backward pass.
The reference here uses neither hooks nor autograd: it scales the output-projection columns a head or neuron feeds
(mathematically the same as scaling its output) by 1 +- eps and takes central differences of every example's loss.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hf_prune
from hf_prune.scoring.calibration import calibration_set
from hf_prune.scoring.criteria import magnitude_scores, mask_gradient_scores

from .families import FAMILIES, make_inputs, make_model

EPS = 1e-4


def setup(name: str):
    family = FAMILIES[name]
    cls = next(c for c in family.classes if "ForSequenceClassification" in c.__name__)
    model = make_model(family, cls).double().eval()
    inputs = make_inputs(family, batch=5, padded=True, seed=7)
    inputs["labels"] = torch.tensor([0, 1, 1, 0, 1])
    return model, inputs


def per_example_losses(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    return F.cross_entropy(logits, inputs["labels"], reduction="none")


def input_columns(module: torch.nn.Module, cols: torch.Tensor) -> torch.Tensor:
    """A view of the weight entries that multiply input features ``cols`` (Linear: columns; Conv1D: rows)."""
    return module.weight[:, cols] if isinstance(module, torch.nn.Linear) else module.weight[cols, :]


def scale_inputs(module: torch.nn.Module, cols: torch.Tensor, factor: float) -> None:
    with torch.no_grad():
        if isinstance(module, torch.nn.Linear):
            module.weight[:, cols] *= factor
        else:
            module.weight[cols, :] *= factor


def finite_difference_gradients(model, inputs):
    """d(loss_i)/d(mask) for every example i, every head (query-head index) and every FFN neuron."""
    adapter = hf_prune.get_adapter(model)
    head_dim = adapter.head_dim(model.config)
    o_path = next(p.path for p in adapter.attention_projs if p.side == "in")
    down_path = next(p.path for p in adapter.ffn_projs if p.side == "in")
    heads, neurons = [], []
    for block, shape in zip(adapter.layers(model), adapter.layer_shapes(model), strict=True):
        per_unit = []
        for module, units, width in (
            (block.get_submodule(o_path), shape.heads, head_dim),
            (block.get_submodule(down_path), shape.ffn, 1),
        ):
            grads = []
            for u in range(units):
                cols = torch.arange(u * width, (u + 1) * width)
                scale_inputs(module, cols, 1 + EPS)
                up = per_example_losses(model, inputs)
                scale_inputs(module, cols, (1 - EPS) / (1 + EPS))
                down = per_example_losses(model, inputs)
                scale_inputs(module, cols, 1 / (1 - EPS))
                grads.append((up - down) / (2 * EPS))
            per_unit.append(torch.stack(grads, dim=1))  # (examples, units)
        heads.append(per_unit[0])
        neurons.append(per_unit[1])
    return heads, neurons


def weight_gradient_reference(model, inputs):
    """d(loss_i)/d(mask) by the chain rule through the weights: scaling the input columns ``C`` of a projection ``W`` by
    ``m`` gives ``dL/dm = <W[:, C], dL/dW[:, C]>``. One backward pass per example, no hooks, exact in any precision."""
    adapter = hf_prune.get_adapter(model)
    head_dim = adapter.head_dim(model.config)
    o_path = next(p.path for p in adapter.attention_projs if p.side == "in")
    down_path = next(p.path for p in adapter.ffn_projs if p.side == "in")
    blocks = list(adapter.layers(model))
    projections = [(b.get_submodule(o_path), b.get_submodule(down_path)) for b in blocks]
    shapes = adapter.layer_shapes(model)
    heads = [torch.zeros(len(inputs["labels"]), s.heads, dtype=torch.float64) for s in shapes]
    neurons = [torch.zeros(len(inputs["labels"]), s.ffn, dtype=torch.float64) for s in shapes]
    for i in range(len(inputs["labels"])):
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        model.zero_grad()
        per_example_losses_grad(model, one).sum().backward()
        for layer, (o, down) in enumerate(projections):
            for store, module, width in ((heads, o, head_dim), (neurons, down, 1)):
                product = (module.weight * module.weight.grad).detach()
                per_column = product.sum(0) if isinstance(module, torch.nn.Linear) else product.sum(1)
                store[layer][i] = per_column.reshape(-1, width).sum(1)
    model.zero_grad()
    return heads, neurons


def per_example_losses_grad(model, inputs) -> torch.Tensor:
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    return F.cross_entropy(logits, inputs["labels"], reduction="none")


def check_scores(model, inputs, heads, neurons, rtol: float, recompute: bool = False) -> None:
    data = calibration_set([inputs], model)
    taylor = mask_gradient_scores(model, data, "taylor", progress=False, recompute=recompute)
    fisher = mask_gradient_scores(model, data, "fisher", progress=False, recompute=recompute)
    for i in range(len(heads)):
        torch.testing.assert_close(taylor.heads[i].double(), heads[i].abs().sum(0), rtol=rtol, atol=1e-8)
        torch.testing.assert_close(fisher.heads[i].double(), heads[i].pow(2).sum(0), rtol=rtol, atol=1e-10)
        torch.testing.assert_close(taylor.ffn[i].double(), neurons[i].abs().sum(0), rtol=rtol, atol=1e-8)
        torch.testing.assert_close(fisher.ffn[i].double(), neurons[i].pow(2).sum(0), rtol=rtol, atol=1e-10)
    assert all(float(t.sum()) > 0 for t in fisher.heads + fisher.ffn)  # the comparison is not 0 == 0


@pytest.mark.parametrize("recompute", [False, True], ids=["stored", "recomputed"])
@pytest.mark.parametrize("name", ["bert", "distilbert", "llama", "gpt2"])
def test_taylor_and_fisher_match_per_example_weight_gradients(name, recompute):
    """``recomputed``: block activations recomputed in the backward pass (the memory-saving path GPUs take) give
    the same scores; the blocks and the KV-cache setting are as they were afterwards."""
    model, inputs = setup(name)
    heads, neurons = weight_gradient_reference(model, inputs)
    use_cache = getattr(model.config, "use_cache", None)
    adapter = hf_prune.get_adapter(model)
    calls = []
    attention = adapter.layers(model)[0].get_submodule(adapter.attention_module)
    handle = attention.register_forward_hook(lambda *_: calls.append(1))
    check_scores(model, inputs, heads, neurons, rtol=1e-5, recompute=recompute)
    handle.remove()
    assert len(calls) == (4 if recompute else 2)  # taylor + fisher, one batch each; recomputed in the backward pass
    assert getattr(model.config, "use_cache", None) == use_cache
    assert not any("forward" in vars(block) for block in hf_prune.get_adapter(model).layers(model))


def test_taylor_and_fisher_match_finite_differences():
    """No autograd at all: central differences of every example's loss (BERT computes purely in float64; Llama's
    RMSNorm rounds through float32, which finite differences would amplify)."""
    model, inputs = setup("bert")
    reference_state = {k: v.clone() for k, v in model.state_dict().items()}
    heads, neurons = finite_difference_gradients(model, inputs)
    for key, value in model.state_dict().items():  # the reference put every weight back
        torch.testing.assert_close(value, reference_state[key], rtol=1e-12, atol=1e-12)
    check_scores(model, inputs, heads, neurons, rtol=1e-4)


def test_magnitude_matches_the_weights_each_head_and_neuron_owns():
    """BERT heads own q, k, v rows and output columns; under GQA (Llama) a query head also owns its group's
    key/value rows; neurons own their up (and gate) rows and their down column."""
    for name in ("bert", "llama"):
        model, _ = setup(name)
        model.requires_grad_(False)
        scores = magnitude_scores(model)
        config = model.config
        head_dim = config.hidden_size // config.num_attention_heads
        for i, block in enumerate(hf_prune.get_adapter(model).layers(model)):
            if name == "bert":
                att = block.attention
                q, k, v, o = att.self.query.weight, att.self.key.weight, att.self.value.weight, att.output.dense.weight
                ups, down = [block.intermediate.dense.weight], block.output.dense.weight
                group = 1
            else:
                att = block.self_attn
                q, k, v, o = att.q_proj.weight, att.k_proj.weight, att.v_proj.weight, att.o_proj.weight
                ups, down = [block.mlp.gate_proj.weight, block.mlp.up_proj.weight], block.mlp.down_proj.weight
                group = config.num_attention_heads // config.num_key_value_heads
            for h in range(config.num_attention_heads):
                rows = slice(h * head_dim, (h + 1) * head_dim)
                kv = slice((h // group) * head_dim, (h // group + 1) * head_dim)
                expected = q[rows].pow(2).sum() + k[kv].pow(2).sum() + v[kv].pow(2).sum() + o[:, rows].pow(2).sum()
                assert float(scores.heads[i][h]) == pytest.approx(float(expected.sqrt()), rel=1e-5)
            for j in range(config.intermediate_size):
                expected = sum(u[j].pow(2).sum() for u in ups) + down[:, j].pow(2).sum()
                assert float(scores.ffn[i][j]) == pytest.approx(float(expected.sqrt()), rel=1e-5)


def test_fisher_ranks_heads_like_brute_force_ablation():
    """The point of the criterion: heads whose removal hurts most score highest. Ablating each head for real (zeroing
    its output columns) and measuring the loss increase must broadly agree with the Fisher ranking."""
    model, inputs = setup("bert")
    model.classifier.weight.data.mul_(30)  # a confident model, so heads matter
    data = calibration_set([inputs], model)
    fisher = mask_gradient_scores(model, data, "fisher", progress=False)
    base = float(per_example_losses(model, inputs).sum())
    adapter = hf_prune.get_adapter(model)
    head_dim = adapter.head_dim(model.config)
    damage, score = [], []
    for i, block in enumerate(adapter.layers(model)):
        o = block.attention.output.dense
        for h in range(model.config.num_attention_heads):
            cols = torch.arange(h * head_dim, (h + 1) * head_dim)
            saved = input_columns(o, cols).clone()
            scale_inputs(o, cols, 0.0)
            damage.append(abs(float(per_example_losses(model, inputs).sum()) - base))
            with torch.no_grad():
                o.weight[:, cols] = saved
            score.append(float(fisher.heads[i][h]))
    rank = lambda xs: torch.tensor(xs).argsort().argsort().double()  # noqa: E731
    spearman = float(torch.corrcoef(torch.stack([rank(damage), rank(score)]))[0, 1])
    assert spearman > 0.5, spearman
