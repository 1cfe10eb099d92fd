"""Plot functions: data in, matplotlib Figure out. No state, no widgets.

Artists that tests and the Lab look for carry a ``gid``: ``threshold``, ``pruned-region``,
``kept``, ``pruned``.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import matplotlib
import matplotlib.lines
import matplotlib.ticker
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .formats import fmt_bytes, fmt_count

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


LEGEND_LAYERS = 10  # beyond this many layers a legend names only the extremes


def ratio_axis(axis: Any) -> None:
    """A log axis of ratios labelled 1x 2x 4x ... (not 10^0 or 6x10^0)."""
    axis.set_major_locator(matplotlib.ticker.LogLocator(base=2))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}x"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


class ReadableLogLocator(matplotlib.ticker.Locator):
    """Log-axis ticks a reader can use: 1-2-5 steps per decade, or, on a range too narrow for
    three of those (a trade-off panel spanning 50-100 KB), ``n`` ticks evenly spaced in log,
    rounded to two significant digits (more on a range too narrow for that)."""

    def __init__(self, n: int = 4, base: int = 1000):
        self.n, self.base = n, base  # base 1024: rounded in the KB/MB shown (35 KB, not 35.2 KB)

    def __call__(self) -> list:
        lo, hi = sorted(self.axis.get_view_interval())
        return self.tick_values(lo, hi)

    def tick_values(self, vmin: float, vmax: float) -> list:
        lo, hi = sorted((vmin, vmax))
        if not (lo > 0 and math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
            return []
        units = [float(self.base) ** k for k in range(5)]  # B, KB, MB ... (or 1, 1000, ...)
        for subs in ((1, 2, 5), (1,)):  # 1-2-5 per decade (of the shown unit); decades if crowded
            steps = sorted({m * 10.0 ** d * u for u in units for d in (0, 1, 2)
                            for m in subs if lo <= m * 10.0 ** d * u <= hi})
            if len(steps) <= 7:
                break
        if len(steps) > 7:
            steps = steps[:: math.ceil(len(steps) / 6)]
        if len(steps) >= 3:
            return steps
        for digits in range(2, 7):  # two significant digits, more only if the range is that narrow
            ticks = set()
            for i in range(self.n):
                v = lo * (hi / lo) ** ((i + 0.5) / self.n)
                unit = float(self.base) ** max(0, math.floor(math.log(v, self.base)))
                shown = v / unit
                ticks.add(round(shown, digits - 1 - math.floor(math.log10(shown))) * unit)
            if len(ticks) >= 3:
                break
        return sorted(ticks)


def log_axis(axis: Any, fmt: Any) -> None:
    """A log axis labelled with ``fmt`` (bytes, counts) at readable ticks, minor ticks unlabelled."""
    axis.set_major_locator(ReadableLogLocator(base=1024 if fmt is fmt_bytes else 1000))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _pos: fmt(v)))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def metric_axis(axis: Any, metric: str) -> None:
    """Accuracy reads as percent everywhere (97.2%, not 0.972); other metrics stay as they are."""
    if metric == "accuracy":
        axis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=None))


def placeholder(figsize: tuple[float, float], text: str) -> PlotFigure:
    """An empty panel saying what would be here and how to get it (instead of a broken image)."""
    fig = new_figure(figsize)
    ax = fig.subplots()
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=11, color="#666", wrap=True, transform=ax.transAxes)
    return fig


def new_figure(figsize: tuple[float, float], figure_class: type = PlotFigure) -> PlotFigure:
    """A figure (of ``figure_class``, a PlotFigure); in a plain script (no IPython) it is also registered with pyplot, so
    ``plt.show()`` shows it. In notebooks it is shown once, by its own display."""
    import sys

    ipython = sys.modules.get("IPython")
    in_ipython = ipython is not None and getattr(ipython, "get_ipython", lambda: None)() is not None
    headless = matplotlib.get_backend().lower() in {"agg", "pdf", "ps", "svg", "cairo", "pgf", "template"}
    if not in_ipython and not headless and "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        return plt.figure(figsize=figsize, layout="constrained", FigureClass=figure_class)
    return figure_class(figsize=figsize, layout="constrained")


def magnitude_threshold(weights: np.ndarray, keep: np.ndarray) -> Optional[float]:
    """Largest pruned |w| when the pruned set is exactly the smallest magnitudes, else None."""
    if keep.all() or not (~keep).any():
        return None
    pruned_max = float(np.abs(weights[~keep]).max())
    if keep.any() and float(np.abs(weights[keep]).min()) < pruned_max:
        return None  # not a magnitude mask (e.g. random): no single threshold exists
    return pruned_max


@dataclass
class LayerHistogram:
    """The artists of one layer's weight histogram (:func:`draw_layer_histogram`), kept so a new
    mask moves them in place: the original weights and bin edges, the per-bin total, the kept
    (blue) and pruned (red, stacked on top) step patches, the pruned band and threshold lines."""

    ax: Axes
    weights: np.ndarray
    edges: np.ndarray
    total: np.ndarray
    kept_bars: Any
    pruned_bars: Any
    band: Any
    lines: list

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(kept, pruned) weights per bin, as drawn."""
        kept = np.asarray(self.kept_bars.get_data().values)
        pruned = np.asarray(self.pruned_bars.get_data().values) - np.asarray(self.pruned_bars.get_data().baseline)
        return kept, pruned

    def update(self, keep: np.ndarray, title: str = "") -> list:
        """Re-split the bars into kept/pruned for a new mask, move the threshold lines and band;
        returns the artists that changed. Axis limits never change: each bin's stacked total is
        the whole weight histogram."""
        w, edges, ax = self.weights, self.edges, self.ax
        k = keep.reshape(-1)
        kept, _ = np.histogram(w[k], bins=edges)
        self.kept_bars.set_data(kept, edges, baseline=0)
        self.pruned_bars.set_data(self.total, edges, baseline=kept)
        t = magnitude_threshold(w, k)
        for line, x in zip(self.lines, (-(t or 0.0), t or 0.0)):
            line.set_xdata([x, x])
            line.set_visible(t is not None)
        self.band.set_x(-(t or 0.0))
        self.band.set_width(2 * (t or 0.0))
        self.band.set_visible(t is not None)
        ax.set_title(title, fontsize=9)
        return [self.kept_bars, self.pruned_bars, self.band, *self.lines, ax.title]


