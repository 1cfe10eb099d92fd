"""Serialisation: sparse state_dicts, recipes (JSON), and the torch.nn.utils.prune bridge."""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Mapping, Union

import numpy as np
import torch
from torch import Tensor, nn

from ._version import __version__
from .compress import _DTYPES as _COMPRESS_DTYPES
from .compress import MAGIC as COMPRESSED
from .compress import raw_bytes, read_compressed

RECIPE_FORMAT = 2  # 2: 'pattern' and optional packed 'mask' per layer; 1 is read too
SPARSE_FORMAT = 1
PathLike = Union[str, "os.PathLike[str]"]


# ---------------------------------------------------------------- sparse tensors
def index_bytes(n: int) -> int:
    return 4 if n < 2**31 else 8


def sparse_layouts(n: int, nnz: int, itemsize: int) -> dict[str, int]:
    """Payload bytes of each layout for a tensor of ``n`` entries with ``nnz`` nonzeros."""
    return {
        "dense": n * itemsize,
        "bitmap": math.ceil(n / 8) + nnz * itemsize,
        "indices": nnz * (index_bytes(n) + itemsize),
    }


def sparse_payload_bytes(n: int, nnz: int, itemsize: int) -> int:
    """Bytes of one encoded tensor's data in its smallest layout: dense values, a packed bitmap
    plus nonzero values, or flat int32 indices plus nonzero values. Serialisation framing
    comes on top (the file totals in ``Session.stats`` include it)."""
    return min(sparse_layouts(n, nnz, itemsize).values())


def _layout(n: int, nnz: int, itemsize: int) -> str:
    sizes = sparse_layouts(n, nnz, itemsize)
    return min(sizes, key=sizes.__getitem__)  # ties prefer dense, then bitmap


def encode_sparse(t: Tensor) -> dict[str, Any]:
    """A tensor in the smallest of three layouts (see :func:`sparse_layouts`)."""
    flat = t.detach().reshape(-1).cpu()
    nonzero = flat != 0
    n, nnz = flat.numel(), int(nonzero.sum())
    layout = _layout(n, nnz, flat.element_size())
    entry: dict[str, Any] = {"shape": list(t.shape), "layout": layout}
    if layout == "dense":
        entry["values"] = flat.clone()
        return entry
    entry["values"] = flat[nonzero].clone()
    if layout == "bitmap":
        entry["bitmap"] = torch.from_numpy(np.packbits(nonzero.numpy()))
    else:
        dtype = torch.int32 if index_bytes(n) == 4 else torch.int64
        entry["indices"] = nonzero.nonzero().reshape(-1).to(dtype)
    return entry


def decode_sparse(entry: Mapping[str, Any]) -> Tensor:
    shape = tuple(entry["shape"])
    values = entry["values"]
    if entry.get("layout") == "dense":
        return values.reshape(shape)
    n = math.prod(shape)
    out = torch.zeros(n, dtype=values.dtype)
    if "bitmap" in entry:
        mask = torch.from_numpy(np.unpackbits(entry["bitmap"].numpy(), count=n).astype(bool))
        out[mask] = values
    else:
        out[entry["indices"].long()] = values
    return out.reshape(shape)


# The earlier sparse export file: MAGIC, an 8-byte little-endian header length, a JSON header
# listing every tensor (key, layout, shape, dtype, nonzeros), then the raw buffers in header
# order. Still read by load_state_dict; new exports use the compressed format (compress.py).
MAGIC = b"PRUNE_LAB_SPARSE"
_DTYPES = {str(d).removeprefix("torch."): d for d in _COMPRESS_DTYPES.values()}  # keyed "float32" here


