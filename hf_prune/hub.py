"""Save and reload pruned models exactly.

Stock ``from_pretrained`` builds every layer at the config's size, so a model whose layers lost different
numbers of heads/neurons cannot load. :func:`from_pretrained` resolves the concrete class, wraps it in a
throw-away subclass whose ``__init__`` resizes the layers to the shapes recorded in ``config.hf_prune``, and
then defers to the stock ``from_pretrained`` so dtype, device_map, sharded safetensors, tied weights and Hub
downloads keep working exactly as users expect.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from accelerate import init_empty_weights
from huggingface_hub import file_exists, snapshot_download
from torch import nn
from transformers import AutoConfig, AutoModel, GenerationConfig, GgufConfig, PreTrainedModel
from transformers.utils import logging

from .portable import NotPortable, Portable, modeling_source, portable_files
from .quantized import float_weights
from .runtime import MANIFEST_KEY, MODELING_FILE
from .sparse_io import SPARSE_INDEX, SPARSE_SUFFIX, load_sparse_state_dict, sparse_files, sparsify_folder
from .state import STATE_KEY
from .surgery import apply_layer_shapes

logger = logging.get_logger(__name__)

# kwargs that select *where* a config/checkpoint comes from; they must reach AutoConfig too.
_HUB_KWARGS = (
    "revision",
    "token",
    "cache_dir",
    "local_files_only",
    "subfolder",
    "trust_remote_code",
    "force_download",
    "proxies",
)


def _resolve_class(model_class: type, config: Any, trust_remote_code: bool = False) -> type[PreTrainedModel]:
    if (
        isinstance(model_class, type)
        and hasattr(model_class, "from_config")
        and not issubclass(model_class, PreTrainedModel)
    ):
        # An Auto class: let it pick the concrete class through its public from_config, as an empty skeleton
        # (accelerate's init_empty_weights: weights on the meta device, nothing allocated); transformers' own
        # resolver is private API.
        with init_empty_weights():
            return type(model_class.from_config(config, trust_remote_code=trust_remote_code))
    if isinstance(model_class, type) and issubclass(model_class, PreTrainedModel):
        return model_class
    raise TypeError(f"model_class must be a transformers Auto class or a PreTrainedModel subclass, got {model_class!r}")


def _shaped_subclass(cls: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """A subclass of ``cls`` whose ``__init__`` resizes layers to ``config.hf_prune`` before weights load."""

    def __init__(self: PreTrainedModel, config: Any, *args: Any, **kwargs: Any) -> None:
        cls.__init__(self, config, *args, **kwargs)
        state = getattr(config, STATE_KEY, None)
        if state and state.get("layers"):
            apply_layer_shapes(self, state["layers"])

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})


def from_pretrained(
    pretrained_model_name_or_path: str | os.PathLike, model_class: type = AutoModel, **kwargs: Any
) -> PreTrainedModel:
    """Load a model saved by ``save_pretrained`` after hf_prune surgery, with its per-layer shapes.

    Args:
        pretrained_model_name_or_path: local folder or Hub repo id.
        model_class: any ``AutoModel...`` class or a concrete class such as ``BertForSequenceClassification``.
        **kwargs: passed to the stock ``from_pretrained`` (``dtype``, ``device_map``, ``revision`` ...).

    An unpruned checkpoint loads exactly as with ``model_class.from_pretrained``.
    """
    hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    if kwargs.get("gguf_file") is not None:
        hub_kwargs["gguf_file"] = kwargs["gguf_file"]
        # GGUF weights unpacked to float at load time: the model hf_prune can slice and train (see quantized.py)
        kwargs.setdefault("quantization_config", GgufConfig(dequantize=True))
    config = kwargs.get("config")
    if config is None:
        config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
    cls = _resolve_class(model_class, config, bool(kwargs.get("trust_remote_code", False)))
    load_cls = _shaped_subclass(cls) if getattr(config, STATE_KEY, None) else cls
    folder = _sparse_folder(pretrained_model_name_or_path, hub_kwargs)
    if folder is not None:
        # weights stored as values + bitmask (save_pretrained(sparse=True)): restored to the exact dense tensors,
        # then loaded like any state dict, so dtype and device_map behave as for a dense checkpoint
        state_dict = load_sparse_state_dict(sparse_files(folder))
        rest = {k: v for k, v in kwargs.items() if k not in _HUB_KWARGS and k != "config"}
        model = load_cls.from_pretrained(None, config=config, state_dict=state_dict, **rest)
        loaded = model[0] if isinstance(model, tuple) else model
        if (folder / "generation_config.json").exists() and getattr(loaded, "generation_config", None) is not None:
            loaded.generation_config = GenerationConfig.from_pretrained(folder)
    else:
        model = load_cls.from_pretrained(pretrained_model_name_or_path, **kwargs)
    if load_cls is not cls:
        loaded = model[0] if isinstance(model, tuple) else model  # output_loading_info=True returns a tuple
        # Hand back the stock class so isinstance, save_pretrained's "architectures" and pickling look normal.
        loaded.__class__ = cls
    loaded = model[0] if isinstance(model, tuple) else model
    _forget_portable(loaded.config)
    if kwargs.get("gguf_file") is not None:
        float_weights(loaded)
    return model


def _sparse_folder(name_or_path: str | os.PathLike, hub_kwargs: dict[str, Any]) -> Path | None:
    """The local folder holding sparse weights (downloaded first for a Hub repo that has them), else None."""
    path = Path(name_or_path)
    subfolder = hub_kwargs.get("subfolder") or ""
    if path.is_dir():
        return path / subfolder if sparse_files(path / subfolder) else None
    try:  # a Hub repo: only one that stores sparse weights takes this path
        has = any(
            file_exists(str(name_or_path), f"{subfolder}/{f}".lstrip("/"), revision=hub_kwargs.get("revision"))
            for f in (f"model{SPARSE_SUFFIX}", SPARSE_INDEX)
        )
    except Exception:  # offline, private without token, not a repo id: the stock loader reports it
        return None
    if not has:
        return None
    keys = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies")
    local = snapshot_download(str(name_or_path), **{k: hub_kwargs[k] for k in keys if k in hub_kwargs})
    return Path(local) / subfolder


def _is_ours(entry: Any) -> bool:
    return isinstance(entry, str) and entry.startswith(f"{Path(MODELING_FILE).stem}.")


def _forget_portable(config: Any) -> None:
    """Drop what only the saved folder needs (the manifest, our ``auto_map`` entries): in memory the model is a
    stock model with hf_prune's state, and the next save describes it afresh."""
    state = getattr(config, STATE_KEY, None)
    if isinstance(state, dict):
        state.pop(MANIFEST_KEY, None)
    auto_map = getattr(config, "auto_map", None)
    if isinstance(auto_map, dict):
        kept = {k: v for k, v in auto_map.items() if not _is_ours(v)}
        if kept:
            config.auto_map = kept
        else:
            delattr(config, "auto_map")