def draw_layer_histogram(
    ax: Axes,
    weights: np.ndarray,
    keep: np.ndarray,
    title: str = "",
    bins: int = 60,
    log: bool = False,
) -> LayerHistogram:
    """Stacked histogram of kept (blue) and pruned (red, on top) original weights; the magnitude
    threshold marked. Returns its :class:`LayerHistogram`, whose ``update(keep)`` moves the
    artists in place for a new mask (they always exist, hidden when unused)."""
    ax.clear()
    w = weights.reshape(-1)
    lim = float(np.abs(w).max()) or 1.0
    edges = np.linspace(-lim, lim, bins + 1)
    total, _ = np.histogram(w, bins=edges)
    # two step patches (not 2 x bins bars): cheap to draw and to update in place
    kept_bars = ax.stairs(total, edges, baseline=0, fill=True, color=KEPT_COLOR, label="kept", gid="kept")
    pruned_bars = ax.stairs(total, edges, baseline=total, fill=True, color=PRUNED_COLOR, label="pruned", gid="pruned")
    band = ax.axvspan(0, 0, color=PRUNED_COLOR, alpha=0.12, gid="pruned-region")
    lines = [ax.axvline(0, color=PRUNED_COLOR, linestyle="--", linewidth=1, gid="threshold") for _ in range(2)]
    hist = LayerHistogram(ax, w, edges, total, kept_bars, pruned_bars, band, lines)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(0.8, max(float(total.max()), 1.0) * 1.5)
    else:
        ax.set_ylim(0, max(float(total.max()), 1.0) * 1.05)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("weight")
    ax.set_ylabel("count (log)" if log else "count")
    ax.legend(handles=[kept_bars, pruned_bars], loc="upper right", fontsize=9, framealpha=0.8)
    hist.update(keep, title)
    return hist


def histogram_counts(hist: LayerHistogram) -> tuple[np.ndarray, np.ndarray]:
    """(kept, pruned) weights per bin as drawn (``LayerHistogram.counts``)."""
    return hist.counts()


def update_layer_histogram(hist: LayerHistogram, keep: np.ndarray, title: str = "") -> list:
    """``hist.update(keep, title)``: the changed artists."""
    return hist.update(keep, title)


