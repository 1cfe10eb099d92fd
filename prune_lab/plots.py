"""Plot functions: data in, matplotlib Figure out. No state, no widgets.

Artists that tests and the Lab look for carry a ``gid``: ``threshold``, ``pruned-region``,
``kept``, ``pruned``.
"""
from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Optional, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from .session import Session

KEPT_COLOR = "#1f77b4"
PRUNED_COLOR = "#d62728"


class PlotFigure(Figure):
    """A Figure that renders itself as PNG in any notebook, with or without a pyplot backend.

    It is not registered with pyplot, so a notebook never shows it twice and never leaks it.
    """

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png")
        return buf.getvalue()


def new_figure(figsize: tuple[float, float]) -> PlotFigure:
    return PlotFigure(figsize=figsize, layout="constrained")


def magnitude_threshold(weights: np.ndarray, keep: np.ndarray) -> Optional[float]:
    """Largest pruned |w| when the pruned set is exactly the smallest magnitudes, else None."""
    if keep.all() or not (~keep).any():
        return None
    pruned_max = float(np.abs(weights[~keep]).max())
    if keep.any() and float(np.abs(weights[keep]).min()) < pruned_max:
        return None  # not a magnitude mask (e.g. random): no single threshold exists
    return pruned_max


def draw_layer_histogram(
    ax: Axes,
    weights: np.ndarray,
    keep: np.ndarray,
    title: str = "",
    bins: int = 60,
    log: bool = False,
) -> None:
    """Stacked histogram of kept and pruned original weights; magnitude threshold marked."""
    ax.clear()
    w = weights.reshape(-1)
    k = keep.reshape(-1)
    lim = float(np.abs(w).max()) or 1.0
    edges = np.linspace(-lim, lim, bins + 1)
    ax.hist([w[k], w[~k]], bins=edges, stacked=True, color=[KEPT_COLOR, PRUNED_COLOR], label=["kept", "pruned"])
    for container, gid in zip(ax.containers, ("kept", "pruned")):
        for patch in container:
            patch.set_gid(gid)
    t = magnitude_threshold(w, k)
    if t is not None:
        ax.axvspan(-t, t, color=PRUNED_COLOR, alpha=0.12, gid="pruned-region")
        for x in (-t, t):
            ax.axvline(x, color=PRUNED_COLOR, linestyle="--", linewidth=1, gid="threshold")
    if log:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("weight")
    ax.set_ylabel("count (log)" if log else "count")


def weight_histograms(
    session: "Session",
    layers: Optional[Sequence[str]] = None,
    bins: int = 60,
    log: bool = False,
    ncols: int = 3,
) -> Figure:
    """One panel per layer: the original weight distribution, pruned part in red.

    For magnitude masks the dashed lines mark the threshold (the largest pruned |w|) and the
    shaded band is the pruned region. ``log=True`` uses a log count axis.
    """
    names = [i.name for i in session.layers] if layers is None else list(layers)
    for name in names:
        session.layer(name)
    ncols = max(1, min(ncols, len(names)))
    nrows = math.ceil(len(names) / ncols)
    fig = new_figure((3.6 * ncols, 2.6 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
    sparsity = session.sparsity
    for ax, name in zip(axes, names):
        info = session.layer(name)
        w = session.original_weight(name).detach().float().cpu().numpy()
        keep = session.mask(name).cpu().numpy()
        shape = "x".join(map(str, info.shape))
        draw_layer_histogram(ax, w, keep, f"{name} ({shape}) - {sparsity[name]:.1%} pruned", bins, log)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    if names:
        axes[0].legend(fontsize=8, loc="upper left")
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
