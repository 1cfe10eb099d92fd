"""Exact k-smallest masks: pure tensor math, no state.

A mask is a bool tensor, True = keep. ``k_smallest_masks`` zeroes exactly ``k`` entries across
one or many score tensors, ties broken deterministically by (tensor order, flat index), and it
never concatenates the tensors: the k-th score is found by a radix select over the scores' bit
patterns (two histogram passes with ``torch.bincount``), so extra memory is bounded by the
largest single tensor, not the sum.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

_RADIX_BITS = 16


def ordered_keys(scores: Tensor) -> Tensor:
    """Flat integer keys whose order equals the order of ``scores`` (floats or integers).

    float32 maps to int32 bit patterns (negative floats flipped so order holds); other floats go
    through float64/int64; integers are widened to int64. -0.0 and +0.0 map to the same key.
    """
    flat = scores.detach().reshape(-1)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    if flat.dtype == torch.float32:
        int_type, flip = torch.int32, 0x7FFFFFFF
    elif flat.dtype == torch.float64:
        int_type, flip = torch.int64, 0x7FFFFFFFFFFFFFFF
    elif not flat.dtype.is_floating_point and flat.dtype != torch.bool:
        return flat.to(torch.int64)
    else:
        raise TypeError(f"scores must be a real float or integer tensor, got dtype {flat.dtype}")
    bits = flat.contiguous().view(int_type)
    negative = bits < 0
    if bool(negative.any()):
        bits = (flat + 0.0).view(int_type)  # -0.0 -> +0.0
        negative = bits < 0
        bits = torch.where(negative, bits ^ flip, bits)
    return bits


def magnitude_keys(weight: Tensor) -> Tensor:
    """Ordered keys of ``|weight|`` in one pass: clearing the sign bit of an IEEE float is abs."""
    flat = weight.detach().reshape(-1)
    if flat.dtype == torch.float32:
        return flat.contiguous().view(torch.int32) & 0x7FFFFFFF
    if flat.dtype == torch.float64:
        return flat.contiguous().view(torch.int64) & 0x7FFFFFFFFFFFFFFF
    return ordered_keys(flat.abs())


def _digit_histogram(keys: Tensor, base: int, shift: int, nbins: int) -> Tensor:
    # shift before subtracting, so no key range can overflow
    d = keys >> shift if shift else keys
    if base:
        d = d - base
    return torch.bincount(d, minlength=nbins).cpu()


def kth_smallest_key(keys_of: Sequence[Tensor], k: int) -> tuple[int, int]:
    """Radix-select the k-th smallest key (1-based) across tensors without concatenating.

    ``keys_of[i]`` may be computed lazily (any Sequence); each is read at most three times.
    Returns ``(threshold, ties)``: every key < threshold is among the k smallest, and ``ties``
    of the keys equal to threshold complete the count.
    """
    extremes = [torch.aminmax(keys_of[i]) for i in range(len(keys_of)) if keys_of[i].numel()]
    lo = min(int(e.min) for e in extremes)
    hi = max(int(e.max) for e in extremes)
    rank = k
    candidates: list[Tensor] | None = None  # None: the full tensors, before the first narrowing
    while lo < hi:
        shift = max(0, (hi - lo).bit_length() - _RADIX_BITS)
        base = lo >> shift
        nbins = (hi >> shift) - base + 1
        hist = torch.zeros(nbins, dtype=torch.int64)
        # lazily: only one tensor's keys exist at a time
        sources = candidates if candidates is not None else (keys_of[i] for i in range(len(keys_of)))
        kept: list[Tensor] = []
        for keys in sources:
            if candidates is not None:
                keys = keys[(keys >= lo) & (keys <= hi)]
            if keys.numel() == 0:
                continue
            hist += _digit_histogram(keys, base, shift, nbins)
            if candidates is not None:
                kept.append(keys)
        cum = hist.cumsum(0)
        b = int(torch.searchsorted(cum, torch.tensor([rank]), right=False)[0])
        rank -= int(cum[b - 1]) if b > 0 else 0
        lo, hi = max(lo, (base + b) << shift), min(hi, ((base + b + 1) << shift) - 1)
        if candidates is None:
            # narrow once from the full tensors; later rounds only touch the survivors
            kept = []
            for i in range(len(keys_of)):
                keys = keys_of[i]
                sel = keys[(keys >= lo) & (keys <= hi)]
                if sel.numel():
                    kept.append(sel)
        candidates = kept
    return lo, rank


def k_smallest_masks(keys: Sequence[Tensor], k: int, shapes: Sequence[torch.Size], method: str = "auto") -> list[Tensor]:
    """Keep-masks (True = keep) zeroing exactly ``k`` of the smallest keys across all tensors.

    ``keys`` are flat ordered keys (:func:`ordered_keys`, :func:`magnitude_keys`), possibly
    computed lazily on access; ``shapes`` gives each mask its tensor's shape. ``method``: "sort"
    (small inputs), "radix" (no concatenation), or "auto" to choose by size; all agree exactly.

    Ties at the threshold are pruned in (tensor order, flat index) order, so the result is
    deterministic and, for tie-free scores, equals ``torch.topk(..., largest=False)`` on the
    concatenation (what ``torch.nn.utils.prune`` does).
    """
    total = sum(int(torch.Size(s).numel()) for s in shapes)
    if not 0 <= k <= total:
        raise ValueError(f"k must be in [0, {total}], got {k}")
    if k == 0 or k == total:
        return [torch.full(s, k == 0, dtype=torch.bool, device=keys[i].device) for i, s in enumerate(shapes)]
    if method == "sort" or (method == "auto" and total <= _SORT_LIMIT):
        return _sorted_masks(keys, k, shapes)
    threshold, ties = kth_smallest_key(keys, k)
    masks: list[Tensor] = []
    for i in range(len(keys)):
        key = keys[i]
        if ties == 0:  # the tied entries to prune are used up: keep the rest
            keep = key >= threshold
        else:
            keep = key > threshold
            equal = key == threshold
            n_equal = int(equal.sum())
            if n_equal > ties:
                keep[equal.nonzero().reshape(-1)[ties:]] = True
                ties = 0
            else:
                ties -= n_equal
        masks.append(keep.reshape(shapes[i]))
    return masks


_SORT_LIMIT = 1 << 16  # below this many entries a stable sort beats the radix passes


def _sorted_masks(keys: Sequence[Tensor], k: int, shapes: Sequence[torch.Size]) -> list[Tensor]:
    parts = [keys[i] for i in range(len(keys))]
    flat = torch.cat([p.to(torch.int64) for p in parts])
    if all(p.dtype == torch.int32 for p in parts):
        # key * n + index is unique and orders ties by (tensor, index): its k-th value splits the
        # entries exactly, in O(n) (a stable sort of a few thousand keys costs ~20x more on CPU)
        index = torch.arange(flat.numel(), device=flat.device)
        unique = flat * flat.numel() + index  # |key| < 2**31 and n <= 2**16: no overflow
        keep = unique > torch.kthvalue(unique, k).values
    else:
        order = torch.sort(flat, stable=True).indices  # ties: lower (tensor, index) first
        keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
        keep[order[:k]] = False
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    return [m.reshape(s) for m, s in zip(keep.split(sizes), shapes)]


def k_smallest_mask(scores: Tensor, k: int, method: str = "auto") -> Tensor:
    """Keep-mask zeroing exactly ``k`` of the smallest entries of one score tensor."""
    return k_smallest_masks([ordered_keys(scores)], k, [scores.shape], method)[0]


def check_fraction(value: object, what: str) -> float:
    """The one validator for sparsities: a real number in [0, 1], else a ValueError/TypeError
    naming ``what`` (e.g. "layer 'fc1': sparsity") and the valid range."""
    import math
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number in [0, 1], got {value!r}")
    v = float(value)
    if math.isnan(v) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{what} {value!r} is outside [0, 1] (a fraction: 0.9 zeroes 90% of the weights)")
    return v


def check_count(value: object, what: str, minimum: int = 1) -> int:
    """The one validator for counts (steps, samples, workers...): an int >= ``minimum`` (a bool
    is not one), else a ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{what} must be {wanted}, got {value!r}")
    return value


def count_to_prune(sparsity: float, n: int) -> int:
    """Zeros for a sparsity fraction: ``round(sparsity * n)``, as ``torch.nn.utils.prune`` rounds."""
    return int(round(sparsity * n))


def keep_mask(scores: Tensor, removed: int) -> Tensor:
    """Keep-mask removing the ``removed`` lowest-scored channels (ties: the lower index goes)."""
    order = torch.argsort(scores, stable=True)
    keep = torch.ones(len(scores), dtype=torch.bool)
    keep[order[:removed]] = False
    return keep
