"""Plots a student reads at 100% zoom: every text at 9 pt or more, shown at 96 CSS dpi (a point is
a point on screen) and rendered at ``scale`` times that for HiDPI screens."""
from __future__ import annotations

import struct

import pytest

import prune_lab as pl


def small_texts(fig) -> list:
    """Visible texts under 9 pt (titles, labels, tick labels, legends, annotations)."""
    fig.canvas.draw()
    return [(t.get_text(), t.get_fontsize()) for t in fig.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text"))
            if t.get_visible() and t.get_text().strip() and t.get_fontsize() < 9]


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
