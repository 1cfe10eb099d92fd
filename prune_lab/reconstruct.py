"""Weight reconstruction after pruning (OBS, OBC, SparseGPT): pure tensor math, no state.

A layer computes ``W x`` for each input column ``x`` (a Linear's input features; a convolution's
unfolded patch). Once a mask is chosen, the kept weights can be changed to make up for the pruned
ones: ``W_hat`` minimises ``||W X - W_hat X||^2`` (X: every calibration input column, summed
over samples and positions) subject to ``W_hat = 0`` where the mask prunes. That objective is
``sum_rows (w - w_hat) H (w - w_hat)^T`` with ``H = X X^T`` (cols x cols), so H is all a layer
needs: one float32 (cols x cols) matrix, ``4 * cols**2`` bytes.

Everything works on the layer's *matrix view* (:func:`to_matrix`): rows are outputs and the
columns are ordered with the N:M groups contiguous (a convolution's columns go (kh, kw, in)), so
N:M groups are runs of M columns here as in ``patterns.nm_mask``.

- :func:`exact`: per row, the least-squares solve on that row's kept columns (Hassibi & Stork's
  OBS applied to the whole mask at once; Frantar & Alistarh 2022, OBC). Cost rows x kept**3.
- :func:`sparsegpt`: SparseGPT (Frantar & Alistarh 2023, Algorithm 1): one shared inverse
  Hessian, columns in blocks of ``blocksize`` with lazy batched updates, and, unless a mask is
  given, its own mask selection per block (score ``w**2 / [U]_jj**2``, U the upper Cholesky
  factor of H^-1) or per N:M group. One change from the published code: each block prunes an
  exact share of ``count`` (the published threshold prunes ``int(p * n)`` entries *or more*
  on ties), so the layer's count is exact, as every prune_lab mask is.

Dampening: ``H + damp * mean(diag H) * I`` (SparseGPT's ``percdamp``, default 0.01), which keeps
the solves well posed when inputs are constant zero (an image border) or fewer than the columns.
Inputs that are always zero (``H_jj = 0``, SparseGPT's ``dead`` columns) do not enter the
objective: their kept weights stay as they were (SparseGPT zeroes them, which would make the
live nonzeros disagree with the mask). Every solve runs in float64.

Neither solver can make the objective worse than the mask alone: :func:`no_worse` keeps the
masked row wherever the reconstructed one is not better under the undamped H (a guard; with
``damp > 0`` the exact solve never needs it).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

DAMP = 0.01  # SparseGPT's percdamp: the fraction of the mean Hessian diagonal added to it
BLOCKSIZE = 128  # SparseGPT's column block (lazy batch) size
EXACT_COLUMNS = 1024  # "auto" solves exactly up to this many columns, SparseGPT's path above
ROW_CHUNK_BYTES = 1 << 28  # the exact solver's batched systems: at most this many bytes at once


def input_dim(kind: str) -> int:
    return 0 if kind == "Conv1D" else 1


def to_matrix(w: Tensor, kind: str) -> Tensor:
    """The (outputs, columns) view of a weight with its input dimension last (a copy for convs):
    Linear (out, in) as is; GPT-2's Conv1D (in, out) transposed; Conv (out, in, kh, kw) as
    (out, kh * kw * in)."""
    moved = w.movedim(input_dim(kind), -1)
    return moved.reshape(moved.shape[0], -1)


def from_matrix(m: Tensor, shape: tuple[int, ...], kind: str) -> Tensor:
    """The inverse of :func:`to_matrix`: a matrix back to the weight's shape (contiguous)."""
    dim = input_dim(kind)
    moved = list(shape)
    moved.append(moved.pop(dim))
    return m.reshape(moved).movedim(-1, dim).contiguous()


def damped(h: Tensor, damp: float = DAMP) -> tuple[Tensor, Tensor]:
    """(float64 ``H + damp * mean(diag H) * I`` with dead columns set to 1 on the diagonal, dead
    mask): the matrix every solve uses. ``damp`` must be >= 0."""
    if not damp >= 0:
        raise ValueError(f"damp must be >= 0 (a fraction of the mean Hessian diagonal; SparseGPT uses 0.01), got {damp!r}")
    h = h.to(torch.float64).clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    lam = damp * float(diag.mean()) if diag.numel() else 0.0
    diag.add_(lam)
    h[dead, :] = 0
    h[:, dead] = 0
    diag[dead] = 1.0
    return h, dead


def error(w: Tensor, w_hat: Tensor, h: Tensor) -> Tensor:
    """Per row, ``(w - w_hat) H (w - w_hat)^T`` = ``||w X - w_hat X||^2`` (float64, >= 0)."""
    d = (w - w_hat).to(torch.float64)
    return ((d @ h.to(torch.float64)) * d).sum(dim=1).clamp_min(0)


def no_worse(w: Tensor, w_hat: Tensor, keep: Tensor, h: Tensor) -> Tensor:
    """``w_hat`` where it fits the layer's inputs at least as well as the mask alone, row by row."""
    masked = w * keep
    better = error(w, w_hat, h) <= error(w, masked, h)
    return torch.where(better.unsqueeze(1), w_hat.to(w.dtype), masked)