def _header(meta: list[tuple[str, tuple[int, ...], torch.dtype, int, bool]]) -> bytes:
    tensors = []
    for key, shape, dtype, nnz, sparse in meta:
        n = math.prod(shape)
        layout = _layout(n, nnz, _itemsize(dtype)) if sparse else "dense"
        tensors.append({"key": key, "layout": layout, "shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "nnz": nnz})
    head = {"prune_lab_sparse": SPARSE_FORMAT, "prune_lab_version": __version__, "tensors": tensors}
    return json.dumps(head, separators=(",", ":")).encode()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def sparse_bytes(state_dict: Mapping[str, Tensor], sparse_keys: Iterable[str]) -> bytes:
    """The earlier sparse export (before the compressed one) of a state_dict: ``sparse_keys``
    encoded (:func:`encode_sparse`), everything else dense. Files in this format still load
    with :func:`load_state_dict`; this writer is what tests that."""
    sparse_keys = set(sparse_keys)
    meta, buffers = [], []
    for key, t in state_dict.items():
        if key in sparse_keys:
            entry = encode_sparse(t)
            nnz = t.numel() if entry["layout"] == "dense" else entry["values"].numel()
            parts = [entry.get("bitmap"), entry.get("indices"), entry["values"]]
            buffers += [raw_bytes(p) for p in parts if p is not None]
        else:
            nnz = t.numel()
            buffers.append(raw_bytes(t))
        meta.append((key, tuple(t.shape), t.dtype, nnz, key in sparse_keys))
    header = _header(meta)
    return b"".join([MAGIC, struct.pack("<Q", len(header)), header, *buffers])


def read_sparse(data: bytes, source: str = "sparse export") -> dict[str, Tensor]:
    if not data.startswith(MAGIC):
        raise ValueError(f"{source} is not a prune_lab sparse export")
    (hlen,) = struct.unpack_from("<Q", data, len(MAGIC))
    pos = len(MAGIC) + 8
    head = json.loads(data[pos : pos + hlen])
    if head.get("prune_lab_sparse", 0) > SPARSE_FORMAT:
        raise ValueError(f"{source}: sparse format {head['prune_lab_sparse']} is newer than this prune_lab reads ({SPARSE_FORMAT}); upgrade prune_lab")
    pos += hlen

    def take(nbytes: int, dtype: torch.dtype) -> Tensor:
        nonlocal pos
        buf = bytearray(data[pos : pos + nbytes])
        pos += nbytes
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype) if nbytes else torch.empty(0, dtype=dtype)

    out: dict[str, Tensor] = {}
    for e in head["tensors"]:
        dtype, shape, nnz = _DTYPES[e["dtype"]], tuple(e["shape"]), e["nnz"]
        n = math.prod(shape)
        entry: dict[str, Any] = {"shape": list(shape), "layout": e["layout"]}
        if e["layout"] == "bitmap":
            entry["bitmap"] = take(math.ceil(n / 8), torch.uint8)
        elif e["layout"] == "indices":
            entry["indices"] = take(nnz * index_bytes(n), torch.int32 if index_bytes(n) == 4 else torch.int64)
        entry["values"] = take((n if e["layout"] == "dense" else nnz) * _itemsize(dtype), dtype)
        out[e["key"]] = decode_sparse(entry).clone()
    return out


def serialize(obj: Any) -> bytes:
    """``torch.save`` into memory: the exact bytes a file export writes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def write_bytes(path: PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def write_export(path: PathLike, model_bytes: bytes, recipe: Mapping[str, Any]) -> dict[str, Path]:
    """Write an export's model file and its recipe beside it (``<stem>.recipe.json``), each
    whole or not at all: ``{"model": path, "recipe": path}``."""
    path = Path(path)
    model_path = write_bytes(path, model_bytes)
    recipe_path = write_bytes(path.with_name(path.stem + ".recipe.json"), json.dumps(recipe, indent=1).encode())
    return {"model": model_path, "recipe": recipe_path}


def load_state_dict(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> dict[str, Tensor]:
    """A dense state_dict from a dense (``torch.save``) or sparse export, for ``model.load_state_dict``."""
    with open(path, "rb") as f:
        head = f.read(max(len(MAGIC), len(COMPRESSED)))
    if head.startswith(COMPRESSED):
        return {k: v.to(map_location) for k, v in read_compressed(Path(path).read_bytes(), f"{os.fspath(path)!r}").items()}
    if head.startswith(MAGIC):
        return {k: v.to(map_location) for k, v in read_sparse(Path(path).read_bytes(), f"{os.fspath(path)!r}").items()}
    return dict(torch.load(path, map_location=map_location, weights_only=True))


# ---------------------------------------------------------------- recipes
def pack_mask(mask: Tensor) -> str:
    """A keep-mask as base64 of its packed bits (flat, row-major)."""
    import base64

    return base64.b64encode(np.packbits(mask.detach().reshape(-1).cpu().numpy()).tobytes()).decode()


def unpack_mask(text: str, shape: tuple[int, ...]) -> Tensor:
    import base64
    import binascii

    n = math.prod(shape)
    try:
        raw = np.frombuffer(base64.b64decode(text, validate=True), dtype=np.uint8)
    except (binascii.Error, ValueError):
        raise ValueError("recipe mask is not base64") from None
    if raw.size != math.ceil(n / 8):
        raise ValueError(f"recipe mask holds {raw.size * 8} bits, the layer needs {n}")
    return torch.from_numpy(np.unpackbits(raw, count=n).astype(bool)).reshape(shape)


def weights_digest(tensors: list[Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for p in str(v).split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def load_recipe(recipe: Union[PathLike, Mapping[str, Any]]) -> dict[str, Any]:
    """Read and validate a recipe (path or dict) without touching any model."""
    source = "recipe"
    if isinstance(recipe, Mapping):
        data: Any = dict(recipe)
    else:
        source = f"recipe file {os.fspath(recipe)!r}"
        try:
            text = Path(recipe).read_text()
        except OSError as e:
            raise ValueError(f"cannot read {source}: {e.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict) or "prune_lab_recipe" not in data:
        raise ValueError(f"{source} is not a prune_lab recipe (no 'prune_lab_recipe' key)")
    fmt = data["prune_lab_recipe"]
    if not isinstance(fmt, int) or fmt < 1:
        raise ValueError(f"{source}: 'prune_lab_recipe' must be a positive integer format, got {fmt!r}")
    version = str(data.get("prune_lab_version", "0"))
    if fmt > RECIPE_FORMAT or _version_tuple(version) > _version_tuple(__version__):
        raise ValueError(
            f"{source} was written by prune_lab {version} (recipe format {fmt}); this is prune_lab "
            f"{__version__}, which reads recipe format <= {RECIPE_FORMAT}. Upgrade prune_lab to apply it."
        )
    layers = data.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{source}: 'layers' must be a non-empty object of layer name -> settings")
    for name, entry in layers.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: layer {name!r} must map to an object, got {entry!r}")
        for key, typ in (("shape", list), ("pruned", int), ("criterion", str)):
            if not isinstance(entry.get(key), typ) or isinstance(entry.get(key), bool):
                raise ValueError(f"{source}: layer {name!r} needs {key!r} of type {typ.__name__}, got {entry.get(key)!r}")
        n = math.prod(entry["shape"])
        if not 0 <= entry["pruned"] <= n:
            raise ValueError(f"{source}: layer {name!r} prunes {entry['pruned']} of {n} weights; valid: 0..{n}")
        if "bits" in entry:
            from .quantize import check_bits

            try:
                check_bits(entry["bits"], entry.get("quant_method"), name)
            except ValueError as e:
                raise ValueError(f"{source}: {e}") from None
        if "mask" in entry:
            try:
                mask = unpack_mask(entry["mask"], tuple(entry["shape"]))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{source}: layer {name!r}: {e}") from None
            if int(mask.numel() - mask.sum()) != entry["pruned"]:
                raise ValueError(f"{source}: layer {name!r}: its mask zeroes {int(mask.numel() - mask.sum())} weights, not {entry['pruned']}")
    if not isinstance(data.get("seed", 0), int):
        raise ValueError(f"{source}: 'seed' must be an integer, got {data.get('seed')!r}")
    return data


def to_torch_prune(model: nn.Module, masks: Mapping[str, Tensor], params: Mapping[str, str] = {}) -> nn.Module:
    """Install masks as ``torch.nn.utils.prune`` buffers (``<param>_orig`` + ``<param>_mask``).

    ``params`` maps a layer name to its qualified parameter name (default ``<layer>.weight``).
    """
    from torch.nn.utils import prune

    modules = dict(model.named_modules(remove_duplicate=False))
    for name, mask in masks.items():
        qualified = params.get(name, f"{name}.weight" if name else "weight")
        mname, _, pname = qualified.rpartition(".")
        if mname not in modules:
            raise ValueError(f"to_torch_prune: the model has no module {mname!r}; is it the same architecture?")
        module = modules[mname]
        weight = getattr(module, pname, None)
        if weight is None or tuple(weight.shape) != tuple(mask.shape):
            raise ValueError(
                f"to_torch_prune: layer {name!r} has weight shape {tuple(getattr(weight, 'shape', ()))}, "
                f"mask shape is {tuple(mask.shape)}"
            )
        prune.custom_from_mask(module, pname, mask.to(weight.device))
    return model
