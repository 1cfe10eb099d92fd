from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

import prune_lab as pl


def _artists(ax, gid):
    return [a for a in ax.get_children() if a.get_gid() == gid]


def test_weight_histograms_mark_threshold_and_pruned_mass(demo_session):
    demo_session.set_sparsity({"fc1": 0.75})
    fig = pl.plots.weight_histograms(demo_session)
    assert isinstance(fig, Figure)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == len(demo_session.layers)
    ax = axes[[i.name for i in demo_session.layers].index("fc1")]
    w = demo_session.original_weight("fc1").numpy().reshape(-1)
    pruned = w[~demo_session.mask("fc1").numpy().reshape(-1)]
    t = np.abs(pruned).max()
    lines = _artists(ax, "threshold")
    assert sorted(line.get_xdata()[0] for line in lines) == pytest.approx([-t, t])
    assert len(_artists(ax, "pruned-region")) == 1
    # the red bars hold exactly the pruned weights, the blue ones the kept
    pruned_bars = _artists(ax, "pruned")
    kept_bars = _artists(ax, "kept")
    stacked_top = sum(p.get_height() for p in pruned_bars)
    assert sum(p.get_height() for p in kept_bars) == w.size - pruned.size
    assert stacked_top == pruned.size
    assert "75.0% pruned" in ax.get_title()
    # a dense layer has no threshold
    ax0 = axes[0]
    assert not _artists(ax0, "threshold")


def test_random_mask_has_no_threshold_and_log_axis(demo_session):
    demo_session.set_sparsity({"fc2": 0.5}, criterion="random")
    fig = pl.plots.weight_histograms(demo_session, layers=["fc2"], log=True)
    ax = fig.axes[0]
    assert not _artists(ax, "threshold")
    assert ax.get_yscale() == "log"


def test_unknown_layer(demo_session):
    with pytest.raises(ValueError, match="no prunable layer named 'fc9'"):
        pl.plots.weight_histograms(demo_session, layers=["fc9"])
