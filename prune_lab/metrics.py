"""Metrics that are not a mean of per-batch values: what they sum, and the value from the sum.

Accuracy is a mean over targets, so batch sums add up exactly. Perplexity is not: it is
``exp`` of the mean token cross-entropy over *all* tokens, and the mean of per-batch perplexities
is a different (larger) number. A :class:`SummedMetric` gives, per batch, a float64 sum and a
count; the evaluator adds them over every batch and calls :meth:`SummedMetric.finish` once on
the overall mean. ``lower_is_better`` tells sweeps, allocations, the planner, trade-offs and
fine-tuning which way is worse (a "drop" of perplexity is a rise).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # targets equal to it are not scored (PyTorch's cross-entropy default)


class SummedMetric:
    """``batch(outputs, targets) -> (sum, count)`` (float64 scalars), ``finish(sum / count)``
    the value; ``name`` is how tables and plots label it."""

    name: str = ""
    lower_is_better: bool = False

    def batch(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def finish(self, mean: float) -> float:
        return mean

    def __call__(self, outputs: Tensor, targets: Tensor) -> float:
        """The metric of one batch on its own."""
        s, n = self.batch(outputs, targets)
        return self.finish(float(s) / float(n)) if float(n) else math.nan

    def __repr__(self) -> str:
        return f"<metric {self.name!r} ({'lower' if self.lower_is_better else 'higher'} is better)>"


class Perplexity(SummedMetric):
    """``exp(mean cross-entropy per token)`` of logits ``(batch, tokens, vocab)`` (or
    ``(batch, classes)``) against integer targets, tokens equal to -100 skipped. 1 is a perfect
    model; a uniform guess over V symbols gives V. Lower is better."""

    name, lower_is_better = "perplexity", True

    def batch(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        logits = outputs.reshape(-1, outputs.shape[-1]).float()
        flat = targets.reshape(-1)
        total = F.cross_entropy(logits, flat, reduction="sum", ignore_index=IGNORE_INDEX).double()
        return total, (flat != IGNORE_INDEX).sum(dtype=torch.float64)

    def finish(self, mean: float) -> float:
        return math.exp(mean)


perplexity = Perplexity()


def lower_is_better(metric: object) -> bool:
    """Whether a smaller value of ``metric`` (a metric object or None for accuracy) is better."""
    return bool(getattr(metric, "lower_is_better", False))


def goodness(value: float, lower_is_better: bool) -> float:
    """``value`` turned so that larger is better (the value, or minus it)."""
    return -value if lower_is_better else value


__all__ = ["SummedMetric", "Perplexity", "perplexity", "lower_is_better", "goodness", "IGNORE_INDEX"]
