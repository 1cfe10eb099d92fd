"""Importance criteria: which weights of a layer matter least. Pure functions of a weight.

A criterion turns a weight tensor into flat *ordered keys* (integers whose order is the importance
order; see ``masks.ordered_keys``); the smallest keys are pruned first. Register a new one with
``register_criterion`` or pass any callable ``(weight, *, layer, seed) -> scores`` where higher
scores mean more important.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import Tensor

from .masks import magnitude_keys, ordered_keys
from .registry import Registry, describe

ScoreFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Criterion:
    """``keys(weight, layer=..., seed=...)`` gives the flat ordered keys; ``name`` goes in recipes.

    ``weight_dependent`` is False for criteria whose masks do not depend on weight values (random),
    so a recipe reproduces them on any weights. ``reproducible`` is False for a criterion that is
    not in the registry (a callable passed directly): a recipe then stores its masks.
    """

    name: str
    keys_fn: Callable[..., Tensor]
    weight_dependent: bool = True
    reproducible: bool = True

    def keys(self, weight: Tensor, *, layer: str, seed: int) -> Tensor:
        return self.keys_fn(weight, layer=layer, seed=seed)


CRITERIA: Registry[Criterion] = Registry("criterion")


def register_criterion(name: str, *, weight_dependent: bool = True) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator registering a score function ``(weight, *, layer, seed) -> scores``."""

    def wrap(fn: ScoreFn) -> ScoreFn:
        CRITERIA.register(name, Criterion(name, _scores_to_keys(fn), weight_dependent))
        return fn

    return wrap


def _scores_to_keys(fn: ScoreFn) -> Callable[..., Tensor]:
    def keys(weight: Tensor, *, layer: str, seed: int) -> Tensor:
        scores = fn(weight, layer=layer, seed=seed)
        if not isinstance(scores, Tensor) or scores.numel() != weight.numel():
            raise ValueError(
                f"criterion {describe(fn)!r} must return a tensor with {weight.numel()} scores for "
                f"layer {layer!r}, got {getattr(scores, 'shape', type(scores).__name__)}"
            )
        if scores.dtype.is_floating_point and not bool(torch.isfinite(scores).all()):
            raise ValueError(f"criterion {describe(fn)!r} returned NaN/inf scores for layer {layer!r}")
        return ordered_keys(scores)

    return keys


def get_criterion(criterion: Union[str, ScoreFn, Criterion]) -> Criterion:
    if isinstance(criterion, Criterion):
        return criterion
    if callable(criterion):
        return Criterion(describe(criterion), _scores_to_keys(criterion), reproducible=False)
    return CRITERIA.get(criterion)


def list_criteria() -> list[str]:
    return CRITERIA.names()


def layer_seed(seed: int, layer: str) -> int:
    """A per-layer seed stable across processes (Python's ``hash`` is salted)."""
    return (int(seed) * 1_000_003 + zlib.crc32(layer.encode())) % (2**63)


def _magnitude_keys(weight: Tensor, *, layer: str, seed: int) -> Tensor:
    return magnitude_keys(weight)


def _random_keys(weight: Tensor, *, layer: str, seed: int) -> Tensor:
    # A permutation is tie-free, so masks nest as sparsity grows; drawn on the CPU so CPU and
    # CUDA sessions get the same masks.
    g = torch.Generator().manual_seed(layer_seed(seed, layer))
    return torch.randperm(weight.numel(), generator=g).to(weight.device)


CRITERIA.register("magnitude", Criterion("magnitude", _magnitude_keys))
CRITERIA.register("random", Criterion("random", _random_keys, weight_dependent=False))
