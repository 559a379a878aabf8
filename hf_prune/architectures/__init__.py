"""Architecture adapter registry. Importing this package registers every built-in family."""

from . import bert, distilbert, gpt2, granite, llama, modernbert, phi3  # noqa: F401  (imported for registration)
from .base import ArchAdapter, LayerConfig, LayerShape, Param, Proj, get_adapter, register, supported_model_types

__all__ = [
    "ArchAdapter",
    "LayerConfig",
    "LayerShape",
    "Param",
    "Proj",
    "get_adapter",
    "register",
    "supported_model_types",
]
