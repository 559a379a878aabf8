"""Deployment: pruned folders that load without hf_prune, and compact storage of sparse weights."""

from __future__ import annotations

import ast
import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as tf

import hf_prune
from hf_prune.sparsity.sparse_io import SPARSE_INDEX, pack_bits, unpack_bits
from hf_prune.structure.remote_code import MODELING_FILE

from .families import FAMILIES, make_inputs, make_model

# hf_prune made unimportable, as on a machine where it is not installed
_NO_HF_PRUNE = "import sys; sys.modules['hf_prune'] = None\n"


def _run_without_hf_prune(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", _NO_HF_PRUNE + textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _non_uniform_bert(cls=tf.BertForSequenceClassification):
    model = make_model(FAMILIES["bert"], cls)
    hf_prune.prune_heads(model, {0: [0, 1, 2, 3], 1: [2]})  # layer 0 loses every head
    hf_prune.prune_ffn(model, {1: list(range(8)), 2: list(range(40))})  # layer 2 loses every neuron
    return model


def test_a_non_uniform_model_loads_and_runs_where_hf_prune_cannot_be_imported(tmp_path):
    model = _non_uniform_bert()
    inputs = make_inputs(FAMILIES["bert"])
    hf_prune.save_pretrained(model, tmp_path / "m")
    ours = hf_prune.from_pretrained(tmp_path / "m", tf.AutoModelForSequenceClassification).eval()
    with torch.no_grad():
        want = ours(**inputs).logits
    torch.save({"inputs": inputs, "want": want}, tmp_path / "io.pt")
    out = _run_without_hf_prune(
        f"""
        import torch, transformers as tf
        io = torch.load({str(tmp_path / "io.pt")!r})
        try:
            import hf_prune
        except ImportError:
            print("no hf_prune")
        model = tf.AutoModelForSequenceClassification.from_pretrained({str(tmp_path / "m")!r}, trust_remote_code=True)
        with torch.no_grad():
            got = model.eval()(**io["inputs"]).logits
        print(type(model).__name__, type(model).__module__.split(".")[0], torch.equal(got, io["want"]))
        base = tf.AutoModel.from_pretrained({str(tmp_path / "m")!r}, trust_remote_code=True)
        print(type(base).__name__, base.config.hf_prune["layers"])
        """
    )
    lines = out.splitlines()
    assert lines[0] == "no hf_prune"
    assert lines[1] == "BertForSequenceClassification transformers_modules True"
    assert lines[2].startswith("BertModel ") and str(model.config.hf_prune["layers"][0]["heads"]) in lines[2]


def test_the_saved_config_names_the_runtime_for_every_task_head_and_memory_stays_clean(tmp_path):
    model = _non_uniform_bert()
    hf_prune.save_pretrained(model, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForSequenceClassification"] == "hf_prune_modeling.BertForSequenceClassification"
    assert saved["auto_map"]["AutoModelForMaskedLM"] == "hf_prune_modeling.BertForMaskedLM"
    assert saved["hf_prune"]["modules"]["encoder.layer.0.attention.self"]["empty"]["kind"] == "attention"
    # the in-memory model keeps a stock config: no auto_map, no manifest (the next save describes it afresh)
    assert not hasattr(model.config, "auto_map") and "modules" not in model.config.hf_prune
    reloaded = hf_prune.from_pretrained(tmp_path / "m", tf.BertForSequenceClassification)
    assert not hasattr(reloaded.config, "auto_map") and "modules" not in reloaded.config.hf_prune
    # pruned further, it is described afresh
    hf_prune.prune_heads(reloaded, {2: [1]})
    hf_prune.save_pretrained(reloaded, tmp_path / "m2")
    saved2 = json.loads((tmp_path / "m2" / "config.json").read_text())
    assert saved2["hf_prune"]["modules"]["encoder.layer.2.attention.self"]["attrs"]["num_attention_heads"] == 3
    # the shipped file is hf_prune.structure.remote_code itself, which imports neither hf_prune nor anything but
    # torch/transformers
    text = (tmp_path / "m" / MODELING_FILE).read_text()
    imports = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            imports |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):  # a relative import (level > 0) would need a package around it
            imports.add("." * node.level + (node.module or "").split(".")[0])
    assert imports <= {"__future__", "typing", "torch", "transformers"}, imports


def test_uniform_pruning_needs_no_remote_code(tmp_path):
    model = make_model(FAMILIES["llama"], tf.LlamaForCausalLM)
    hf_prune.prune_ffn(model, {i: list(range(8)) for i in range(3)})
    hf_prune.save_pretrained(model, tmp_path / "m")
    assert not (tmp_path / "m" / MODELING_FILE).exists()
    assert "auto_map" not in json.loads((tmp_path / "m" / "config.json").read_text())
    inputs = make_inputs(FAMILIES["llama"])
    stock = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(stock(**inputs).logits, model.eval()(**inputs).logits)


def test_a_model_loaded_through_the_runtime_can_be_pruned_and_saved_again(tmp_path):
    model = _non_uniform_bert()
    hf_prune.save_pretrained(model, tmp_path / "m")
    remote = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    hf_prune.prune_ffn(remote, {0: [0, 1]})
    inputs = make_inputs(FAMILIES["bert"])
    hf_prune.save_pretrained(remote, tmp_path / "m2")
    again = hf_prune.from_pretrained(tmp_path / "m2", tf.AutoModelForSequenceClassification).eval()
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, remote(**inputs).logits)
    assert [s["ffn"] for s in again.config.hf_prune["layers"]] == [38, 32, 0]


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 64, 1001])
def test_bit_packing_round_trips(numel):
    mask = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 7) // 8
    assert torch.equal(unpack_bits(packed, numel), mask)


