"""hf_prune: structured and unstructured pruning for Hugging Face transformers.

Public API (everything users need is re-exported here)::

    import hf_prune
    hf_prune.prune_heads(model, {0: [1, 3], 5: [0]})
    hf_prune.prune_ffn(model, {0: list(range(512))})
    model.save_pretrained("out")
    model = hf_prune.from_pretrained("out", AutoModelForSequenceClassification)
"""

from .architectures import ArchAdapter, LayerShape, Param, Proj, get_adapter, register, supported_model_types
from .config import PruningConfig
from .io.gguf import export_gguf
from .io.load import from_pretrained, is_pruned
from .io.save import save_pretrained
from .io.vllm import export_vllm
from .measure import compare_latency, count_parameters, encoder_flops, measure_latency, prunable_parameters
from .oneshot import PruningReport, prune
from .planning.allocate import allocate
from .planning.depth_search import remove_attention
from .planning.latency_search import LatencyTargetError
from .planning.latency_table import LatencyTable, profile_latency
from .planning.plan import PruningPlan
from .scoring.calibration import CalibrationSet, calibration_set
from .scoring.criteria import Scores, magnitude_scores, mask_gradient_scores, random_scores, structured_scores
from .structure.layout import model_layout
from .structure.state import pruning_state
from .structure.surgery import apply_layer_shapes, prune_ffn, prune_heads, prune_layers
from .training.lora import LoraArguments, get_peft_model, keep_masks, merge_and_unload
from .training.trainer import PruningCallback, PruningMixin, PruningTrainer

__version__ = "0.1.0"

__all__ = [
    "ArchAdapter",
    "CalibrationSet",
    "LatencyTable",
    "LatencyTargetError",
    "LayerShape",
    "LoraArguments",
    "Param",
    "Proj",
    "PruningCallback",
    "PruningConfig",
    "PruningMixin",
    "PruningPlan",
    "PruningReport",
    "PruningTrainer",
    "Scores",
    "__version__",
    "allocate",
    "apply_layer_shapes",
    "calibration_set",
    "compare_latency",
    "count_parameters",
    "encoder_flops",
    "export_gguf",
    "export_vllm",
    "from_pretrained",
    "get_adapter",
    "get_peft_model",
    "is_pruned",
    "keep_masks",
    "magnitude_scores",
    "mask_gradient_scores",
    "measure_latency",
    "merge_and_unload",
    "model_layout",
    "profile_latency",
    "prunable_parameters",
    "prune",
    "prune_ffn",
    "prune_heads",
    "prune_layers",
    "pruning_state",
    "random_scores",
    "register",
    "remove_attention",
    "save_pretrained",
    "structured_scores",
    "supported_model_types",
]
