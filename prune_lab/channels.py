"""Structured pruning over the pruning state and its channel groups: whole channels, whole
blocks, their scores and the global channel ranking.

Every function takes the :class:`~prune_lab.state.PruningState` (its ``groups`` found by
:func:`ensure_groups`) and validates everything before it writes anything: a bad value raises
with the layer, the value and what would be valid, and the state is unchanged.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .criteria import get_criterion
from .groups import Groups, find_groups, get_channel_criterion
from .heads import find_heads
from .masks import check_fraction
from .state import PruningState


def ensure_groups(state: PruningState, example_input: Tensor) -> Groups:
    """The model's channel groups, found by Torch-Pruning on first use (traced on a copy) and
    kept on the state."""
    if state.groups is None:
        with state.lock:
            groups = find_groups(state.model, state.layers, example_input)
            groups.heads, groups.heads_excluded = find_heads(state.model, state.layers, example_input)
            state.groups = groups
    return state.groups


def criterion_of(state: PruningState, criterion: Any) -> tuple[str, str]:
    """(channel criterion name, calibration fingerprint); a data-aware one refreshes the
    state's statistics first (they must exist: ``calibrate()``)."""
    crit = get_channel_criterion(criterion)
    if not crit.needs:
        return crit.name, ""
    element = get_criterion(crit.needs)
    state.refresh_calibration(element)
    return crit.name, state._calibration_id(element)


def scores(state: PruningState, group: str, criterion: str = "l1", seed: Optional[int] = None) -> Tensor:
    """Importance of each channel of ``group`` (float64; the lowest are removed first), from
    the base weights; see ``groups.py`` for each criterion's formula."""
    grp = state.groups.resolve(group)
    crit = get_channel_criterion(criterion)
    seed = state.seed if seed is None else int(seed)
    element = None
    if crit.needs:
        element_crit = get_criterion(crit.needs)
        element = {state.info(n).param: state.scores(n, element_crit, seed) for n in grp.layers}
    tensors = {m.key: state.channel_member_base(m.key) for m in grp.members}
    return crit.score(grp, tensors, seed, element)


def keep_of(state: PruningState, group: str) -> Tensor:
    """The keep-mask over a group's channels (True = kept)."""
    grp = state.groups.resolve(group)
    c = state.channels.get(grp.name)
    return torch.ones(grp.size, dtype=torch.bool) if c is None else c.keep.clone()


def kept(state: PruningState, heads: bool = False) -> dict[str, tuple[int, int]]:
    """Per channel group: ``(kept, total)`` channels (every group, pruned or not); ``heads``:
    per attention module, ``(kept, total)`` heads."""
    removed = {g: c.count for g, c in state.channels.items()}
    return {g: (grp.size - removed.get(g, 0), grp.size) for g, grp in units(state.groups, heads).items()}


def unit_of(groups: Groups, name: str, heads: bool = False) -> Any:
    """The channel group ``name`` produces (``heads``: the head group of attention module
    ``name`` or of one of its projections); a ValueError says why there is none."""
    return groups.head(name) if heads else groups.of(name)


def units(groups: Groups, heads: bool = False) -> dict[str, Any]:
    """Every channel group (``heads``: every head group) by name."""
    return groups.heads if heads else groups.groups


def counts_for(groups: Groups, sparsities: Mapping[str, Any], round_to: Optional[int], heads: bool = False) -> dict[str, int]:
    """Channels removed per group for ``{layer: fraction of its group's channels}``: whole
    classes of tied channels, a multiple of ``round_to`` kept; one value per group
    (``heads``: heads removed per attention module)."""
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive integer (channels kept are a multiple of it), got {round_to!r}")
    counts: dict[str, int] = {}
    asked: dict[str, str] = {}
    what = "heads" if heads else "channels"
    for layer, value in sparsities.items():
        grp = unit_of(groups, layer, heads)
        fraction = check_fraction(value, f"layer {layer!r}: {'head' if heads else 'channel'} sparsity")
        k = grp.removal(fraction, round_to)
        if k >= grp.size:
            most = grp.size - grp.period
            raise ValueError(f"layer {layer!r}: sparsity {fraction:g} would remove every one of its {grp.size} {what} "
                             f"(group {grp.name!r}); at most {most} can go (sparsity <= {most / grp.size:.3g})")
        if grp.name in counts and counts[grp.name] != k:
            raise ValueError(f"layers {asked[grp.name]!r} and {layer!r} share channel group {grp.name!r}: give one value")
        counts[grp.name], asked[grp.name] = k, layer
    return counts


