"""Load pruned models exactly: :func:`from_pretrained` and :func:`is_pruned`.

Stock ``from_pretrained`` builds every layer at the config's size, so a model whose layers lost different
numbers of heads/neurons cannot load. :func:`from_pretrained` resolves the concrete class, wraps it in a
throw-away subclass whose ``__init__`` restores the shapes recorded in ``config.hf_prune``, and
then defers to the stock ``from_pretrained`` so dtype, device_map, sharded safetensors, tied weights and Hub
downloads keep working exactly as users expect.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from accelerate import init_empty_weights
from huggingface_hub import file_exists, snapshot_download
from huggingface_hub.errors import HFValidationError, OfflineModeIsEnabled
from huggingface_hub.errors import HTTPError as HubHTTPError
from torch import nn
from transformers import AutoConfig, AutoModel, GenerationConfig, GgufConfig, PreTrainedModel
from transformers.utils import logging

from ..compat import float_weights, swap_class
from ..sparsity.sparse_io import SPARSE_INDEX, SPARSE_SUFFIX, load_sparse_state_dict, sparse_files
from ..structure.portable import forget_portable
from ..structure.remote_code import pruned_class, recorded_state
from ..structure.surgery import apply_layer_shapes

logger = logging.get_logger(__name__)

# what the Hub check for sparse weights may raise when it cannot tell: a name that is no repo id (a missing local
# folder), offline mode, and the HTTP client's errors (no network, timeouts, gated repos, server errors). Anything
# else is a bug and propagates.
_CANNOT_TELL = (HFValidationError, OfflineModeIsEnabled, HubHTTPError)

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
    """A subclass of ``cls`` whose ``__init__`` restores the shapes ``config.hf_prune`` records before weights load:
    the remote-code file's own :func:`~hf_prune.structure.remote_code.pruned_class`, so hf_prune and stock loaders
    read the recorded state alike, with hf_prune's per-layer resizing (which also checks and records the state)."""
    return pruned_class(cls, apply_layer_shapes)


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
        # GGUF weights unpacked to float at load time: the model hf_prune can slice and train (see compat.py)
        kwargs.setdefault("quantization_config", GgufConfig(dequantize=True))
    config = kwargs.get("config")
    if config is None:
        config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
    cls = _resolve_class(model_class, config, bool(kwargs.get("trust_remote_code", False)))
    load_cls = _shaped_subclass(cls) if recorded_state(config) else cls
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
        swap_class(loaded, cls)
    loaded = model[0] if isinstance(model, tuple) else model
    forget_portable(loaded.config)
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
    except _CANNOT_TELL:  # not a repo id, offline, unreachable, gated or failing: the stock loader reports it
        return None
    if not has:
        return None
    keys = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies")
    local = snapshot_download(str(name_or_path), **{k: hub_kwargs[k] for k in keys if k in hub_kwargs})
    return Path(local) / subfolder


def is_pruned(model: nn.Module) -> bool:
    """True when ``model`` carries an hf_prune state (structure removed by hf_prune)."""
    config = getattr(model, "config", None)
    return config is not None and recorded_state(config) is not None
