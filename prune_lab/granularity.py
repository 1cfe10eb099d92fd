"""The granularity spectrum: the same fraction of a layer's weights removed at four grains, from
single weights to whole channels, and what each grain costs (accuracy) and buys (a smaller file,
fewer MACs for a sparse kernel, fewer MACs for the dense kernels every runtime has).

Finer grains choose each weight freely, so they keep more accuracy; coarser ones remove structure
a dense kernel can skip: only channel removal makes the model itself smaller. Every figure is
counted or measured on the session's own model; the session is left exactly as it was.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar

from torch import Tensor

if TYPE_CHECKING:
    from .session import Session

T = TypeVar("T")
GRAINS = ("unstructured", "2:4", "kernel", "channels")  # finest to coarsest


@dataclass
class GrainRow:
    """One grain at the spectrum's sparsity. ``zeroed``: weights of all prunable layers set to zero
    (channels also zero the readers' columns and BatchNorm entries of the removed channels);
    ``dense_macs``: MACs per sample of the physically compacted model (``Session.compact``), what a
    dense kernel runs; ``effective_macs``: MACs on nonzero weights, what an ideal sparse kernel runs."""

    grain: str
    metric: float
    zeroed: int
    sparse_file_bytes: int
    effective_macs: int
    dense_macs: int


@dataclass
class Spectrum:
    layers: tuple[str, ...]
    sparsity: float
    metric_name: str
    dense: GrainRow  # the unpruned model, for reference
    rows: list[GrainRow]

    def __repr__(self) -> str:
        lines = [f"{', '.join(self.layers)} at {self.sparsity:.0%} sparsity",
                 f"{'grain':<14}{self.metric_name:>10}{'zeroed':>9}{'sparse file B':>15}{'eff. MACs':>11}"
                 f"{'dense-kernel MACs':>19}"]
        for r in [self.dense] + self.rows:
            lines.append(f"{r.grain:<14}{r.metric:>10.4f}{r.zeroed:>9,}{r.sparse_file_bytes:>15,}"
                         f"{r.effective_macs:>11,}{r.dense_macs:>19,}")
        return "\n".join(lines)


def _row(session: "Session", grain: str, dense_nonzeros: int) -> GrainRow:
    from .measure import model_macs

    total = session.stats().total
    removed = any(kept < size for kept, size in session.channels.values())
    small = session.compact(measure=False) if removed else session.model  # compact() refuses when nothing goes
    return GrainRow(grain, session.evaluate()[session.metric_name], dense_nonzeros - total["nonzeros"],
                    total["sparse_file_bytes"], total["effective_macs"], model_macs(small, session.data.sample(1)[0]))


def _at_each_grain(session: "Session", layers: Sequence[str], sparsity: float, grains: Sequence[str],
                   criterion: str, measure: Callable[[str], T]) -> list[T]:
    """``measure(grain)`` with ``layers`` pruned to ``sparsity`` at each grain in turn; the session
    is restored bit for bit after each, and whatever happens (a grain refused, an interrupt)."""
    before = session.snapshot()
    out = []
    try:
        for grain in grains:
            session.set_sparsity({name: sparsity for name in layers}, criterion=criterion, pattern=grain)
            out.append(measure(grain))
            session.restore(before)
    finally:
        session.restore(before)
    return out


def spectrum(session: "Session", layers: Sequence[str], sparsity: float = 0.5,
             grains: Sequence[str] = GRAINS, criterion: str = "magnitude") -> Spectrum:
    """Prune ``layers`` to ``sparsity`` at each grain in turn (``set_sparsity(..., pattern=grain)``,
    a layer a grain does not fit is refused by name), measure, and restore the session bit for
    bit. ``sparsity=0.5`` is where 2:4 applies; a grain's own rounding (whole kernels, channels)
    may take a little more or less, as ``zeroed`` shows. Starts from the session's current state."""
    layers = tuple(layers)
    dense_nonzeros = session.stats().total["nonzeros"]
    dense = _row(session, "(as given)", dense_nonzeros)
    rows = _at_each_grain(session, layers, sparsity, grains, criterion, lambda g: _row(session, g, dense_nonzeros))
    return Spectrum(layers, sparsity, session.metric_name, dense, rows)


def grain_masks(session: "Session", layer: str, sparsity: float = 0.5, grains: Sequence[str] = GRAINS,
                criterion: str = "magnitude") -> dict[str, Tensor]:
    """``{grain: keep mask of layer's weight}`` (bool, the weight's shape) with ``layer`` pruned to
    ``sparsity`` at each grain in turn, the session restored bit for bit afterwards: what each grain
    leaves of the same layer, for :func:`prune_lab.plots.grain_masks`."""
    masks = _at_each_grain(session, (layer,), sparsity, grains, criterion,
                           lambda _: session.mask(layer).detach().cpu().clone())
    return dict(zip(grains, masks))


__all__ = ["GRAINS", "GrainRow", "Spectrum", "grain_masks", "spectrum"]
