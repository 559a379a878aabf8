"""The model card a recipe run writes: Hub metadata (base model, data sets, pipeline tag, model-index) and the
"Serving" section, checked on reports that real (tiny) recipe runs produced."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers as tf
from huggingface_hub import ModelCard

from hf_prune.architectures import LayerShape
from hf_prune.recipes import runner
from hf_prune.recipes.report import model_card
from hf_prune.recipes.schema import load_recipe
from hf_prune.structure.layout import layout_of
from tests.test_recipes import REPO, base_recipe, tiny_bert, write

SST2 = {"train": str(REPO / "data/sst2/train_8k.tsv"), "validation": str(REPO / "data/sst2/dev.tsv")}
WIKITEXT = str(REPO / "data/wikitext2/test_head.txt")


@pytest.fixture(scope="module")
def bert_report(tmp_path_factory) -> dict:
    """The report of a tiny BERT classification run on the shipped SST-2 copy (a local base model)."""
    tmp = tmp_path_factory.mktemp("card-bert")
    data = base_recipe(tmp, tiny_bert(tmp / "bert", layers=2))
    data["dense_training"] = None
    data["data"].update({"max_train_samples": 32, "max_eval_samples": 16, "calibration_samples": 16})
    data["evaluation"]["metrics"] = ["accuracy", "f1"]
    return runner.run_recipe(load_recipe(write(tmp, data)))


@pytest.fixture(scope="module")
def llama_report(tmp_path_factory) -> dict:
    """The report of a tiny Llama (4 query heads in 2 key/value groups) causal-LM run on the WikiText-2 excerpt."""
    tmp = tmp_path_factory.mktemp("card-llama")
    folder = tiny_bert(tmp / "bert", layers=1)  # for its tokenizer
    tokenizer = tf.AutoTokenizer.from_pretrained(folder)
    vocab_size = len((folder / "vocab.txt").read_text().split("\n"))  # the ids the run's latency inputs draw from
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    tf.LlamaForCausalLM(config).save_pretrained(tmp / "llama")
    tokenizer.save_pretrained(tmp / "llama")
    recipe = {
        "model": {"name_or_path": str(tmp / "llama"), "task": "causal-lm"},
        "data": {
            "files": {"train": WIKITEXT, "validation": WIKITEXT},
            "format": "text",
            "text_columns": ["text"],
            "max_length": 32,
            "max_train_samples": 40,
            "max_eval_samples": 40,
            "calibration_samples": 8,
        },
        "pruning": {"target_flops": 0.7, "criterion": "magnitude", "batch_size": 4, "seq_len": 32},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "disable_tqdm": True},
        "evaluation": {"metrics": ["perplexity"], "latency_batch": 1, "latency_seq_len": 16, "latency_repeats": 1},
        "output": {"dir": str(tmp / "out")},
    }
    return runner.run_recipe(load_recipe(write(tmp, recipe)))


def card_of(report: dict) -> ModelCard:
    """The card as the Hub reads it: the generated text parsed back by huggingface_hub."""
    return ModelCard(str(model_card(report, "recipe: {}")))


def serving_table(card: ModelCard) -> dict[str, tuple[bool, str]]:
    """``engine -> (runs it, how)`` from the rows of the card's Serving table."""
    section = card.text.split("## Serving", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return {name.strip(): (ok.strip() == "yes", how) for name, ok, how in rows[1:]}


def with_plan(report: dict, heads: list[int], kv_heads: list[int], ffn: list[int], loading: str) -> dict:
    """``report`` describing other per-block shapes (and the way its folder loads)."""
    other = copy.deepcopy(report)
    other["plan"].update({"kept_heads": heads, "kept_kv_heads": kv_heads, "kept_ffn": ffn})
    other["loading"] = loading
    return other


def test_classification_card_metadata_is_the_runs_own_numbers(bert_report):
    out = Path(bert_report["output_dir"])
    data = ModelCard.load(out / "README.md").data  # the card the run wrote
    assert data.pipeline_tag == "text-classification" and data.library_name == "transformers"
    assert "hf_prune" in data.tags
    assert data.base_model is None  # a local folder is no Hub model
    assert data.datasets == ["nyu-mll/glue"]  # data/sst2 is GLUE SST-2
    final = bert_report["metrics"]["after_recovery"]
    assert set(final) == {"accuracy", "f1"}
    assert {r.metric_type: r.metric_value for r in data.eval_results} == final
    for result in data.eval_results:
        assert (result.task_type, result.dataset_type) == ("text-classification", "nyu-mll/glue")
        assert (result.dataset_config, result.dataset_split) == ("sst2", "validation")
    assert data.model_name == "out"
    text = (out / "README.md").read_text()
    assert "What was removed" in text and f"kept per layer: {bert_report['plan']['kept_heads']}" in text


def test_offline_alias_and_hub_data_name_their_hub_ids(bert_report):
    report = copy.deepcopy(bert_report)
    report["base_model"] = "offline:minilm"
    report["recipe"]["data"] = {"dataset": "stanfordnlp/imdb", "eval_split": "test", "max_eval_samples": 16}
    data = card_of(report).data
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert data.datasets == ["stanfordnlp/imdb"]
    assert {(r.dataset_type, r.dataset_split) for r in data.eval_results} == {("stanfordnlp/imdb", "test")}
    report["base_model"] = "google-bert/bert-base-uncased"
    assert card_of(report).data.base_model == "google-bert/bert-base-uncased"


def test_local_data_and_unfinished_runs_claim_no_data_set_or_results(bert_report, tmp_path):
    report = copy.deepcopy(bert_report)
    report["recipe"]["data"]["files"] = {"train": str(tmp_path / "mine.tsv"), "validation": str(tmp_path / "d.tsv")}
    data = card_of(report).data
    assert data.datasets is None and data.eval_results is None and data.base_model is None
    report = copy.deepcopy(bert_report)
    del report["metrics"]["after_recovery"]
    report["pending"] = ["evaluate_pruned", "latency"]
    card = card_of(report)
    assert card.data.eval_results is None and card.data.datasets == ["nyu-mll/glue"]
    assert "unfinished" in card.text


def test_encoder_serving_is_transformers_and_onnx(bert_report):
    table = serving_table(card_of(bert_report))
    assert set(table) == {"transformers", "ONNX Runtime"} and all(ok for ok, _ in table.values())
    remote = bert_report["loading"] == "remote-code"
    assert ("trust_remote_code=True" in table["transformers"][1]) == remote
    assert "hf-prune export MODEL_DIR --output OUT" in table["ONNX Runtime"][1]


def test_causal_lm_card_metadata_is_the_runs_own_numbers(llama_report):
    data = ModelCard.load(Path(llama_report["output_dir"]) / "README.md").data
    assert data.pipeline_tag == "text-generation" and data.base_model is None
    assert data.datasets == ["Salesforce/wikitext"]
    (result,) = data.eval_results
    assert result.metric_type == "perplexity"
    assert result.metric_value == llama_report["metrics"]["after_recovery"]["perplexity"]
    assert (result.task_type, result.dataset_config, result.dataset_split) == (
        "text-generation",
        "wikitext-2-v1",
        "test",
    )


VLLM = "hf-prune export MODEL_DIR --format vllm --output OUT"
GGUF = "hf-prune export MODEL_DIR --format gguf --gguf-type f16 --output OUT.gguf"


@pytest.mark.parametrize(
    ("layout", "heads", "kv_heads", "ffn", "loading"),
    [
        ("uniform", [2, 2], [1, 1], [48, 48], "stock"),
        ("servable", [4, 4], [2, 1], [64, 32], "remote-code"),
        ("servable", [4, 0], [2, 0], [64, 40], "remote-code"),  # block 1 lost its attention
        ("free", [4, 2], [2, 1], [64, 64], "remote-code"),
    ],
)
def test_decoder_serving_names_the_engines_of_its_layout(llama_report, layout, heads, kv_heads, ffn, loading):
    assert layout_of([LayerShape(*s) for s in zip(heads, kv_heads, ffn, strict=True)]) == layout
    card = card_of(with_plan(llama_report, heads, kv_heads, ffn, loading))
    assert f"Layout: **{layout}**" in card.text
    table = serving_table(card)
    assert set(table) == {"transformers", "vLLM", "llama.cpp"}
    runs = {name for name, (ok, _) in table.items() if ok}
    transformers_how = table["transformers"][1]
    if layout == "uniform":
        assert runs == {"transformers", "vLLM", "llama.cpp"}
        assert (
            "AutoModelForCausalLM.from_pretrained" in transformers_how and "trust_remote_code" not in transformers_how
        )
        assert VLLM in table["vLLM"][1] and "vllm serve OUT" in table["vLLM"][1] and GGUF in table["llama.cpp"][1]
    elif layout == "servable":
        assert runs == {"transformers", "vLLM", "llama.cpp"} and "trust_remote_code=True" in transformers_how
        assert VLLM in table["vLLM"][1] and "DeciLMForCausalLM" in table["vLLM"][1]
        assert GGUF in table["llama.cpp"][1] and "`deci`" in table["llama.cpp"][1]
    else:
        assert runs == {"transformers"} and "trust_remote_code=True" in transformers_how
        for engine in ("vLLM", "llama.cpp"):
            assert 'PruningConfig(layout="servable")' in table[engine][1] and '"uniform"' in table[engine][1]


def test_the_runs_own_decoder_card_matches_its_layout(llama_report):
    plan = llama_report["plan"]
    shapes = [LayerShape(*s) for s in zip(plan["kept_heads"], plan["kept_kv_heads"], plan["kept_ffn"], strict=True)]
    card = ModelCard.load(Path(llama_report["output_dir"]) / "README.md")
    assert f"Layout: **{layout_of(shapes)}**" in card.text
    runs = {name for name, (ok, _) in serving_table(card).items() if ok}
    assert ("vLLM" in runs) == (layout_of(shapes) != "free")
