"""When does a sparse kernel beat a dense one? Measured, not assumed.

A masked weight still runs through a dense matmul at full cost; a sparse layout (CSR, COO) skips
the zeros but pays for indices and irregular memory access. :func:`time_sparse_matmul` times both
on the same weights, interleaved run by run (a load spike hits both), and :func:`break_even`
reads the sparsity from which the sparse kernel stays faster. The answer is this machine's: CPU,
threads, shape and batch change it.
"""
from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .devices import timed_ms
from .masks import check_count, count_to_prune

LAYOUTS = ("csr", "coo")


@dataclass
class KernelRow:
    """One sparsity: median milliseconds of ``W @ X`` dense and sparse, and their largest difference."""

    sparsity: float
    nonzeros: int  # values stored by the sparse layout: exactly n - round(sparsity * n)
    dense_ms: float
    sparse_ms: float
    max_error: float  # max |sparse - dense| over the output (float sums in another order)

    @property
    def speedup(self) -> float:
        """dense time / sparse time: above 1 the sparse kernel is faster."""
        return self.dense_ms / self.sparse_ms


@dataclass
class KernelTimings:
    shape: tuple[int, int]  # (out_features, in_features) of W
    batch: int
    layout: str
    device: str
    threads: int
    repeats: int
    rows: list[KernelRow] = field(default_factory=list)

    @property
    def break_even(self) -> Optional[float]:
        """:func:`break_even` of the measured rows."""
        return break_even([r.sparsity for r in self.rows], [r.speedup for r in self.rows])

    def __repr__(self) -> str:
        head = (f"W {self.shape[0]}x{self.shape[1]} @ X {self.shape[1]}x{self.batch}, {self.layout} vs dense on "
                f"{self.device}, {self.threads} threads, median of {self.repeats}")
        lines = [head, f"{'sparsity':>9}{'dense ms':>10}{'sparse ms':>11}{'speedup':>9}"]
        lines += [f"{r.sparsity:>9.0%}{r.dense_ms:>10.3f}{r.sparse_ms:>11.3f}{r.speedup:>8.2f}x" for r in self.rows]
        be = self.break_even
        lines.append("sparse never faster here" if be is None else f"break-even at about {be:.0%} sparsity")
        return "\n".join(lines)


def break_even(sparsities: Sequence[float], speedups: Sequence[float]) -> Optional[float]:
    """The sparsity from which the sparse kernel is faster (speedup >= 1) at every higher measured
    level, interpolated linearly between the last losing and the first winning level; the lowest
    level if it already wins there (the break-even is at or below it); None if the highest loses."""
    if len(sparsities) != len(speedups) or not sparsities:
        raise ValueError(f"break_even: one speedup per sparsity, got {len(sparsities)} and {len(speedups)}")
    pts = sorted(zip(sparsities, speedups))
    if pts[-1][1] < 1:
        return None
    j = len(pts) - 1
    while j > 0 and pts[j - 1][1] >= 1:
        j -= 1
    if j == 0:
        return float(pts[0][0])
    (s0, v0), (s1, v1) = pts[j - 1], pts[j]
    return float(s0 + (1 - v0) * (s1 - s0) / (v1 - v0))


def _check(out_features: int, in_features: int, batch: int, sparsities: Sequence[float], layout: str,
           repeats: int, warmup: int) -> None:
    for name, v in (("out_features", out_features), ("in_features", in_features), ("batch", batch),
                    ("repeats", repeats)):
        check_count(v, f"time_sparse_matmul: {name}")
    check_count(warmup, "time_sparse_matmul: warmup", minimum=0)
    if layout not in LAYOUTS:
        raise ValueError(f"time_sparse_matmul: layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not sparsities:
        raise ValueError("time_sparse_matmul: give at least one sparsity")
    for s in sparsities:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0 <= s < 1) or math.isnan(s):
            raise ValueError(f"time_sparse_matmul: sparsity {s!r} must be in [0, 1) (a weight with no nonzeros "
                             f"has nothing to time)")


def random_operands(out_features: int, in_features: int, batch: int, sparsities: Sequence[float],
                    seed: int = 0) -> tuple[Tensor, list[Tensor]]:
    """``X`` (in x batch) and, per sparsity ``s``, ``W`` (out x in, float32) with exactly
    ``round(s * out * in)`` zeros uniformly placed (as unstructured pruning leaves them), the same
    nonzero values at every level; deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    x = torch.randn(in_features, batch, generator=g)
    n = w.numel()
    weights = []
    for s in sparsities:
        keep = torch.ones(n, dtype=torch.bool)
        keep[torch.randperm(n, generator=g)[: count_to_prune(s, n)]] = False
        weights.append(w * keep.view_as(w))
    return x, weights


def time_sparse_matmul(out_features: int = 1024, in_features: int = 1024, batch: int = 64,
                       sparsities: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98), layout: str = "csr",
                       repeats: int = 25, warmup: int = 3, seed: int = 0,
                       device: Union[str, torch.device, None] = None) -> KernelTimings:
    """Time ``W @ X`` with ``W`` dense (zeros multiplied) and in ``layout`` (zeros skipped) for the
    :func:`random_operands` of ``seed``: ``repeats`` runs of each, alternating, after ``warmup``."""
    _check(out_features, in_features, batch, sparsities, layout, repeats, warmup)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    cuda = dev.type == "cuda"
    x, weights = random_operands(out_features, in_features, batch, sparsities, seed)
    x = x.to(dev)
    result = KernelTimings((out_features, in_features), batch, layout,
                           torch.cuda.get_device_name(dev) if cuda else "cpu", torch.get_num_threads(), repeats)
    for s, w in zip(sparsities, weights):
        dense = w.to(dev)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": a fact of torch, not of this measurement
            warnings.simplefilter("ignore", UserWarning)
            sparse = dense.to_sparse_csr() if layout == "csr" else dense.to_sparse_coo().coalesce()
            stored = int(sparse.values().numel())  # what the sparse kernel iterates over, counted in its own layout
            with torch.inference_mode():
                err = float((sparse @ x - dense @ x).abs().max())
                for _ in range(warmup):
                    timed_ms(lambda: dense @ x, dev)
                    timed_ms(lambda: sparse @ x, dev)
                dense_t: list[float] = []
                sparse_t: list[float] = []
                for _ in range(repeats):  # alternate one run each, so load changes hit both
                    dense_t.append(timed_ms(lambda: dense @ x, dev))
                    sparse_t.append(timed_ms(lambda: sparse @ x, dev))
        result.rows.append(KernelRow(float(s), stored, statistics.median(dense_t), statistics.median(sparse_t), err))
    return result


__all__ = ["KernelRow", "KernelTimings", "LAYOUTS", "break_even", "random_operands", "time_sparse_matmul"]