def set_channels(state: PruningState, sparsities: Mapping[str, Any], criterion: Any = "l1", seed: Optional[int] = None,
                 round_to: Optional[int] = None, replace_unstructured: bool = False, heads: bool = False) -> None:
    """Remove ``round(fraction * channels)`` of each named layer's channel group, lowest score
    first (``heads``: ``round(fraction * heads)`` of each named attention module's heads)."""
    counts = counts_for(state.groups, sparsities, round_to, heads)
    name, calibration = criterion_of(state, criterion)
    seed = state.seed if seed is None else int(seed)
    channels, records = state.compute_channels(counts, lambda g: scores(state, g, name, seed), name, seed,
                                               replace_unstructured=replace_unstructured, calibration=calibration)
    state.apply_channels(channels, records)


def set_blocks(state: PruningState, values: Mapping[str, Any]) -> None:
    """``{block: 1}`` removes a block (it then computes the identity), ``0`` brings it back."""
    counts: dict[str, int] = {}
    for name, v in values.items():
        state.groups.block(name)
        if isinstance(v, bool) or v not in (0, 1, 0.0, 1.0):
            raise ValueError(f"block {name!r}: pattern 'blocks' takes 1 (remove the block) or 0 (keep it), got {v!r}")
        counts[name] = int(v)
    keeps = {b: torch.zeros(1, dtype=torch.bool) for b, k in counts.items() if k}
    channels, records = state.compute_channels(counts, lambda b: torch.zeros(1, dtype=torch.float64), "block", 0,
                                               keeps=keeps, replace_unstructured=True)
    state.apply_channels(channels, records)


def global_counts(groups: Groups, all_scores: Mapping[str, Tensor], fraction: float) -> dict[str, int]:
    """Channels removed per group when the ``fraction`` of all their channels with the lowest
    normalised importance go (Torch-Pruning's global pruning): each group's (class) scores are
    divided by their mean so groups of different size and scale compare; a class of tied
    channels goes whole, and the best class of every group stays."""
    total = sum(groups.get(g).size for g in all_scores)
    target = int(round(fraction * total))
    pool = []
    for g, sc in all_scores.items():
        unit = groups.get(g).class_scores(sc)
        norm = unit / unit.mean().clamp(min=1e-300)
        order = torch.argsort(unit, stable=True)
        pool += [(float(norm[i]), g, rank) for rank, i in enumerate(order[:-1].tolist())]
    pool.sort()
    counts = {g: 0 for g in all_scores}
    removed = 0
    for _, g, _rank in pool:
        step = groups.get(g).period
        if removed + step <= target:
            counts[g] += step
            removed += step
    return counts


def set_global_channels(state: PruningState, sparsity: Any, allocation: Any = "uniform", criterion: Any = "l1",
                        seed: Optional[int] = None, locked: Sequence[str] = (), round_to: Optional[int] = None,
                        heads: bool = False) -> None:
    """``uniform``: every unlocked group loses the same fraction (each keeping at least one
    channel, or class); ``global``: the channels with the lowest normalised importance
    (:func:`global_counts`). ``heads``: the same over the attention modules' heads."""
    fraction = check_fraction(sparsity, f"{'head' if heads else 'channel'} sparsity")
    groups = state.groups
    locked_groups = set()
    for n in locked:
        try:
            locked_groups.add(unit_of(groups, n, heads).name)
        except ValueError:
            if not heads:  # a locked layer outside every head group stays as it is anyway
                raise
    free = [g for g in units(groups, heads) if g not in locked_groups]
    if allocation not in ("uniform", "global"):
        raise ValueError(f"pattern {'heads' if heads else 'channels'!r} takes allocation 'uniform' or 'global', "
                         f"not {allocation!r}")
    name, calibration = criterion_of(state, criterion)
    seed = state.seed if seed is None else int(seed)
    if allocation == "uniform":
        counts = {g: min(groups.get(g).removal(fraction, round_to), groups.get(g).size - groups.get(g).period)
                  for g in free}
        score_of = lambda g: scores(state, g, name, seed)  # noqa: E731
    else:
        all_scores = {g: scores(state, g, name, seed) for g in free}
        counts = global_counts(groups, all_scores, fraction)
        score_of = all_scores.__getitem__
    channels, records = state.compute_channels(counts, score_of, name, seed, replace_unstructured=True,
                                               calibration=calibration)
    state.apply_channels(channels, records)


__all__ = ["unit_of", "units", "ensure_groups", "criterion_of", "scores", "keep_of", "kept", "counts_for", "set_channels", "set_blocks",
           "global_counts", "set_global_channels"]
