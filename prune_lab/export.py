"""Serialisation: sparse state_dicts, recipes (JSON), and the torch.nn.utils.prune bridge."""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np
import torch
from torch import Tensor, nn

from ._version import __version__

RECIPE_FORMAT = 1
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


def encode_sparse(t: Tensor) -> dict[str, Any]:
    """A tensor in the smallest of three layouts (see :func:`sparse_layouts`); ties prefer dense."""
    flat = t.detach().reshape(-1).cpu()
    nonzero = flat != 0
    n, nnz = flat.numel(), int(nonzero.sum())
    sizes = sparse_layouts(n, nnz, flat.element_size())
    layout = min(sizes, key=sizes.__getitem__)
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
    n = math.prod(shape)
    if entry.get("layout") == "dense":
        return values.reshape(shape)
    out = torch.zeros(n, dtype=values.dtype)
    if "bitmap" in entry:
        mask = torch.from_numpy(np.unpackbits(entry["bitmap"].numpy(), count=n).astype(bool))
        out[mask] = values
    else:
        out[entry["indices"].long()] = values
    return out.reshape(shape)


def sparse_state(state_dict: Mapping[str, Tensor], sparse_keys: list[str]) -> dict[str, Any]:
    return {
        "prune_lab_sparse": SPARSE_FORMAT,
        "sparse": {k: encode_sparse(state_dict[k]) for k in sparse_keys},
        "dense": {k: v.detach().cpu() for k, v in state_dict.items() if k not in sparse_keys},
        "order": list(state_dict),
    }


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


def load_state_dict(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> dict[str, Tensor]:
    """A dense state_dict from a dense or sparse export, loadable with ``model.load_state_dict``."""
    obj = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(obj, Mapping) and "prune_lab_sparse" in obj:
        if obj["prune_lab_sparse"] > SPARSE_FORMAT:
            raise ValueError(f"{path}: sparse format {obj['prune_lab_sparse']} is newer than this prune_lab reads ({SPARSE_FORMAT}); upgrade prune_lab")
        tensors = {k: decode_sparse(v) for k, v in obj["sparse"].items()}
        tensors.update(obj["dense"])
        return {k: tensors[k] for k in obj["order"]}
    return dict(obj)


# ---------------------------------------------------------------- recipes
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
    if not isinstance(data.get("seed", 0), int):
        raise ValueError(f"{source}: 'seed' must be an integer, got {data.get('seed')!r}")
    return data


def to_torch_prune(model: nn.Module, masks: Mapping[str, Tensor]) -> nn.Module:
    """Install masks as ``torch.nn.utils.prune`` buffers (``weight_orig`` + ``weight_mask``).

    Every module sharing a tied weight gets the mask, so the tie survives on ``weight_orig``.
    """
    from torch.nn.utils import prune

    modules = dict(model.named_modules(remove_duplicate=False))
    for name, mask in masks.items():
        if name not in modules:
            raise ValueError(f"to_torch_prune: the model has no module {name!r}; is it the same architecture?")
        module = modules[name]
        weight = getattr(module, "weight", None)
        if weight is None or tuple(weight.shape) != tuple(mask.shape):
            raise ValueError(
                f"to_torch_prune: layer {name!r} has weight shape {tuple(getattr(weight, 'shape', ()))}, "
                f"mask shape is {tuple(mask.shape)}"
            )
        prune.custom_from_mask(module, "weight", mask.to(weight.device))
    return model
