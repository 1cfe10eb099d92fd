"""Importance criteria: which weights of a layer matter least.

A criterion turns a weight tensor into flat *ordered keys* (integers whose order is the importance
order; see ``masks.ordered_keys``); the smallest keys are pruned first. Register a new one with
``register_criterion`` or pass any callable ``(weight, *, layer, seed) -> scores`` where higher
scores mean more important. A criterion that looks at data declares ``needs`` (any of
``"act_norm"``, ``"grad"``, ``"fisher"``) and receives ``stats`` (a ``calibration.LayerStats``)
after ``Session.calibrate(train_data)``.

Built-in criteria (w: the layer's base weights):

- ``magnitude``: |w|.
- ``random``: a seeded permutation (the floor every other criterion must beat).
- ``taylor``: mean over calibration minibatches b of (g_b * w)^2, g_b the gradient of batch b's
  mean loss: the squared first-order Taylor estimate of the loss change when w is removed, as
  Molchanov et al. 2019 accumulate it. ``taylor-meangrad``: |w * g| with g the gradient of the
  mean loss over all samples, the degenerate form (near 0 at convergence).
- ``obd``: 1/2 * h * w^2, h the Hessian diagonal: the empirical Fisher (mean squared
  per-sample gradient) or, after ``calibrate(..., hessian="hutchinson")``, Hutchinson's
  estimate of the true diagonal (Optimal Brain Damage, LeCun et al. 1990).
- ``wanda``: |W_ij| * ||X_j||_2, X_j the j-th input feature over the calibration samples and
  positions (for convolutions: input channel x kernel position), compared within each output row
  as the paper does: every row of a layer loses the same number of weights (+-1); across layers
  (global allocation) entries compare by their rank fraction within their row (Sun et al. 2023).
- ``sparsegpt``: masks chosen *and* the kept weights refitted by SparseGPT (Frantar & Alistarh
  2023; ``reconstruct.py``); its keys (for allocations across layers) are w^2 / [U]_jj^2.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .masks import magnitude_keys, ordered_keys
from .registry import Registry, describe

ScoreFn = Callable[..., Tensor]
STATISTICS = ("act_norm", "grad", "fisher", "batch_grad_sq", "xtx")  # what calibration can compute (``calibration.py``)


@dataclass
class LayerStats:
    """What a data-aware criterion reads for one layer (weight-shaped float32 tensors or None),
    computed by ``calibration.py`` from training data."""

    act_norm: Optional[Tensor] = None
    grad: Optional[Tensor] = None
    fisher: Optional[Tensor] = None
    hessian: Optional[Tensor] = None  # the Hessian diagonal OBD uses: the Fisher or Hutchinson's
    batch_grad_sq: Optional[Tensor] = None  # mean over minibatches of the squared minibatch gradient (Taylor)
    xtx: Optional[Tensor] = None  # (cols, cols) Gram matrix of the layer's inputs (reconstruction), float64
    kind: str = ""  # the layer's module kind, for the matrix view of ``xtx``
    xtx_error: str = ""  # why ``xtx`` is empty: the layer's inputs cannot be refitted to (its kind, a tie)


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
    needs: tuple[str, ...] = ()
    scores_fn: Optional[Callable[..., Tensor]] = None  # float importance per entry, where a sum of them means something
    reconstructs: bool = False  # its masks come with refitted weights (SparseGPT): ``reconstruct.py`` chooses both

    def keys(self, weight: Tensor, *, layer: str, seed: int, stats: Optional[LayerStats] = None) -> Tensor:
        if self.needs:
            return self.keys_fn(weight, layer=layer, seed=seed, stats=stats)
        return self.keys_fn(weight, layer=layer, seed=seed)

    def scores(self, weight: Tensor, *, layer: str, seed: int, stats: Optional[LayerStats] = None) -> Tensor:
        """Float64 importance of every entry, shaped like ``weight``: what a channel criterion
        sums over a channel's entries (keys only order entries; their sum means nothing)."""
        if self.scores_fn is None:
            raise ValueError(f"criterion {self.name!r} has no per-entry scores to sum over a channel")
        out = self.scores_fn(weight, layer=layer, seed=seed, stats=stats) if self.needs else \
            self.scores_fn(weight, layer=layer, seed=seed)
        return out.double().reshape(weight.shape)


CRITERIA: Registry[Criterion] = Registry("criterion")


