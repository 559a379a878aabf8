"""GGUF export for llama.cpp (hf_prune.io.gguf): the file read back, and llama.cpp running it.

Fast tests read the written file with ``gguf.GGUFReader`` (metadata, tensor shapes, the q/k permutation against
independent references, the vocabulary) and check that refused exports write nothing. ``real`` tests compare an
export of the untouched SmolLM2 with the llama.cpp-made GGUF it ships as. ``engine`` tests run the exports in
llama.cpp (``.venv-llamacpp``, ``make serve-install``): they skip without it unless ``HF_PRUNE_REQUIRE_ENGINES=1``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import hf_prune
from hf_prune.io import gguf_vocab
from hf_prune.io.engines import EngineUnavailable, engine_python, run_engine
from hf_prune.io.gguf import GGUFBlock, export_gguf, gguf_blocks, permute_rope
from tests.engine_reference import PROMPTS, nll, ppl, wikitext_windows

ROOT = Path(__file__).resolve().parents[1]
TEXT = "The quick brown fox jumps over the lazy dog. " * 20 + "Numbers 12345 and 3.14, code x = f(y) + 1!"


# ---------------------------------------------------------------------------------------------------------
# tiny models and a tiny byte-level BPE tokenizer
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_tokenizer():
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator([TEXT, "hello world, structured pruning of transformers"] * 5, trainer)
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )


def _tiny(config_cls=tf.LlamaConfig, layers=4, **kw):
    base = dict(
        vocab_size=416,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )
    base.update(kw)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config_cls(**base)).eval()


def _servable(model):
    """Block 0 without attention, block 1 without MLP, block 2 narrower, the last block without MLP."""
    last = model.config.num_hidden_layers - 1
    hf_prune.prune_heads(model, {0: [0, 1, 2, 3]})
    hf_prune.prune_ffn(model, {1: list(range(96)), 2: list(range(40)), last: list(range(96))})
    return model


def _fields(path):
    reader = gguf.GGUFReader(path)
    return reader, {k: v.contents() for k, v in reader.fields.items() if not k.startswith("GGUF.")}


# ---------------------------------------------------------------------------------------------------------
# fast: metadata, tensors, permutation, vocabulary, refusals
# ---------------------------------------------------------------------------------------------------------


def test_servable_model_is_written_as_deci_with_per_block_arrays(tmp_path, bpe_tokenizer):
    model = _servable(_tiny())
    shapes = hf_prune.get_adapter(model).layer_shapes(model)
    path = export_gguf(model, tmp_path / "m.gguf", gguf_type="f32", tokenizer=bpe_tokenizer)
    reader, fields = _fields(path)
    assert fields["general.architecture"] == "deci"
    blocks = gguf_blocks(shapes, 4)
    # removed sublayers are 0, except block 0's attention (linear stand-in) and MLP-less blocks that keep attention
    assert blocks == [
        GGUFBlock(4, 0, 96, "zero_linear", "real"),
        GGUFBlock(4, 2, 1, "real", "zero"),
        GGUFBlock(4, 2, 56, "real", "real"),
        GGUFBlock(4, 2, 1, "real", "zero"),
    ]
    assert fields["deci.attention.head_count"] == [b.heads for b in blocks]
    assert fields["deci.attention.head_count_kv"] == [0, 2, 2, 2]
    assert fields["deci.feed_forward_length"] == [96, 1, 56, 1]
    assert fields["deci.attention.key_length"] == fields["deci.rope.dimension_count"] == 16
    tensors = {t.name: t for t in reader.tensors}
    assert "blk.0.attn_q.weight" not in tensors and not np.asarray(tensors["blk.0.attn_output.weight"].data).any()
    assert not np.asarray(tensors["blk.1.ffn_down.weight"].data).any()
    for i, s in enumerate(shapes):  # GGUF lists dimensions innermost first: (in, out)
        if s.heads:
            assert list(tensors[f"blk.{i}.attn_q.weight"].shape) == [64, s.heads * 16]
            assert list(tensors[f"blk.{i}.attn_k.weight"].shape) == [64, s.kv_heads * 16]
        if s.ffn:
            assert list(tensors[f"blk.{i}.ffn_down.weight"].shape) == [s.ffn, 64]
    assert list(tensors["output.weight"].shape) == [64, 416]


def test_blocks_without_both_sublayers_stay_empty_except_where_llama_cpp_needs_a_stand_in():
    s = hf_prune.LayerShape
    blocks = gguf_blocks([s(4, 2, 8), s(0, 0, 0), s(0, 0, 8), s(0, 0, 0)], 4)
    assert [(b.heads, b.kv_heads, b.ffn) for b in blocks] == [(4, 2, 8), (0, 0, 0), (0, 0, 8), (0, 0, 1)]


def test_uniform_model_is_written_as_llama_and_q8_0_quantizes(tmp_path, bpe_tokenizer):
    model = _tiny()
    hf_prune.prune_heads(model, {i: [2, 3] for i in range(4)})  # one key/value group per block: 2 heads of 16
    hf_prune.prune_ffn(model, {i: list(range(32)) for i in range(4)})
    path = export_gguf(model, tmp_path / "m.gguf", gguf_type="q8_0", tokenizer=bpe_tokenizer)
    reader, fields = _fields(path)
    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == 7
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (2, 1)
    assert (fields["llama.feed_forward_length"], fields["llama.attention.key_length"]) == (64, 16)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    q = reader.tensors[[t.name for t in reader.tensors].index("blk.0.ffn_up.weight")]
    dequantized = gguf.quants.dequantize(q.data, q.tensor_type)
    weight = model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    assert np.abs(dequantized - weight).max() <= np.abs(weight).max() / 127  # q8_0: int8 blocks with one scale


def test_qk_permutation_matches_rope_reference_and_transformers_inverse(tmp_path, bpe_tokenizer):
    """llama.cpp rotates adjacent pairs (2i, 2i+1), Hugging Face the halves (i, i + d/2): scores computed both ways
    agree once q/k rows are permuted, and transformers' own GGUF loader undoes the permutation of the file."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    heads, dim, pos = 3, 8, torch.arange(5)
    q, k = torch.randn(heads, 5, dim), torch.randn(heads, 5, dim)
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    angle = pos[:, None] * inv[None]  # (pos, dim/2)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    hf = tf.models.llama.modeling_llama.apply_rotary_pos_emb(q[None], k[None], cos[None], sin[None])

    def interleaved(x):  # ggml_rope NORM mode
        pairs = x.reshape(*x.shape[:-1], dim // 2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack([a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()], -1).flatten(-2)

    def permuted(x):  # rows of a (heads * dim) projection output, permuted as the export does
        return torch.from_numpy(permute_rope(x.permute(1, 0, 2).reshape(5, -1).T.numpy(), heads).T.copy())

    qp, kp = (permuted(x).reshape(5, heads, dim).permute(1, 0, 2) for x in (q, k))
    expected = hf[0][0] @ hf[1][0].transpose(-1, -2)
    assert torch.allclose(interleaved(qp) @ interleaved(kp).transpose(-1, -2), expected, atol=1e-5)

    model = _servable(_tiny(tf.Qwen2Config))  # q/k biases are permuted too
    path = export_gguf(model, tmp_path / "m.gguf", gguf_type="f32", tokenizer=bpe_tokenizer)
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    undo = LlamaTensorProcessor()._reverse_permute_weights
    attn = model.model.layers[2].self_attn
    for name, module, n in (("attn_q", attn.q_proj, 4), ("attn_k", attn.k_proj, 2)):
        for part in ("weight", "bias"):
            original = getattr(module, part).detach().numpy()
            assert np.array_equal(undo(tensors[f"blk.2.{name}.{part}"], n, n), original)


def test_vocabulary_reads_back_as_the_same_tokenizer(tmp_path, bpe_tokenizer):
    model = _tiny(layers=1)
    path = export_gguf(model, tmp_path / "m.gguf", gguf_type="f16", tokenizer=bpe_tokenizer)
    _, fields = _fields(path)
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == 416 and tokens[-1] == "[PAD415]" and types[-1] == gguf.TokenType.UNUSED
    vocab = bpe_tokenizer.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())
    assert types[vocab["<|im_end|>"]] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.bos_token_id"] == bpe_tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == bpe_tokenizer.eos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert len(fields["tokenizer.ggml.merges"]) == len(
        json.loads(bpe_tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    )
    back = tf.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")  # transformers' GGUF tokenizer reader
    for text in (TEXT, "hello world", "pruning 42 transformers!"):
        assert back(text).input_ids == bpe_tokenizer(text).input_ids


