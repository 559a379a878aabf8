"""Empty branches: a layer whose heads (or FFN neurons) are all removed keeps only its output-projection bias.

The block's attention (or FFN) module gets a subclass whose forward returns that bias and, for decoders, keeps the
KV cache's length bookkeeping right so ``generate()`` still works. The code lives in :mod:`hf_prune.runtime`, the
self-contained file saved next to pruned models, so a model loaded without hf_prune runs the same forward.
"""

from __future__ import annotations

from .runtime import make_empty

__all__ = ["make_empty"]