def _sparsify(model: torch.nn.Module, density: float, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for linear in hf_prune.get_adapter(model).all_block_linears(model):
            linear.weight.mul_(torch.rand(linear.weight.shape, generator=g) < density)


def _bert_base_proportions(**kw) -> tf.BertConfig:
    # BERT-base proportions (embeddings ~22% of the weights) at 1/6 the width: file-size ratios as for BERT-base
    return tf.BertConfig(
        vocab_size=5087, hidden_size=128, num_hidden_layers=12, num_attention_heads=2, intermediate_size=512, **kw
    )


def _files_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.endswith(".safetensors"))


def test_a_90_percent_sparse_bert_is_stored_in_at_most_035_of_the_dense_file_and_reloads_exactly(tmp_path):
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(_bert_base_proportions()).eval()
    _sparsify(model, 0.1)
    hf_prune.save_pretrained(model, tmp_path / "dense")
    hf_prune.save_pretrained(model, tmp_path / "sparse", sparse=True)
    ratio = _files_bytes(tmp_path / "sparse") / _files_bytes(tmp_path / "dense")
    assert ratio <= 0.35, ratio
    assert not (tmp_path / "sparse" / "model.safetensors").exists()
    loaded = hf_prune.from_pretrained(tmp_path / "sparse", tf.BertForSequenceClassification)
    want = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    # a stock loader stops instead of initialising random weights
    with pytest.raises(OSError, match=r"model\.safetensors|pytorch_model\.bin"):
        tf.BertForSequenceClassification.from_pretrained(tmp_path / "sparse")


