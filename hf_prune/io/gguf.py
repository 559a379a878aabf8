"""Export a pruned Llama-family decoder to a GGUF file that llama.cpp runs.

:func:`export_gguf` writes one ``.gguf`` file (weights in f32, f16 or q8_0, the tokenizer, the chat template). The
llama.cpp architecture follows the model's layout (:mod:`hf_prune.structure.layout`):

* ``"uniform"`` blocks: the stock ``llama`` architecture (also for Mistral and Qwen2: llama.cpp's ``llama`` graph
  loads optional q/k/v/o and MLP biases, so Qwen2's q/k/v biases need no architecture of their own);
* ``"servable"`` blocks: the ``deci`` architecture (Llama-3.1-Nemotron-51B), whose metadata holds per-block arrays
  ``deci.attention.head_count`` / ``head_count_kv`` / ``feed_forward_length``, 0 marking a removed sublayer;
* ``"free"`` blocks (per-block query-head counts), or a family whose blocks llama.cpp's ``llama``/``deci`` graphs
  cannot compute (Qwen3's and Gemma's q/k norms, Gemma's scaled embeddings and sandwich norms, GPT-2, BERT...):
  ``ValueError`` before anything is written, naming the blocks at fault and the layout to prune with.

Where llama.cpp's ``deci`` graph (``src/models/deci.cpp``, llama-cpp-python 0.3.36) would not compute what the
per-block arrays say, the file holds stand-ins that compute the pruned model exactly (:func:`gguf_blocks`):

* a block that keeps attention but has no MLP: with ``n_ff == 0`` the graph ``continue``-s before it stores the
  block's output, so the attention result is dropped; in the last block (any shape) ``n_ff == 0`` also skips the
  output-row selection and llama.cpp aborts. Such blocks get a zero MLP of width 1 (adds exactly nothing; f32).
* block 0 without attention: llama.cpp takes the head size from block 0's head count (0 heads: head size 0, the
  file does not load). Block 0 gets llama.cpp's "linear attention" form (query heads > 0, key/value heads 0) with a
  zero output matrix, which adds exactly nothing (one hidden x hidden product per token).

Llama's q/k projections are permuted (llama.cpp's ``LlamaModel.permute``): Hugging Face rotates the two halves of
each head (``rotate_half``), llama.cpp's ``llama``/``deci`` graphs rotate adjacent pairs; the permutation turns one
into the other, biases included. Everything else the ``gguf`` package does: the writer, tensor names
(:func:`gguf.get_tensor_name_map`), q8_0 quantization, merges and special ids (:class:`gguf.SpecialVocab`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from ..architectures import LayerShape, get_adapter
from ..structure.layout import check_layout, layout_of
from ..utils import atomic_write

try:
    import gguf
except ImportError as err:  # pragma: no cover - exercised only without the optional package
    raise ImportError("GGUF export needs the gguf package: pip install gguf") from err

from .gguf_vocab import add_vocab

logger = logging.get_logger(__name__)

GGUF_TYPES: tuple[str, ...] = ("f32", "f16", "q8_0")
#: model types whose blocks llama.cpp's llama/deci graphs compute (pre-norm RMSNorm, rotate-half RoPE, SiLU-gated MLP)
FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2")
_FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
_T = gguf.MODEL_TENSOR
_ATTENTION = {_T.ATTN_NORM, _T.ATTN_Q, _T.ATTN_K, _T.ATTN_V, _T.ATTN_OUT}
_MLP = {_T.FFN_NORM, _T.FFN_GATE, _T.FFN_UP, _T.FFN_DOWN}
_LOADED = {_T.TOKEN_EMBD, _T.OUTPUT_NORM, _T.OUTPUT, *_ATTENTION, *_MLP}  # what llama/deci load per tensor name


@dataclass(frozen=True)
class GGUFBlock:
    """What one block becomes in the GGUF file: the per-block metadata and which tensors are written.

    ``attention``: ``"real"`` (its own q/k/v/o), ``"none"`` (removed, 0 heads) or ``"zero_linear"`` (block 0
    without attention, see the module docstring). ``mlp``: ``"real"``, ``"none"`` (0 width) or ``"zero"`` (width 1,
    zero weights).
    """

    heads: int
    kv_heads: int
    ffn: int
    attention: str = "real"
    mlp: str = "real"


def gguf_blocks(shapes: Sequence[LayerShape], num_heads: int) -> list[GGUFBlock]:
    """The ``deci`` blocks that compute ``shapes`` in llama.cpp (``num_heads``: the query heads the kept attention
    sublayers share, for a block-0 stand-in). Removed sublayers are 0s, except the stand-ins the module docstring
    explains."""
    blocks = []
    last = len(shapes) - 1
    for i, s in enumerate(shapes):
        if s.heads:
            heads, kv, attention = s.heads, s.kv_heads, "real"
        elif i == 0:
            heads, kv, attention = num_heads, 0, "zero_linear"
        else:
            heads, kv, attention = 0, 0, "none"
        if s.ffn:
            ffn, mlp = s.ffn, "real"
        elif s.heads or i == last:
            ffn, mlp = 1, "zero"
        else:
            ffn, mlp = 0, "none"
        blocks.append(GGUFBlock(heads, kv, ffn, attention, mlp))
    return blocks


def permute_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of a q or k projection (weight or bias) from Hugging Face's half-split RoPE layout to
    llama.cpp's interleaved one, head by head: llama.cpp's ``LlamaModel.permute`` (in its converter script, not in
    the ``gguf`` package, hence this copy)."""
    if n_heads == 0:
        return weight
    shape = weight.shape
    return weight.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _family_problems(config: Any) -> list[str]:
    """Why llama.cpp's llama/deci graphs would compute something else than this model (empty when they match)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        return [
            f"model_type={model_type!r} is not exported to GGUF (supported: {', '.join(FAMILIES)}); llama.cpp's "
            f"llama/deci graphs lack what it needs (e.g. Qwen3's q/k norms, Gemma's norms and scaled embeddings)"
        ]
    problems = []
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config.hidden_act!r} (llama.cpp's llama/deci MLP is SiLU-gated)")
    if getattr(config, "use_sliding_window", False):
        problems.append("use_sliding_window=True (llama.cpp's llama/deci attention is global)")
    rope_type = _rope_parameters(config).get("rope_type", "default")
    if rope_type not in ("default", "linear", "llama3"):
        problems.append(f"RoPE type {rope_type!r} (exported: default, linear, llama3)")
    return problems


def _rope_parameters(config: Any) -> dict[str, Any]:
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.update(getattr(config, "rope_parameters", None) or {})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    return params


def check_exportable(model: nn.Module) -> tuple[str, list[LayerShape]]:
    """The llama.cpp architecture (``"llama"`` or ``"deci"``) and block shapes of ``model``.

    Raises:
        ValueError: the family is not one llama.cpp's llama/deci graphs compute, or the blocks are ``"free"``
            (the message names the blocks and the layout to prune with).
    """
    problems = _family_problems(model.config)
    if problems:
        raise ValueError(f"{type(model).__name__} cannot be exported to GGUF: " + "; ".join(problems))
    shapes = get_adapter(model).layer_shapes(model)
    if layout_of(shapes) != "uniform":
        check_layout(shapes, "servable", "llama.cpp (GGUF 'deci' architecture)")
    if getattr(model.config, "model_type", None) == "mistral" and getattr(model.config, "sliding_window", None):
        logger.warning("llama.cpp's llama/deci graphs ignore Mistral's sliding window: exact up to that length only")
    return ("llama" if layout_of(shapes) == "uniform" else "deci"), shapes


def _rope_freqs(config: Any, head_dim: int) -> np.ndarray | None:
    """Llama 3.1's per-frequency RoPE factors (llama.cpp's ``rope_freqs`` tensor), as llama.cpp's converter
    computes them; ``None`` for other RoPE types."""
    params = _rope_parameters(config)
    if params.get("rope_type") != "llama3":
        return None
    base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_context = params.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _is_tied(model: nn.Module) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight.data_ptr() == inp.weight.data_ptr()


def model_tensors(model: nn.Module, arch: str, blocks: Sequence[GGUFBlock]) -> list[tuple[str, np.ndarray]]:
    """The GGUF tensors (name, float32 array in PyTorch's row-major orientation) of ``model`` for ``arch``: mapped
    names, q/k permuted for llama.cpp's RoPE, removed sublayers left out and the stand-ins of :func:`gguf_blocks`.

    Raises:
        ValueError: the model holds tensors llama.cpp's graph would not load (named in the message).
    """
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI, len(blocks))
    tied, out, unknown = _is_tied(model), [], []
    for name, tensor in model.state_dict().items():
        if "rotary_emb" in name or (tied and name == "lm_head.weight"):
            continue
        mapped = tensor_map.get_type_and_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None or mapped[0] not in _LOADED:
            unknown.append(name)
            continue
        kind, gguf_name = mapped
        data = tensor.detach().to(torch.float32).cpu().numpy()
        bid = int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else None
        if bid is not None:
            block = blocks[bid]
            if (kind in _ATTENTION and block.attention != "real") or (kind in _MLP and block.mlp != "real"):
                continue
            if kind == _T.ATTN_Q:
                data = permute_rope(data, block.heads)
            elif kind == _T.ATTN_K:
                data = permute_rope(data, block.kv_heads)
        out.append((gguf_name, data))
    if unknown:
        raise ValueError(
            f"llama.cpp's {arch} graph has no place for these tensors, so the GGUF file would not compute this model: "
            f"{', '.join(unknown[:6])}{' ...' if len(unknown) > 6 else ''}"
        )
    hidden = int(model.config.hidden_size)
    for i, block in enumerate(blocks):
        if block.attention == "zero_linear":
            out += [(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))]
            out += [(f"blk.{i}.attn_output.weight", np.zeros((hidden, hidden), np.float32))]
        if block.mlp == "zero":
            out += [(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))]
            out += [(f"blk.{i}.{n}.weight", np.zeros((1, hidden), np.float32)) for n in ("ffn_gate", "ffn_up")]
            out += [(f"blk.{i}.ffn_down.weight", np.zeros((hidden, 1), np.float32))]
    return out


def _encode(data: np.ndarray, gguf_type: str) -> tuple[np.ndarray, Any]:
    """``data`` in the file's type: vectors stay f32 (as llama.cpp's converter keeps norms and biases), matrices
    become f16 or q8_0; a matrix whose rows do not fill whole q8_0 blocks of 32 falls back to f16 (as there)."""
    if data.ndim < 2 or gguf_type == "f32":
        return data.astype(np.float32), None
    if gguf_type == "q8_0":
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
        if data.shape[-1] % block == 0:
            quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            return quantized, gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def _add_metadata(
    writer: gguf.GGUFWriter, model: nn.Module, arch: str, blocks: Sequence[GGUFBlock], gguf_type: str
) -> None:
    """General, hyperparameter and RoPE keys. ``deci`` gets per-block arrays, ``llama`` the block-0 values."""
    config, adapter = model.config, get_adapter(model)
    head_dim = adapter.head_dim(config)
    name = Path(str(getattr(config, "_name_or_path", "") or "model")).name or "model"
    writer.add_name(f"{name} (hf_prune)")
    writer.add_file_type(int(_FILE_TYPES[gguf_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(len(blocks))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    if arch == "deci":
        writer.add_head_count([b.heads for b in blocks])
        writer.add_head_count_kv([b.kv_heads for b in blocks])
        writer.add_feed_forward_length([b.ffn for b in blocks])
    else:
        writer.add_head_count(blocks[0].heads)
        writer.add_head_count_kv(blocks[0].kv_heads)
        writer.add_feed_forward_length(blocks[0].ffn)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    params = _rope_parameters(config)
    writer.add_rope_freq_base(float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    if params.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(model.get_input_embeddings().weight.shape[0]))


def _tokenizer_for(model_or_folder: nn.Module | str | os.PathLike, model: nn.Module) -> Any:
    """The tokenizer saved with the model: in the folder exported from, else at the model's ``name_or_path``."""
    import transformers as tf

    source = model_or_folder if not isinstance(model_or_folder, nn.Module) else model.config._name_or_path
    try:
        return tf.AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(
            f"export_gguf needs the model's tokenizer and found none at {str(source)!r}; pass tokenizer="
        ) from err


