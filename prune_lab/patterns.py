"""Sparsity patterns: unstructured (any weights) and N:M (N kept in every group of M
consecutive weights along the input dimension, the pattern NVIDIA GPUs of compute capability
8.0 and later accelerate as 2:4).

The input dimension of a weight is its dimension 1 (Linear ``(out, in)``, convolutions
``(out, in/groups, *kernel)``, attention and RNN matrices), except GPT-2's ``Conv1D`` whose weight
is ``(in, out)``: dimension 0. Groups run along that dimension for every other index fixed.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
from torch import Tensor

UNSTRUCTURED = "unstructured"
CHANNELS = "channels"  # whole output channels and everything coupled to them (``groups.py``)
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm(pattern: str) -> Optional[tuple[int, int]]:
    """``(N, M)`` for an ``"N:M"`` pattern, None for unstructured; anything else is an error
    naming what is valid."""
    if pattern in (None, UNSTRUCTURED, "weights"):
        return None
    m = _NM.match(str(pattern)) if isinstance(pattern, str) else None
    if m is None:
        raise ValueError(f"pattern {pattern!r}: use 'unstructured', 'channels' or 'N:M' with 0 < N < M (e.g. '2:4')")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise ValueError(f"pattern {pattern!r}: N:M needs 0 < N < M (N kept of every M), got N={n}, M={mm}")
    return n, mm


def normalize(pattern: Optional[str]) -> str:
    nm = parse_nm(pattern if pattern is not None else UNSTRUCTURED)
    return UNSTRUCTURED if nm is None else f"{nm[0]}:{nm[1]}"


def nm_sparsity(pattern: str) -> float:
    n, m = parse_nm(pattern) or (1, 1)
    return (m - n) / m


def input_dim(kind: str) -> int:
    return 0 if kind == "Conv1D" else 1


class PatternWarning(UserWarning):
    """An N:M pattern applied to the whole model left the layers it does not fit as they were."""


def nm_fits(kind: str, shape: tuple[int, ...], m: int) -> bool:
    """Whether groups of ``m`` tile the weight's input dimension."""
    return len(shape) >= 2 and shape[input_dim(kind)] % m == 0


def check_nm(name: str, kind: str, shape: tuple[int, ...], pattern: str) -> tuple[int, int, int]:
    """``(N, M, input dim)`` when ``pattern`` fits the layer, else a clear error."""
    nm = parse_nm(pattern)
    assert nm is not None
    n, m = nm
    if nm_fits(kind, shape, m):
        return n, m, input_dim(kind)
    if len(shape) < 2:
        raise ValueError(f"layer {name!r}: an N:M pattern needs a matrix or convolution weight, not shape {shape}")
    dim = input_dim(kind)
    if shape[dim] % m:
        raise ValueError(f"layer {name!r}: pattern {pattern!r} groups its input dimension (size {shape[dim]}, dim {dim} "
                         f"of {shape}) by {m}, which does not divide it; choose an M that divides {shape[dim]}")
    return n, m, dim


def _grouped(t: Tensor, shape: tuple[int, ...], dim: int, m: int) -> Tensor:
    """``t`` (flat or shaped) as (groups, M): the input dimension last, split into groups of M."""
    t = t.reshape(shape).movedim(dim, -1)
    return t.reshape(-1, m)


def nm_mask(keys: Tensor, shape: tuple[int, ...], kind: str, n: int, m: int) -> Tensor:
    """Keep-mask keeping the ``n`` largest keys of every group of ``m`` along the input dimension
    (ties by position: the earlier weight is pruned first, as ``k_smallest_masks`` does)."""
    dim = input_dim(kind)
    g = _grouped(keys, shape, dim, m)
    # stable ascending sort: the first m - n of each group are pruned
    order = torch.argsort(g, dim=1, stable=True)
    keep = torch.ones_like(g, dtype=torch.bool)
    keep.scatter_(1, order[:, : m - n], False)
    moved = list(shape)
    moved.append(moved.pop(dim))
    return keep.reshape(moved).movedim(-1, dim).contiguous()


def nm_groups(t: Tensor, kind: str, m: int) -> Tensor:
    """The (groups, M) view of a weight or mask along its input dimension (for checks)."""
    return _grouped(t, tuple(t.shape), input_dim(kind), m)


__all__ = ["UNSTRUCTURED", "PatternWarning", "nm_fits", "parse_nm", "normalize", "nm_sparsity", "check_nm", "nm_mask", "nm_groups", "input_dim"]
