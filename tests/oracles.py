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