def test_unknown_pre_tokenizer_falls_back_to_default_with_a_warning(bpe_tokenizer, monkeypatch):
    tokenizer = copy.deepcopy(bpe_tokenizer)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    warnings = []
    monkeypatch.setattr(gguf_vocab.logger, "warning", warnings.append)
    assert gguf_vocab.pre_tokenizer_name(tokenizer) == "default"
    assert warnings and "default" in warnings[0]


def test_refused_exports_write_nothing(tmp_path, bpe_tokenizer):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"gguf_type='q4'.*allowed: f32, f16, q8_0"):
        export_gguf(_tiny(), out / "m.gguf", gguf_type="q4", tokenizer=bpe_tokenizer)
    free = _tiny()
    hf_prune.prune_heads(free, {1: [2, 3]})  # 2 query heads in block 1, 4 elsewhere
    with pytest.raises(ValueError, match=r"block 1 has 2 query heads.*layout='servable'"):
        export_gguf(free, out / "m.gguf", tokenizer=bpe_tokenizer)
    qwen3 = _tiny(tf.Qwen3Config, head_dim=16)
    with pytest.raises(ValueError, match=r"model_type='qwen3'.*q/k norms"):
        export_gguf(qwen3, out / "m.gguf", tokenizer=bpe_tokenizer)
    assert not out.exists()


