"""Export a pruned decoder as a folder vLLM serves as it is (``vllm serve FOLDER`` / ``vllm.LLM(FOLDER)``).

:func:`export_vllm` writes safetensors with the family's stock tensor names, a ``config.json``, the tokenizer files
and ``generation_config.json``. The config follows the model's layout (:mod:`hf_prune.structure.layout`):

* ``"uniform"``: the family's own config (``LlamaConfig``, ``Qwen2Config``...) without hf_prune's record or remote
  code, so vLLM runs the model with its own implementation of the family.
* ``"servable"`` Llama, Mistral and Qwen2 blocks: vLLM's ``DeciLMForCausalLM`` (``model_type: "nemotron-nas"``,
  ``vllm/model_executor/models/nemotron_nas.py``). Each entry of ``block_configs`` gives a block's attention
  (``no_op``, ``n_heads_in_group`` = query heads per key/value head; query heads are global, ``head_dim`` explicit)
  and MLP (``no_op``, ``intermediate_size``). A no-op sublayer has no weights at all (no norm either). Neither
  transformers nor vLLM 0.32 ships a config class for ``nemotron-nas``, so ``configuration_decilm.py`` (a
  ``LlamaConfig`` whose ``block_configs`` read as attributes) is written beside ``config.json`` with an ``auto_map``;
  vLLM needs ``trust_remote_code=True``. hf_prune is not needed to serve it.
* ``"free"`` (per-block query heads), or a family DeciLM's Llama blocks cannot compute (Qwen3's q/k norms, Gemma's
  norms and embedding scale, sliding windows, a non-SiLU MLP): ``ValueError`` before anything is written, naming the
  blocks at fault and the layout to prune with.

How vLLM 0.32's DeciLM reads a block, and what the export writes so it computes the pruned model exactly:

* a block with neither sublayer is the identity: it is left out (``num_hidden_layers`` counts the others);
* the first block it runs must have attention: a no-op attention there reaches the MLP norm with no residual yet,
  which that code cannot take. That block gets a zero attention (one key/value head, zero q/k/v/o), which adds
  exactly nothing;
* q/k/v biases (Qwen2): ``qkv_bias: true`` with ``attention_bias: false`` (no o_proj bias); Llama's
  ``attention_bias`` and ``mlp_bias`` are copied. A removed sublayer whose output bias is not zero adds a constant in
  transformers that a no-op cannot: refused.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict
from torch import nn
from transformers.utils import logging

from ..architectures import LayerShape, get_adapter
from ..compat import float_weights
from ..structure.layout import check_layout, layout_of
from ..utils import atomic_write_json, staged_dir

logger = logging.get_logger(__name__)

#: model types whose blocks vLLM's DeciLM (LlamaAttention + LlamaMLP) computes, for the servable layout
FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2")
CONFIG_FILE = "configuration_decilm.py"
#: files of a saved tokenizer (and the generation defaults) copied beside the weights
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
_WHY_NOT = {
    "qwen3": "its attention normalises queries and keys per head, q_norm/k_norm",
    "gemma": "its norms scale by (1 + weight) and it scales the embeddings",
    "gemma2": "its norms scale by (1 + weight), it scales the embeddings and soft-caps attention",
    "gemma3_text": "its norms scale by (1 + weight), it scales the embeddings and normalises queries and keys",
}
# family config keys the nemotron-nas config keeps as they are
_COPIED = (
    "vocab_size",
    "hidden_size",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "use_cache",
)
CONFIG_SOURCE = '''"""Config of a pruned decoder for vLLM's DeciLMForCausalLM (model_type "nemotron-nas").