@contextlib.contextmanager
def _portable_config(config: Any, portable: Portable) -> Iterator[None]:
    """The config as saved: the manifest and ``auto_map`` added for the write only, the caller's config restored."""
    had_state, had_map = hasattr(config, STATE_KEY), hasattr(config, "auto_map")
    state, auto_map = getattr(config, STATE_KEY, None), getattr(config, "auto_map", None)
    try:
        _forget_portable(config)
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
    ``hf_prune_modeling.py`` (:mod:`hf_prune.runtime`) and an ``auto_map`` in its config, so stock
    ``AutoModel....from_pretrained(path, trust_remote_code=True)`` and ``pipeline(..., trust_remote_code=True)``
    load it where hf_prune is not installed; :func:`from_pretrained` needs no remote code. Uniform shapes load with
    plain ``from_pretrained`` and get no remote code.

    ``sparse=True`` stores every tensor that is smaller that way as its non-zero values and a bitmask
    (:mod:`hf_prune.sparse_io`; a 90%-sparse float32 weight takes about 0.13 of its dense bytes). Only
    :func:`from_pretrained` reads that layout (it restores the exact dense tensors), so such a folder gets no remote
    code for stock loaders.
    """
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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
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
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_atomic_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def write_atomic_dir(tmp: Path, target: Path) -> None:
    """Move the finished folder ``tmp`` to ``target``, replacing any existing folder as late as possible."""
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        if backup.exists():
            shutil.rmtree(backup)
        os.replace(target, backup)
    try:
        os.replace(tmp, target)
    except BaseException:
        if backup is not None:
            os.replace(backup, target)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def is_pruned(model: nn.Module) -> bool:
    """True when ``model`` carries an hf_prune state (structure removed by hf_prune)."""
    return bool(getattr(getattr(model, "config", None), STATE_KEY, None))