class HistogramFigure(PlotFigure):
    """:func:`weight_histograms`' figure: ``histograms[layer]`` is each panel's :class:`LayerHistogram`."""

    histograms: dict


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
    fig = new_figure((3.6 * ncols, 2.6 * nrows), HistogramFigure)
    fig.histograms = {}
    axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
    sparsity = session.sparsity
    for ax, name in zip(axes, names):
        info = session.layer(name)
        w = session.original_weight(name).detach().float().cpu().numpy()
        keep = session.mask(name).cpu().numpy()
        shape = "x".join(map(str, info.shape))
        fig.histograms[name] = draw_layer_histogram(ax, w, keep, f"{name} ({shape}) - {sparsity[name]:.1%} pruned", bins, log)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    if names:
        axes[0].legend(fontsize=9, loc="upper left")
    return fig


def sensitivity(result: Any, key: Optional[str] = None, current: Optional[dict[str, float]] = None) -> Figure:
    """One curve per layer: the metric (or ``key``) against that layer's sparsity.

    The dotted line is the reference (the model as the sweep found it); each layer's current
    sparsity is marked with a dot on its curve (``current`` overrides the sweep's).
    """
    key = key or result.metric
    current = result.current if current is None else current
    fig = new_figure((7.0, 4.2))
    ax = fig.subplots()
    for layer in result.layers:
        pts = result.curve(layer, key)
        if not pts:
            continue
        xs, ys = zip(*pts)
        (line,) = ax.plot(xs, ys, marker=".", label=layer, gid=f"curve:{layer}")
        s = current.get(layer, 0.0)
        y = float(np.interp(s, xs, ys))
        ax.plot([s], [y], "o", color=line.get_color(), markersize=8, markeredgecolor="black", gid=f"current:{layer}")
    ax.axhline(result.reference[key], color="gray", linestyle=":", linewidth=1, gid="reference")
    from .patterns import get_pattern

    channels = get_pattern(getattr(result, "pattern", None)).grouped
    ax.set_xlabel("channels removed from the group (others unchanged)" if channels else "sparsity of the layer (others unchanged)")
    ax.set_ylabel(key)
    metric_axis(ax.yaxis, key)
    status = "" if result.complete else " (incomplete)"
    ax.set_title(f"{'Channel group' if channels else 'Layer'} sensitivity - {result.criterion}{status}", fontsize=10)
    ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    handles = {h.get_label(): h for h in ax.get_lines() if str(h.get_gid()).startswith("curve:")}
    if len(handles) > LEGEND_LAYERS:
        # many layers: name the most and the least sensitive, the rest are grey and grouped
        ranking = list(result.ranking(max_drop=0.01))
        named = ranking[: LEGEND_LAYERS // 2] + ranking[-(LEGEND_LAYERS // 2):]
        for name, line in handles.items():
            if name not in named:
                line.set_color("#bbbbbb")
                line.set_linewidth(0.8)
                line.set_marker("")
                line.set_zorder(0)
        shown = [handles[n] for n in named if n in handles]
        rest = matplotlib.lines.Line2D([], [], color="#bbbbbb", label=f"{len(handles) - len(shown)} other layers")
        ax.legend(shown + [rest], [h.get_label() for h in shown] + [rest.get_label()], fontsize=9, loc="lower left",
                  title="most / least prunable", title_fontsize=9)
    else:
        ax.legend(fontsize=9, ncol=2 if len(result.layers) > 8 else 1, loc="lower left")
    return fig


def sensitivity_heatmap(result: Any, key: Optional[str] = None) -> Figure:
    """Layers x levels heatmap of the drop in the metric versus the reference (red = worse)."""
    key = key or result.metric
    table = result.table(key).numpy()
    drop = result.reference[key] - table if key == result.metric else table - result.reference[key]
    fig = new_figure((7.0, 0.35 * len(result.layers) + 1.6))
    ax = fig.subplots()
    vmax = float(np.nanmax(np.abs(drop))) if np.isfinite(drop).any() else 1.0
    im = ax.imshow(drop, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
    im.set_gid("heatmap")
    ax.set_yticks(range(len(result.layers)), result.layers, fontsize=9)
    step = max(1, len(result.levels) // 10)
    ax.set_xticks(range(0, len(result.levels), step), [f"{lv:.0%}" for lv in result.levels[::step]], fontsize=9)
    ax.set_xlabel("sparsity")
    fig.colorbar(im, ax=ax, label=f"{key} drop" if key == result.metric else f"{key} increase")
    ax.set_title("Sensitivity heatmap", fontsize=10)
    return fig


class TradeoffFigure(PlotFigure):
    """:func:`tradeoff_points`' figure; ``fitted``: its limits were fitted to the points once
    (afterwards ``grow_only`` updates only widen them)."""

    fitted: bool = False


def tradeoff_points(points: Sequence[dict[str, Any]], current: Optional[int] = None, metric: str = "accuracy") -> Figure:
    """Every configuration tried: ``metric`` against sparse bytes and against effective MACs,
    Pareto fronts drawn, ``points[current]`` highlighted. Update in place with
    :func:`update_tradeoff_points`."""
    fig = new_figure((7.0, 3.0), TradeoffFigure)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (key, label) in zip(axes, (("sparse_bytes", "sparse file bytes"), ("effective_macs", "effective MACs"))):
        ax.plot([], [], "o", color="#999999", markersize=4, gid="points", alpha=0.7)
        ax.plot([], [], "-", color=KEPT_COLOR, linewidth=1.5, gid="pareto")
        ax.plot([], [], "*", color=PRUNED_COLOR, markersize=14, markeredgecolor="black", gid="current")
        ax.set_xscale("log")
        log_axis(ax.xaxis, fmt_bytes if key == "sparse_bytes" else fmt_count)  # 54.6 KB, 35,112: not 6x10^4
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    metric_axis(axes[0].yaxis, metric)
    fig.suptitle("Configurations tried (line: Pareto front)", fontsize=10)
    update_tradeoff_points(fig, points, current, metric)
    return fig


def update_tradeoff_points(
    fig: Figure, points: Sequence[dict[str, Any]], current: Optional[int] = None, metric: str = "accuracy", grow_only: bool = False
) -> bool:
    """Move the points, fronts and current marker in place; returns True when axis limits changed.

    ``grow_only`` widens limits (with margin) only when a point falls outside them, so a live
    view rarely needs a full redraw."""
    from .workflows.tradeoff import pareto_front

    scores = [p[metric] for p in points]
    changed = False
    for ax, key in zip(fig.axes[:2], ("sparse_bytes", "effective_macs")):
        lines = {line.get_gid(): line for line in ax.lines}
        costs = [p[key] for p in points]
        lines["points"].set_data(costs, scores)
        front = pareto_front(costs, scores)
        lines["pareto"].set_data([costs[i] for i in front], [scores[i] for i in front])
        if current is not None and points:
            lines["current"].set_data([costs[current]], [scores[current]])
        else:
            lines["current"].set_data([], [])
        if points:
            lo, hi = min(costs), max(costs)
            ylo, yhi = min(scores), max(scores)
            pad = max(0.01, (yhi - ylo) * 0.08)
            old_x, old_y = ax.get_xlim(), ax.get_ylim()
            if not grow_only or not getattr(fig, "fitted", False):
                ax.set_xlim(lo / 1.3, hi * 1.3)
                ax.set_ylim(ylo - pad, yhi + pad)
            else:
                if lo < old_x[0] or hi > old_x[1]:
                    ax.set_xlim(min(old_x[0], lo / 2), max(old_x[1], hi * 2))
                if ylo < old_y[0] or yhi > old_y[1]:
                    ax.set_ylim(min(old_y[0], ylo - 4 * pad), max(old_y[1], yhi + pad))
            changed = changed or (ax.get_xlim(), ax.get_ylim()) != (old_x, old_y)
    if points and isinstance(fig, TradeoffFigure):
        fig.fitted = True
    return changed


def move_sensitivity_markers(fig: Figure, result: Any, current: dict[str, float], key: Optional[str] = None) -> None:
    """Move each layer's current-sparsity dot on a :func:`sensitivity` figure, in place."""
    key = key or result.metric
    lines = {line.get_gid(): line for line in fig.axes[0].lines}
    for layer in result.layers:
        marker = lines.get(f"current:{layer}")
        pts = result.curve(layer, key)
        if marker is None or not pts:
            continue
        xs, ys = zip(*pts)
        s = current.get(layer, 0.0)
        marker.set_data([s], [float(np.interp(s, xs, ys))])


def tradeoff(result: Any, x: str = "compression") -> Figure:
    """Metric against compression (params/nonzeros), sparse file bytes or theoretical speedup
    (log x): one curve per strategy (mean over seeds, bars = spread), solid before and dashed
    after fine-tuning, the Pareto front of all measured points in grey, dense as a dotted line."""
    from .workflows.tradeoff import pareto_front

    keys = {"compression": ("compression", "compression (params / nonzeros)"), "bytes": ("sparse_bytes", "sparse file bytes"),
            "speedup": ("speedup", "theoretical speedup (MACs / effective MACs)")}
    if x not in keys:
        raise ValueError(f"x must be one of {', '.join(map(repr, keys))}, got {x!r}")
    key, label = keys[x]
    m = result.metric
    rows = result.summary()
    fig = new_figure((7.0, 4.2))
    ax = fig.subplots()
    xs_all, ys_all = [], []
    for i, strategy in enumerate(dict.fromkeys(r["strategy"] for r in rows)):
        rs = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r[key])
        color = f"C{i}"
        xs = [r[key] for r in rs]
        for suffix, style in (("", "-"), ("_finetuned", "--")):
            ys = [r.get(f"{m}{suffix}") for r in rs]
            if any(v is None for v in ys):
                continue
            err = [r.get(f"{m}{suffix}_std", 0.0) for r in rs]
            ax.errorbar(xs, ys, yerr=err if any(err) else None, fmt=style, marker="o", markersize=4, color=color,
                        label=f"{strategy}{' + fine-tune' if suffix else ''}", gid=f"curve:{strategy}{suffix}")
            xs_all += xs
            ys_all += ys
    if key == "sparse_bytes":
        costs = xs_all
    else:
        costs = [-v for v in xs_all]  # more compression / speedup is better
    front = pareto_front(costs, ys_all, getattr(result, "lower_is_better", False))
    ax.plot([xs_all[i] for i in front], [ys_all[i] for i in front], color="gray", linewidth=3, alpha=0.35, zorder=0, gid="pareto", label="Pareto front")
    ax.axhline(result.dense[m], color="black", linestyle=":", linewidth=1, gid="dense")
    ax.set_xscale("log")
    if key in ("compression", "speedup"):
        ratio_axis(ax.xaxis)
    else:
        log_axis(ax.xaxis, fmt_bytes)
    ax.set_xlabel(label)
    ax.set_ylabel(m)
    metric_axis(ax.yaxis, m)
    ax.set_title("Accuracy / size trade-off" + (" (cached)" if result.cached else ""), fontsize=10)
    ax.legend(fontsize=9, ncol=2)
    ax.grid(alpha=0.3)
    return fig


def criterion_scores(session: "Session", layer: str, criteria: Sequence[str] = ("magnitude", "taylor", "obd", "wanda"),
                     seed: int = 0) -> Figure:
    """What each criterion keeps in one layer: every weight's importance rank (0 = pruned first,
    1 = kept longest) as an image, one panel per criterion, rows = output units. Ranks, not raw
    scores, so criteria on different scales share one colour scale. Data-aware criteria need
    ``session.calibrate(train_data)`` first."""
    info = session.layer(layer)
    fig = new_figure((2.6 * len(criteria), 2.8))
    axes = fig.subplots(1, len(criteria), squeeze=False)[0]
    for ax, name in zip(axes, criteria):
        keys = session.importance(layer, name, seed).cpu()
        rank = np.empty(keys.numel())
        rank[np.argsort(keys.numpy(), kind="stable")] = np.arange(keys.numel()) / max(keys.numel() - 1, 1)
        image = rank.reshape(info.shape[0], -1)
        im = ax.imshow(image, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("input feature")
        ax.set_ylabel("output unit" if ax is axes[0] else "")
    fig.colorbar(im, ax=list(axes), label="importance rank", shrink=0.9)
    fig.suptitle(f"{layer} ({'x'.join(map(str, info.shape))}): which weights each criterion keeps", fontsize=10)
    return fig


def grain_curves(results: dict[str, Any], layer: str, key: Optional[str] = None) -> Figure:
    """One layer's sensitivity at several grains: ``{grain: SensitivityResult}`` (each a sweep of
    ``layer`` with ``pattern=grain``), the metric against the fraction removed (for channels, of the
    layer's channel group: its readers' columns go too)."""
    fig = new_figure((6.0, 3.6))
    ax = fig.subplots()
    reference = None
    for grain, result in results.items():
        k = key or result.metric
        pts = result.curve(layer, k)
        if pts:
            xs, ys = zip(*pts)
            alone = len(pts) == 1  # 2:4 has one level: a marker big enough not to hide under another curve
            ax.plot(xs, ys, marker="D" if alone else "o", markersize=8 if alone else 4, linestyle="none" if alone else "-",
                    label=grain, gid=f"grain:{grain}", zorder=3 if alone else 2)
            reference = result.reference[k]
            metric_axis(ax.yaxis, k)
            ax.set_ylabel(k)
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle=":", linewidth=1, gid="reference")
    ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_xlabel(f"fraction of {layer}'s weights removed (channels: of its filters)")
    ax.set_title(f"{layer}: the same fraction at {len(results)} grains", fontsize=10)
    ax.legend(fontsize=9, loc="lower left")
    ax.grid(alpha=0.3)
    return fig


def grain_masks(masks: dict[str, Any], layer: str) -> Figure:
    """What each grain keeps of one layer: ``{grain: keep mask}`` (``granularity.grain_masks``),
    one panel per grain, a row per output channel and, for a conv, its ``in x kh x kw`` weights
    flattened along the row (a kernel is a run of ``kh * kw``). Dark: kept; light: pruned."""
    fig = new_figure((6.4, 1.2 + 0.06 * max(int(next(iter(masks.values())).shape[0]), 8)))
    axes = np.atleast_1d(fig.subplots(1, len(masks), sharey=True))
    for ax, (grain, mask) in zip(axes, masks.items()):
        m = np.asarray(mask, dtype=bool).reshape(mask.shape[0], -1)
        ax.imshow(m, cmap="Greys", vmin=0, vmax=1.6, aspect="auto", interpolation="nearest", gid=f"mask:{grain}")
        ax.set_title(f"{grain}\n{1 - m.mean():.0%} pruned", fontsize=9)
        ax.set_xticks([])
        ax.set_xlabel("weights of a row", fontsize=8)
    axes[0].set_ylabel("output channel")
    fig.suptitle(f"{layer}: the same layer pruned at each grain (dark: kept)", fontsize=10)
    return fig


def kernel_speedup(timings: Any) -> Figure:
    """Measured dense time / sparse time of ``W @ X`` against the sparsity of ``W``
    (``sparse_kernels.KernelTimings``), with the break-even marked: above 1 the sparse kernel wins."""
    fig = new_figure((6.0, 3.4))
    ax = fig.subplots()
    xs = [r.sparsity for r in timings.rows]
    ax.plot(xs, [r.speedup for r in timings.rows], marker="o", gid="speedup")
    ax.axhline(1.0, color="gray", linestyle=":", linewidth=1, gid="even")
    be = timings.break_even
    if be is not None:
        ax.axvline(be, color="C3", linestyle="--", linewidth=1, gid="break-even")
        ax.text(be, ax.get_ylim()[1], f" break-even {be:.0%}", color="C3", va="top", fontsize=9)
    ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_xlabel("sparsity of W (zeros uniformly placed)")
    ax.set_ylabel("dense time / sparse time")
    out, inp = timings.shape
    ax.set_title(f"{timings.layout.upper()} vs dense, W {out}x{inp}, batch {timings.batch}, {timings.device}, "
                 f"{timings.threads} threads (measured)", fontsize=9)
    ax.grid(alpha=0.3)
    return fig


def bn_scale_histograms(models: dict[str, Any], bins: int = 40) -> Figure:
    """``|gamma|`` of every BatchNorm channel, one histogram per model (``{label: model}``), on one
    shared axis: network slimming's penalty piles the scales up near zero."""
    from .slimming import bn_scales

    fig = new_figure((6.0, 3.2))
    ax = fig.subplots()
    values = {label: np.concatenate([g.detach().abs().cpu().numpy() for g in bn_scales(m).values()])
              for label, m in models.items()}
    top = max(float(v.max()) for v in values.values())
    edges = np.linspace(0.0, top, bins + 1)
    for label, v in values.items():
        ax.hist(v, bins=edges, alpha=0.6, label=f"{label} ({v.size} channels)")
    ax.set_xlabel("|gamma| of a BatchNorm channel")
    ax.set_ylabel("channels")
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    return fig
