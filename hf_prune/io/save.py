"""Save pruned models exactly (atomically, optionally sparse, with remote code where stock configs fall short).

A model whose layers lost different numbers of heads/neurons gets its per-layer shapes recorded in ``config.hf_prune``
(read back by :mod:`hf_prune.io.load`) and, for loaders without hf_prune, the remote-code file and ``auto_map``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel
from transformers.utils import logging

from ..compat import float_weights
from ..sparsity.sparse_io import sparsify_folder
from ..structure.portable import NotPortable, Portable, forget_portable, modeling_source, portable_files
from ..structure.remote_code import MANIFEST_KEY, MODELING_FILE
from ..structure.state import STATE_KEY
from ..training.lora import ADAPTER_DIR, base_model, base_state_dict, is_peft_model, save_adapter
from ..utils import staged_dir

logger = logging.get_logger(__name__)


@contextlib.contextmanager
def _portable_config(config: Any, portable: Portable) -> Iterator[None]:
    """The config as saved: the manifest and ``auto_map`` added for the write only, the caller's config restored."""
    had_state, had_map = hasattr(config, STATE_KEY), hasattr(config, "auto_map")
    state, auto_map = getattr(config, STATE_KEY, None), getattr(config, "auto_map", None)
    try:
        forget_portable(config)
        if portable.needs_remote_code:
            setattr(config, STATE_KEY, {**getattr(config, STATE_KEY), MANIFEST_KEY: portable.manifest})
            config.auto_map = {**(getattr(config, "auto_map", None) or {}), **portable.auto_map}
        yield
    finally:
        for name, had, value in ((STATE_KEY, had_state, state), ("auto_map", had_map, auto_map)):
            if had:
                setattr(config, name, value)
            elif hasattr(config, name):
                delattr(config, name)


def save_pretrained(
    model: PreTrainedModel,
    save_directory: str | os.PathLike,
    tokenizer: Any | None = None,
    sparse: bool = False,
    **kwargs: Any,
) -> Path:
    """Atomically save ``model`` (and optionally its tokenizer) as safetensors.

    Everything is written to a temporary sibling folder first and moved into place only when complete, so a
    failure (disk full, interrupted job) never leaves a half-written ``save_directory``; an existing folder is
    replaced only after the new one is fully written.

    A model whose per-layer shapes the stock config cannot express (heads or neurons pruned unevenly) also gets
    ``hf_prune_modeling.py`` (:mod:`hf_prune.structure.remote_code`) and an ``auto_map`` in its config, so stock
    ``AutoModel....from_pretrained(path, trust_remote_code=True)`` and ``pipeline(..., trust_remote_code=True)``
    load it where hf_prune is not installed; :func:`from_pretrained` needs no remote code. Uniform shapes load with
    plain ``from_pretrained`` and get no remote code.

    ``sparse=True`` stores every tensor that is smaller that way as its non-zero values and a bitmask
    (:mod:`hf_prune.sparsity.sparse_io`; a 90%-sparse float32 weight takes about 0.13 of its dense bytes). Only
    :func:`from_pretrained` reads that layout (it restores the exact dense tensors), so such a folder gets no remote
    code for stock loaders.

    A peft model (LoRA adapters on a pruned base) saves as its pruned base, with stock weight names and no LoRA, and
    its adapters in ``save_directory/adapter`` (``PeftModel.from_pretrained(hf_prune.from_pretrained(path),
    path / "adapter")``); merge it first with :func:`hf_prune.merge_and_unload` to save one plain model instead.
    """
    peft_model = model if is_peft_model(model) else None
    if peft_model is not None:
        if sparse:
            raise ValueError("sparse=True is invalid for a peft model; merge it first with hf_prune.merge_and_unload")
        model = base_model(peft_model)
        kwargs["state_dict"] = base_state_dict(peft_model)
    float_weights(model)  # a dequantized GGUF model saves as the float checkpoint it is
    portable = Portable()
    if not sparse:
        try:
            portable = portable_files(model)
        except NotPortable as exc:
            logger.warning(f"hf_prune: this model will load with hf_prune.from_pretrained only ({exc})")
    if sparse and kwargs.get("safe_serialization") is False:
        raise ValueError("sparse=True stores safetensors; drop safe_serialization=False")
    target = Path(save_directory).resolve()
    with staged_dir(target) as tmp:
        with _portable_config(model.config, portable):
            model.save_pretrained(tmp, **kwargs)
        if portable.needs_remote_code:
            (tmp / MODELING_FILE).write_text(modeling_source())
        if sparse:
            sizes = sparsify_folder(tmp)
            logger.info(
                f"hf_prune: {sizes['compressed_tensors']} sparse tensors stored as values + bitmask: "
                f"{sizes['sparse_bytes'] / 2**20:.1f} MiB instead of {sizes['dense_bytes'] / 2**20:.1f} MiB"
            )
        if peft_model is not None:
            save_adapter(peft_model, tmp / ADAPTER_DIR, target)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return target


def add_remote_code(model: PreTrainedModel, folder: str | os.PathLike) -> bool:
    """Make a folder a stock ``save_pretrained`` wrote (a Trainer checkpoint, ``trainer.save_model``) load without
    hf_prune, as :func:`save_pretrained` does: rewrite its ``config.json`` with the manifest and ``auto_map`` and add
    ``hf_prune_modeling.py``. True when the model needed them (non-uniform shapes)."""
    try:
        portable = portable_files(model)
    except NotPortable as exc:
        logger.warning(f"hf_prune: {folder} will load with hf_prune.from_pretrained only ({exc})")
        return False
    if not portable.needs_remote_code:
        return False
    folder = Path(folder)
    with _portable_config(model.config, portable):
        model.config.save_pretrained(folder)
    (folder / MODELING_FILE).write_text(modeling_source())
    return True
