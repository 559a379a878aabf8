"""Recipe schema, CLI, metrics, reports, model card, push_to_hub and atomic output."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml

import hf_prune
from hf_prune.recipes import cli, runner
from hf_prune.recipes import data as recipe_data
from hf_prune.recipes.metrics import classification_metrics, load_metric, perplexity
from hf_prune.recipes.schema import RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def base_recipe(tmp_path: Path, model_dir: Path) -> dict:
    return {
        "model": {"name_or_path": str(model_dir), "task": "sequence-classification", "num_labels": 2},
        "data": {
            "files": {"train": str(REPO / "data/sst2/train_8k.tsv"), "validation": str(REPO / "data/sst2/dev.tsv")},
            "format": "tsv",
            "text_columns": ["sentence"],
            "label_column": "label",
            "max_length": 32,
            "max_train_samples": 64,
            "max_eval_samples": 48,
            "calibration_samples": 32,
        },
        "dense_training": {
            "num_train_epochs": 1,
            "per_device_train_batch_size": 16,
            "optim": "adamw_torch",
            "disable_tqdm": True,
        },
        "pruning": {"target_flops": 0.6, "criterion": "fisher", "scope": "global", "distill_alpha": 0.5},
        "training": {
            "num_train_epochs": 1,
            "per_device_train_batch_size": 16,
            "optim": "adamw_torch",
            "disable_tqdm": True,
        },
        "evaluation": {"metrics": ["accuracy", "f1", "matthews_correlation"], "latency_batch": 4, "latency_repeats": 2},
        "output": {"dir": str(tmp_path / "out")},
        "seed": 0,
    }


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random BERT with a real (small) WordPiece vocabulary, saved like a Hub checkpoint."""
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"), layers=2)


