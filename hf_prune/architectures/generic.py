"""Models of families hf_prune has no adapter for: unstructured and N:M sparsity only.

Weight sparsity needs no knowledge of heads or neurons, only the linear layers of the repeated blocks, so an
unknown family is not refused for it. The blocks are found structurally: the ``nn.ModuleList`` children of one
class that hold linear layers (``model.layers``, ``encoder.layer``, ``transformer.h``, ``encoder.block``...). Every
``nn.Linear`` / ``Conv1D`` inside them is prunable; embeddings and output heads, which sit outside the blocks, are
not, as for the known families. Removing heads, neurons or blocks still needs an adapter (they need to know which
projections are sliced together), and asking for it on such a model raises the registry's error.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn
from transformers.pytorch_utils import Conv1D

from .base import ArchAdapter, LayerShape

LINEAR_TYPES = (nn.Linear, Conv1D)


def is_linear(module: nn.Module) -> bool:
    """A layer whose weight is a plain (out, in) or GPT-2 (in, out) matrix hf_prune can mask."""
    return isinstance(module, LINEAR_TYPES) and module.weight.dim() == 2


def block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The outermost ``nn.ModuleList``s whose children are all of one class and each hold a linear layer, by name
    (several for encoder-decoder models)."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue  # a list inside a block (e.g. experts) belongs to that block
        if len({type(child) for child in module}) != 1:
            continue
        if all(any(is_linear(m) for m in child.modules()) for child in module):
            found.append((name, module))
    return found


class GenericAdapter(ArchAdapter):
    """Stands in for an adapter on a model of an unregistered family (see the module docstring).

    It reports no heads or FFN neurons (``layer_shapes`` is empty) and is never registered:
    ``get_adapter(model, structural=False)`` returns one for an unknown ``model_type``.
    """

    structural: ClassVar[bool] = False
    attention_projs = ()
    ffn_projs = ()

    def __init__(self, model_type: str | None) -> None:
        self.model_types = (str(model_type),)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The largest list of blocks (by parameters): the chain block-by-block reconstruction runs through."""
        lists = block_lists(model)
        if not lists:
            raise ValueError(
                f"hf_prune found no repeated blocks with linear layers in {type(model).__name__} "
                f"(model_type={self.model_types[0]!r}): weight sparsity prunes the nn.Linear layers of the blocks "
                "held in an nn.ModuleList"
            )
        return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))[1]

    def block_linears(self, block: nn.Module) -> list[nn.Module]:
        return [m for m in block.modules() if is_linear(m) and m.weight.numel()]

    def all_block_linears(self, model: nn.Module) -> list[nn.Module]:
        lists = block_lists(model)
        if not lists:
            self.layers(model)  # raises the explanatory error
        return [m for _, blocks in lists for block in blocks for m in self.block_linears(block)]

    def layer_shapes(self, model: nn.Module) -> list[LayerShape]:
        return []
