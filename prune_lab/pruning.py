"""Setting sparsities: where a slider's value becomes a count and then a mask.

``Session.set_sparsity`` / ``set_global_sparsity`` validate the call's shape and forward
here. The pattern (``patterns.py``) decides what a sparsity means for a layer (``count``)
and the state (``state.py``) computes and applies the masks, all or nothing. Structured
patterns go to ``channels.py``. Nothing here reads the Session: the state and, for a
sensitivity-based allocation, the last sensitivity result are passed in.
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional, Sequence

from . import channels as _channels
from .allocation import allocate, pattern_counts
from .criteria import get_criterion
from .masks import check_fraction
from .patterns import Pattern, PatternWarning, get_pattern
from .state import PruningState, check_reconstruct, check_reconstructable


def check_layer_sparsity(state: PruningState, name: str, value: Any) -> float:
    """``value`` as a sparsity in [0, 1] for layer ``name`` (a clear error names both)."""
    state.info(name)
    return check_fraction(value, f"layer {name!r}: sparsity")


def layer_counts(state: PruningState, sparsities: Mapping[str, Any], pattern: Pattern) -> dict[str, int]:
    """Weights to prune per layer under ``pattern``, every value checked before any is used."""
    return {n: pattern.count(state.info(n), check_layer_sparsity(state, n, v)) for n, v in sparsities.items()}


def set_sparsity(state: PruningState, sparsities: Mapping[str, Any], criterion: Any = "magnitude",
                 seed: Optional[int] = None, pattern: Any = "unstructured", round_to: Optional[int] = None,
                 reconstruct: Any = False) -> None:
    """Prune each named layer to its pattern's count for the sparsity given; the others keep
    theirs. Grouped patterns need ``state.groups`` (``channels.ensure_groups``). ``reconstruct``:
    refit the kept weights to the layer's calibration inputs (``state.check_reconstruct``)."""
    if not isinstance(sparsities, Mapping):
        raise TypeError(
            "set_sparsity takes a {layer: sparsity} dict (use set_global_sparsity for one number), "
            f"got {type(sparsities).__name__}"
        )
    pat = get_pattern(pattern)
    method = check_reconstruct(reconstruct)
    check_reconstructable(pat, method)
    if pat.grouped:
        if pat.removes_blocks:
            _channels.set_blocks(state, sparsities)
        else:
            _channels.set_channels(state, sparsities, criterion, seed, round_to, heads=pat.heads)
        return
    if round_to is not None:
        raise ValueError(f"round_to applies to pattern='channels' only, not {pat.name!r}")
    crit = get_criterion(criterion)
    counts = layer_counts(state, sparsities, pat)
    state.refresh_calibration(crit, bool(method))
    state.set_counts(counts, crit, state.seed if seed is None else int(seed), pattern=pat.name, reconstruct=method)


def set_global_sparsity(state: PruningState, sparsity: Any, allocation: Any = "global", criterion: Any = "magnitude",
                        seed: Optional[int] = None, locked: Sequence[str] = (), pattern: Any = "unstructured",
                        sensitivity: Any = None, reconstruct: Any = False) -> None:
    """Prune to a total sparsity split across unlocked layers by ``allocation`` (locked layers
    keep their masks and count toward it). A pattern with fixed levels (N:M) gives every
    layer it fits that level and warns (``PatternWarning``) naming the layers it skipped."""
    pat = get_pattern(pattern)
    method = check_reconstruct(reconstruct)
    check_reconstructable(pat, method)
    if pat.grouped:
        if pat.removes_blocks:
            raise ValueError("pattern 'blocks' removes named blocks: set_sparsity({block: 1}, pattern='blocks')")
        _channels.set_global_channels(state, sparsity, allocation, criterion, seed, locked, heads=pat.heads)
        return
    crit = get_criterion(criterion)
    state.refresh_calibration(crit, bool(method))
    if pat.allocated:
        result, crit, seed = allocate(state, sparsity, allocation, crit, seed, locked, sensitivity)
        # SparseGPT chooses each layer's mask itself, for the allocation's counts
        state.set_counts(result.counts, crit, seed, None if crit.reconstructs else result.masks, reconstruct=method)
        return
    counts, skipped = pattern_counts(state, pat, sparsity, allocation, crit, seed, locked, sensitivity)
    state.set_counts(counts, crit, state.seed if seed is None else int(seed), pattern=pat.name, reconstruct=method)
    if skipped:
        warnings.warn(f"pattern {pat.name}: left as they were (the pattern does not fit them): {', '.join(skipped)}",
                      PatternWarning, stacklevel=3)


__all__ = ["check_layer_sparsity", "layer_counts", "set_sparsity", "set_global_sparsity"]