def exact(w: Tensor, h: Tensor, keep: Tensor, damp: float = DAMP) -> Tensor:
    """Per row r, the kept weights minimising ``(w_r - v) H (w_r - v)^T`` with v zero where
    ``keep[r]`` is False: v_K = (H_KK)^-1 (H w_r^T)_K, with the damped H (:func:`damped`;
    ``damp=0`` solves the undamped system by least squares, which equals ``torch.linalg.lstsq``
    on the kept columns of X). Rows are solved as one batch of (cols x cols) systems
    ``D H D + (I - D)`` (D the row's keep diagonal), in chunks of ``ROW_CHUNK_BYTES``."""
    rows, cols = w.shape
    hd = damped(h, damp)[0] if damp != 0 else h.to(torch.float64)
    w64, k = w.to(torch.float64), keep.reshape(rows, cols).to(torch.float64)
    rhs = (w64 @ hd) * k  # (H w_r^T)_K per row, zero off K; a dead column's row is e_j: its kept weight stays
    out = torch.empty_like(w64)
    chunk = max(1, ROW_CHUNK_BYTES // max(1, 8 * cols * cols))
    for s in range(0, rows, chunk):
        kk = k[s : s + chunk]
        a = hd.unsqueeze(0) * kk.unsqueeze(2) * kk.unsqueeze(1) + torch.diag_embed(1 - kk)
        b = rhs[s : s + chunk].unsqueeze(2)
        if damp > 0:
            sol = torch.linalg.solve(a, b)
        else:
            sol = torch.linalg.lstsq(a.cpu(), b.cpu(), driver="gelsd").solution.to(w.device)
        out[s : s + chunk] = sol.squeeze(2) * kk
    return out.to(w.dtype)


def _block_counts(count: int, rows: int, cols: int, blocksize: int) -> list[int]:
    """How many of ``count`` entries each column block prunes: the block's exact share
    (``floor(count * end / cols) - floor(count * start / cols)``), summing to ``count``."""
    return [count * min(e, cols) // cols - count * s // cols for s, e in
            ((s, s + blocksize) for s in range(0, cols, blocksize))]


def sparsegpt(w: Tensor, h: Tensor, count: Optional[int] = None, keep: Optional[Tensor] = None, n: int = 0, m: int = 0,
              blocksize: int = BLOCKSIZE, damp: float = DAMP) -> tuple[Tensor, Tensor]:
    """SparseGPT on a (rows, cols) matrix: ``(w_hat, keep)``. Give the mask (``keep``), or let it
    choose ``count`` entries (unstructured) or ``n`` kept of every ``m`` columns (N:M) itself.
    ``blocksize`` must be a multiple of ``m``."""
    rows, cols = w.shape
    if (keep is None) == (count is None and not m):
        raise ValueError("sparsegpt takes a keep-mask, a count, or an N:M pattern (n, m): exactly one")
    if m and blocksize % m:
        raise ValueError(f"sparsegpt: blocksize {blocksize} must be a multiple of M={m}")
    hd, dead = damped(h, damp)
    W = w.to(torch.float64).clone()  # a dead column's H^-1 row is e_j: nothing flows to or from it
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=w.device) if keep is None else ~keep.bool()
    shares = _block_counts(int(count), rows, cols, blocksize) if keep is None and not m else None
    for bi, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        w1, hinv1 = W[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        d1 = torch.diagonal(hinv1)
        if shares is not None:
            from .masks import k_smallest_mask

            score = w1 ** 2 / d1.reshape(1, -1) ** 2
            pruned[:, i1:i2] = ~k_smallest_mask(score, shares[bi])
        for i in range(i2 - i1):
            if m and i % m == 0:
                score = w1[:, i : i + m] ** 2 / d1[i : i + m].reshape(1, -1) ** 2
                order = torch.argsort(score, dim=1, stable=True)[:, : m - n]
                pruned[:, i1 + i : i1 + i + m] = torch.zeros_like(score, dtype=torch.bool).scatter_(1, order, True)
            col, d = w1[:, i], hinv1[i, i]
            q = torch.where(pruned[:, i1 + i], torch.zeros_like(col), col)
            q1[:, i] = q
            e = (col - q) / d
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        W[:, i1:i2] = q1
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    keep_out = ~pruned
    return (W * keep_out).to(w.dtype), keep_out


def obs_scores(w: Tensor, h: Tensor, damp: float = DAMP) -> Tensor:
    """SparseGPT's saliency ``w**2 / [U]_jj**2`` (U the upper Cholesky factor of the damped
    H^-1) for every entry of the matrix: the static ranking its first block uses."""
    hd, _ = damped(h, damp)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
    return w.to(torch.float64) ** 2 / torch.diagonal(u).reshape(1, -1) ** 2


__all__ = ["DAMP", "BLOCKSIZE", "to_matrix", "from_matrix", "damped", "error", "no_worse", "exact", "sparsegpt",
           "obs_scores"]