Written by hf_prune's export_vllm. A LlamaConfig plus ``block_configs``, one entry per block: ``attention``
(``no_op``: no attention sublayer; ``n_heads_in_group``: query heads per key/value head) and ``ffn`` (``no_op``;
``intermediate_size``). vLLM reads them as attributes (``block_config.attention.no_op``), so each entry is a dict
whose keys also read as attributes.
"""

from transformers import LlamaConfig


class BlockSection(dict):
    """A dict whose keys read as attributes; a missing key is a missing attribute."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _section(value):
    if isinstance(value, dict):
        return BlockSection({key: _section(item) for key, item in value.items()})
    return value


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"
    block_configs: list | None = None

    def __post_init__(self, **kwargs):
        self.block_configs = [_section(dict(block)) for block in self.block_configs or []]
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Nothing to check: head_dim is explicit, so the query heads need not divide hidden_size."""
'''


@dataclass(frozen=True)
class VllmBlock:
    """One block of the nemotron-nas export: ``source`` (its index in the model), ``attention`` (``"real"``,
    ``"none"`` or ``"zero"``: the zero stand-in of the module docstring), ``kv_heads`` and ``ffn`` (0 = no MLP)."""

    source: int
    attention: str
    kv_heads: int
    ffn: int


def vllm_blocks(shapes: list[LayerShape]) -> list[VllmBlock]:
    """The blocks a servable model becomes in DeciLM: identity blocks dropped, the first one given attention."""
    blocks = []
    for i, s in enumerate(shapes):
        if s.heads == 0 and s.ffn == 0:
            continue
        attention = "real" if s.heads else ("zero" if not blocks else "none")
        blocks.append(VllmBlock(i, attention, s.kv_heads if s.heads else int(attention == "zero"), s.ffn))
    return blocks


def _family_problems(model: nn.Module) -> list[str]:
    """Why DeciLM's Llama blocks cannot compute ``model``'s (empty when they can)."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        why = _WHY_NOT.get(model_type, "it is not a Llama-family decoder")
        return [f"nemotron-nas's Llama blocks cannot compute {model_type!r} ones: {why}"]
    problems = []
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config.hidden_act!r} (vLLM's LlamaMLP runs SiLU only)")
    window = getattr(config, "sliding_window", None)
    sliding = model_type == "mistral" or "sliding_attention" in (getattr(config, "layer_types", None) or [])
    if sliding and window and window < config.max_position_embeddings:
        problems.append(f"its {window}-token sliding window, which DeciLM does not apply")
    return problems


def _removed_biases(model: nn.Module, shapes: list[LayerShape]) -> list[str]:
    """Blocks whose removed sublayer still adds a non-zero output bias in transformers."""
    problems = []
    adapter = get_adapter(model)
    outputs = {
        "attention": f"{adapter.attention_module}.{adapter.attention_out}",
        "MLP": f"{adapter.ffn_module}.{adapter.ffn_out}",
    }
    for i, (block, s) in enumerate(zip(adapter.layers(model), shapes, strict=True)):
        for gone, (sublayer, name) in zip((s.heads == 0, s.ffn == 0), outputs.items(), strict=True):
            bias = getattr(block.get_submodule(name), "bias", None) if gone else None
            if bias is not None and bool(bias.detach().ne(0).any()):
                problems.append(f"block {i}'s removed {sublayer} still adds its output bias ({name}.bias, not zero)")
    return problems


def check_servable(model: nn.Module) -> tuple[str, list[LayerShape]]:
    """``("uniform" | "servable", shapes)``: how :func:`export_vllm` writes ``model``.

    Raises:
        ValueError: ``model`` is not a causal LM, its blocks are ``"free"``, or they are ``"servable"`` but of a
            family or with a feature nemotron-nas cannot compute; the message names the blocks and the layout to
            prune with.
    """
    if getattr(model, "get_output_embeddings", lambda: None)() is None:
        raise ValueError(f"export_vllm exports causal language models; {type(model).__name__} has no LM head")
    shapes = get_adapter(model).layer_shapes(model)
    if layout_of(shapes) == "uniform":
        return "uniform", shapes
    check_layout(shapes, "servable", "vLLM (DeciLMForCausalLM, nemotron-nas)")
    problems = _family_problems(model) or _removed_biases(model, shapes)
    if problems:
        # nemotron-nas is the only way vLLM takes non-uniform blocks: what blocks it names the uniform layout's way
        check_layout(shapes, "uniform", f"vLLM (this {model.config.model_type} model: {'; '.join(problems)})")
    if not any(s.heads for s in shapes):
        raise ValueError("vLLM's nemotron-nas needs at least one block that keeps its attention; every block lost it")
    return "servable", shapes


# ---- config --------------------------------------------------------------------------------------------------------
def family_config(model: nn.Module, diff: bool = True) -> dict[str, Any]:
    """``model``'s config as a stock checkpoint has it: no hf_prune record, no ``auto_map`` to hf_prune's remote
    code, ``architectures`` set to the stock class. ``diff``: only the values that differ from the class's defaults,
    as ``save_pretrained`` writes them (the nemotron-nas config needs them all: its defaults are Llama's)."""
    config = model.config.to_diff_dict() if diff else model.config.to_dict()
    config.pop("hf_prune", None)
    config.pop("_name_or_path", None)
    auto_map = {k: v for k, v in (config.pop("auto_map", None) or {}).items() if "hf_prune" not in str(v)}
    if auto_map:
        config["auto_map"] = auto_map
    stock = next((c for c in type(model).__mro__ if c.__module__.startswith("transformers.")), type(model))
    config["architectures"] = [stock.__name__]
    return config


def nemotron_config(model: nn.Module, blocks: list[VllmBlock], heads: int) -> dict[str, Any]:
    """The ``nemotron-nas`` config of a servable ``model`` cut into ``blocks``, with ``heads`` query heads."""
    family = family_config(model, diff=False)
    config = {k: family[k] for k in _COPIED if k in family}
    if family["model_type"] == "qwen2":  # q/k/v biases, no o_proj bias (DeciLM reads qkv_bias over attention_bias)
        config.update(attention_bias=False, qkv_bias=True)
    block_configs = []
    for b in blocks:
        attention = {"no_op": b.attention == "none", "replace_with_linear": False, "n_heads_in_group": None}
        if b.attention != "none":
            attention["n_heads_in_group"] = heads // b.kv_heads
        ffn = {"no_op": b.ffn == 0, "replace_with_linear": False, "intermediate_size": b.ffn or None}
        block_configs.append({"attention": attention, "ffn": ffn})
    first = next(b for b in blocks if b.attention != "none")
    config.update(
        architectures=["DeciLMForCausalLM"],
        model_type="nemotron-nas",
        auto_map={"AutoConfig": f"{CONFIG_FILE[:-3]}.DeciLMConfig"},
        num_hidden_layers=len(blocks),
        num_attention_heads=heads,
        num_key_value_heads=first.kv_heads,
        head_dim=get_adapter(model).head_dim(model.config),
        intermediate_size=max(b.ffn for b in blocks),
        block_configs=block_configs,
    )
    return config


# ---- tensors -------------------------------------------------------------------------------------------------------
def _layers_prefix(model: nn.Module) -> str:
    layers = get_adapter(model).layers(model)
    return next(name for name, module in model.named_modules() if module is layers) + "."


def _stock_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict without the LM head when it is the input embedding (tied)."""
    tensors = dict(model.state_dict())
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and out.weight.data_ptr() == inp.weight.data_ptr():
        tensors.pop(next(name for name, module in model.named_modules() if module is out) + ".weight", None)
    return tensors


def _zero_attention(prefix: str, model: nn.Module, heads: int, qkv_bias: bool, o_bias: bool) -> dict[str, Any]:
    """A block's stand-in attention that adds exactly nothing: one key/value head, zero q/k/v/o."""
    hidden, head_dim = get_adapter(model).hidden_size(model.config), get_adapter(model).head_dim(model.config)
    dtype = model.get_input_embeddings().weight.dtype
    shapes = {"q_proj": heads * head_dim, "k_proj": head_dim, "v_proj": head_dim}
    tensors = {f"{prefix}input_layernorm.weight": torch.ones(hidden, dtype=dtype)}
    for name, rows in shapes.items():
        tensors[f"{prefix}self_attn.{name}.weight"] = torch.zeros(rows, hidden, dtype=dtype)
        if qkv_bias:
            tensors[f"{prefix}self_attn.{name}.bias"] = torch.zeros(rows, dtype=dtype)
    tensors[f"{prefix}self_attn.o_proj.weight"] = torch.zeros(hidden, heads * head_dim, dtype=dtype)
    if o_bias:
        tensors[f"{prefix}self_attn.o_proj.bias"] = torch.zeros(hidden, dtype=dtype)
    return tensors


def nemotron_tensors(model: nn.Module, blocks: list[VllmBlock], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The safetensors of the nemotron-nas export: stock names, blocks renumbered, removed sublayers left out.

    Raises:
        ValueError: a block holds a tensor of neither sublayer (nothing DeciLM would load).
    """
    prefix = _layers_prefix(model)
    by_block: dict[int, dict[str, torch.Tensor]] = {}
    tensors = {}
    for name, tensor in _stock_tensors(model).items():
        if name.startswith(prefix):
            index, rest = name[len(prefix) :].split(".", 1)
            by_block.setdefault(int(index), {})[rest] = tensor
        else:
            tensors[name] = tensor
    qkv_bias = bool(config.get("qkv_bias", config.get("attention_bias", False)))
    for j, block in enumerate(blocks):
        new = f"{prefix}{j}."
        for rest, tensor in by_block.get(block.source, {}).items():
            sublayer = "attention" if rest.startswith(("self_attn.", "input_layernorm.")) else "ffn"
            if sublayer == "ffn" and not rest.startswith(("mlp.", "post_attention_layernorm.")):
                raise ValueError(f"block {block.source} holds {rest!r}, which vLLM's DeciLM blocks have no place for")
            if (block.attention == "real") if sublayer == "attention" else block.ffn > 0:
                tensors[new + rest] = tensor
        if block.attention == "zero":
            heads = config["num_attention_heads"]
            tensors.update(_zero_attention(new, model, heads, qkv_bias, bool(config.get("attention_bias"))))
    return tensors


# ---- the export ----------------------------------------------------------------------------------------------------
def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype (float32, float16, bfloat16)")
    return resolved


def _write_tokenizer(folder: Path, tokenizer: Any, source: Path | None, model: nn.Module) -> None:
    """The tokenizer files (and ``generation_config.json``): from ``tokenizer`` (an object or a folder), else from
    the folder the model came from."""
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
    else:
        origin = Path(tokenizer) if tokenizer is not None else source
        for name in TOKENIZER_FILES if origin is not None and origin.is_dir() else ():
            if (origin / name).is_file() and not (folder / name).exists():
                shutil.copyfile(origin / name, folder / name)
    generation = getattr(model, "generation_config", None)
    if not (folder / "generation_config.json").exists() and generation is not None:
        generation.save_pretrained(folder)


def export_vllm(
    model_or_folder: nn.Module | str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write a pruned causal LM to the folder ``output`` that vLLM serves as it is, and return its path.

    ``model_or_folder``: a model, or a folder saved by :func:`hf_prune.save_pretrained` (loaded in its saved
    dtype). ``dtype``: the weights' type in the export (``"float16"``, ``torch.bfloat16``...; the model's own when
    omitted). ``tokenizer``: a tokenizer or a folder holding one; by default the files of the source folder (or of
    the model's ``name_or_path``) are copied. Uniform models get their family's stock config, servable Llama /
    Mistral / Qwen2 ones vLLM's ``nemotron-nas`` (see the module docstring: ``trust_remote_code=True`` to serve).
    Every check runs before anything is written, and the folder is built beside ``output`` and renamed into place,
    so a failed export leaves ``output`` as it was. The model's weights are not modified (a GGUF model dequantized
    at load time loses its quantization marks, as in :func:`hf_prune.save_pretrained`).

    Raises:
        ValueError: the layout is ``"free"``, the family or a feature is one nemotron-nas cannot compute (the
            message names the blocks and the layout to prune with), ``dtype`` is not a float type, or the weights
            are still packed (quantized).
    """
    target_dtype = _resolve_dtype(dtype)
    source = None
    if isinstance(model_or_folder, nn.Module):
        model = model_or_folder
        name_or_path = getattr(model.config, "_name_or_path", "") or ""
        source = Path(name_or_path) if name_or_path and Path(name_or_path).is_dir() else None
    else:
        import transformers as tf

        from .load import from_pretrained

        source = Path(model_or_folder)
        model = from_pretrained(str(source), tf.AutoModelForCausalLM, dtype="auto")
    float_weights(model)  # a dequantized GGUF model exports as the float model it is (no quantization_config)
    layout, shapes = check_servable(model)
    if layout == "uniform":
        config, tensors = family_config(model), _stock_tensors(model)
    else:
        blocks = vllm_blocks(shapes)
        config = nemotron_config(model, blocks, next(s.heads for s in shapes if s.heads))
        tensors = nemotron_tensors(model, blocks, config)
    tensors = {k: v.detach().to("cpu", target_dtype or v.dtype).contiguous() for k, v in tensors.items()}
    floats = [v.dtype for v in tensors.values() if v.is_floating_point()]
    config["dtype"] = str(floats[0] if floats else torch.float32).removeprefix("torch.")
    with staged_dir(output) as tmp:
        save_torch_state_dict(tensors, tmp, max_shard_size="5GB")
        atomic_write_json(tmp / "config.json", config, sort_keys=True)
        if layout == "servable":
            (tmp / CONFIG_FILE).write_text(CONFIG_SOURCE)
        _write_tokenizer(tmp, tokenizer, source, model)
    output = Path(output).resolve()
    if not (output / "tokenizer_config.json").exists():
        logger.warning(f"hf_prune: {output} has no tokenizer (pass tokenizer=): serve it with skip_tokenizer_init=True")
    return output