def test_failed_write_leaves_the_previous_file(tmp_path, bpe_tokenizer, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"old")

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(_tiny(layers=1), path, tokenizer=bpe_tokenizer)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


# ---------------------------------------------------------------------------------------------------------
# real SmolLM2: the export of the untouched model equals the llama.cpp-made GGUF it ships as
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    from hf_prune.recipes.offline import smollm2_path

    folder, gguf_file = smollm2_path()
    model = hf_prune.from_pretrained(folder, tf.AutoModelForCausalLM, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = tf.AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    return model.eval(), tokenizer, Path(folder) / gguf_file


@pytest.mark.real
def test_smollm2_export_matches_llama_cpp_own_conversion(tmp_path, smollm2):
    model, tokenizer, shipped = smollm2
    ours = gguf.GGUFReader(export_gguf(model, tmp_path / "m.gguf", gguf_type="f32", tokenizer=tokenizer))
    theirs = gguf.GGUFReader(shipped)
    mine = {t.name: t for t in ours.tensors}
    assert set(mine) == {t.name for t in theirs.tensors}
    for t in theirs.tensors:  # the weights transformers unpacked from this file, written back: bit-identical
        expected = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.array_equal(np.asarray(mine[t.name].data).reshape(expected.shape), expected), t.name
    skip = {"general.name", "general.file_type", "general.quantization_version"}
    for key, field in theirs.fields.items():
        if key.startswith(("llama.", "tokenizer.")) and key not in skip:
            assert ours.fields[key].contents() == field.contents(), key


# ---------------------------------------------------------------------------------------------------------
# engine: llama.cpp runs the exports
# ---------------------------------------------------------------------------------------------------------


def _require_llamacpp() -> Path:
    try:
        return engine_python("llamacpp")
    except EngineUnavailable as err:
        if os.environ.get("HF_PRUNE_REQUIRE_ENGINES") == "1":
            pytest.fail(f"HF_PRUNE_REQUIRE_ENGINES=1 but llama.cpp is missing: {err}")
        pytest.skip(f"llama.cpp engine not installed (make serve-install): {err}")


def _greedy(model, prompts, n=16):
    """``n`` argmax tokens after each prompt (EOS does not stop it, as in the runner). Each step runs the whole
    sequence: transformers' KV cache reads the sequence length off block 0's cache, which a block 0 without
    attention leaves empty."""
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            for _ in range(n):
                ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
            out.append(ids[0, len(prompt) :].tolist())
    return out


@pytest.fixture(scope="module")
def servable_smollm2(smollm2, tmp_path_factory):
    """SmolLM2 pruned by hand into the servable layout, saved, exported f32 and q8_0, and its reference outputs."""
    _require_llamacpp()
    model, tokenizer, _ = smollm2
    model = copy.deepcopy(model)
    hf_prune.prune_heads(model, {5: list(range(9))})
    hf_prune.prune_ffn(model, {2: list(range(512)), 10: list(range(768)), 25: list(range(1024))})
    hf_prune.prune_layers(model, [20])
    folder = tmp_path_factory.mktemp("servable")
    hf_prune.save_pretrained(model, folder / "model", tokenizer=tokenizer)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    windows = wikitext_windows(tokenizer)
    return {
        "model": model,
        "folder": folder,
        "f32": export_gguf(folder / "model", folder / "f32.gguf", gguf_type="f32"),
        "prompts": prompts,
        "windows": windows,
        "greedy": _greedy(model, prompts),
        "nll": nll(model, windows),
    }


@pytest.mark.engine
@pytest.mark.real
def test_llama_cpp_runs_servable_smollm2_like_transformers(servable_smollm2):
    s = servable_smollm2
    fields = _fields(s["f32"])[1]
    shapes = hf_prune.get_adapter(s["model"]).layer_shapes(s["model"])
    assert fields["general.architecture"] == "deci" and fields["deci.block_count"] == 29
    assert fields["deci.attention.head_count"] == [s.heads for s in shapes]
    assert fields["deci.feed_forward_length"] == [s.ffn for s in shapes]
    request = {"model": str(s["f32"]), "prompts": s["prompts"], "max_tokens": 16, "windows": s["windows"]}
    request["timing"] = {"batch": 1, "prompt_len": 32, "new_tokens": 8, "repeats": 1}
    answer = run_engine("llamacpp", request)
    matches = sum(a == b for a, b in zip(answer["generated"], s["greedy"], strict=True))
    print(f"llama.cpp f32 greedy matches transformers for {matches}/3 prompts")
    assert matches >= 2 and all(len(g) == 16 for g in answer["generated"])
    engine, reference = ppl(answer["nll"], answer["scored"]), ppl(s["nll"], [len(w) - 1 for w in s["windows"]])
    print(f"perplexity llama.cpp f32 {engine:.4f}, transformers {reference:.4f}")
    assert abs(engine / reference - 1) < 0.01
    assert answer["timing"]["decode_tokens_per_s"][0] > 0 and answer["timing"]["prefill_s"][0] > 0


@pytest.mark.engine
@pytest.mark.real
def test_llama_cpp_tokenizes_like_the_tokenizer(servable_smollm2, smollm2):
    tokenizer = smollm2[1]
    texts = [TEXT, "Hello, world! It's 2024-05-01; x=3.14159.", " = Robert <unk> = \n Robert is an actor ."]
    script = (
        "import json, sys, llama_cpp\n"
        "r = json.load(sys.stdin)\n"
        "m = llama_cpp.Llama(model_path=r['model'], vocab_only=True, verbose=False)\n"
        "print(json.dumps([m.tokenize(t.encode(), add_bos=False, special=False) for t in r['texts']]))\n"
    )
    request = json.dumps({"model": str(servable_smollm2["f32"]), "texts": texts})
    proc = subprocess.run(
        [str(_require_llamacpp()), "-c", script], input=request, capture_output=True, text=True, check=True
    )
    assert json.loads(proc.stdout.splitlines()[-1]) == [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


@pytest.mark.engine
@pytest.mark.real
def test_q8_0_stays_near_f32_perplexity(servable_smollm2):
    """q8_0 rounds each weight to 1/127 of its block's largest (|error| <= 0.4% of it): on this 135M model that
    moves perplexity by a fraction of a percent; 3% leaves room for the model's small size, not for a broken file."""
    s = servable_smollm2
    path = export_gguf(s["folder"] / "model", s["folder"] / "q8.gguf", gguf_type="q8_0")
    assert path.stat().st_size < 0.35 * s["f32"].stat().st_size
    answer = run_engine("llamacpp", {"model": str(path), "windows": s["windows"]})
    reference = ppl(s["nll"], [len(w) - 1 for w in s["windows"]])
    engine = ppl(answer["nll"], answer["scored"])
    print(f"perplexity llama.cpp q8_0 {engine:.4f}, transformers f32 {reference:.4f}", answer.get("note", ""))
    assert abs(engine / reference - 1) < 0.03


@pytest.mark.engine
@pytest.mark.real
def test_uniform_smollm2_cut_runs_as_llama(smollm2, tmp_path):
    """Two blocks dropped: still one stock shape, so the stock ``llama`` architecture (SmolLM2 loses most of its
    quality to any hand-picked FFN cut without recovery, and near-ties make greedy tokens a coin toss)."""
    _require_llamacpp()
    model, tokenizer, _ = smollm2
    model = copy.deepcopy(model)
    hf_prune.prune_layers(model, [20, 25])
    path = export_gguf(model, tmp_path / "u.gguf", gguf_type="f32", tokenizer=tokenizer)
    fields = _fields(path)[1]
    assert (fields["general.architecture"], fields["llama.block_count"]) == ("llama", 28)
    prompts, windows = [tokenizer(p).input_ids for p in PROMPTS], wikitext_windows(tokenizer, n=2)
    answer = run_engine("llamacpp", {"model": str(path), "prompts": prompts, "max_tokens": 16, "windows": windows})
    matches = sum(a == b for a, b in zip(answer["generated"], _greedy(model, prompts), strict=True))
    print(f"llama.cpp uniform cut greedy matches transformers for {matches}/3 prompts")
    assert matches >= 2
    reference = ppl(nll(model, windows), [len(w) - 1 for w in windows])
    assert abs(ppl(answer["nll"], answer["scored"]) / reference - 1) < 0.01


@pytest.mark.engine
def test_llama_cpp_runs_tiny_llama_with_fewer_heads_as_llama(tmp_path, bpe_tokenizer):
    """Uniformly fewer heads: 2 heads of 16 in a hidden size of 64, so llama.cpp must read the head size from
    ``key_length`` (not hidden / heads); Llama 3.1's RoPE scaling travels as the ``rope_freqs`` tensor."""
    _require_llamacpp()
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 32}
    model = _tiny(rope_parameters={**rope, "low_freq_factor": 1.0, "high_freq_factor": 4.0})
    hf_prune.prune_heads(model, {i: [0, 1] for i in range(4)})
    hf_prune.prune_ffn(model, {i: list(range(0, 96, 3)) for i in range(4)})
    path = export_gguf(model, tmp_path / "t.gguf", gguf_type="f32", tokenizer=bpe_tokenizer)
    reader, fields = _fields(path)
    assert fields["general.architecture"] == "llama"
    freqs = np.asarray(reader.tensors[[t.name for t in reader.tensors].index("rope_freqs.weight")].data)
    assert freqs.shape == (8,) and freqs.min() == 1.0 and freqs.max() == 8.0
    _assert_runs_like_transformers(model, path)


def _assert_runs_like_transformers(model, path):
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(3, 400, (3, 48), generator=g).tolist()
    prompts = [w[:8] for w in windows]
    answer = run_engine("llamacpp", {"model": str(path), "prompts": prompts, "max_tokens": 16, "windows": windows})
    assert answer["generated"] == _greedy(model, prompts)
    assert np.allclose(answer["nll"], nll(model, windows), rtol=1e-4)


@pytest.mark.engine
def test_llama_cpp_runs_servable_qwen2_with_biases_and_stand_ins(tmp_path, bpe_tokenizer):
    """Qwen2's q/k/v biases, fewer query heads in every block, block 0 without attention, MLP-less blocks (the last
    one too): every stand-in of gguf_blocks, run by llama.cpp against transformers."""
    _require_llamacpp()
    model = _tiny(tf.Qwen2Config, layers=5, tie_word_embeddings=True)
    with torch.no_grad():
        for block in model.model.layers:
            for proj in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    hf_prune.prune_heads(model, {i: [2, 3] for i in range(1, 5)})
    _servable(model)
    path = export_gguf(model, tmp_path / "q.gguf", gguf_type="f32", tokenizer=bpe_tokenizer)
    assert _fields(path)[1]["deci.attention.head_count"] == [2, 2, 2, 2, 2]
    _assert_runs_like_transformers(model, path)


def test_cli_exports_a_saved_folder_as_gguf(tmp_path, bpe_tokenizer, capsys):
    from hf_prune.recipes.cli import main

    model = _servable(_tiny())
    hf_prune.save_pretrained(model, tmp_path / "saved")
    bpe_tokenizer.save_pretrained(tmp_path / "saved")
    out = tmp_path / "m.gguf"
    assert (
        main(["export", str(tmp_path / "saved"), "--format", "gguf", "--gguf-type", "q8_0", "--output", str(out)]) == 0
    )
    assert "q8_0" in capsys.readouterr().out
    reader, fields = _fields(out)
    assert fields["general.architecture"] == "deci"
    assert fields["deci.feed_forward_length"] == [96, 1, 56, 1]  # MLP-less blocks: the zero width-1 stand-in
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_up.weight"] == types["blk.2.ffn_up.weight"] == "Q8_0"
    # an ONNX-only option is refused before anything is written
    assert main(["export", str(tmp_path / "saved"), "--format", "gguf", "--int8", "--output", str(tmp_path / "x")]) == 1
    assert "--int8 is an ONNX option" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
