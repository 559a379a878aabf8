"""Bad input gets a clear error, naming the bad value and what is allowed, before any work is done."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers as tf
from huggingface_hub.errors import HFValidationError, OfflineModeIsEnabled
from huggingface_hub.errors import HTTPError as HubHTTPError

from hf_prune import PruningCallback, PruningConfig, PruningTrainer, allocate, prune
from hf_prune.config import CRITERIA, GRADIENT_CRITERIA, UnknownKeyError, type_ok
from hf_prune.io import load as load_module
from hf_prune.io import onnx as onnx_module
from hf_prune.recipes import cli
from hf_prune.recipes.schema import RecipeError, load_recipe
from hf_prune.scoring.criteria import magnitude_scores, structured_scores

from .families import FAMILIES, make_model


def tiny_bert() -> torch.nn.Module:
    family = FAMILIES["bert"]
    return make_model(family, next(c for c in family.classes if "ForSequenceClassification" in c.__name__))


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---- 1. a misspelt PruningConfig keyword ------------------------------------------------------------------
def test_a_misspelt_keyword_names_the_closest_field():
    with pytest.raises(TypeError, match=r"PruningConfig: unknown key 'hedas' \(did you mean 'heads'\?\); allowed: "):
        PruningConfig(hedas=0.5)
    # the same error as a dict config, and catchable as the ValueError every other config problem is
    with pytest.raises(ValueError, match=r"unknown key 'critrion' \(did you mean 'criterion'\?\)") as err:
        PruningConfig(critrion="fisher")
    assert isinstance(err.value, UnknownKeyError)
    with pytest.raises(UnknownKeyError, match=r"unknown key 'critrion' \(did you mean 'criterion'\?\)"):
        PruningConfig.from_dict({"critrion": "fisher"})


def test_good_keywords_build_the_same_config_as_before():
    kwargs = {"target_flops": 0.5, "criterion": "fisher", "scope": "global", "pattern": "2:4", "seed": 3}
    cfg = PruningConfig(**kwargs)
    assert dataclasses.is_dataclass(cfg)
    assert {k: getattr(cfg, k) for k in kwargs} == kwargs
    assert cfg == PruningConfig.from_dict(kwargs) == copy.deepcopy(cfg) == dataclasses.replace(cfg)
    assert PruningConfig(0.25).heads == 0.25  # positional arguments pass through too
    # the signature tools and HfArgumentParser-style readers see is the dataclass's own
    assert list(inspect.signature(PruningConfig).parameters) == [f.name for f in dataclasses.fields(PruningConfig)]


# ---- 2. an N:M pattern with a different sparsity ----------------------------------------------------------
def test_an_nm_pattern_refuses_a_sparsity_it_would_override():
    with pytest.raises(ValueError, match=r"sparsity=0\.7 contradicts pattern='2:4'.*1 - N/M = 0\.5"):
        PruningConfig(sparsity=0.7, pattern="2:4")
    with pytest.raises(ValueError, match=r"sparsity=0\.5 contradicts pattern='1:4'.*1 - N/M = 0\.75"):
        PruningConfig(sparsity=0.5, pattern="1:4")
    # the sparsity the pattern fixes, or none, is accepted
    assert PruningConfig(sparsity=0.5, pattern="2:4").effective_sparsity == 0.5
    assert PruningConfig(pattern="2:4").effective_sparsity == 0.5
    assert PruningConfig(sparsity=1 - 1 / 3, pattern="1:3").nm == (1, 3)


# ---- 3. a model name instead of a model -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bert-base-uncased", Path("some/folder")])
def test_prune_refuses_a_name_and_says_to_load_it(name):
    with pytest.raises(TypeError, match=r"prune\(\) takes a loaded model; got the \w+ '.*'.*from_pretrained\("):
        prune(name, PruningConfig(heads=0.5))
    with pytest.raises(TypeError, match=r"prune\(\) takes a loaded model \(a torch nn.Module\); got dict"):
        prune({"model": name}, PruningConfig(heads=0.5))


# ---- 4. a config that is not a PruningConfig -------------------------------------------------------------
BAD_CONFIGS = ["target_flops=0.5", [0.5], 0.5, None]


@pytest.mark.parametrize("bad", BAD_CONFIGS, ids=repr)
def test_every_entry_point_refuses_a_non_config_before_any_work(bad, tmp_path):
    model = tiny_bert()
    before = state(model)
    accepted = r"must be a PruningConfig or a dict of its fields"
    with pytest.raises(TypeError, match=rf"prune\(config=\.\.\.\) {accepted} \(e\.g\. .*\); got {type(bad).__name__} "):
        prune(model, bad)
    with pytest.raises(TypeError, match=rf"allocate\(config=\.\.\.\) {accepted}"):
        allocate(model, magnitude_scores(model), bad)
    with pytest.raises(TypeError, match=rf"PruningCallback\(config=\.\.\.\) {accepted}"):
        PruningCallback(bad)
    if bad is not None:  # the trainer's default is PruningConfig()
        args = tf.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
        with pytest.raises(TypeError, match=rf"pruning_config {accepted}"):
            PruningTrainer(model=model, args=args, pruning_config=bad)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_every_entry_point_accepts_a_dict_of_fields():
    model = tiny_bert()
    assert PruningCallback({"heads": 0.5}).config == PruningConfig(heads=0.5)
    plan = allocate(model, magnitude_scores(model), {"heads": 0.5})
    assert plan == allocate(model, magnitude_scores(model), PruningConfig(heads=0.5))
    with pytest.raises(UnknownKeyError, match=r"prune\(config=\.\.\.\): unknown key 'hedas'"):
        prune(model, {"hedas": 0.5})


# ---- one list of gradient criteria -------------------------------------------------------------------------
def test_gradient_criteria_are_the_ones_that_need_data():
    assert set(GRADIENT_CRITERIA) < set(CRITERIA)
    for criterion in CRITERIA:
        cfg = PruningConfig(heads=0.5, criterion=criterion)
        assert cfg.needs_gradients == cfg.needs_data == (criterion in ("taylor", "fisher"))
    with pytest.raises(
        ValueError, match=r"unknown criterion 'fischer' \(did you mean 'fisher'\?\); allowed: magnitude"
    ):
        structured_scores(tiny_bert(), "fischer")


# ---- 5. and 6. recipe values checked at load time -----------------------------------------------------------
BASE = textwrap.dedent(
    """\
    model:
      name_or_path: offline:minilm
    data:
      files: {train: a.tsv, validation: b.tsv}
      text_columns: [sentence]
    output:
      dir: out
      export: onnx
    """
)


def recipe_error(tmp_path: Path, extra: str) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(BASE + extra)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    return str(err.value).replace(str(path), "r.yaml")


def test_recipe_dtype_is_checked_at_load_time(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text(BASE.replace("offline:minilm", "offline:minilm\n  dtype: float23"))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(err.value) == (
        f"{path}:3: model.dtype='float23' (did you mean 'float32'?); allowed: float32, bfloat16, float16, float64"
    )
    path.write_text(BASE.replace("offline:minilm", "offline:minilm\n  dtype: bfloat16"))
    assert load_recipe(path).model.dtype == "bfloat16"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "evaluation:\n  latency_repeats: 0\n",
            "r.yaml:10: evaluation.latency_repeats=0 is invalid; allowed: an integer >= 1",
        ),
        ("evaluation:\n  latency_batch: 0\n", "r.yaml:10: evaluation.latency_batch=0 is invalid"),
        ("evaluation:\n  latency_seq_len: -4\n", "r.yaml:10: evaluation.latency_seq_len=-4 is invalid"),
        ("seed: -1\n", "r.yaml:9: seed=-1 is invalid; allowed: an integer >= 0"),
    ],
)
def test_impossible_recipe_numbers_fail_at_load_time(tmp_path, extra, message):
    assert recipe_error(tmp_path, extra).startswith(message)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_length", 0, "data.max_length=0 is invalid; allowed: an integer >= 1"),
        ("max_train_samples", 0, "data.max_train_samples=0 is invalid"),
        ("max_eval_samples", -1, "data.max_eval_samples=-1 is invalid"),
        ("calibration_samples", 0, "data.calibration_samples=0 is invalid"),
        ("shuffle_seed", -2, "data.shuffle_seed=-2 is invalid; allowed: an integer >= 0"),
        ("text_columns", [], "data.text_columns needs at least one column"),
    ],
)
def test_impossible_data_values_fail_at_load_time(key, value, message):
    data = {"model": {"name_or_path": "m"}, "data": {"files": {"train": "a"}, key: value}, "output": {"dir": "x"}}
    with pytest.raises(RecipeError, match=None) as err:
        load_recipe(data)
    assert str(err.value).startswith(f"<dict>: {message}")


def test_causal_lm_blocks_need_two_tokens_and_labels_one_class():
    data = {"model": {"name_or_path": "m", "task": "causal-lm"}, "data": {"files": {"train": "a"}, "max_length": 1}}
    with pytest.raises(RecipeError, match=r"data\.max_length=1 is invalid for causal-lm; allowed: an integer >= 2"):
        load_recipe({**data, "output": {"dir": "x"}})
    data["model"] = {"name_or_path": "m", "num_labels": 0}
    with pytest.raises(RecipeError, match=r"model\.num_labels=0 is invalid; allowed: an integer >= 1"):
        load_recipe({**data, "output": {"dir": "x"}})


def test_recipe_type_checks_share_the_config_checker():
    # one checker for recipes and PruningConfig: a bool is never a number or a count
    assert not type_ok(True, int) and not type_ok(True, float) and type_ok(3, float) and type_ok(None, int | None)
    assert type_ok(["a"], list[str]) and not type_ok(["a", 1], list[str])
    data = {"model": {"name_or_path": "m"}, "data": {"files": {"train": "a"}}, "output": {"dir": "x"}}
    with pytest.raises(RecipeError, match=r"evaluation\.latency_repeats must be int, got True"):
        load_recipe({**data, "evaluation": {"latency_repeats": True}})


# ---- 7. export_onnx arguments ----------------------------------------------------------------------------------
@pytest.fixture
def no_export_work(monkeypatch):
    """Fail the test if export_onnx loads a model or imports ONNX before its arguments are checked."""

    def forbidden(*args, **kwargs):
        raise AssertionError("export_onnx did work before validating its arguments")

    monkeypatch.setattr(onnx_module, "load_for_export", forbidden)
    monkeypatch.setattr(onnx_module, "_require_onnx", forbidden)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"atol": -1e-4}, ValueError, r"atol=-0\.0001 is invalid; allowed: a finite number >= 0"),
        ({"atol": math.nan}, ValueError, r"atol=nan is invalid"),
        ({"atol": math.inf}, ValueError, r"atol=inf is invalid"),
        ({"atol": "1e-4"}, ValueError, r"atol='1e-4' is invalid"),
        ({"int8": "yes"}, TypeError, r"int8='yes' is invalid; allowed: True or False"),
        ({"int8": 1}, TypeError, r"int8=1 is invalid"),
        ({"trace_shape": (0, 16)}, ValueError, r"trace_shape batch=0 is invalid; allowed: an integer >= 1"),
        ({"trace_shape": (2,)}, ValueError, r"trace_shape=\(2,\) is invalid; allowed: a \(batch, sequence\) pair"),
        ({"check_shapes": ()}, ValueError, r"check_shapes=\(\) is invalid"),
        ({"check_shapes": ((3, 1.5),)}, ValueError, r"check_shapes sequence=1\.5 is invalid"),
    ],
)
def test_export_onnx_checks_its_arguments_first(tmp_path, no_export_work, kwargs, error, message):
    with pytest.raises(error, match=message):
        onnx_module.export_onnx(tiny_bert(), tmp_path / "onnx", **kwargs)
    with pytest.raises(error, match=message):
        onnx_module.export_onnx(tmp_path / "saved", tmp_path / "onnx", **kwargs)
    assert not (tmp_path / "onnx").exists()


def test_export_onnx_refuses_to_replace_the_model_folder(tmp_path, no_export_work):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    for output in (folder, tmp_path, folder / ".." / "model"):
        with pytest.raises(ValueError, match="is the model folder or holds it"):
            onnx_module.export_onnx(folder, output)
    assert (folder / "config.json").read_text() == "{}"
    with pytest.raises(TypeError, match="model must be a torch model or a saved model folder; got int"):
        onnx_module.export_onnx(3, tmp_path / "onnx")


def test_the_export_cli_reports_a_bad_atol_before_loading(tmp_path, no_export_work, capsys):
    code = cli.main(["export", str(tmp_path / "model"), "--output", str(tmp_path / "onnx"), "--atol", "-1"])
    assert code == 1
    assert "error: export_onnx: atol=-1.0 is invalid; allowed: a finite number >= 0" in capsys.readouterr().err


# ---- 8. the Hub check for sparse weights ---------------------------------------------------------------------
def _raiser(exc: BaseException):
    def file_exists(*args, **kwargs):
        raise exc

    return file_exists


HTTP_MODULE = sys.modules[HubHTTPError.__module__]  # the HTTP client huggingface_hub is built on


@pytest.mark.parametrize(
    "exc",
    [
        HFValidationError("Repo id must be in the form 'repo_name' or 'namespace/repo_name'"),
        OfflineModeIsEnabled("offline mode is enabled"),
        HTTP_MODULE.ConnectError("Name or service not known"),
        HTTP_MODULE.ReadTimeout("timed out"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_the_hub_check_treats_cannot_tell_as_not_sparse(monkeypatch, exc):
    monkeypatch.setattr(load_module, "file_exists", _raiser(exc))
    assert load_module._sparse_folder("someone/some-model", {}) is None


@pytest.mark.parametrize("exc", [RuntimeError("a bug"), TypeError("revision must be a str"), KeyError("x")])
def test_the_hub_check_lets_other_errors_through(monkeypatch, exc):
    monkeypatch.setattr(load_module, "file_exists", _raiser(exc))
    with pytest.raises(type(exc)):
        load_module._sparse_folder("someone/some-model", {})


def test_the_hub_check_offline_and_for_a_missing_folder(monkeypatch):
    """Real huggingface_hub calls, no network: what it raises offline and for a path that is no repo id."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert load_module._sparse_folder("./no/such/folder", {}) is None
    assert load_module._sparse_folder("someone/some-model", {"revision": "main"}) is None
