"""Save and reload pruned models exactly.

Stock ``from_pretrained`` builds every layer at the config's size, so a model whose layers lost different
numbers of heads/neurons cannot load. :func:`from_pretrained` resolves the concrete class, wraps it in a
throw-away subclass whose ``__init__`` resizes the layers to the shapes recorded in ``config.hf_prune``, and
then defers to the stock ``from_pretrained`` so dtype, device_map, sharded safetensors, tied weights and Hub
downloads keep working exactly as users expect.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModel, GgufConfig, PreTrainedModel
from transformers.utils import logging

from .quantized import float_weights
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
    if not getattr(config, STATE_KEY, None):
        model = cls.from_pretrained(pretrained_model_name_or_path, **kwargs)
    else:
        model = _shaped_subclass(cls).from_pretrained(pretrained_model_name_or_path, **kwargs)
        loaded = model[0] if isinstance(model, tuple) else model  # output_loading_info=True returns a tuple
        # Hand back the stock class so isinstance, save_pretrained's "architectures" and pickling look normal.
        loaded.__class__ = cls
    if kwargs.get("gguf_file") is not None:
        float_weights(model[0] if isinstance(model, tuple) else model)
    return model


def save_pretrained(
    model: PreTrainedModel,
    save_directory: str | os.PathLike,
    tokenizer: Any | None = None,
    **kwargs: Any,
) -> Path:
    """Atomically save ``model`` (and optionally its tokenizer) as safetensors.

    Everything is written to a temporary sibling folder first and moved into place only when complete, so a
    failure (disk full, interrupted job) never leaves a half-written ``save_directory``; an existing folder is
    replaced only after the new one is fully written.
    """
    float_weights(model)  # a dequantized GGUF model saves as the float checkpoint it is
    target = Path(save_directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_atomic_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


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
