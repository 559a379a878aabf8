"""hf_prune: structured and unstructured pruning for Hugging Face transformers.

Public API (everything users need is re-exported here)::

    import hf_prune
    hf_prune.prune_heads(model, {0: [1, 3], 5: [0]})
    hf_prune.prune_ffn(model, {0: list(range(512))})
    model.save_pretrained("out")
    model = hf_prune.from_pretrained("out", AutoModelForSequenceClassification)
"""

from .architectures import ArchAdapter, LayerShape, Proj, get_adapter, register, supported_model_types
from .hub import from_pretrained, is_pruned, save_pretrained
from .measure import compare_latency, count_parameters, encoder_flops, measure_latency, prunable_parameters
from .plan import PruningPlan
from .surgery import apply_layer_shapes, prune_ffn, prune_heads, pruning_state

__version__ = "0.1.0"

__all__ = [
    "ArchAdapter",
    "LayerShape",
    "Proj",
    "PruningPlan",
    "__version__",
    "apply_layer_shapes",
    "compare_latency",
    "count_parameters",
    "encoder_flops",
    "from_pretrained",
    "get_adapter",
    "is_pruned",
    "measure_latency",
    "prunable_parameters",
    "prune_ffn",
    "prune_heads",
    "pruning_state",
    "register",
    "save_pretrained",
    "supported_model_types",
]
