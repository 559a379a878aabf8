"""Compact storage of sparse weights: values + bitmask in safetensors, restored to the exact dense tensors.

Unstructured and N:M sparsity leave the tensors dense, so a 90%-sparse model saved normally is as large as the dense
one. ``hf_prune.save_pretrained(model, path, sparse=True)`` stores every tensor that gets smaller that way as its
non-zero values plus a one-bit-per-element mask (the bitmask layout compressed-tensors calls ``sparse-bitmask``):
``4 d + 1/8`` bytes per float32 element at density ``d`` (``2 d + 1/8`` in 16 bits), against 4 (2) dense.

Why not the compressed-tensors package itself: loading its format needs that package and a quantization config on the
model, and it stores row offsets we do not need; the layout here is a few lines of torch, keeps the safetensors
header as the only metadata, and restores bit-exact tensors with nothing but torch and safetensors.

The weights go to ``model.sparse.safetensors`` (``model-0000i-of-0000n.sparse.safetensors`` with
``model.sparse.safetensors.index.json`` when sharded), not ``model.safetensors``: a stock ``from_pretrained`` then
stops with "no file named model.safetensors" instead of silently initialising random weights.
:func:`hf_prune.from_pretrained` detects the files and restores the dense tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

SPARSE_SUFFIX = ".sparse.safetensors"
SPARSE_INDEX = "model.sparse.safetensors.index.json"
_META_KEY = "hf_prune_sparse"
_VALUES, _MASK = "::values", "::bitmask"
# compress a tensor only when that saves at least this fraction of its bytes (small savings are not worth a format)
MIN_SAVING = 0.1
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor (flattened, row-major) into uint8, eight elements per byte, least significant bit
    first."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BITS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` bits as a flat boolean tensor."""
    bits = (packed[:, None] & _BITS.to(packed.device)) != 0
    return bits.reshape(-1)[:numel]


def _compressed_bytes(tensor: torch.Tensor, nonzero: int) -> int:
    return nonzero * tensor.element_size() + (tensor.numel() + 7) // 8


def compress(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Split ``tensors`` into what is stored: sparse floating tensors as ``name::values`` + ``name::bitmask``, the
    rest unchanged. Returns the tensors to write and ``{name: {"shape", "dtype"}}`` for the compressed ones."""
    out: dict[str, torch.Tensor] = {}
    meta: dict[str, dict] = {}
    for name, tensor in tensors.items():
        if _VALUES in name or _MASK in name:
            raise ValueError(f"tensor name {name!r} collides with hf_prune's sparse storage suffixes")
        if tensor.is_floating_point() and tensor.numel() >= 64:
            mask = tensor != 0
            nonzero = int(mask.sum())
            if _compressed_bytes(tensor, nonzero) <= (1 - MIN_SAVING) * tensor.numel() * tensor.element_size():
                out[name + _VALUES] = tensor.reshape(-1)[mask.reshape(-1)].contiguous()
                out[name + _MASK] = pack_bits(mask)
                meta[name] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
                continue
        out[name] = tensor.contiguous()
    return out, meta


def decompress(stored: dict[str, torch.Tensor], meta: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`compress`: the exact dense tensors."""
    out = {k: v for k, v in stored.items() if not k.endswith((_VALUES, _MASK))}
    for name, info in meta.items():
        try:
            values, packed = stored[name + _VALUES], stored[name + _MASK]
        except KeyError as exc:
            raise ValueError(f"sparse checkpoint lists {name!r} but lacks its {exc.args[0]!r} tensor") from None
        shape = torch.Size(info["shape"])
        mask = unpack_bits(packed, shape.numel())
        if int(mask.sum()) != values.numel():
            raise ValueError(f"sparse checkpoint: {name!r} has {values.numel()} values for {int(mask.sum())} set bits")
        dense = values.new_zeros(shape.numel())
        dense[mask] = values
        out[name] = dense.view(shape)
    return out


def sparsify_folder(folder: Path) -> dict[str, int]:
    """Rewrite the safetensors weights ``save_pretrained`` wrote into ``folder`` in the sparse layout, in place
    (``folder`` is the temporary folder of an atomic save). Returns ``{"dense_bytes", "sparse_bytes",
    "compressed_tensors"}`` for the report."""
    index_path = folder / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        shards = sorted(set(index["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        index, shards = None, ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no safetensors weights in {folder} to store sparsely (save with safetensors)")
    dense_bytes = sparse_bytes = compressed = 0
    weight_map: dict[str, str] = {}
    for shard in shards:
        path = folder / shard
        dense_bytes += path.stat().st_size
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        stored, meta = compress(load_file(str(path)))
        compressed += len(meta)
        target = folder / (shard.removesuffix(".safetensors") + SPARSE_SUFFIX)
        save_file(stored, str(target), metadata={**metadata, "format": "pt", _META_KEY: json.dumps(meta)})
        path.unlink()
        sparse_bytes += target.stat().st_size
        weight_map.update(dict.fromkeys(stored, target.name))
    if index is not None:
        index_path.unlink()
        (folder / SPARSE_INDEX).write_text(
            json.dumps({"metadata": {**index.get("metadata", {})}, "weight_map": weight_map}, indent=2)
        )
    return {"dense_bytes": dense_bytes, "sparse_bytes": sparse_bytes, "compressed_tensors": compressed}


def sparse_files(folder: Path) -> list[Path]:
    """The sparse weight files of a saved folder (empty for an ordinary checkpoint)."""
    index = folder / SPARSE_INDEX
    if index.exists():
        return [folder / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / f"model{SPARSE_SUFFIX}"
    return [single] if single.exists() else []


def load_sparse_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    """The dense state dict stored in ``files`` (see :func:`sparsify_folder`)."""
    state: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
        state.update(decompress(load_file(str(path)), meta))
    return state
