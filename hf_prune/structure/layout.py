"""Layouts: which serving engines can run a model's per-block shapes.

A pruned model is a list of block shapes (:class:`~hf_prune.architectures.LayerShape`: query heads, key/value heads,
FFN width; 0 heads = the block's attention sublayer is removed, 0 FFN = its MLP is removed). Engines accept three
families of shapes, from most to least constrained:

* ``"uniform"``: every block has the same shape and keeps both sublayers. A plain stock config describes it, so
  transformers, vLLM and llama.cpp (``llama`` GGUF) all run it.
* ``"servable"``: every block that keeps attention has the same number of query heads (key/value heads may differ
  per block and must divide it), FFN widths are free per block, and a block may lose its attention or its MLP. This
  is what vLLM's ``DeciLMForCausalLM`` (``nemotron-nas``, per-block ``n_heads_in_group`` and ``intermediate_size``)
  and llama.cpp's ``deci`` architecture describe.
* ``"free"``: anything hf_prune's own surgery produces (per-block query-head counts); transformers loads it through
  the remote-code file saved beside the weights, the engines above do not.

The allocator (:mod:`hf_prune.planning.layout`) restricts its choices to the layout a :class:`~hf_prune.PruningConfig`
asks for; the serving exports (:mod:`hf_prune.io.vllm`, :mod:`hf_prune.io.gguf`) check the layout here before writing
anything.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..architectures import LayerShape, get_adapter
from ..config import LAYOUTS


def layout_problems(shapes: Sequence[LayerShape], layout: str) -> list[str]:
    """Why ``shapes`` do not fit ``layout`` (empty when they do), one sentence per block at fault.

    Raises:
        ValueError: ``layout`` is not one of :data:`LAYOUTS`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is invalid; allowed: {', '.join(LAYOUTS)}")
    problems: list[str] = []
    if layout == "free" or not shapes:
        return problems
    if layout == "uniform":
        first = shapes[0]
        for i, s in enumerate(shapes):
            if s.heads == 0 or s.ffn == 0:
                removed = "attention" if s.heads == 0 else "MLP"
                problems.append(f"block {i} has its {removed} sublayer removed")
            elif s != first:
                problems.append(
                    f"block {i} is (heads, kv_heads, ffn) = {(s.heads, s.kv_heads, s.ffn)}, block 0 is "
                    f"{(first.heads, first.kv_heads, first.ffn)}"
                )
        return problems
    with_attention = [(i, s) for i, s in enumerate(shapes) if s.heads > 0]
    if with_attention:
        i0, s0 = with_attention[0]
        for i, s in with_attention[1:]:
            if s.heads != s0.heads:
                problems.append(f"block {i} has {s.heads} query heads, block {i0} has {s0.heads}")
        for i, s in with_attention:
            if s.kv_heads and s.heads % s.kv_heads:
                problems.append(f"block {i}'s {s.kv_heads} key/value heads do not divide its {s.heads} query heads")
    return problems


def layout_of(shapes: Sequence[LayerShape]) -> str:
    """The most constrained layout ``shapes`` fit: ``"uniform"``, ``"servable"`` or ``"free"``."""
    for layout in ("uniform", "servable"):
        if not layout_problems(shapes, layout):
            return layout
    return "free"


def model_layout(model: nn.Module) -> str:
    """:func:`layout_of` the blocks of ``model`` (read from its modules)."""
    return layout_of(get_adapter(model).layer_shapes(model))


def check_layout(shapes: Sequence[LayerShape], layout: str, what: str) -> None:
    """Raise ``ValueError`` naming the blocks that keep ``shapes`` out of ``layout`` and how to get there.

    ``what`` says who needs the layout (``"vLLM (nemotron-nas)"``), for the message.
    """
    problems = layout_problems(shapes, layout)
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ValueError(
            f"{what} needs the {layout!r} layout, and this model is {layout_of(shapes)!r}: {shown}. Prune with "
            f"PruningConfig(layout={layout!r}) (recipe: pruning.layout: {layout}) to get a model it runs."
        )
