"""PruningPlan: *what* to remove, as plain data (JSON-serialisable, inspectable, editable).

A plan is produced by the allocation step (or written by hand) and applied by :mod:`hf_prune.structure.surgery`.
Indices refer to the model the plan is applied to (its current numbering).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..architectures import LayerShape, get_adapter
from ..structure import refit
from ..structure.surgery import prune_structure
from ..utils import JsonMixin


def _int_keys(mapping: Mapping[Any, Iterable[int]]) -> dict[int, list[int]]:
    return {int(k): sorted(int(i) for i in v) for k, v in mapping.items()}


@dataclass
class PruningPlan(JsonMixin):
    """Per layer, which attention heads and which FFN neurons to remove.

    Attributes:
        heads: ``{layer: [query head indices]}``.
        ffn: ``{layer: [neuron indices]}``.
        meta: free-form provenance (criterion, targets, scores summary); carried through JSON untouched.
    """

    heads: dict[int, list[int]] = field(default_factory=dict)
    ffn: dict[int, list[int]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.heads = _int_keys(self.heads)
        self.ffn = _int_keys(self.ffn)

    @property
    def num_heads_removed(self) -> int:
        return sum(len(v) for v in self.heads.values())

    @property
    def num_neurons_removed(self) -> int:
        return sum(len(v) for v in self.ffn.values())

    def is_empty(self) -> bool:
        return self.num_heads_removed == 0 and self.num_neurons_removed == 0

    def only(self, layer: int) -> PruningPlan:
        """The part of this plan that touches ``layer`` (block-by-block passes apply a plan one block at a time)."""
        return PruningPlan(
            heads={layer: self.heads[layer]} if layer in self.heads else {},
            ffn={layer: self.ffn[layer]} if layer in self.ffn else {},
            meta=self.meta,
        )

    def apply(
        self,
        model: nn.Module,
        calibration: Iterable[dict[str, Any]] | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> nn.Module:
        """Apply the plan in place (both parts validated before any weight changes).

        With ``calibration`` (batches of model inputs), the kept columns and the bias of every shrunk output
        projection are refitted by least squares to reproduce their dense output
        (:func:`hf_prune.structure.refit.apply_plan_with_compensation`); ``reduce`` sums its statistics over
        processes.
        """
        if calibration is None:
            return prune_structure(model, self.heads, self.ffn)
        refit.apply_plan_with_compensation(model, self, calibration, reduce=reduce)
        return model

    def shapes_after(self, model: nn.Module) -> list[LayerShape]:
        """The per-layer shapes ``model`` will have once the plan is applied (the model is not changed)."""
        shapes = get_adapter(model).layer_shapes(model)
        out = []
        for i, s in enumerate(shapes):
            removed = set(self.heads.get(i, []))
            group = s.heads // s.kv_heads if s.kv_heads else 1
            # a key/value head stays while any query head of its group does (whole groups or inside groups)
            kv = len({h // group for h in range(s.heads) if h not in removed}) if s.kv_heads else 0
            out.append(LayerShape(s.heads - len(removed), kv, s.ffn - len(self.ffn.get(i, []))))
        return out

    def to_dict(self) -> dict[str, Any]:
        # JSON object keys are strings; from_dict converts them back.
        return {
            "heads": {str(k): v for k, v in sorted(self.heads.items())},
            "ffn": {str(k): v for k, v in sorted(self.ffn.items())},
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruningPlan:
        unknown = set(data) - {"heads", "ffn", "meta"}
        if unknown:
            raise ValueError(f"unknown PruningPlan keys {sorted(unknown)}; allowed: heads, ffn, meta")
        return cls(heads=data.get("heads", {}), ffn=data.get("ffn", {}), meta=dict(data.get("meta", {})))