def tiny_bert(folder: Path, layers: int) -> Path:
    """A random BERT of ``layers`` blocks (hidden 32, 4 heads, FFN 64), seeded, saved with its tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for line in (REPO / "data/sst2/dev.tsv").read_text().split("\n")[1:] for w in line.split()[:-1]})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words[:2000]]
    (folder / "vocab.txt").write_text("\n".join(vocab))
    tokenizer = tf.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    tf.BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write(tmp_path: Path, data: dict | str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


# ---- schema ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_are_valid_and_their_data_ship_with_the_repository(path, capsys, monkeypatch):
    recipe = load_recipe(path)
    assert recipe.model.name_or_path and recipe.output.dir
    if not recipe.data.files:  # a Hub dataset id (online recipe): offline, the dry run checks the schema only
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        assert recipe.data.dataset and cli.main(["run", str(path), "--dry-run"]) == 0
        assert "not loaded offline" in capsys.readouterr().out
        return
    for f in recipe.data.files.values():
        resolved = Path(recipe_data.resolve_path(recipe, f)).resolve()
        assert resolved.is_relative_to(REPO) and resolved.exists(), f"{path.name}: {f} is not in the repository"
    # the dry run loads the data (files, splits and columns), everything short of the model
    assert cli.main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "valid recipe" in out and f"{recipe.data.train_split} " in out


def test_data_format_is_read_from_the_name_compression_aside(tmp_path):
    assert [
        recipe_data.data_format(n) for n in ("a.tsv.xz", "a.jsonl", "a.JSON.gz", "b.txt", "c.parquet", "d.csv")
    ] == [
        "tsv",
        "json",
        "json",
        "text",
        "parquet",
        "csv",
    ]
    (tmp_path / "rows.jsonl").write_text('{"sentence": "good", "label": 1}\n{"sentence": "bad", "label": 0}\n')
    (tmp_path / "odd.dat").write_text("x")
    rows = {
        "model": {"name_or_path": "m", "task": "sequence-classification"},
        "data": {"files": {"train": str(tmp_path / "rows.jsonl"), "validation": str(tmp_path / "rows.jsonl")}},
        "output": {"dir": str(tmp_path / "out")},
    }
    loaded = recipe_data.load_data(load_recipe(write(tmp_path, rows)))
    assert loaded["train"].column_names == ["sentence", "label"] and len(loaded["train"]) == 2
    rows["data"]["files"] = {"train": str(tmp_path / "odd.dat"), "validation": str(tmp_path / "odd.dat")}
    with pytest.raises(RecipeError, match=r"set data\.format to one of csv, tsv, json, text, parquet"):
        recipe_data.load_data(load_recipe(write(tmp_path, rows)))


def test_shipped_data_match_their_published_checksums():
    """data/README.md lists the sha256 of every shipped file (of the decompressed content for .xz files)."""
    import hashlib
    import lzma
    import re

    rows = re.findall(r"^\| `([^`]+)` \|.*\| ([0-9a-f]{64}) \|$", (REPO / "data" / "README.md").read_text(), re.M)
    shipped = sorted(str(p.relative_to(REPO / "data")) for p in (REPO / "data").rglob("*") if p.is_file())
    assert sorted(name for name, _ in rows) == [n for n in shipped if n != "README.md"]
    for name, digest in rows:
        raw = (REPO / "data" / name).read_bytes()
        content = lzma.decompress(raw) if name.endswith(".xz") else raw
        assert hashlib.sha256(content).hexdigest() == digest, name
    assert sum((REPO / "data" / n).stat().st_size for n in shipped) < 8 * 2**20


BAD = [
    ("trainig:\n  num_train_epochs: 1\n", "r.yaml:9: unknown section 'trainig' (did you mean 'training'?)"),
    (
        "training:\n  learning_rat: 0.1\n",
        "r.yaml:10: unknown key 'learning_rat' in section 'training' (did you mean 'learning_rate'?)",
    ),
    ("training:\n  num_train_epochs: two\n", "r.yaml:10: training.num_train_epochs must be float, got 'two'"),
    (
        "pruning:\n  critrion: fisher\n",
        "r.yaml:10: unknown key 'critrion' in section 'pruning' (did you mean 'criterion'?)",
    ),
    ("pruning:\n  heads: 1.5\n", "r.yaml:10: PruningConfig.heads=1.5 is invalid"),
    (
        "pruning:\n  criterion: fischer\n",
        "r.yaml:10: PruningConfig.criterion='fischer' is invalid (did you mean 'fisher'?)",
    ),
    ("evaluation:\n  metrics: [acuracy]\n", "r.yaml:10: unknown metric 'acuracy' (did you mean 'accuracy'?)"),
    (
        "evaluation:\n  latency_bach: 4\n",
        "unknown key 'latency_bach' in section 'evaluation' (did you mean 'latency_batch'?)",
    ),
    ("seed: zero\n", "r.yaml:9: seed must be an integer, got 'zero'"),
    (
        "training:\n  lora:\n    rank: 8\n",
        "r.yaml:11: unknown key 'rank' in section 'training.lora'",
    ),
    ("training:\n  lora:\n    r: 0\n", "r.yaml:11: LoraArguments.r=0 is invalid; allowed: an integer >= 1"),
    ("training:\n  lora:\n    dropout: high\n", "r.yaml:11: training.lora.dropout must be float, got 'high'"),
]


@pytest.mark.parametrize(("extra", "message"), BAD, ids=[m.split(":")[-1][:30] for _, m in BAD])
def test_bad_recipes_fail_with_key_line_and_suggestion(tmp_path, extra, message):
    base = textwrap.dedent(
        """\
        model:
          name_or_path: offline:minilm
        data:
          files: {train: a.tsv, validation: b.tsv}
          text_columns: [sentence]
        output:
          dir: out
        # extra
        """
    )
    path = write(tmp_path, base + extra)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert message.replace("r.yaml", str(path)) in str(err.value)


def test_structural_recipe_errors(tmp_path):
    cases = [
        ({"output": {"dir": "x"}}, "missing required key 'model.name_or_path'"),
        (
            {
                "model": {"name_or_path": "m", "task": "clasification"},
                "output": {"dir": "x"},
                "data": {"files": {"train": "a"}},
            },
            "(did you mean 'sequence-classification'?)",
        ),
        ({"model": {"name_or_path": "m"}, "output": {"dir": "x"}, "data": {}}, "data needs either 'dataset'"),
        (
            {
                "model": {"name_or_path": "m"},
                "output": {"dir": "x", "push_to_hub": True},
                "data": {"files": {"train": "a"}},
            },
            "push_to_hub needs output.repo_id",
        ),
        (
            {
                "model": {"name_or_path": "m"},
                "output": {"dir": "x"},
                "data": {"files": {"train": "a"}, "format": "tvs"},
            },
            "(did you mean 'tsv'?)",
        ),
    ]
    for data, message in cases:
        with pytest.raises(RecipeError, match=None) as err:
            load_recipe(data)
        assert message in str(err.value), (message, str(err.value))


def test_missing_column_fails_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch):
    data = base_recipe(tmp_path, tiny_model_dir)
    data["data"]["text_columns"] = ["sentense"]

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load for a bad recipe")

    monkeypatch.setattr(runner, "load_model_and_tokenizer", no_model)
    recipe = load_recipe(write(tmp_path, data))
    with pytest.raises(
        RecipeError,
        match=r"column 'sentense' \(data.text_columns\) not in the data \(did you mean "
        r"'sentence'\?\)",
    ):
        runner.run_recipe(recipe)
    assert ":" in str(recipe.where("data", "text_columns"))


def test_overrides_apply_and_are_validated(tmp_path):
    path = REPO / "recipes" / "demo.yaml"
    recipe = load_recipe(path, ["training.learning_rate=1e-4", "pruning.target_flops=0.5", "seed=3"])
    assert recipe.training["learning_rate"] == 1e-4 and recipe.pruning.target_flops == 0.5 and recipe.seed == 3
    with pytest.raises(RecipeError, match="unknown key 'learnin_rate'"):
        load_recipe(path, ["training.learnin_rate=1"])
    with pytest.raises(RecipeError, match="expects key=value"):
        load_recipe(path, ["training.learning_rate"])


# ---- metrics --------------------------------------------------------------------------------------------
def test_offline_metrics_match_reference_values():
    preds, refs = [0, 1, 1, 0, 1, 2], [0, 1, 0, 0, 1, 2]
    m = classification_metrics(["accuracy", "f1", "matthews_correlation"], preds[:5], refs[:5])
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["f1"] == pytest.approx(0.8)  # tp 2, fp 1, fn 0
    assert m["matthews_correlation"] == pytest.approx(4 / 6)  # (tp*tn - fp*fn) / sqrt(3*2*3*2)
    macro = classification_metrics(["f1"], preds, refs, num_labels=3)["f1"]
    assert macro == pytest.approx((0.8 + 0.8 + 1.0) / 3)
    assert perplexity([2.0, 3.0], [10, 30]) == pytest.approx(float(torch.exp(torch.tensor(2.75))))
    assert type(load_metric("accuracy")).__name__ == "Accuracy"
    with pytest.raises(ValueError, match="not available offline"):
        load_metric("bleu")


# ---- end to end -----------------------------------------------------------------------------------------
def test_recipe_runs_end_to_end_and_writes_everything(tmp_path, tiny_model_dir, capsys):
    data = base_recipe(tmp_path, tiny_model_dir)
    data["training"]["logging_steps"] = 1
    recipe = load_recipe(write(tmp_path, data))
    report = runner.run_recipe(recipe)
    out = Path(report["output_dir"])
    names = {p.name for p in out.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "pruning_report.json",
        "SUMMARY.md",
        "kept_structure.svg",
        "README.md",
        "recipe.yaml",
    } <= names
    assert not any(n.endswith(".bin") for n in names)
    saved = json.loads((out / "pruning_report.json").read_text())
    for key in (
        "plan",
        "params",
        "encoder_flops",
        "size_bytes",
        "metrics",
        "latency",
        "wall_time_s",
        "versions",
        "seed",
    ):
        assert key in saved
    assert set(saved["metrics"]) == {"dense", "after_pruning", "after_recovery"}
    assert set(saved["metrics"]["after_pruning"]) == {"accuracy", "f1", "matthews_correlation"}
    assert saved["encoder_flops"]["ratio"] == pytest.approx(1 / 0.6, rel=0.02)
    assert saved["params"]["pruned"] < saved["params"]["dense"]
    card = (out / "README.md").read_text()
    assert str(tiny_model_dir) in card and "What was removed" in card
    assert f"kept per layer: {saved['plan']['kept_heads']}" in card
    assert "<svg" in (out / "kept_structure.svg").read_text()
    model = hf_prune.from_pretrained(out, tf.AutoModelForSequenceClassification)
    assert hf_prune.count_parameters(model) == saved["params"]["pruned"]
    assert [s.heads for s in hf_prune.get_adapter(model).layer_shapes(model)] == saved["plan"]["kept_heads"]
    assert "accuracy" in runner.summary_table(report)
    assert "pending" not in saved and "error" not in saved and "unfinished" not in card
    # the trainer's logs and `hf-prune inspect` describe the saved model exactly as the report does
    last_log = saved["train_log"][-1]
    assert last_log["pruning/params"] == saved["params"]["pruned"]
    assert last_log["pruning/kept_heads"] == str(saved["plan"]["kept_heads"])
    assert last_log["pruning/kept_ffn"] == str(saved["plan"]["kept_ffn"])
    seq = str(saved["encoder_flops"]["seq_len"])
    capsys.readouterr()  # the run's own output
    assert cli.main(["inspect", str(out), "--task", "sequence-classification", "--json", "--seq-len", seq]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == saved["params"]["pruned"] and info["encoder_flops"] == saved["encoder_flops"]["pruned"]
    assert [layer["ffn"] for layer in info["layers"]] == saved["plan"]["kept_ffn"] and info["pruned_by_hf_prune"]


def test_failed_run_leaves_no_half_written_output(tmp_path, tiny_model_dir, monkeypatch):
    data = base_recipe(tmp_path, tiny_model_dir)
    data["dense_training"] = None
    recipe = load_recipe(write(tmp_path, data))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(runner, "write_report", boom)
    with pytest.raises(OSError, match="disk full"):
        runner.run_recipe(recipe)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize(
    ("target", "step", "not_done"),
    [("_export", "export", ["export"]), ("compare_latency", "latency", ["latency", "export"])],
)
def test_a_failure_after_training_keeps_the_trained_model_and_records_the_error(
    tmp_path, tiny_model_dir, monkeypatch, target, step, not_done
):
    data = base_recipe(tmp_path, tiny_model_dir)
    data["dense_training"] = None
    data["output"]["export"] = "onnx"
    recipe = load_recipe(write(tmp_path, data))

    def boom(*args, **kwargs):
        raise RuntimeError(f"{step} broke")

    monkeypatch.setattr(runner, target, boom)
    with pytest.raises(RuntimeError, match=f"{step} broke"):
        runner.run_recipe(recipe)
    out = tmp_path / "out"
    saved = json.loads((out / "pruning_report.json").read_text())
    assert saved["error"] == {"step": step, "type": "RuntimeError", "message": f"{step} broke"}
    assert saved["pending"] == not_done
    assert set(saved["metrics"]["after_recovery"]) == {"accuracy", "f1", "matthews_correlation"}
    assert ("latency" in saved) == (step == "export")
    assert f"failed at `{step}`" in (out / "SUMMARY.md").read_text()
    assert f"failed at `{step}`" in (out / "README.md").read_text()
    # the trained model is on disk whole and loads; nothing staged or half-exported is left behind
    model = hf_prune.from_pretrained(out, tf.AutoModelForSequenceClassification)
    assert hf_prune.count_parameters(model) == saved["params"]["pruned"]
    assert [s.heads for s in hf_prune.get_adapter(model).layer_shapes(model)] == saved["plan"]["kept_heads"]
    assert not (out / "onnx").exists() and not [p for p in out.iterdir() if p.name.startswith(".")]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_push_to_hub_uploads_exactly_the_output_folder(tmp_path, tiny_model_dir, monkeypatch):
    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            calls["create"] = (repo_id, private)

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls["upload"] = (folder_path, repo_id, sorted(p.name for p in Path(folder_path).iterdir()))
            return "https://hub/commit/1"

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    data = base_recipe(tmp_path, tiny_model_dir)
    data["dense_training"] = None
    data["output"].update({"push_to_hub": True, "repo_id": "me/tiny-pruned", "private": True})
    report = runner.run_recipe(load_recipe(write(tmp_path, data)))
    assert calls["create"] == ("me/tiny-pruned", True)
    folder, repo, files = calls["upload"]
    assert folder == report["output_dir"] and repo == "me/tiny-pruned"
    assert "README.md" in files and "model.safetensors" in files
    # a non-uniform result uploads the file that lets transformers alone load it
    assert report["loading"] == "remote-code" and "hf_prune_modeling.py" in files


# ---- CLI ------------------------------------------------------------------------------------------------
def test_cli_exit_codes_and_inspect(tmp_path, tiny_model_dir, capsys):
    bad = write(tmp_path, "model: {name_or_path: m}\noutput: {dir: x}\ndata: {files: {train: a}}\ntrainig: {}\n")
    assert cli.main(["run", str(bad)]) == 2
    assert "unknown section 'trainig'" in capsys.readouterr().err
    assert cli.main(["run", str(REPO / "recipes" / "demo.yaml"), "--dry-run"]) == 0
    assert "valid recipe" in capsys.readouterr().out
    model = tf.BertForSequenceClassification.from_pretrained(tiny_model_dir)
    hf_prune.prune_heads(model, {0: [0, 1]})
    model.save_pretrained(tmp_path / "pruned")
    assert cli.main(["inspect", str(tmp_path / "pruned"), "--task", "sequence-classification", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [layer["heads"] for layer in info["layers"]] == [2, 4] and info["pruned_by_hf_prune"]
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "run" in capsys.readouterr().out


def test_cli_evaluate_runs_the_recipe_metrics(tmp_path, tiny_model_dir, capsys):
    data = base_recipe(tmp_path, tiny_model_dir)
    path = write(tmp_path, data)
    assert cli.main(["evaluate", str(path), "--model", str(tiny_model_dir)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"accuracy", "f1", "matthews_correlation"}
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_recipe_with_depth_pruning_removes_blocks_before_training(tmp_path, tiny_model_dir):
    data = base_recipe(tmp_path, tiny_model_dir)
    data["pruning"] = {"layers": 0.5, "layer_criterion": "influence", "ffn": 0.25, "criterion": "magnitude"}
    report = runner.run_recipe(load_recipe(write(tmp_path, data)))
    out = Path(report["output_dir"])
    saved = json.loads((out / "pruning_report.json").read_text())
    assert saved["plan"]["original_layers"] == 2 and len(saved["plan"]["kept_layers"]) == 1
    assert saved["plan"]["kept_ffn"] == [48]  # the width step ran on the block that stayed
    assert "Transformer blocks:** 1 removed" in (out / "README.md").read_text()
    model = hf_prune.from_pretrained(out, tf.AutoModelForSequenceClassification)
    assert len(hf_prune.get_adapter(model).layers(model)) == 1
    assert hf_prune.count_parameters(model) == saved["params"]["pruned"]


def test_depth_and_width_recipe_keeps_the_plan_it_had_before_the_runner_called_prune(tmp_path):
    """Recorded from the runner that ran the depth step itself (before it called ``prune(depth_only=True)``): the
    same blocks, heads and neurons, and the same training losses, come out."""
    data = base_recipe(tmp_path, tiny_bert(tmp_path / "bert4", layers=4))
    data["pruning"] = {
        "layers": 0.25,
        "layer_criterion": "influence",
        "target_flops": 0.5,
        "criterion": "fisher",
        "scope": "global",
        "reconstruct": True,
    }
    data["training"]["logging_steps"] = 1
    report = runner.run_recipe(load_recipe(write(tmp_path, data)))
    plan = report["plan"]
    assert plan["kept_layers"] == [0, 2, 3] and plan["original_layers"] == 4
    assert plan["kept_heads"] == [3, 2, 4] and plan["kept_ffn"] == [32, 40, 32]
    assert plan["kept_original_head_ids"] == [[0, 1, 3], [2, 3], [0, 1, 2, 3]]
    assert report["params"] == {"dense": 101634, "pruned": 84226}
    assert [round(h["loss"], 4) for h in report["train_log"]] == [0.6967, 0.6947, 0.6969, 0.6935]


def test_prune_depth_only_removes_blocks_and_hands_on_the_rest_of_the_target():
    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64
    )
    model = tf.BertForSequenceClassification(config)
    pruning = hf_prune.PruningConfig(layers=0.25, layer_criterion="last", target_flops=0.5, criterion="magnitude")
    report = hf_prune.prune(model, pruning, depth_only=True)
    assert report.layers_removed == [2] and report.layers_after == report.layers_before[:3]
    assert report.flops_after / report.flops_before == pytest.approx(3 / 4)  # equal blocks: 3 of 4 remain
    width = hf_prune.PruningConfig.from_dict(report.width_config)
    # what is left of the target: 3/4 of the FLOPs kept so far, times the width target, is the recipe's 0.5
    assert width.layers == 0 and width.target_flops == pytest.approx(0.5 / 0.75)
    assert report.plan == hf_prune.PruningPlan().to_dict() and report.sparsity == 0.0
    with pytest.raises(
        ValueError, match=r"prune\(depth_only=True\) removes blocks only.*layers=0.0 and max_layers=0.0"
    ):
        hf_prune.prune(model, hf_prune.PruningConfig(target_flops=0.5), depth_only=True)


def test_recipe_saves_sparse_weights_and_exports_an_onnx_model_it_evaluates(tmp_path, tiny_model_dir):
    pytest.importorskip("onnxruntime", reason="the onnx extra is part of the test install (make test)")
    data = base_recipe(tmp_path, tiny_model_dir)
    data["dense_training"] = None
    data["pruning"].update({"sparsity": 0.8})
    data["output"].update({"sparse": True, "export": "onnx"})
    report = runner.run_recipe(load_recipe(write(tmp_path, data)))
    out = Path(report["output_dir"])
    assert (out / "model.sparse.safetensors").exists() and not (out / "model.safetensors").exists()
    assert report["loading"] == "hf_prune" and report["size_bytes"]["saved_format"].startswith("sparse")
    model = hf_prune.from_pretrained(out, tf.AutoModelForSequenceClassification)
    block = sum(m.weight.numel() * 4 for m in hf_prune.get_adapter(model).all_block_linears(model))
    # 80% zeros in the blocks' weights: each costs 4 bytes dense, about 0.2 x 4 + 1/8 stored
    assert report["size_bytes"]["saved"] < report["size_bytes"]["pruned"] - 0.7 * block
    assert (out / "onnx" / "model.onnx").exists() and (out / "onnx" / "tokenizer.json").exists()
    export = report["export"]
    # the float32 graph reproduces the PyTorch model, so the evaluation split scores the same
    assert export["metrics"] == pytest.approx(report["metrics"]["after_recovery"])
    assert export["check"]["max_abs_diff"] < 1e-4 and export["latency_ms"]["onnxruntime_cpu"] > 0
    card = (out / "README.md").read_text()
    assert "model.sparse.safetensors" in card and "### ONNX (onnx)" in card
    assert hf_prune.count_parameters(model) == report["params"]["pruned"]


def test_a_non_uniform_recipe_output_says_how_to_load_it_without_hf_prune(tmp_path, tiny_model_dir):
    data = base_recipe(tmp_path, tiny_model_dir)
    data["dense_training"] = None
    report = runner.run_recipe(load_recipe(write(tmp_path, data)))
    out = Path(report["output_dir"])
    uniform = len(set(report["plan"]["kept_heads"])) == 1 and len(set(report["plan"]["kept_ffn"])) == 1
    expected = "stock" if uniform and report["plan"]["kept_heads"][0] == 4 else "remote-code"
    assert report["loading"] == expected
    card = (out / "README.md").read_text()
    assert ("trust_remote_code=True" in card) == (expected == "remote-code")
    assert (out / "hf_prune_modeling.py").exists() == (expected == "remote-code")


@pytest.mark.parametrize("value", ["onnx-int4", "tflite"])
def test_an_unknown_export_format_is_refused_with_the_allowed_ones(tmp_path, value):
    data = {
        "model": {"name_or_path": "offline:minilm"},
        "data": {"files": {"train": "a.tsv", "validation": "b.tsv"}, "text_columns": ["sentence"]},
        "output": {"dir": "x", "export": value},
    }
    with pytest.raises(RecipeError, match=rf"output\.export={value!r} is not allowed; use one of onnx, onnx-int8"):
        load_recipe(write(tmp_path, data))


def test_lora_recipe_recovers_with_masked_adapters_and_saves_one_merged_model(tmp_path, tiny_model_dir):
    data = base_recipe(tmp_path, tiny_model_dir)
    data["dense_training"] = None
    data["pruning"].update(sparsity=0.5, sparsity_scope="row", schedule="iterative", frequency=2)
    data["training"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.1}
    recipe = load_recipe(write(tmp_path, data))
    assert recipe.lora == hf_prune.LoraArguments(r=4, alpha=8, dropout=0.1)
    assert "lora" not in recipe.training  # not a TrainingArguments field
    report = runner.run_recipe(recipe)
    out = Path(report["output_dir"])
    assert not (out / "adapter_config.json").exists()
    model = hf_prune.from_pretrained(out, tf.AutoModelForSequenceClassification)
    assert not any("lora" in n or "base_layer" in n for n, _ in model.named_parameters())
    kept = [s.heads for s in hf_prune.get_adapter(model).layer_shapes(model)]
    assert kept == report["plan"]["kept_heads"] and sum(kept) < 3 * 4  # cut while the adapters existed
    assert hf_prune.sparsity.masks.sparsity_report(model)["overall"] == pytest.approx(0.5, abs=0.01)
    assert set(report["metrics"]) == {"dense", "after_pruning", "after_recovery"}
