"""Accuracy/size trade-offs: Pareto fronts over measured configurations."""
from __future__ import annotations

from typing import Sequence


def pareto_front(costs: Sequence[float], scores: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats (lower or equal cost and higher or equal
    score, one strictly), ordered by cost. Lower cost is better, higher score is better."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -scores[i]))
    front: list[int] = []
    best = float("-inf")
    for i in order:
        if scores[i] > best:
            front.append(i)
            best = scores[i]
    return front
