"""vLLM export (hf_prune.io.vllm): the folder's config and tensors, its refusals, and vLLM serving it.

Fast tests read the written folder (``config.json``, the safetensors, the ``nemotron-nas`` config class loaded as
remote code) and check that refused exports write nothing. ``engine`` tests serve the exports in vLLM
(``.venv-vllm``, ``make serve-install``) through ``vllm_runner.py`` and compare greedy tokens and perplexity with
transformers; they skip without vLLM unless ``HF_PRUNE_REQUIRE_ENGINES=1``. One vLLM start per test (about a minute
on two cores): every test sends all its prompts and windows in one request.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers

import hf_prune
from hf_prune.io.engines import SCRIPTS, EngineUnavailable, engine_python, run_engine
from hf_prune.io.vllm import CONFIG_FILE, VllmBlock, export_vllm, vllm_blocks
from tests.engine_reference import PROMPTS, nll, ppl, wikitext_windows

ROOT = Path(__file__).resolve().parents[1]
S = hf_prune.LayerShape


def _tiny(config_cls=tf.LlamaConfig, layers=5, **kw):
    base = dict(
        vocab_size=300,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # vLLM's CPU attention takes head sizes 32, 64, 80...
        max_position_embeddings=128,
        tie_word_embeddings=True,
        initializer_range=0.3,  # decisive logits: greedy tokens do not hinge on float rounding
    )
    base.update(kw)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config_cls(**base)).eval()


def _random_biases(model):
    """Biases drawn at random (transformers initialises them to zero, which would hide a misplaced one)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _servable(model):
    """Block 0 without attention, block 2 narrower, block 3 without MLP, block 4 empty (the identity)."""
    hf_prune.prune_heads(model, {0: list(range(4)), 4: list(range(4))})
    hf_prune.prune_ffn(model, {2: list(range(64)), 3: list(range(256)), 4: list(range(256))})
    return model


def _tensors(folder):
    with safe_open(Path(folder) / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)


def _word_tokenizer():
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(297))])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


# ---------------------------------------------------------------------------------------------------------
# fast: config, tensors, refusals
# ---------------------------------------------------------------------------------------------------------


def test_servable_llama_is_written_as_nemotron_nas_with_per_block_configs(tmp_path):
    model = _servable(_tiny())
    out = export_vllm(model, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    assert config["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig"} and "hf_prune" not in config
    assert (config["num_attention_heads"], config["head_dim"], config["num_hidden_layers"]) == (4, 32, 4)
    assert config["tie_word_embeddings"] and config["rms_norm_eps"] == model.config.rms_norm_eps
    assert config["rope_parameters"] == model.config.rope_parameters
    attention = [(b["attention"]["no_op"], b["attention"]["n_heads_in_group"]) for b in config["block_configs"]]
    ffn = [(b["ffn"]["no_op"], b["ffn"]["intermediate_size"]) for b in config["block_configs"]]
    # block 0's attention is the zero stand-in with one key/value head; block 4 (no sublayer left) is gone
    assert attention == [(False, 4), (False, 2), (False, 2), (False, 2)]
    assert ffn == [(False, 256), (False, 256), (False, 192), (True, None)]
    tensors = _tensors(out)
    assert "lm_head.weight" not in tensors  # tied: vLLM ties it to the embedding
    assert not tensors["model.layers.0.self_attn.o_proj.weight"].any()
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (32, 128)
    assert not any(k.startswith(("model.layers.3.mlp", "model.layers.3.post_attention")) for k in tensors)
    assert not any(k.startswith("model.layers.4.") for k in tensors)
    source = model.state_dict()
    for k in ("model.layers.2.mlp.down_proj.weight", "model.layers.3.self_attn.k_proj.weight", "model.norm.weight"):
        assert torch.equal(tensors[k], source[k]), k


def test_nemotron_config_class_loads_as_remote_code_with_attribute_access(tmp_path):
    out = export_vllm(_servable(_tiny()), tmp_path / "out")
    assert (out / CONFIG_FILE).exists()
    config = tf.AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert type(config).__name__ == "DeciLMConfig" and config.model_type == "nemotron-nas"
    block = config.block_configs[3]  # how vLLM reads them
    assert block.attention.no_op is False and block.attention.n_heads_in_group == 2 and block.ffn.no_op is True
    assert not hasattr(block.ffn, "ffn_mult") and not hasattr(block.ffn, "hidden_act")  # vLLM's hasattr checks
    assert json.loads(config.to_json_string())["block_configs"][3]["ffn"]["no_op"] is True
    assert copy.deepcopy(config).block_configs[2].ffn.intermediate_size == 192


def test_blocks_drop_identities_and_give_the_first_block_attention():
    blocks = vllm_blocks([S(0, 0, 0), S(0, 0, 8), S(4, 2, 0), S(0, 0, 8), S(0, 0, 0)])
    assert blocks == [VllmBlock(1, "zero", 1, 8), VllmBlock(2, "real", 2, 0), VllmBlock(3, "none", 0, 8)]


def test_uniform_cut_is_the_stock_family_config_and_loads_without_hf_prune(tmp_path):
    model = _tiny(tie_word_embeddings=False)
    hf_prune.prune_heads(model, {i: [2, 3] for i in range(5)})  # one key/value group of every block
    hf_prune.prune_ffn(model, {i: list(range(0, 256, 4)) for i in range(5)})
    hf_prune.prune_layers(model, [3])
    out = export_vllm(model, tmp_path / "out", tokenizer=_word_tokenizer())
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert "hf_prune" not in config and "auto_map" not in config and not (out / CONFIG_FILE).exists()
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 32)
    assert (config["intermediate_size"], config["num_hidden_layers"]) == (192, 4)
    assert "lm_head.weight" in _tensors(out)  # not tied here
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    stock = tf.LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.arange(3, 40)[None]
    with torch.inference_mode():
        assert torch.equal(stock(ids).logits, model(ids).logits)


