"""Weight quantization after pruning, deterministic so it can be recomputed (and undone) from the
base weights and the mask at any time.

- ``uniform``: symmetric per output channel. With ``q = 2**(bits-1) - 1`` and
  ``scale_c = max |w_c| / q`` over the channel's kept weights, a weight becomes
  ``round(w / scale_c) * scale_c``: at most half a step (``scale_c / 2``) from ``w``, no clipping.
  Bits: 2, 4, 8.
- ``kmeans``: weight sharing (Han et al. 2016, Deep Compression): ``2**bits`` centroids fitted by
  Lloyd's algorithm on the kept weights of the layer, initialised linearly between their min and
  max (the paper's best initialisation), each kept weight replaced by its nearest centroid.
  Pruned weights stay exactly 0 (the mask multiplies after). Bits: 1 to 8.

Codes are what the compressed export stores: for ``uniform`` the signed level in ``[-q, q]`` and
one float32 scale per channel; for ``kmeans`` the centroid index and the float32 codebook.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

METHODS = {"uniform": (2, 4, 8), "kmeans": (1, 2, 3, 4, 5, 6, 7, 8)}
KMEANS_ITERATIONS = 50


def check_bits(bits: object, method: object, layer: str = "") -> tuple[int, str]:
    where = f"layer {layer!r}: " if layer else ""
    if method not in METHODS:
        raise ValueError(f"{where}quantization method {method!r}: use one of {', '.join(METHODS)}")
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in METHODS[method]:  # type: ignore[index]
        valid = ", ".join(map(str, METHODS[method]))  # type: ignore[index]
        raise ValueError(f"{where}bits={bits!r} is not supported by {method!r} quantization; use one of {valid} "
                         "(or None to remove it)")
    return int(bits), str(method)


@dataclass
class Quantized:
    """``values`` (the weight's new float values, pruned entries 0), ``codes`` (int64, the
    weight's shape) and ``codebook`` (uniform: per-channel scales; kmeans: the centroids)."""

    values: Tensor
    codes: Tensor
    codebook: Tensor
    method: str
    bits: int
    channel_dim: int = 0


def channel_dim(kind: str) -> int:
    """The output-channel dimension of a weight (GPT-2's Conv1D is ``(in, out)``)."""
    return 1 if kind == "Conv1D" else 0


def quantize(weight: Tensor, mask: Optional[Tensor], bits: int, method: str, kind: str = "") -> Quantized:
    """Quantize ``weight`` (its kept entries: ``mask`` True, or all) deterministically."""
    w = weight.detach()
    keep = torch.ones_like(w, dtype=torch.bool) if mask is None else mask
    if method == "uniform":
        q = 2 ** (bits - 1) - 1
        dim = channel_dim(kind) if w.dim() > 1 else 0
        moved = (w * keep).abs().movedim(dim, 0).reshape(w.shape[dim] if w.dim() > 1 else 1, -1)
        scale = moved.amax(dim=1) / q
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        shape = [1] * w.dim()
        if w.dim() > 1:
            shape[dim] = -1
        s = scale.reshape(shape)
        codes = torch.clamp(torch.round(w / s), -q, q).to(torch.int64)
        values = (codes.to(w.dtype) * s) * keep
        return Quantized(values, codes, scale.float(), method, bits, dim)
    if method == "kmeans":
        kept = w[keep].float()
        k = 2 ** bits
        if kept.numel() == 0:
            centroids = torch.zeros(k, device=w.device)
        else:
            centroids = torch.linspace(float(kept.min()), float(kept.max()), k, device=w.device)
            sorted_kept = torch.sort(kept).values
            for _ in range(KMEANS_ITERATIONS):
                bounds = (centroids[1:] + centroids[:-1]) / 2
                assign = torch.searchsorted(bounds, sorted_kept)
                sums = torch.zeros(k, device=w.device).index_add_(0, assign, sorted_kept)
                counts = torch.bincount(assign, minlength=k).float()
                new = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
                new = torch.sort(new).values
                if torch.equal(new, centroids):
                    break
                centroids = new
        bounds = (centroids[1:] + centroids[:-1]) / 2
        codes = torch.searchsorted(bounds, w.float().contiguous().reshape(-1)).reshape(w.shape)
        values = centroids.to(w.dtype)[codes] * keep
        return Quantized(values, codes, centroids, method, bits, 0)
    raise ValueError(f"quantization method {method!r}: use one of {', '.join(METHODS)}")


__all__ = ["METHODS", "Quantized", "quantize", "check_bits", "channel_dim"]