def test_sparse_files_shrink_with_density_and_keep_dtype_sharding_and_structure(tmp_path):
    sizes = {}
    for density in (0.5, 0.3, 0.1):
        torch.manual_seed(0)
        model = tf.BertForSequenceClassification(_bert_base_proportions()).eval()
        _sparsify(model, density)
        hf_prune.save_pretrained(model, tmp_path / f"d{density}", sparse=True)
        sizes[density] = _files_bytes(tmp_path / f"d{density}")
    assert sizes[0.5] > sizes[0.3] > sizes[0.1]
    # structured + 2:4 sparse, bfloat16, sharded: restored exactly, shapes and all
    model = _non_uniform_bert()
    hf_prune.prune(model, hf_prune.PruningConfig(pattern="2:4", sparsity_scope="layer"))
    model = model.to(torch.bfloat16)
    hf_prune.save_pretrained(model, tmp_path / "shards", sparse=True, max_shard_size="20KB")
    assert (tmp_path / "shards" / SPARSE_INDEX).exists()
    assert not (tmp_path / "shards" / MODELING_FILE).exists()  # stock loaders cannot read the sparse layout
    loaded = hf_prune.from_pretrained(tmp_path / "shards", tf.BertForSequenceClassification, dtype=torch.bfloat16)
    want, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    inputs = make_inputs(FAMILIES["bert"])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**inputs).logits, model.eval()(**inputs).logits)


def test_a_sparse_causal_lm_keeps_its_generation_config(tmp_path):
    model = make_model(FAMILIES["llama"], tf.LlamaForCausalLM)
    model.generation_config.max_new_tokens = 7
    _sparsify(model, 0.2)
    hf_prune.save_pretrained(model, tmp_path / "m", sparse=True)
    loaded = hf_prune.from_pretrained(tmp_path / "m", tf.AutoModelForCausalLM)
    assert loaded.generation_config.max_new_tokens == 7
    inputs = make_inputs(FAMILIES["llama"], padded=False)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**inputs).logits, model.eval()(**inputs).logits)


def test_sparse_and_safe_serialization_false_conflict(tmp_path):
    model = make_model(FAMILIES["bert"])
    with pytest.raises(ValueError, match="safe_serialization"):
        hf_prune.save_pretrained(copy.deepcopy(model), tmp_path / "m", sparse=True, safe_serialization=False)
    assert not (tmp_path / "m").exists()


# ---- ONNX export -------------------------------------------------------------------------------------------
def _exported(tmp_path, model, int8=False):
    from hf_prune.io.onnx import export_onnx

    hf_prune.save_pretrained(model, tmp_path / "m")
    return export_onnx(tmp_path / "m", tmp_path / ("int8" if int8 else "fp32"), int8=int8)


