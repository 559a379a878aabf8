"""The shared helpers of hf_prune.utils (and the one offline-alias parser): each written once, each checked here."""

import json

import pytest
import torch
from torch import nn

from hf_prune.recipes.offline import OFFLINE_MODELS, resolve_offline
from hf_prune.utils import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    dummy_inputs,
    eval_mode,
    random_token_ids,
    restored_mode,
    staged_dir,
)


def test_random_token_ids_match_a_seeded_randint():
    # the numbers the timing and export inputs always had: torch.randint on a CPU generator seeded with `seed`
    expected = torch.randint(1000, 5000, (3, 7), generator=torch.Generator().manual_seed(4))
    assert torch.equal(random_token_ids(5000, 3, 7, seed=4), expected)
    small = random_token_ids(50, 2, 64, low=1000)  # low past the vocabulary: only the last id is left
    assert bool((small == 49).all())


def test_dummy_inputs_use_the_model_vocabulary_and_reject_none():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="vocab_size"):
        dummy_inputs(model, 2, 3)
    model.config = type("Config", (), {"vocab_size": 30})()
    inputs = dummy_inputs(model, 2, 3, low=5)
    assert inputs["input_ids"].shape == (2, 3) and bool((inputs["input_ids"] >= 5).all())
    assert bool((inputs["input_ids"] < 30).all()) and torch.equal(inputs["attention_mask"], torch.ones(2, 3).long())
    with pytest.raises(ValueError, match="vocab_size=1"):
        random_token_ids(1, 2, 3)


def test_eval_mode_and_restored_mode_give_the_model_back_as_it_came():
    a, b = nn.Dropout(), nn.Dropout()
    b.eval()
    with eval_mode(a, b):
        assert not a.training and not b.training
    assert a.training and not b.training
    with pytest.raises(RuntimeError), eval_mode(a):
        raise RuntimeError("boom")
    assert a.training
    with restored_mode(a):
        assert a.training  # restored_mode leaves the mode alone inside
        a.eval()
    assert a.training


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "sub" / "f.json"
    atomic_write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1} and path.read_text().endswith("\n")

    def half(tmp):
        tmp.write_text("{partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half)
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.json"]  # no temporary file left
    atomic_write_text(path, "new")
    assert path.read_text() == "new"


def test_staged_dir_moves_in_on_success_and_leaves_the_target_on_failure(tmp_path):
    target = tmp_path / "out"
    with staged_dir(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        (tmp / "a.txt").write_text("1")
    assert [p.name for p in target.iterdir()] == ["a.txt"]
    with pytest.raises(KeyError), staged_dir(target) as tmp:
        (tmp / "b.txt").write_text("2")
        raise KeyError("stop")
    assert [p.name for p in target.iterdir()] == ["a.txt"]  # the old folder, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the staging folder is gone
    with staged_dir(target) as tmp:
        (tmp / "c.txt").write_text("3")
    assert [p.name for p in target.iterdir()] == ["c.txt"]  # replaced as a whole, not merged


def test_resolve_offline_passes_other_names_through_and_names_the_allowed_aliases():
    assert resolve_offline("some/hub-id") == ("some/hub-id", None)
    with pytest.raises(ValueError, match="offline:minilm") as err:
        resolve_offline("offline:minilmm")
    assert all(alias in str(err.value) for alias in OFFLINE_MODELS)


def _fake_engine(tmp_path, monkeypatch, body: str) -> None:
    """A stand-in for the vLLM environment's interpreter: a shell script that ignores the runner script."""
    python = tmp_path / "python"
    python.write_text(f"#!/bin/bash\ncat > /dev/null\n{body}\n")
    python.chmod(0o755)
    monkeypatch.setenv("HF_PRUNE_VLLM_PYTHON", str(python))


def test_engine_runner_killed_by_a_signal_is_started_once_more(tmp_path, monkeypatch):
    from hf_prune.io.engines import run_engine

    marker = tmp_path / "first-attempt"
    _fake_engine(
        tmp_path, monkeypatch, f"if [ ! -e {marker} ]; then touch {marker}; kill -ABRT $$; fi\necho '{{\"ok\": 1}}'"
    )
    assert run_engine("vllm", {"model": "m"}) == {"ok": 1}
    assert marker.exists()


def test_engine_runner_error_exit_or_a_second_kill_is_raised(tmp_path, monkeypatch):
    from hf_prune.io.engines import run_engine

    _fake_engine(tmp_path, monkeypatch, "echo 'bad request' >&2\nexit 3")
    with pytest.raises(RuntimeError, match=r"exit 3\).*\n.*bad request"):
        run_engine("vllm", {"model": "m"})
    _fake_engine(tmp_path, monkeypatch, "echo 'aborted' >&2\nkill -ABRT $$")
    with pytest.raises(RuntimeError, match=r"exit -6\).*\n.*aborted"):
        run_engine("vllm", {"model": "m"})