def _stand_ins(blocks: Sequence[GGUFBlock]) -> set[str]:
    """Names of the zero stand-in matrices of :func:`gguf_blocks` (kept f32: tiny, and a width-1 MLP has rows
    q8_0 cannot hold)."""
    names = set()
    for i, block in enumerate(blocks):
        if block.attention == "zero_linear":
            names.add(f"blk.{i}.attn_output.weight")
        if block.mlp == "zero":
            names.update(f"blk.{i}.{n}.weight" for n in ("ffn_gate", "ffn_up", "ffn_down"))
    return names


def export_gguf(
    model_or_folder: nn.Module | str | os.PathLike,
    output: str | os.PathLike,
    *,
    gguf_type: str = "f16",
    tokenizer: Any = None,
) -> Path:
    """Write a (pruned) Llama/Mistral/Qwen2 causal LM and its tokenizer to the GGUF file ``output`` for llama.cpp.

    ``model_or_folder``: a model, or a folder saved by :func:`hf_prune.save_pretrained` (then loaded in float32,
    its tokenizer read from it unless ``tokenizer`` is given). ``gguf_type``: the weights' type, one of
    :data:`GGUF_TYPES` (q8_0: 8-bit blocks of 32 with one f16 scale each, about half of f16's size). Uniform models
    are written as llama.cpp's ``llama`` architecture, servable ones as ``deci`` (see the module docstring). Every
    check runs before anything is written, and the file is written atomically (a temporary sibling renamed over
    ``output``), so a failed export leaves ``output`` as it was. Returns ``output``.

    Raises:
        ValueError: ``gguf_type`` is not allowed; the model's family or layout is not one llama.cpp computes (the
            message names the blocks and the layout to prune with); the tokenizer is not byte-level BPE.
    """
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type={gguf_type!r} is invalid; allowed: {', '.join(GGUF_TYPES)}")
    if isinstance(model_or_folder, nn.Module):
        model = model_or_folder
    else:
        import transformers as tf

        from .load import from_pretrained

        model = from_pretrained(str(model_or_folder), tf.AutoModelForCausalLM, dtype=torch.float32)
    arch, shapes = check_exportable(model)
    if tokenizer is None:
        tokenizer = _tokenizer_for(model_or_folder, model)
    adapter = get_adapter(model)
    blocks = gguf_blocks(shapes, next((s.heads for s in shapes if s.heads), adapter.num_heads(model.config)))
    writer = gguf.GGUFWriter(None, arch)
    _add_metadata(writer, model, arch, blocks, gguf_type)
    pre = add_vocab(writer, tokenizer, int(model.get_input_embeddings().weight.shape[0]), model.config)
    tensors = model_tensors(model, arch, blocks)
    freqs = _rope_freqs(model.config, adapter.head_dim(model.config))
    if freqs is not None:
        tensors.append(("rope_freqs.weight", freqs))
    stand_ins = _stand_ins(blocks)
    for name, data in tensors:
        array, raw_dtype = _encode(data, "f32" if name in stand_ins else gguf_type)
        writer.add_tensor(name, array, raw_dtype=raw_dtype)

    def write(tmp: Path) -> None:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    path = atomic_write(output, write)
    logger.info(f"wrote {path} ({arch}, {gguf_type}, {len(blocks)} blocks, pre-tokenizer {pre!r})")
    return path
