"""Allocations: a target total sparsity -> exact per-layer pruned counts.

An allocation is a callable ``(session, sparsity, *, criterion, seed, locked) -> Allocation``
(or a plain ``{layer: sparsity}`` dict). Built-ins return exact counts whose sum is
``round(sparsity * total_params)`` minus what locked layers already prune.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Union

from torch import Tensor

from .criteria import Criterion
from .masks import count_to_prune, k_smallest_masks
from .registry import Registry

if TYPE_CHECKING:
    from .session import Session


@dataclass
class Allocation:
    """Pruned weight counts per layer; ``masks`` when the allocation already built them."""

    counts: dict[str, int]
    masks: Optional[dict[str, Tensor]] = field(default=None, repr=False)


AllocationFn = Callable[..., Union[Allocation, Mapping[str, float]]]
ALLOCATIONS: Registry[AllocationFn] = Registry("allocation")


def register_allocation(name: str) -> Callable[[AllocationFn], AllocationFn]:
    def wrap(fn: AllocationFn) -> AllocationFn:
        return ALLOCATIONS.register(name, fn)

    return wrap


def get_allocation(allocation: Union[str, AllocationFn]) -> AllocationFn:
    if callable(allocation):
        return allocation
    return ALLOCATIONS.get(allocation)


def list_allocations() -> list[str]:
    return ALLOCATIONS.names()


def free_budget(session: "Session", sparsity: float, locked: Mapping[str, int]) -> tuple[list[str], int]:
    """Unlocked layers and how many weights they must prune so the total hits ``sparsity``."""
    total = sum(info.n_params for info in session.layers)
    free = [info.name for info in session.layers if info.name not in locked]
    capacity = sum(session.layer(name).n_params for name in free)
    k = count_to_prune(sparsity, total) - sum(locked.values())
    return free, max(0, min(capacity, k))


def largest_remainder(shares: Mapping[str, float], k: int, caps: Mapping[str, int]) -> dict[str, int]:
    """Integer counts proportional to ``shares`` summing to exactly ``k`` (Hamilton's method)."""
    total_share = sum(shares.values())
    if k == 0 or total_share == 0:
        return {name: 0 for name in shares}
    exact = {name: min(caps[name], k * s / total_share) for name, s in shares.items()}
    counts = {name: int(math.floor(v)) for name, v in exact.items()}
    missing = k - sum(counts.values())
    order = sorted(shares, key=lambda n: (-(exact[n] - counts[n]), list(shares).index(n)))
    while missing > 0:
        progressed = False
        for name in order:
            if missing == 0:
                break
            if counts[name] < caps[name]:
                counts[name] += 1
                missing -= 1
                progressed = True
        if not progressed:
            break
    return counts


@register_allocation("uniform")
def uniform(session: "Session", sparsity: float, *, criterion: Criterion, seed: int, locked: Mapping[str, int]) -> Allocation:
    """The same sparsity in every unlocked layer (each within one weight), total exact."""
    free, k = free_budget(session, sparsity, locked)
    caps = {name: session.layer(name).n_params for name in free}
    return Allocation(largest_remainder(caps, k, caps))


@register_allocation("global")
def global_threshold(session: "Session", sparsity: float, *, criterion: Criterion, seed: int, locked: Mapping[str, int]) -> Allocation:
    """One threshold on the criterion across all unlocked layers (``prune.global_unstructured``).

    Found by radix select over per-layer keys: no concatenation of all weights.
    """
    free, k = free_budget(session, sparsity, locked)
    keys = session.lazy_keys(free, criterion, seed)
    shapes = [session.layer(name).shape for name in free]
    masks = k_smallest_masks(keys, k, shapes)
    counts = {name: int(m.numel() - m.sum()) for name, m in zip(free, masks)}
    return Allocation(counts, dict(zip(free, masks)))


def as_allocation(result: Any, session: "Session") -> Allocation:
    """Normalise what an allocation returned; a ``{layer: sparsity}`` dict is rounded per layer."""
    if isinstance(result, Allocation):
        return result
    if isinstance(result, Mapping):
        counts = {}
        for name, s in result.items():
            session.check_sparsity(name, s)
            counts[name] = count_to_prune(float(s), session.layer(name).n_params)
        return Allocation(counts)
    raise TypeError(f"an allocation must return an Allocation or a {{layer: sparsity}} dict, got {type(result).__name__}")


@register_allocation("sensitivity")
def sensitivity_plan(session: "Session", sparsity: float, *, criterion: Criterion, seed: int, locked: Mapping[str, int]) -> Allocation:
    """The greedy plan from the session's last sensitivity sweep (``session.sensitivity()``)."""
    result = getattr(session, "last_sensitivity", None)
    if result is None:
        raise ValueError("allocation 'sensitivity' needs a sweep first: run session.sensitivity()")
    held = dict(locked)
    for info in session.layers:  # layers the sweep did not cover stay as they are
        if info.name not in result.layers:
            held[info.name] = session.pruned_counts[info.name]
    plan = result.allocate(target_sparsity=sparsity, locked={n: k for n, k in held.items() if n in result.layers})
    counts = {n: round(s * session.layer(n).n_params) for n, s in plan.items() if n not in held}
    return Allocation(counts)