@pytest.mark.parametrize(
    ("family", "cls"),
    [("bert", tf.BertForSequenceClassification), ("llama", tf.LlamaForCausalLM), ("gpt2", tf.GPT2LMHeadModel)],
)
def test_onnx_export_of_a_non_uniform_model_matches_pytorch_on_new_shapes(tmp_path, family, cls):
    pytest.importorskip("onnxruntime", reason="the onnx extra is part of the test install (make test)")
    from hf_prune.io.onnx import onnx_session, run_onnx

    model = make_model(FAMILIES[family], cls)
    from hf_prune.structure.surgery import prune_structure
    from hf_prune.testing import conformance_request

    prune_structure(model, *conformance_request(model))  # uneven layers, one attention and one FFN emptied
    report = _exported(tmp_path, model)
    assert report.max_abs_diff <= 1e-4 * max(1.0, report.output_scale) and report.outputs[0] == "logits"
    assert (tmp_path / "fp32" / "config.json").exists() and (tmp_path / "fp32" / "export_report.json").exists()
    # a batch and length the export never saw
    inputs = make_inputs(FAMILIES[family], batch=4, seq=19)
    with torch.no_grad():
        want = model.eval()(**inputs).logits
    got = run_onnx(onnx_session(report.path), inputs)[0]
    valid = inputs["attention_mask"].bool()
    if want.dim() == 3:
        want, got = want[valid], got[valid]
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_exporting_a_model_object_leaves_the_callers_model_as_it_was(tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnx extra is part of the test install (make test)")
    from hf_prune.io.onnx import export_onnx

    model = _non_uniform_bert().to(torch.bfloat16).train()
    report = export_onnx(model, tmp_path / "onnx")
    assert report.max_abs_diff <= 1e-4 * max(1.0, report.output_scale)
    assert model.training and {p.dtype for p in model.parameters()} == {torch.bfloat16}


def int8_test_model() -> tf.BertForSequenceClassification:
    """A pruned 4-layer BERT whose logits vary with the input by about 0.3: its initial weights are wider than
    BERT's 0.02, so int8 errors are measured against a scale that a broken quantization would visibly miss."""
    torch.manual_seed(0)
    config = _bert_base_proportions(num_labels=3, initializer_range=0.05)
    config.num_hidden_layers = 4
    model = tf.BertForSequenceClassification(config).eval()
    hf_prune.prune_heads(model, {0: [0], 2: [1]})
    return model


def assert_int8_close(got: torch.Tensor, want: torch.Tensor, rel: float = 0.15) -> None:
    """An int8 model's logits ``got`` against its float model's ``want`` (examples, classes), on the scale of what
    the inputs change: every logit within ``rel`` of the largest deviation of a logit from its class mean over the
    examples (a constant output, as from zeroed or wildly mis-scaled weights, is off by at least half of that), and
    the predicted class the same wherever the float model's margin is clear (above a tenth of that scale)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    spread = float((want - want.mean(0)).abs().max())
    err = float((got - want).abs().max())
    assert spread > 0.1, f"the float model's logits barely depend on the input ({spread:.3g}): no test of int8"
    assert err <= rel * spread, f"int8 logits off by {err:.3g}, {err / spread:.1%} of their spread {spread:.3g}"
    top2 = want.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.1 * spread
    assert int(clear.sum()) >= want.shape[0] // 2, "too few examples with a clear margin to compare predictions"
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_int8_onnx_and_torch_int8_shrink_the_model_and_mostly_agree(tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnx extra is part of the test install (make test)")
    from hf_prune.io.onnx import onnx_session, run_onnx, torch_int8

    model = int8_test_model()
    config = model.config
    fp32 = _exported(tmp_path, model)
    int8 = _exported(tmp_path, model, int8=True)
    assert int8.int8 and int8.atol is None and int8.size_bytes < 0.4 * fp32.size_bytes
    # the export's own check (its sample inputs): close on the logits' scale, the predicted class mostly kept
    assert int8.max_abs_diff <= 0.1 * int8.output_scale and int8.agreement >= 0.6, int8
    inputs = {k: v.clamp(max=config.vocab_size - 1) for k, v in make_inputs(FAMILIES["bert"], batch=8).items()}
    with torch.no_grad():
        want = model(**inputs).logits
        quantized = torch_int8(model)
        got_torch = quantized(**inputs).logits
    got_onnx = run_onnx(onnx_session(int8.path), inputs)[0]
    assert_int8_close(got_torch, want)
    assert_int8_close(got_onnx, want)
    assert any(type(m).__name__ == "Linear" and "quantized" in type(m).__module__ for m in quantized.modules())


def test_cli_export_writes_the_graph_and_says_how_close_it_is(tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="the onnx extra is part of the test install (make test)")
    from hf_prune.recipes.cli import main

    hf_prune.save_pretrained(_non_uniform_bert(), tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), "--output", str(tmp_path / "onnx")]) == 0
    out = capsys.readouterr().out
    assert "model.onnx (float32" in out and "(tolerance met)" in out
    saved = json.loads((tmp_path / "onnx" / "export_report.json").read_text())
    assert saved["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert saved["checked_shapes"] == [[3, 11], [2, 23]]
    assert main(["export", str(tmp_path / "missing"), "--output", str(tmp_path / "x")]) == 1
    assert not (tmp_path / "x").exists()


def test_export_without_onnx_installed_says_what_to_install(tmp_path, monkeypatch):
    from hf_prune.io import onnx as export

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install 'hf_prune\[onnx\]'"):
        export.export_onnx(_non_uniform_bert(), tmp_path / "o")
    assert not (tmp_path / "o").exists()
