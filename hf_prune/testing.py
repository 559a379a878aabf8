"""Conformance kit for architecture adapters: the checks every registered family must pass.

Writing an adapter for a new family? Run::

    from hf_prune.testing import check_adapter
    check_adapter(lambda: MyModelForCausalLM(tiny_config), inputs, causal=True)

It prunes a non-uniform set of heads (whole key/value groups under GQA, one layer emptied) and FFN neurons (one
layer emptied) and asserts, raising ``AssertionError`` with what differed:

1. **exactness:** the pruned model's outputs equal the dense model's with those heads and neurons *zeroed*, where
   zeroing is derived from the adapter's own description (the "in" columns of each branch's output projection),
   so a wrong part layout or a forgotten projection cannot pass;
2. **the request is not vacuous:** pruning changed the outputs and removed parameters;
3. **save/reload:** ``hf_prune.save_pretrained`` then ``hf_prune.from_pretrained`` gives identical outputs and the
   recorded shapes; so does the stock auto class with ``trust_remote_code=True`` through the folder's
   ``hf_prune_modeling.py`` (the non-uniform shapes need it), and the folder has no remote code when the stock config
   describes the shapes;
4. **generation** (``causal=True``): greedy ``generate`` with the KV cache gives the zeroed model's tokens;
5. **bad input:** an out-of-range request raises ``ValueError`` and leaves the model untouched;
6. **depth:** removing a block equals the dense model with that block skipped (a hook hands its input through), the
   result reloads with hf_prune and with the stock class, and generates the same tokens;
7. **query heads inside groups** (grouped-query attention only): one query head removed from every key/value group
   of every layer equals the zeroed model, reloads with hf_prune and with the stock class (uniform shapes: the
   config describes them), and generates the same tokens; a removal that leaves groups unequal raises.

The project's own test suite runs it for every registered model type (``tests/test_conformance.py``).
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from .architectures import get_adapter
from .architectures.base import head_feature_index, out_in
from .io.load import from_pretrained
from .io.save import save_pretrained
from .measure import count_parameters
from .structure.remote_code import MODELING_FILE
from .structure.surgery import prune_layers, prune_structure

__all__ = ["check_adapter", "conformance_request", "zero_heads_and_neurons"]


def zero_heads_and_neurons(model: nn.Module, heads: Mapping[int, list[int]], neurons: Mapping[int, list[int]]) -> None:
    """Silence query heads and FFN neurons in place by zeroing the input columns they feed in each branch's output
    projection (the adapter's ``"in"`` projections): the dense reference a structural removal must reproduce.
    Indices refer to the current model."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    head_dim = adapter.head_dim(model.config)
    with torch.no_grad():
        for projs, request, width in ((adapter.attention_projs, heads, head_dim), (adapter.ffn_projs, neurons, 1)):
            for layer, ids in request.items():
                index = head_feature_index(ids, width)
                for proj in projs:
                    if proj.side == "in":
                        module = layers[layer].get_submodule(proj.path)
                        weight = out_in(module.weight, module)
                        weight[:, index.to(weight.device)] = 0


def conformance_request(model: nn.Module) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """A non-uniform head and neuron request for ``model`` (needs at least two layers): layer 0 loses one key/value
    group (or two single heads), the last layer loses every head, layer 0 a quarter of its neurons and the last
    layer all of them."""
    adapter = get_adapter(model)
    shapes = adapter.layer_shapes(model)
    if len(shapes) < 2:
        raise ValueError("check_adapter needs a model with at least two layers")
    first, last = shapes[0], len(shapes) - 1
    group = first.heads // first.kv_heads if first.kv_heads else 1
    heads = {0: list(range(group)) if group > 1 else [h for h in (1, 3) if h < first.heads] or [0]}
    heads[last] = list(range(shapes[last].heads))
    g = torch.Generator().manual_seed(3)
    neurons = {0: sorted(torch.randperm(first.ffn, generator=g)[: max(1, first.ffn // 4)].tolist())}
    neurons[last] = list(range(shapes[last].ffn))
    return heads, neurons


def _output(out: Any) -> torch.Tensor:
    for key in ("logits", "start_logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    raise AssertionError(f"check_adapter: no logits or hidden states in the model output {type(out).__name__}")


def _last_hidden(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    # task heads can squash differences (a random classifier's logits barely move), the last hidden state cannot
    out = model(**inputs, output_hidden_states=True)
    hidden = getattr(out, "hidden_states", None)
    return hidden[-1] if hidden else _output(out)


def _close(got: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    diff = (got.float() - expected.float()).abs().max().item() if got.shape == expected.shape else None
    assert diff is not None and diff <= atol, f"check_adapter: {what}: max abs difference {diff} > {atol}"


def check_adapter(
    make_model: Callable[[], nn.Module],
    inputs: Mapping[str, torch.Tensor],
    causal: bool = False,
    atol: float = 1e-4,
    generate_kwargs: Mapping[str, Any] | None = None,
) -> None:
    """Run the conformance checks (module docstring) on models built by ``make_model`` (a fresh model per call,
    in eval mode or not: the kit switches to eval) with ``inputs`` (a batch the model's forward accepts)."""
    model = make_model().eval()
    heads, neurons = conformance_request(model)
    reference = copy.deepcopy(model)
    zero_heads_and_neurons(reference, heads, neurons)
    with torch.no_grad():
        dense_hidden = _last_hidden(model, inputs)
        expected = _output(reference(**inputs))
    before = count_parameters(model)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    n_layers = len(get_adapter(model).layers(model))
    try:
        prune_structure(model, {n_layers: [0]})
    except ValueError:
        pass
    else:
        raise AssertionError("check_adapter: an out-of-range layer index did not raise ValueError")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items()), "a bad request changed weights"

    prune_structure(model, heads, neurons)
    assert count_parameters(model) < before, "check_adapter: pruning removed no parameters"
    with torch.no_grad():
        got = _output(model(**inputs))
        changed = (_last_hidden(model, inputs).float() - dense_hidden.float()).abs().max().item()
    _close(got, expected, atol, "pruned model vs the dense model with the same heads/neurons zeroed")
    assert changed > atol, f"check_adapter: pruning did not change the hidden states (max difference {changed})"

    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(model, folder)
        loaded = from_pretrained(folder, type(model)).eval()
        assert (Path(folder) / MODELING_FILE).exists(), "non-uniform shapes saved without hf_prune_modeling.py"
        _check_stock_loading(model, folder, inputs, got)
    assert loaded.config.hf_prune["layers"] == model.config.hf_prune["layers"], "reloaded shapes differ"
    with torch.no_grad():
        _close(_output(loaded(**inputs)), got, 0.0, "reloaded model vs the pruned model")

    if causal:
        _same_generation(model, reference, inputs, generate_kwargs, "pruned")
    _check_depth(make_model, inputs, causal, atol, generate_kwargs)
    _check_in_group(make_model, inputs, causal, atol, generate_kwargs)


def _same_generation(
    model: nn.Module,
    reference: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    generate_kwargs: Mapping[str, Any] | None,
    what: str,
) -> None:
    """Greedy ``generate`` with the KV cache gives the reference's tokens."""
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, **(generate_kwargs or {})}
    with torch.no_grad():
        want = reference.generate(**inputs, **kwargs)
        tokens = model.generate(**inputs, **kwargs)
    assert torch.equal(tokens, want), f"check_adapter: generate() {what} gave {tokens.tolist()}, not {want.tolist()}"


def _skip_block(block: nn.Module) -> None:
    """Make ``block`` hand its input hidden states through unchanged (the reference for removing it)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        if isinstance(output, tuple):
            return (hidden, *output[1:])
        return hidden

    block.register_forward_hook(hook, with_kwargs=True)


def _check_in_group(
    make_model: Callable[[], nn.Module],
    inputs: Mapping[str, torch.Tensor],
    causal: bool,
    atol: float,
    generate_kwargs: Mapping[str, Any] | None,
) -> None:
    model = make_model().eval()
    adapter = get_adapter(model)
    shapes = adapter.layer_shapes(model)
    group = shapes[0].heads // shapes[0].kv_heads if shapes[0].kv_heads else 1
    if group < 2 or any(s.heads != shapes[0].heads or s.kv_heads != shapes[0].kv_heads for s in shapes):
        return  # no grouped-query attention (or already non-uniform): nothing to remove inside groups
    # a different member of each group, so that "the first head of the group" cannot pass by accident
    heads = {i: [g * group + (g + i) % group for g in range(s.kv_heads)] for i, s in enumerate(shapes)}
    if shapes[0].kv_heads > 1:  # one query head out of one group leaves the groups unequal: refused, untouched
        snapshot = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            prune_structure(model, {0: heads[0][:1]})
        except ValueError:
            pass
        else:
            raise AssertionError("check_adapter: removing one query head of one group (unequal groups) did not raise")
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items()), "unequal groups changed weights"
    reference = copy.deepcopy(model)
    zero_heads_and_neurons(reference, heads, {})
    prune_structure(model, heads)
    kept = adapter.layer_shapes(model)
    assert all(s.kv_heads == shapes[0].kv_heads and s.heads == shapes[0].heads - s.kv_heads for s in kept), (
        f"check_adapter: in-group removal left shapes {kept}"
    )
    _matches_and_reloads(
        model,
        reference,
        inputs,
        causal,
        atol,
        generate_kwargs,
        "query heads removed inside groups vs zeroed",
        "after in-group removal",
    )


def _check_depth(
    make_model: Callable[[], nn.Module],
    inputs: Mapping[str, torch.Tensor],
    causal: bool,
    atol: float,
    generate_kwargs: Mapping[str, Any] | None,
) -> None:
    model = make_model().eval()
    adapter = get_adapter(model)
    n = len(adapter.layers(model))
    gone = 1 if n > 2 else 0
    reference = copy.deepcopy(model)
    _skip_block(adapter.layers(reference)[gone])
    prune_layers(model, [gone])
    assert len(adapter.layers(model)) == n - 1 and adapter.num_layers(model.config) == n - 1, "block count"
    _matches_and_reloads(
        model,
        reference,
        inputs,
        causal,
        atol,
        generate_kwargs,
        "model without a block vs the dense model skipping it",
        "without a block",
    )


def _check_stock_loading(
    model: nn.Module, folder: str, inputs: Mapping[str, torch.Tensor], expected: torch.Tensor
) -> None:
    """The saved ``folder`` loads with transformers alone: through the auto class named in its ``auto_map`` with
    ``trust_remote_code=True`` when it carries ``hf_prune_modeling.py``, else with the stock class."""
    name = type(model).__name__
    if (Path(folder) / MODELING_FILE).exists():
        auto_map = json.loads((Path(folder) / "config.json").read_text()).get("auto_map") or {}
        autos = [k for k, v in auto_map.items() if v.endswith(f".{name}")]
        assert autos, f"auto_map {auto_map} names no {name}"
        loaded = getattr(transformers, autos[0]).from_pretrained(folder, trust_remote_code=True)
        assert type(loaded).__module__.startswith("transformers_modules."), "remote code was not used"
        how = f"{autos[0]}.from_pretrained(trust_remote_code=True)"
    else:
        assert "auto_map" not in json.loads((Path(folder) / "config.json").read_text()), "auto_map without its file"
        loaded = type(model).from_pretrained(folder)
        how = f"{name}.from_pretrained"
    assert type(loaded).__name__ == name, f"{how} built a {type(loaded).__name__}"
    with torch.no_grad():
        _close(_output(loaded.eval()(**inputs)), expected, 0.0, f"{how} vs the pruned model")


def _matches_and_reloads(
    model: nn.Module,
    reference: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    causal: bool,
    atol: float,
    generate_kwargs: Mapping[str, Any] | None,
    what: str,
    when: str,
) -> None:
    """``model`` computes what ``reference`` does, reloads bit-exactly (hf_prune's and the stock loader) and, for
    LMs, generates the same tokens."""
    with torch.no_grad():
        got = _output(model(**inputs))
        _close(got, _output(reference(**inputs)), atol, what)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(model, folder)
        for loaded in (from_pretrained(folder, type(model)), type(model).from_pretrained(folder)):
            with torch.no_grad():
                _close(_output(loaded.eval()(**inputs)), got, 0.0, f"reload {when} ({type(loaded).__name__})")
        _check_stock_loading(model, folder, inputs, got)  # uniform shapes: no remote code written
    if causal:
        _same_generation(model, reference, inputs, generate_kwargs, when)