def test_qwen2_keeps_qkv_biases_and_no_o_proj_bias(tmp_path):
    model = _servable(_random_biases(_tiny(tf.Qwen2Config, use_sliding_window=False)))
    out = export_vllm(model, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["qkv_bias"] is True and config["attention_bias"] is False  # vLLM: qkv_bias wins for q/k/v
    tensors = _tensors(out)
    assert {"model.layers.1.self_attn.q_proj.bias", "model.layers.1.self_attn.v_proj.bias"} <= set(tensors)
    assert not tensors["model.layers.0.self_attn.q_proj.bias"].any()  # the zero stand-in has zero biases
    assert not any(k.endswith("o_proj.bias") for k in tensors)


def test_export_from_a_saved_folder_copies_the_tokenizer_and_casts(tmp_path):
    model = _servable(_tiny())
    hf_prune.save_pretrained(model, tmp_path / "saved", tokenizer=_word_tokenizer())
    out = export_vllm(tmp_path / "saved", tmp_path / "out", dtype="bfloat16")
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    assert not any(p.name.startswith("hf_prune") for p in out.iterdir())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in _tensors(out).values()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="not a floating-point"):
        export_vllm(model, tmp_path / "int", dtype="int8")


def _refused(model, tmp_path, match):
    (tmp_path / "out").mkdir(parents=True)
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(ValueError, match=match):
        export_vllm(model, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "keep.txt").read_text() == "old"


def test_free_layout_is_refused_before_anything_is_written(tmp_path):
    model = _tiny()
    hf_prune.prune_heads(model, {1: [0, 1]})  # 2 query heads in block 1, 4 elsewhere
    _refused(model, tmp_path, r"vLLM .*'servable' layout.*'free': block 1 has 2 query heads.*layout='servable'")


def test_families_nemotron_nas_cannot_compute_are_refused_unless_uniform(tmp_path):
    model = _tiny(tf.Qwen3Config)
    hf_prune.prune_ffn(model, {1: list(range(64))})
    _refused(model, tmp_path, r"qwen3.*q_norm/k_norm.*'uniform' layout.*block 1 .*layout='uniform'")
    uniform = _tiny(tf.Qwen3Config)
    hf_prune.prune_ffn(uniform, {i: list(range(64)) for i in range(5)})
    out = export_vllm(uniform, tmp_path / "uniform")
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3"


def test_sliding_windows_and_biases_of_removed_sublayers_are_refused(tmp_path):
    mistral = _servable(_tiny(tf.MistralConfig, sliding_window=16))
    _refused(mistral, tmp_path / "a", "16-token sliding window")
    biased = _tiny(mlp_bias=True)
    torch.nn.init.normal_(biased.model.layers[1].mlp.down_proj.bias)
    hf_prune.prune_ffn(biased, {1: list(range(256))})  # the removed MLP still adds down_proj's bias
    _refused(
        biased, tmp_path / "b", r"block 1's removed MLP still adds its output bias \(mlp.down_proj.bias, not zero\)"
    )


def test_runner_is_standalone_and_sizes_the_context_to_the_request():
    source = (SCRIPTS / "vllm_runner.py").read_text()
    imported = {
        (n.module or "") if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(ast.parse(source))
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    }
    assert not any(name.startswith(("hf_prune", ".")) or name == "" for name in imported)
    spec = importlib.util.spec_from_file_location("vllm_runner", SCRIPTS / "vllm_runner.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)  # vLLM is imported only when serving
    request = {"prompts": [[1] * 70], "max_tokens": 16, "windows": [[1] * 100], "timing": {"prompt_len": 8}}
    assert runner._max_model_len(request) == 128


# ---------------------------------------------------------------------------------------------------------
# engine: vLLM serves the exports
# ---------------------------------------------------------------------------------------------------------


def _require_vllm() -> None:
    try:
        engine_python("vllm")
    except EngineUnavailable as err:
        if os.environ.get("HF_PRUNE_REQUIRE_ENGINES") == "1":
            pytest.fail(f"HF_PRUNE_REQUIRE_ENGINES=1 but vLLM is missing: {err}")
        pytest.skip(f"vLLM engine not installed (make serve-install): {err}")


def _greedy(model, prompts, n=16):
    with torch.inference_mode():
        return [
            model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)[
                0, len(p) :
            ].tolist()
            for p in prompts
        ]


