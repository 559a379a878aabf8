"""Architecture adapter registry. Importing this package registers every built-in family."""

from . import bert, distilbert, gpt2, llama  # noqa: F401  (imported for registration)
from .base import ArchAdapter, LayerShape, Proj, get_adapter, register, supported_model_types

__all__ = ["ArchAdapter", "LayerShape", "Proj", "get_adapter", "register", "supported_model_types"]