def register_criterion(name: str, *, weight_dependent: bool = True, needs: Sequence[str] = ()) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator registering a score function ``(weight, *, layer, seed) -> scores`` (with
    ``needs``: ``(weight, *, layer, seed, stats) -> scores``)."""
    needs = tuple(needs)
    bad = [n for n in needs if n not in STATISTICS]
    if bad:
        raise ValueError(f"criterion {name!r}: unknown statistics {bad}; valid: {', '.join(map(repr, STATISTICS))}")

    def wrap(fn: ScoreFn) -> ScoreFn:
        CRITERIA.register(name, Criterion(name, _scores_to_keys(fn, bool(needs)), weight_dependent, needs=needs))
        return fn

    return wrap


def _scores_to_keys(fn: ScoreFn, with_stats: bool = False) -> Callable[..., Tensor]:
    def keys(weight: Tensor, *, layer: str, seed: int, stats: Optional[LayerStats] = None) -> Tensor:
        scores = fn(weight, layer=layer, seed=seed, stats=stats) if with_stats else fn(weight, layer=layer, seed=seed)
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


def _magnitude_scores(weight: Tensor, *, layer: str, seed: int) -> Tensor:
    return weight.detach().double().abs()


def _random_scores(weight: Tensor, *, layer: str, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(layer_seed(seed, layer))
    return torch.rand(weight.shape, generator=g, dtype=torch.float64).to(weight.device)


CRITERIA.register("magnitude", Criterion("magnitude", _magnitude_keys, scores_fn=_magnitude_scores))
CRITERIA.register("random", Criterion("random", _random_keys, weight_dependent=False, scores_fn=_random_scores))



# ---------------------------------------------------------------------- data-aware criteria
def _stat(stats: Optional[LayerStats], key: str, layer: str, criterion: str) -> Tensor:
    value = getattr(stats, key, None) if stats is not None else None
    if value is None:
        raise ValueError(f"criterion {criterion!r} has no {key!r} statistics for layer {layer!r}; call calibrate(train_data) first")
    return value


def _taylor_scores(weight: Tensor, *, layer: str, seed: int, stats: Optional[LayerStats]) -> Tensor:
    """mean over minibatches b of (g_b * w) ** 2 (Molchanov et al. 2019, per parameter)."""
    g2 = _stat(stats, "batch_grad_sq", layer, "taylor")
    return weight.detach().double() ** 2 * g2.double()


def _taylor_meangrad_scores(weight: Tensor, *, layer: str, seed: int, stats: Optional[LayerStats]) -> Tensor:
    """|w * g|, g the gradient of the mean loss over every calibration sample: close to 0 on a
    converged model, which is why it prunes badly (kept to show that, under its own name)."""
    g = _stat(stats, "grad", layer, "taylor-meangrad")
    return (weight.detach().double() * g.double()).abs()


def layer_gram(stats: Optional[LayerStats], layer: str) -> Tensor:
    """The layer's input Gram matrix H, or a clear error (not calibrated; a layer it cannot serve)."""
    h = _stat(stats, "xtx", layer, "sparsegpt")
    if stats is not None and stats.xtx_error:
        raise ValueError(stats.xtx_error)
    return h


def _sparsegpt_scores(weight: Tensor, *, layer: str, seed: int, stats: Optional[LayerStats]) -> Tensor:
    """SparseGPT's saliency w**2 / [U]_jj**2 (``reconstruct.obs_scores``), shaped like the weight."""
    from .reconstruct import from_matrix, obs_scores, to_matrix

    h = layer_gram(stats, layer)
    kind = stats.kind if stats is not None else ""
    return from_matrix(obs_scores(to_matrix(weight.detach(), kind), h), tuple(weight.shape), kind)


def _obd_scores(weight: Tensor, *, layer: str, seed: int, stats: Optional[LayerStats]) -> Tensor:
    h = _stat(stats, "hessian", layer, "obd")
    return 0.5 * h.double() * weight.detach().double() ** 2


def _taylor_keys(weight: Tensor, *, layer: str, seed: int, stats: Optional[LayerStats]) -> Tensor:
    return ordered_keys(_taylor_scores(weight, layer=layer, seed=seed, stats=stats))


def _obd_keys(weight: Tensor, *, layer: str, seed: int, stats: Optional[LayerStats]) -> Tensor:
    return ordered_keys(_obd_scores(weight, layer=layer, seed=seed, stats=stats))


def wanda_scores(weight: Tensor, act_norm: Tensor) -> Tensor:
    """|W_ij| * ||X_j||_2 per entry (``act_norm`` holds ||X_j|| for the feature entry ij reads)."""
    return weight.detach().double().abs() * act_norm.double()


def _wanda_keys(weight: Tensor, *, layer: str, seed: int, stats: Optional[LayerStats]) -> Tensor:
    act = _stat(stats, "act_norm", layer, "wanda")
    if not bool(act.any()):
        raise ValueError(f"wanda: calibration saw no inputs for layer {layer!r} (transposed and 3-D convolutions are "
                         "not covered); use another criterion for it")
    scores = wanda_scores(weight, act)
    rows = scores.reshape(scores.shape[0], -1) if scores.dim() > 1 else scores.reshape(1, -1)
    n_rows, n_cols = rows.shape
    rank = torch.empty_like(rows, dtype=torch.float64)
    order = torch.argsort(rows, dim=1, stable=True)
    rank.scatter_(1, order, torch.arange(n_cols, dtype=torch.float64, device=rows.device).expand(n_rows, n_cols))
    # rank fraction within the row, ties between rows broken by row index: pruning the k smallest
    # keys removes the lowest-ranked entries of every row in turn
    row = torch.arange(n_rows, dtype=torch.float64, device=rows.device).unsqueeze(1)
    key = (rank / n_cols) + row / (n_rows * n_cols * 2.0)
    return ordered_keys(key.reshape(weight.shape))


CRITERIA.register("taylor", Criterion("taylor", _taylor_keys, needs=("batch_grad_sq",), scores_fn=_taylor_scores))
CRITERIA.register("taylor-meangrad", Criterion("taylor-meangrad", _scores_to_keys(_taylor_meangrad_scores, True),
                                               needs=("grad",), scores_fn=_taylor_meangrad_scores))
CRITERIA.register("sparsegpt", Criterion("sparsegpt", _scores_to_keys(_sparsegpt_scores, True), needs=("xtx",),
                                         scores_fn=_sparsegpt_scores, reconstructs=True))
CRITERIA.register("obd", Criterion("obd", _obd_keys, needs=("fisher",), scores_fn=_obd_scores))
CRITERIA.register("wanda", Criterion("wanda", _wanda_keys, needs=("act_norm",)))


def needs_of(names: Sequence[Union[str, Criterion]]) -> tuple[str, ...]:
    """The statistics the given criteria (default every registered one) need, in a fixed order."""
    found = {n for c in names for n in get_criterion(c).needs}
    return tuple(n for n in STATISTICS if n in found)