@pytest.fixture(scope="module")
def smollm2():
    from hf_prune.recipes.offline import smollm2_path

    _require_vllm()
    folder, gguf_file = smollm2_path()
    model = hf_prune.from_pretrained(folder, tf.AutoModelForCausalLM, gguf_file=gguf_file, dtype=torch.float32)
    return model.eval(), tf.AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)


def _serve_and_compare(model, tokenizer, folder, windows=4):
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    request = {"model": str(folder), "prompts": prompts, "max_tokens": 16}
    windows = wikitext_windows(tokenizer, n=windows) if windows else []
    answer = run_engine("vllm", {**request, "windows": windows} if windows else request)
    assert answer["generated"] == _greedy(model, prompts)  # 3 of 3 prompts, 16 tokens each
    if windows:
        ours, theirs = ppl(nll(model, windows), [len(w) - 1 for w in windows]), ppl(answer["nll"], answer["scored"])
        assert answer["scored"] == [len(w) - 1 for w in windows]
        assert abs(theirs / ours - 1) < 0.01, (ours, theirs)


@pytest.mark.engine
@pytest.mark.real
def test_vllm_serves_servable_smollm2_like_transformers(smollm2, tmp_path):
    model, tokenizer = smollm2
    model = copy.deepcopy(model)
    hf_prune.prune_heads(model, {5: list(range(9))})  # block 5 loses its attention
    hf_prune.prune_ffn(model, {2: list(range(512)), 10: list(range(768)), 25: list(range(1024))})  # 1024/768/512
    hf_prune.prune_layers(model, [20])
    hf_prune.save_pretrained(model, tmp_path / "saved", tokenizer=tokenizer)
    out = export_vllm(tmp_path / "saved", tmp_path / "vllm")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 29 and config["block_configs"][5]["attention"]["no_op"]
    assert (out / "tokenizer.json").exists()
    _serve_and_compare(model, tokenizer, out)


@pytest.mark.engine
@pytest.mark.real
def test_vllm_serves_uniform_smollm2_as_plain_llama(smollm2, tmp_path):
    model, tokenizer = smollm2
    model = copy.deepcopy(model)
    hf_prune.prune_ffn(model, {i: list(range(0, 1536, 6)) for i in range(30)})  # 1280 neurons everywhere
    out = export_vllm(model, tmp_path / "vllm", tokenizer=tokenizer)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["intermediate_size"] == 1280
    _serve_and_compare(model, tokenizer, out, windows=2)


@pytest.mark.engine
def test_vllm_serves_servable_qwen2_with_biases_and_times_it(tmp_path):
    _require_vllm()
    model = _servable(_random_biases(_tiny(tf.Qwen2Config, use_sliding_window=False)))
    hf_prune.prune_layers(model, [1])
    out = export_vllm(model, tmp_path / "vllm", tokenizer=_word_tokenizer())
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 9, 13)]
    windows = [torch.randint(3, 300, (48,), generator=g).tolist() for _ in range(2)]
    timing = {"batch": 2, "prompt_len": 16, "new_tokens": 8, "repeats": 2}
    request = {"model": str(out), "prompts": prompts, "max_tokens": 16, "windows": windows, "timing": timing}
    answer = run_engine("vllm", request)
    assert answer["generated"] == _greedy(model, prompts)
    assert answer["nll"] == pytest.approx(nll(model, windows), rel=1e-4)
    assert len(answer["timing"]["prefill_s"]) == len(answer["timing"]["decode_tokens_per_s"]) == 2
    assert all(v > 0 for v in answer["timing"]["prefill_s"] + answer["timing"]["decode_tokens_per_s"])
    assert answer["engine_version"].startswith("0.")


def test_cli_exports_a_saved_folder_for_vllm_and_says_how_to_serve_it(tmp_path, capsys):
    from hf_prune.recipes.cli import main

    hf_prune.save_pretrained(_servable(_tiny()), tmp_path / "servable")
    assert main(["export", str(tmp_path / "servable"), "--format", "vllm", "--output", str(tmp_path / "a")]) == 0
    assert "--trust-remote-code" in capsys.readouterr().out
    assert json.loads((tmp_path / "a" / "config.json").read_text())["model_type"] == "nemotron-nas"
    uniform = _tiny()
    hf_prune.prune_heads(uniform, {i: [0, 1] for i in range(uniform.config.num_hidden_layers)})  # one KV group
    hf_prune.save_pretrained(uniform, tmp_path / "uniform")
    assert main(["export", str(tmp_path / "uniform"), "--format", "vllm", "--output", str(tmp_path / "b")]) == 0
    assert "--trust-remote-code" not in capsys.readouterr().out
    assert json.loads((tmp_path / "b" / "config.json").read_text())["model_type"] == "llama"
    assert not (tmp_path / "b" / CONFIG_FILE).exists()
