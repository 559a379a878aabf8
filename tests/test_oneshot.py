"""Config validation, criteria, allocation, unstructured masks and one-shot prune() on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

import hf_prune
from hf_prune import PruningConfig, prune
from hf_prune.architectures.base import head_feature_index
from hf_prune.planning.allocate import allocate
from hf_prune.scoring.criteria import magnitude_scores, mask_gradient_scores, random_scores
from hf_prune.sparsity.masks import compute_masks, prunable_linears, sparsity_report, weight_scores

from .families import FAMILIES, make_inputs, make_model, output_tensor

ALL = ["bert", "distilbert", "gpt2", "llama"]


def calibration(family, n_batches: int = 2, batch: int = 8) -> list[dict]:
    examples = []
    for seed in range(n_batches):
        inputs = make_inputs(family, batch=batch, padded=False, seed=seed + 10)
        examples += [{k: v[i] for k, v in inputs.items()} for i in range(batch)]
    return examples


def task_model(name: str):
    family = FAMILIES[name]
    cls = next(c for c in family.classes if "ForSequenceClassification" in c.__name__ or "ForCausalLM" in c.__name__)
    return family, make_model(family, cls)


# ---- config ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"heads": 1.0}, "PruningConfig.heads=1.0 is invalid; allowed: a number with 0 <= heads < 1"),
        ({"ffn": -0.1}, "PruningConfig.ffn=-0.1"),
        ({"target_flops": 0.0}, "0 < target_flops <= 1"),
        ({"criterion": "fischer"}, "did you mean 'fisher'?"),
        ({"scope": "globl"}, "did you mean 'global'?"),
        ({"sparsity": 1.5}, "PruningConfig.sparsity=1.5"),
        ({"pattern": "4:2"}, "0 < N < M"),
        ({"pattern": "2:4", "sparsity_scope": "global"}, "cannot be combined"),
        ({"min_heads_per_layer": -1}, "an integer >= 0"),
        ({"heads": 0.5, "target_flops": 0.5}, "are alternatives"),
        ({"target_flops": 0.5, "target_params": 0.5}, "at most one"),
        ({"heads": "half"}, "PruningConfig.heads='half'"),
    ],
)
def test_bad_configs_fail_with_clear_messages(kwargs, message):
    with pytest.raises(ValueError) as err:
        PruningConfig(**kwargs)
    assert message in str(err.value)


def test_config_round_trips_and_rejects_unknown_keys():
    cfg = PruningConfig(target_flops=0.5, criterion="fisher", scope="global", pattern="2:4")
    assert PruningConfig.from_json(cfg.to_json()) == cfg
    assert PruningConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.nm == (2, 4) and cfg.effective_sparsity == 0.5
    with pytest.raises(ValueError, match="unknown key 'critrion' \\(did you mean 'criterion'\\?\\)"):
        PruningConfig.from_dict({"critrion": "fisher"})


# ---- criteria -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_every_criterion_scores_every_family(name):
    family, model = task_model(name)
    shapes = hf_prune.get_adapter(model).layer_shapes(model)
    before = copy.deepcopy(model.state_dict())
    results = {
        "magnitude": magnitude_scores(model),
        "random": random_scores(model, seed=0),
        "taylor": mask_gradient_scores(
            model, hf_prune.scoring.calibration.iter_batches(calibration(family), 8), "taylor"
        ),
        "fisher": mask_gradient_scores(
            model, hf_prune.scoring.calibration.iter_batches(calibration(family), 8), "fisher"
        ),
    }
    for crit, scores in results.items():
        assert [s.numel() for s in scores.heads] == [s.heads for s in shapes], crit
        assert [s.numel() for s in scores.ffn] == [s.ffn for s in shapes], crit
        assert all(torch.isfinite(s).all() and (s >= 0).all() for s in scores.heads + scores.ffn), crit
        assert any(s.max() > 0 for s in scores.heads) and any(s.max() > 0 for s in scores.ffn), crit
    # scoring never changes the model and leaves no gradients behind
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_random_is_seeded_and_taylor_differs_from_fisher():
    family, model = task_model("bert")
    a, b, c = random_scores(model, 1), random_scores(model, 1), random_scores(model, 2)
    assert all(torch.equal(x, y) for x, y in zip(a.heads, b.heads, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.heads, c.heads, strict=True))
    data = calibration(family)
    taylor = mask_gradient_scores(model, hf_prune.scoring.calibration.iter_batches(data, 8), "taylor")
    fisher = mask_gradient_scores(model, hf_prune.scoring.calibration.iter_batches(data, 8), "fisher")
    assert not torch.allclose(taylor.ffn[0], fisher.ffn[0])


def test_fisher_scores_match_a_per_example_reference():
    """Per-example mask gradients from one batched backward equal those of separate single-example passes."""
    family, model = task_model("bert")
    data = calibration(family, n_batches=1, batch=4)
    batched = mask_gradient_scores(model, hf_prune.scoring.calibration.iter_batches(data, 4), "fisher")
    single = mask_gradient_scores(model, hf_prune.scoring.calibration.iter_batches(data, 1), "fisher")
    for a, b in zip(batched.heads + batched.ffn, single.heads + single.ffn, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-9)


# ---- allocation -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("criterion", ["magnitude", "fisher"])
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("target", ["target_flops", "target_params"])
def test_flops_and_params_targets_are_met_within_one_percent(name, criterion, scope, target):
    # a wider FFN than the exactness configs, closer to real proportions (heads are coarse units)
    cfg_kwargs = {target: 0.5, "criterion": criterion, "scope": scope, "ffn_multiple": 4}
    family, family_model = task_model(name)
    config = family_model.config
    if hasattr(config, "intermediate_size"):
        config.intermediate_size = 128
    elif hasattr(config, "hidden_dim"):
        config.hidden_dim = 128
    else:
        config.n_inner = 128
    model = type(family_model)(config).eval()
    dense_params = hf_prune.prunable_parameters(model)
    report = prune(model, PruningConfig(**cfg_kwargs, seq_len=16), calibration_data=calibration(family))
    if target == "target_flops":
        kept = report.flops_after / report.flops_before
    else:
        kept = hf_prune.prunable_parameters(model) / dense_params
    assert abs(kept - 0.5) <= 0.01, kept
    # the allocator's own cost model must agree with what was measured on the model
    assert report.plan["meta"]["achieved_keep"] == pytest.approx(kept, abs=1e-9)


def test_layer_scope_is_uniform_and_global_scope_is_not():
    _family, model = task_model("bert")
    scores = magnitude_scores(model)
    # make layer 0 clearly more important than the others, after per-layer normalisation too
    scores.heads[0] = torch.tensor([10.0, 10.0, 10.0, 10.0])
    scores.heads[1] = torch.tensor([1.0, 1.0, 0.01, 0.01])
    scores.heads[2] = torch.tensor([1.0, 0.01, 0.01, 0.01])
    layer = allocate(model, scores, PruningConfig(heads=0.5, scope="layer"))
    glob = allocate(model, scores, PruningConfig(heads=0.5, scope="global"))
    assert {k: len(v) for k, v in layer.heads.items()} == {0: 2, 1: 2, 2: 2}
    assert sum(len(v) for v in glob.heads.values()) == 6
    assert len(glob.heads.get(2, [])) == 3 and len(glob.heads.get(1, [])) == 2  # lowest normalised go first
    # layer scope removes the two weakest of layer 2 (three tie at 0.01), never its strongest head 0
    assert len(layer.heads[2]) == 2 and set(layer.heads[2]) <= {1, 2, 3}


def test_min_heads_per_layer_and_gqa_groups_are_respected():
    family = FAMILIES["llama"]
    model = make_model(family)
    scores = magnitude_scores(model)
    config = PruningConfig(heads=0.9, scope="global", min_heads_per_layer=2, head_unit="group")
    plan = allocate(model, scores, config)
    for _layer, removed in plan.heads.items():
        assert len(removed) == 2  # 4 heads in 2 groups: one group (2 heads) must stay
        assert removed in ([0, 1], [2, 3])
    # the default for 2 groups of 2 is one query head from every group: each group keeps one of its two
    plan = allocate(model, scores, PruningConfig(heads=0.9, scope="global", min_heads_per_layer=2))
    assert plan.meta["head_unit"] == "query"
    for _layer, removed in plan.heads.items():
        assert len(removed) == 2 and {h // 2 for h in removed} == {0, 1}
    for unit in ("group", "query"):
        config = PruningConfig(heads=0.9, scope="layer", min_heads_per_layer=0, head_unit=unit)
        zero = allocate(model, scores, config)
        assert all(len(v) == 4 for v in zero.heads.values())


def test_ffn_sizes_are_rounded_to_the_multiple():
    _family, model = task_model("bert")
    report = prune(model, PruningConfig(ffn=0.3, ffn_multiple=8))
    assert all(layer["ffn"] % 8 == 0 for layer in report.layers_after)


# ---- unstructured ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["layer", "row", "global"])
def test_unstructured_sparsity_is_exact_and_baked(scope, tmp_path):
    _family, model = task_model("gpt2")
    report = prune(model, PruningConfig(sparsity=0.6, sparsity_scope=scope))
    assert report.sparsity == pytest.approx(0.6, abs=0.01)
    sr = sparsity_report(model)
    if scope != "global":
        assert all(abs(v - 0.6) < 0.02 for v in sr["per_module"].values())
    else:
        assert max(sr["per_module"].values()) - min(sr["per_module"].values()) > 0.01
    # baked: plain parameters, stock keys, zeros survive save/reload
    assert not any("mask" in k or "orig" in k for k in model.state_dict())
    model.save_pretrained(tmp_path)
    reloaded = hf_prune.from_pretrained(tmp_path, type(model))
    assert sparsity_report(reloaded)["overall"] == pytest.approx(report.sparsity)


def test_n_m_pattern_keeps_n_of_every_m():
    _family, model = task_model("llama")
    prune(model, PruningConfig(pattern="2:4"))
    for module in prunable_linears(model).values():
        groups = (module.weight != 0).reshape(module.weight.shape[0], -1, 4).sum(-1)
        assert (groups <= 2).all()
    assert sparsity_report(model)["overall"] == pytest.approx(0.5, abs=0.01)


def test_activation_aware_scores_weight_by_input_norms():
    _family, model = task_model("llama")
    modules = prunable_linears(model)
    norms = {name: torch.linspace(0.1, 10, m.in_features) for name, m in modules.items()}
    mag = weight_scores(modules, "magnitude")
    act = weight_scores(modules, "activation", norms)
    name = next(iter(modules))
    torch.testing.assert_close(act[name], mag[name] * norms[name])
    masks = compute_masks(act, 0.5, "row")
    # columns with large input norms survive far more often
    kept_per_col = masks[name].float().mean(0)
    assert kept_per_col[-4:].mean() > kept_per_col[:4].mean() + 0.3


def test_activation_sparsity_needs_data_and_runs_with_it():
    family, model = task_model("llama")
    with pytest.raises(ValueError, match="needs calibration_data"):
        prune(model, PruningConfig(sparsity=0.5, sparsity_criterion="activation"))
    report = prune(
        model, PruningConfig(sparsity=0.5, sparsity_criterion="activation", sparsity_scope="row"), calibration(family)
    )
    assert report.sparsity == pytest.approx(0.5, abs=0.01)


# ---- prune() --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_prune_combines_structure_and_sparsity_for_every_family(name, tmp_path):
    family, model = task_model(name)
    config = PruningConfig(target_flops=0.6, criterion="taylor", scope="global", sparsity=0.3, ffn_multiple=4)
    report = prune(model, config, calibration_data=calibration(family))
    assert report.params_after < report.params_before
    assert report.flops_after / report.flops_before == pytest.approx(0.6, abs=0.01)
    assert report.sparsity == pytest.approx(0.3, abs=0.02)
    assert report.layers_after == [s.to_dict() for s in hf_prune.get_adapter(model).layer_shapes(model)]
    assert "kept heads per layer" in str(report) and report.to_json()
    model.save_pretrained(tmp_path)
    reloaded = hf_prune.from_pretrained(tmp_path, type(model)).eval()
    inputs = make_inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(output_tensor(reloaded(**inputs)), output_tensor(model.eval()(**inputs)))


def test_prune_refuses_data_criteria_without_data_before_touching_the_model():
    _family, model = task_model("bert")
    snapshot = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"criterion=.fisher.*needs calibration_data"):
        prune(model, PruningConfig(heads=0.5, criterion="fisher"))
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())


# ---- reconstruction (OBS update) ------------------------------------------------------------------------
def test_obs_update_reconstructs_better_than_masking():
    from hf_prune.sparsity.reconstruct import obs_update

    g = torch.Generator().manual_seed(0)
    # correlated inputs (as real activations are): what a removed weight did, others can partly take over
    x = torch.randn(2048, 64, generator=g) @ (torch.eye(64) + torch.randn(64, 64, generator=g) / 4)
    w = torch.randn(32, 64, generator=g)
    hessian = x.t() @ x / x.shape[0]
    keep = torch.rand(32, 64, generator=g) > 0.5
    updated = obs_update(w, hessian, keep)
    assert (updated[~keep] == 0).all()

    def error(v: torch.Tensor) -> float:
        return float(((x @ v.t() - x @ w.t()) ** 2).mean())

    best = torch.zeros_like(w)  # per-row least squares on the kept support: the floor no update can beat
    for i in range(w.shape[0]):
        best[i, keep[i]] = torch.linalg.lstsq(x[:, keep[i]], (x @ w[i]).unsqueeze(1)).solution.squeeze(1)
    # the OBS update and lstsq reach the same optimum by two float32 routes: compare with a rounding tolerance
    assert error(best) <= error(updated) * (1 + 1e-4) and error(updated) < 0.9 * error(w * keep)
    torch.testing.assert_close(obs_update(w, hessian, torch.ones_like(keep)), w, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_reconstruct_keeps_sparsity_and_reduces_output_error(name):
    family, model = task_model(name)
    data = calibration(family, n_batches=4)
    inputs = make_inputs(family, padded=False, seed=99)
    with torch.no_grad():
        reference = output_tensor(model(**inputs))
    errors = {}
    for reconstruct in (False, True):
        pruned = copy.deepcopy(model)
        config = PruningConfig(
            sparsity=0.5, sparsity_scope="row", sparsity_criterion="activation", reconstruct=reconstruct
        )
        report = prune(pruned, config, calibration_data=data)
        assert report.sparsity == pytest.approx(0.5, abs=0.01)
        with torch.no_grad():
            errors[reconstruct] = float((output_tensor(pruned(**inputs)) - reference).pow(2).mean())
    assert errors[True] < errors[False]


# ---- structured reconstruction (least-squares refit of the output projections) ----------------------------
def _structured_plan(name: str) -> hf_prune.PruningPlan:
    # GQA (llama: 2 query heads per key/value head) removes whole groups; bert-like layers lose every head in
    # layer 1 (only the bias path is left) and part of the FFN elsewhere
    if name in LLAMA_LIKE:
        return hf_prune.PruningPlan(heads={0: [0, 1], 2: [2, 3]}, ffn={0: list(range(0, 40, 3)), 1: list(range(25))})
    return hf_prune.PruningPlan(heads={0: [1], 1: [0, 1, 2, 3]}, ffn={0: list(range(0, 40, 3)), 2: list(range(25))})


# the refit runs block by block: families whose blocks get different masks / rotary tables (sliding windows) too
LLAMA_LIKE = ("llama", "gemma2", "granite_swa")


@pytest.mark.parametrize("name", [*ALL, "gemma2", "granite_swa", "modernbert"])
def test_structured_reconstruct_is_the_least_squares_refit(name):
    from hf_prune.structure.refit import apply_plan_with_compensation

    family, model = task_model(name)
    adapter = hf_prune.get_adapter(model)
    layers = adapter.layers(model)
    batches = [make_inputs(family, batch=8, seq=11, padded=True, seed=s) for s in range(6)]
    plan = _structured_plan(name)
    head_dim = adapter.head_dim(model.config)
    # the reference: every shrunk output projection's inputs on real (non-padding) tokens, and its dense output
    targets = []
    for layer, removed, projs in [(i, r, adapter.attention_projs) for i, r in plan.heads.items()] + [
        (i, r, adapter.ffn_projs) for i, r in plan.ffn.items()
    ]:
        for proj in projs:
            if proj.side == "in":
                gone = set(removed if projs is adapter.ffn_projs else head_feature_index(removed, head_dim).tolist())
                targets.append((layers[layer].get_submodule(proj.path), gone))
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(targets))}
    handles = [
        m.register_forward_pre_hook(lambda mod, inp, i=i: captured[i].append(inp[0].detach().clone()))
        for i, (m, _) in enumerate(targets)
    ]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    references = []
    for i, (module, gone) in enumerate(targets):
        valid = torch.cat([b["attention_mask"].reshape(-1) for b in batches]).bool()
        x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured[i]])[valid].double()
        w = (module.weight if isinstance(module, torch.nn.Linear) else module.weight.t()).detach().double()
        bias = getattr(module, "bias", None)
        bias = None if bias is None else bias.detach().double().clone()  # the refit overwrites it in place
        y = x @ w.t() + (0 if bias is None else bias)
        keep = [c for c in range(x.shape[1]) if c not in gone]
        design = x[:, keep] if bias is None else torch.cat([x[:, keep], torch.ones(len(x), 1, dtype=x.dtype)], 1)
        solution = torch.linalg.lstsq(design, y).solution.t()
        references.append((solution, x[:, keep], y, w[:, keep], bias))
    apply_plan_with_compensation(model, plan, batches, damp=0.0)
    assert [s.to_dict() for s in adapter.layer_shapes(model)] == [
        s.to_dict() for s in adapter.layer_shapes(plan.apply(task_model(name)[1]))
    ]
    for (module, _), (solution, x_keep, y, w_keep, bias) in zip(targets, references, strict=True):
        w_new = (module.weight if isinstance(module, torch.nn.Linear) else module.weight.t()).detach().double()
        refit = x_keep @ w_new.t() + (0 if bias is None else module.bias.detach().double())
        design = x_keep if bias is None else torch.cat([x_keep, torch.ones(len(x_keep), 1, dtype=x_keep.dtype)], 1)
        optimum = (design @ solution.t() - y).pow(2).mean()
        plain = x_keep @ w_keep.t() + (0 if bias is None else bias)
        # the refit reaches the least-squares optimum up to the float32 statistics (the solution itself is not unique
        # when inputs are collinear, the residual is), and beats keeping the surviving weights as they were
        refit_err, plain_err = float((refit - y).pow(2).mean()), float((plain - y).pow(2).mean())
        assert plain_err > float(optimum)
        # (relative to the gap to plain removal as well: Gemma 2's large activations leave a tiny optimum)
        assert refit_err == pytest.approx(float(optimum), rel=1e-4, abs=1e-12)
        assert refit_err - float(optimum) <= 1e-3 * (plain_err - float(optimum))


@pytest.mark.parametrize("name", ALL)
def test_structured_reconstruct_brings_the_pruned_model_closer_to_the_dense_one(name):
    family, model = task_model(name)
    data = calibration(family, n_batches=8)
    held_out = make_inputs(family, batch=8, padded=False, seed=123)
    with torch.no_grad():
        reference = output_tensor(model(**held_out))
    errors, shapes = {}, {}
    for reconstruct in (False, True):
        pruned = copy.deepcopy(model)
        config = PruningConfig(heads=0.5, ffn=0.5, criterion="magnitude", reconstruct=reconstruct, max_samples=64)
        report = prune(pruned, config, calibration_data=data)
        shapes[reconstruct] = report.layers_after
        with torch.no_grad():
            errors[reconstruct] = float((output_tensor(pruned(**held_out)) - reference).pow(2).mean())
    assert shapes[True] == shapes[False]
    assert errors[True] < errors[False]


def test_structured_reconstruct_needs_data_before_touching_the_model():
    _family, model = task_model("bert")
    snapshot = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="needs calibration_data"):
        prune(model, PruningConfig(heads=0.5, criterion="magnitude", reconstruct=True))
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())


def test_structured_reconstruct_rejects_a_bad_plan_before_calibrating():
    from hf_prune.structure.refit import apply_plan_with_compensation

    _family, model = task_model("llama")
    snapshot = copy.deepcopy(model.state_dict())

    def batches():
        raise AssertionError("calibration must not start for an invalid plan")
        yield

    with pytest.raises(ValueError, match="every group must keep the same number"):
        apply_plan_with_compensation(model, hf_prune.PruningPlan(heads={0: [0]}), batches())
    assert all(torch.equal(snapshot[k], v) for k, v in model.state_dict().items())


def test_structured_reconstruct_warns_when_the_refit_is_underdetermined(caplog):
    """Fewer calibration tokens than a projection's kept inputs: the fit is exact on them and poor elsewhere."""
    from hf_prune.structure.refit import apply_plan_with_compensation

    caplog.set_level("WARNING")
    family, model = task_model("llama")
    plan = _structured_plan("llama")
    apply_plan_with_compensation(
        copy.deepcopy(model), plan, [make_inputs(family, batch=8, seq=11, seed=s) for s in range(6)]
    )
    assert "underdetermined" not in caplog.text
    apply_plan_with_compensation(model, plan, [make_inputs(family, batch=1, seq=4, seed=0)])
    assert "the least-squares refit is underdetermined (layer 0 " in caplog.text
    assert "from 4 tokens" in caplog.text
