"""Plots a student reads at 100% zoom: every text at 9 pt or more, shown at 96 CSS dpi (a point is
a point on screen) and rendered at ``scale`` times that for HiDPI screens."""
from __future__ import annotations

import struct

import prune_lab as pl


def small_texts(fig) -> list:
    """Visible texts under 9 pt (titles, labels, tick labels, legends, annotations)."""
    fig.canvas.draw()
    return [(t.get_text(), t.get_fontsize()) for t in fig.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text"))
            if t.get_visible() and t.get_text().strip() and t.get_fontsize() < 9]


def drawn_texts(fig) -> list:
    """The texts a reader sees: titles, axis labels, legends, figure texts and the tick labels of
    ticks inside the view (matplotlib keeps labels of ticks outside it, undrawn)."""
    texts = list(fig.texts)
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        if ax.get_legend() is not None:
            texts += [*ax.get_legend().get_texts(), ax.get_legend().get_title()]
        for axis, (lo, hi) in ((ax.xaxis, sorted(ax.get_xlim())), (ax.yaxis, sorted(ax.get_ylim()))):
            texts += [t.label1 for t in axis.get_major_ticks() if lo - 1e-9 <= t.get_loc() <= hi + 1e-9]
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def cut_texts(fig) -> list:
    """Drawn texts that reach outside the figure (a y label cut off at the left edge, say)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    out = []
    for t in drawn_texts(fig):
        e = t.get_window_extent(renderer)
        if e.x0 < box.x0 - 1 or e.y0 < box.y0 - 1 or e.x1 > box.x1 + 1 or e.y1 > box.y1 + 1:
            out.append(t.get_text())
    return out


def test_the_histogram_keeps_its_labels_inside_after_switching_layers_and_log_counts(demo_session):
    """The y label was cut after switching layers and disappeared with log counts."""
    lab = pl.Lab(demo_session)
    for layer in ("fc2", "conv1", "fc1"):
        lab.layer_select.value = layer
        for log in (False, True):
            lab.log_counts.value = log
            fig = lab._figures["histogram"]
            ax = fig.axes[0]
            assert ax.get_ylabel() and ax.yaxis.label.get_visible(), (layer, log)
            assert not cut_texts(fig), (layer, log, cut_texts(fig))


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_every_lab_panel_is_legible_and_shown_at_its_size(demo_session, digits):
    lab = pl.Lab(demo_session, train_data=digits.train, scale=1.5)
    lab.sliders["fc1"].value = 60
    for name in ("histogram", "sensitivity"):  # the sensitivity panel holds its placeholder here
        assert not small_texts(lab._figures[name]), name
    lab.run_sensitivity(levels=[0.0, 0.5, 0.9])
    lab.log_counts.value = True
    for name in ("histogram", "sensitivity", "tradeoff"):
        fig = lab._figures[name]
        assert not small_texts(fig), name
        w_in, h_in = fig.get_size_inches()
        layout = lab.images[name].layout
        assert (layout.width, layout.height) == (f"{w_in * 96:.0f}px", f"{h_in * 96:.0f}px")  # 96 CSS dpi
        assert png_size(lab.images[name].value) == (int(w_in * 144), int(h_in * 144))  # HiDPI: 1.5 x 96 dpi


def test_the_plot_functions_are_legible(demo_session):
    s = demo_session
    result = s.sensitivity(levels=[0.0, 0.5, 0.9], progress=False)
    figures = {
        "weight_histograms": pl.plots.weight_histograms(s),
        "sensitivity": pl.plots.sensitivity(result),
        "sensitivity_heatmap": pl.plots.sensitivity_heatmap(result),
        "tradeoff": s.tradeoff(strategies=["global", "uniform"], compressions=[2, 4], progress=False).plot(),
    }
    for name, fig in figures.items():
        assert not small_texts(fig), name
