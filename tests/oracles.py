"""Independent computations the tests compare prune_lab's numbers with."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> tuple[float, float]:
    """One plain forward pass per batch: accuracy and cross-entropy over non-ignored targets."""
    was = model.training
    model.eval()
    outs = []
    with torch.no_grad():
        for s in range(0, len(x), batch):
            out = model(x[s : s + batch])
            outs.append(out["logits"] if isinstance(out, dict) else out)
    model.train(was)
    out = torch.cat(outs)
    logits, flat = out.reshape(-1, out.shape[-1]).double(), y.reshape(-1)
    valid = flat != -100
    acc = float(((logits.argmax(-1) == flat) & valid).sum()) / float(valid.sum())
    loss = float(F.cross_entropy(logits, flat, ignore_index=-100))
    return acc, loss


def nonzeros(t: torch.Tensor) -> int:
    """Counted element by element in Python's own arithmetic, not by torch.count_nonzero."""
    return sum(1 for v in t.detach().reshape(-1).tolist() if v != 0)


def huffman_total_bits(symbols) -> int:
    """Bits of an optimal prefix code for ``symbols``: the sum of every merge of the two
    smallest counts (each merge adds one bit to every symbol below it). One symbol: 1 bit each."""
    import heapq
    from collections import Counter

    counts = list(Counter(int(s) for s in symbols).values())
    if len(counts) == 1:
        return counts[0]
    heapq.heapify(counts)
    total = 0
    while len(counts) > 1:
        a, b = heapq.heappop(counts), heapq.heappop(counts)
        total += a + b
        heapq.heappush(counts, a + b)
    return total


def gaps(weight) -> list:
    """Distances between consecutive nonzeros of the flattened weight (the first from -1)."""
    flat = weight.detach().reshape(-1).tolist()
    out, last = [], -1
    for i, v in enumerate(flat):
        if v != 0:
            out.append(i - last)
            last = i
    return out
