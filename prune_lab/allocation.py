"""Allocations: a target total sparsity -> exact per-layer pruned counts.

An allocation is a callable ``(state, sparsity, *, criterion, seed, locked) -> Allocation``
(or a plain ``{layer: sparsity}`` dict); ``state`` is the session's ``PruningState`` (``.layers``,
``.layer(name)``, ``.base(name)``, ``.keys(names, criterion, seed)``). With a criterion other than
magnitude, ``global`` thresholds that criterion's scores across layers, ``uniform``, ``erk`` and
``random`` choose counts from shapes alone and rank within each layer by the criterion, and
``lamp`` chooses counts from magnitudes (its definition) while the criterion picks the weights. Built-ins return exact counts whose sum is
``round(sparsity * total_params)`` minus what locked layers already prune.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from torch import Tensor

from .criteria import Criterion
from .masks import check_fraction, count_to_prune, k_smallest_masks
from .registry import Registry
from .state import PruningState  # allocations read the pruning state (layers, base weights, keys)


@dataclass
class Allocation:
    """Pruned weight counts per layer; ``masks`` when the allocation already built them."""

    counts: dict[str, int]
    masks: Optional[dict[str, Tensor]] = field(default=None, repr=False)
    criterion: Optional[Criterion] = None  # overrides the caller's criterion (e.g. random pruning)


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


def free_budget(state: "PruningState", sparsity: float, locked: Mapping[str, int]) -> tuple[list[str], int]:
    """Unlocked layers and how many weights they must prune so the total hits ``sparsity``."""
    total = sum(info.n_params for info in state.layers)
    free = [info.name for info in state.layers if info.name not in locked]
    capacity = sum(state.layer(name).n_params for name in free)
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
def uniform(state: "PruningState", sparsity: float, *, criterion: Criterion, seed: int, locked: Mapping[str, int]) -> Allocation:
    """The same sparsity in every unlocked layer (each within one weight), total exact."""
    free, k = free_budget(state, sparsity, locked)
    caps = {name: state.layer(name).n_params for name in free}
    return Allocation(largest_remainder(caps, k, caps))


@register_allocation("global")
def global_threshold(state: "PruningState", sparsity: float, *, criterion: Criterion, seed: int, locked: Mapping[str, int]) -> Allocation:
    """One threshold on the criterion across all unlocked layers (``prune.global_unstructured``).

    Found by radix select over per-layer keys: no concatenation of all weights.
    """
    free, k = free_budget(state, sparsity, locked)
    keys = state.keys(free, criterion, seed)
    shapes = [state.layer(name).shape for name in free]
    masks = k_smallest_masks(keys, k, shapes)
    counts = {name: int(m.numel() - m.sum()) for name, m in zip(free, masks)}
    return Allocation(counts, dict(zip(free, masks)))


def as_allocation(result: Any, state: "PruningState") -> Allocation:
    """Normalise what an allocation returned; a ``{layer: sparsity}`` dict is rounded per layer."""
    if isinstance(result, Allocation):
        return result
    if isinstance(result, Mapping):
        counts = {}
        for name, s in result.items():
            v = check_fraction(s, f"layer {name!r}: sparsity")
            counts[name] = count_to_prune(v, state.layer(name).n_params)
        return Allocation(counts)
    raise TypeError(f"an allocation must return an Allocation or a {{layer: sparsity}} dict, got {type(result).__name__}")


@register_allocation("sensitivity")
def sensitivity_plan(state: "PruningState", sparsity: float, *, criterion: Criterion, seed: int, locked: Mapping[str, int],
                     sensitivity: Any = None) -> Allocation:
    """The greedy plan from the last sensitivity sweep (``Session.sensitivity()``)."""
    result = sensitivity
    if result is None:
        raise ValueError("allocation 'sensitivity' needs a sweep first: run Session.sensitivity()")
    held = dict(locked)
    for info in state.layers:  # layers the sweep did not cover stay as they are
        if info.name not in result.layers:
            held[info.name] = state.counts[info.name]
    plan = result.allocate(target_sparsity=sparsity, locked={n: k for n, k in held.items() if n in result.layers})
    counts = {n: round(s * state.layer(n).n_params) for n, s in plan.items() if n not in held}
    return Allocation(counts)


sensitivity_plan.needs_sensitivity = True  # type: ignore[attr-defined]


@register_allocation("erk")
def erdos_renyi_kernel(state: "PruningState", sparsity: float, *, criterion: Criterion, seed: int, locked: Mapping[str, int]) -> Allocation:
    """Erdos-Renyi-Kernel (Evci et al. 2020, RigL): density of a layer proportional to
    sum(shape) / prod(shape), so small layers stay denser; layers that would exceed density 1
    are kept dense and the rest rescaled. Kept counts are rounded to hit the total exactly."""
    free, k = free_budget(state, sparsity, locked)
    n = {name: state.layer(name).n_params for name in free}
    raw = {name: sum(state.layer(name).shape) / n[name] for name in free}
    keep_total = sum(n.values()) - k
    dense: set[str] = set()
    while True:  # find the scale eps with sum(min(1, eps * raw) * n) == keep_total
        rest = [name for name in free if name not in dense]
        budget = keep_total - sum(n[name] for name in dense)
        denom = sum(raw[name] * n[name] for name in rest)
        eps = budget / denom if denom > 0 else 0.0
        over = {name for name in rest if eps * raw[name] > 1}
        if not over:
            break
        dense |= over
    kept_share = {name: (n[name] if name in dense else eps * raw[name] * n[name]) for name in free}
    kept = largest_remainder(kept_share, keep_total, n)
    return Allocation({name: n[name] - kept[name] for name in free})


@register_allocation("lamp")
def lamp(state: "PruningState", sparsity: float, *, criterion: Criterion, seed: int, locked: Mapping[str, int]) -> Allocation:
    """Layer-adaptive magnitude pruning (Lee et al. 2021): each weight's score is w^2 divided by
    the sum of w'^2 over the weights of its layer at least as large; one global threshold on that
    score. Within a layer the order is magnitude order, so the masks are magnitude masks."""
    import torch

    from .masks import ordered_keys

    free, k = free_budget(state, sparsity, locked)

    class _Scores:
        def __len__(self) -> int:
            return len(free)

        def __getitem__(self, i: int):
            w2 = state.original_weight(free[i]).detach().double().reshape(-1) ** 2
            order = torch.argsort(w2, stable=True)
            sorted_w2 = w2[order]
            suffix = torch.flip(torch.cumsum(torch.flip(sorted_w2, [0]), 0), [0])
            score = torch.empty_like(w2)
            score[order] = sorted_w2 / suffix.clamp_min(torch.finfo(torch.float64).tiny)
            return ordered_keys(score)

    masks = k_smallest_masks(_Scores(), k, [state.layer(name).shape for name in free])
    return Allocation({name: int(m.numel() - m.sum()) for name, m in zip(free, masks)})


@register_allocation("random")
def random_allocation(state: "PruningState", sparsity: float, *, criterion: Criterion, seed: int, locked: Mapping[str, int]) -> Allocation:
    """The floor: weights pruned uniformly at random across all unlocked layers (seeded). Counts
    per layer are one multivariate hypergeometric draw; masks use the random criterion."""
    import numpy as np

    from .criteria import get_criterion

    free, k = free_budget(state, sparsity, locked)
    rng = np.random.default_rng(seed)
    draw = rng.multivariate_hypergeometric([state.layer(name).n_params for name in free], k) if free else []
    return Allocation({name: int(c) for name, c in zip(free, draw)}, criterion=get_criterion("random"))


class LayerCollapseWarning(UserWarning):
    """A global allocation pruned a whole layer."""


def allocate(state: "PruningState", sparsity: float, allocation: Union[str, AllocationFn] = "global", criterion: Any = "magnitude",
             seed: Optional[int] = None, locked: Any = (), sensitivity: Any = None) -> tuple[Allocation, Criterion, int]:
    """Validate and run an allocation: ``(Allocation, criterion used, seed)``; writes nothing.

    ``locked`` layers keep their current counts, which count toward the total."""
    from .criteria import get_criterion
    from .registry import describe

    check_fraction(sparsity, "global sparsity")
    locked = list(locked)
    for name in locked:
        state.layer(name)
    crit = get_criterion(criterion)
    seed = state.seed if seed is None else int(seed)
    fn = get_allocation(allocation)
    locked_counts = {name: state.counts[name] for name in locked}
    extra = {"sensitivity": sensitivity} if getattr(fn, "needs_sensitivity", False) else {}
    result = as_allocation(fn(state, float(sparsity), criterion=crit, seed=seed, locked=locked_counts, **extra), state)
    emptied = [n for n, k in result.counts.items() if k == state.layer(n).n_params]
    if emptied and sparsity < 1:
        import warnings

        warnings.warn(
            f"allocation {describe(allocation)!r} at {sparsity:.1%} pruned every weight of {', '.join(emptied)}: "
            "the network is cut there and fine-tuning cannot recover it (try 'lamp', 'erk' or a lock)",
            LayerCollapseWarning,
            stacklevel=3,
        )
    return result, result.criterion or crit, seed


def pattern_counts(state: "PruningState", pat: Any, sparsity: float, allocation: Any, criterion: Criterion,
                   seed: Optional[int], locked: Sequence[str], sensitivity: Any = None) -> tuple[dict[str, int], list[str]]:
    """Per-layer counts for a pattern that is structured within a layer (N:M, kernels), and the
    unlocked layers it does not fit (left as they are). ``sparsity`` is that of the layers it
    fits (locked ones keep theirs and count toward it). A pattern with fixed levels (N:M) gives
    each unlocked layer the same sparsity; any other takes the allocation's per-layer fractions,
    each snapped to what the pattern can reach. Writes nothing."""
    check_fraction(sparsity, "sparsity")
    unlocked = [i for i in state.layers if i.name not in locked]
    fitting = [i for i in unlocked if pat.fits(i)]
    skipped = [i.name for i in unlocked if not pat.fits(i)]
    if not fitting:
        raise ValueError(f"pattern {pat.name}: no unlocked layer fits it: {', '.join(skipped)}")
    if pat.levels() is not None:
        fractions = {i.name: float(sparsity) for i in fitting}
    else:
        held = [i for i in state.layers if not pat.fits(i)]  # count toward the model's total as they are
        zeros = sum(state.counts[i.name] for i in held)
        fit_params = sum(i.n_params for i in state.layers if pat.fits(i))
        total = (sparsity * fit_params + zeros) / sum(i.n_params for i in state.layers)
        planned, _, _ = allocate(state, total, allocation, criterion, seed, list(locked) + [i.name for i in held], sensitivity)
        fractions = {i.name: pat.snap(planned.counts[i.name] / i.n_params, i) for i in fitting}
    return {n: pat.count(state.layer(n), f) for n, f in fractions.items()}, skipped


def apply_global(state: "PruningState", sparsity: float, allocation: Union[str, AllocationFn] = "global", criterion: Any = "magnitude",
                 seed: Optional[int] = None, locked: Any = (), sensitivity: Any = None) -> list[str]:
    """Prune the state to a total sparsity split by ``allocation``; returns the changed layers."""
    result, crit, seed = allocate(state, sparsity, allocation, criterion, seed, locked, sensitivity)
    return state.set_counts(result.counts, crit, seed, result.masks)
