from __future__ import annotations

import math
import re

import numpy as np
import pytest
from matplotlib.figure import Figure

import prune_lab as pl


def _artists(ax, gid):
    return [a for a in ax.get_children() if a.get_gid() == gid and a.get_visible()]


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
    hist = fig.histograms["fc1"]
    assert hist.ax is ax
    kept_counts, pruned_counts = pl.plots.histogram_counts(hist)
    edges = hist.edges
    assert np.array_equal(pruned_counts, np.histogram(pruned, bins=edges)[0])
    assert kept_counts.sum() == w.size - pruned.size and pruned_counts.sum() == pruned.size
    assert "75.0% pruned" in ax.get_title()
    # a dense layer has no threshold
    ax0 = axes[0]
    assert not _artists(ax0, "threshold")


def test_histogram_updates_in_place_for_a_new_mask(demo_session):
    from prune_lab.plots import draw_layer_histogram, new_figure, update_layer_histogram

    w = demo_session.original_weight("fc2").numpy()
    fig = new_figure((4, 3))
    ax = fig.subplots()
    hist = draw_layer_histogram(ax, w, demo_session.mask("fc2").numpy(), "dense")
    ylim = ax.get_ylim()
    demo_session.set_sparsity({"fc2": 0.6})
    changed = update_layer_histogram(hist, demo_session.mask("fc2").numpy(), "60%")
    assert pl.plots.histogram_counts(hist)[1].sum() == round(0.6 * w.size)
    assert not hasattr(ax, "_prune_lab_hist")  # the artists live in the returned dataclass, not on the Axes
    assert ax.get_ylim() == ylim and ax.get_title() == "60%"
    t = np.abs(w[~demo_session.mask("fc2").numpy()]).max()
    assert sorted(line.get_xdata()[0] for line in _artists(ax, "threshold")) == pytest.approx([-t, t])
    assert ax.title in changed


def test_random_mask_has_no_threshold_and_log_axis(demo_session):
    demo_session.set_sparsity({"fc2": 0.5}, criterion="random")
    fig = pl.plots.weight_histograms(demo_session, layers=["fc2"], log=True)
    ax = fig.axes[0]
    assert not _artists(ax, "threshold")
    assert ax.get_yscale() == "log"


def test_unknown_layer(demo_session):
    with pytest.raises(ValueError, match="no prunable layer named 'fc9'"):
        pl.plots.weight_histograms(demo_session, layers=["fc9"])


def test_predictions_are_clipped_to_what_was_measured(demo_session):
    r = demo_session.sensitivity(levels=(0.0, 0.5, 0.9), progress=False)
    for target in (0.1, 0.5, 0.8):
        plan = r.allocate(target_sparsity=target)
        best = max([rec["accuracy"] for rec in r.records] + [r.reference["accuracy"]])
        assert 0.0 <= plan.predicted <= best
    assert "predicted (not measured)" in repr(plan)


def test_many_layer_legends_name_the_extremes_and_group_the_rest():
    from prune_lab.workflows.sensitivity import SensitivityResult

    layers = [f"block{i}.conv" for i in range(84)]
    records = [{"layer": n, "level": lv, "accuracy": 0.9 - lv * (i % 7) / 10, "loss": 0.1} for i, n in enumerate(layers)
               for lv in (0.0, 0.5)]
    r = SensitivityResult(layers, [0.0, 0.5], {n: 10 for n in layers}, {n: 0.0 for n in layers}, "magnitude", "accuracy",
                          {"accuracy": 0.9, "loss": 0.1}, {"accuracy": 0.9, "loss": 0.1}, records, True)
    fig = pl.plots.sensitivity(r)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert len(labels) == 11 and labels[-1] == "74 other layers"
    ranking = list(r.ranking(max_drop=0.01))
    assert labels[:10] == ranking[:5] + ranking[-5:]


def test_ratio_axes_read_1x_2x_4x(demo_session):
    t = demo_session.tradeoff(strategies=["global"], compressions=(1, 2, 4, 8), cache=False, progress=False)
    fig = t.plot(x="compression")
    fig.canvas.draw()
    ticks = [x.get_text() for x in fig.axes[0].get_xticklabels() if x.get_text()]
    assert set(ticks) >= {"1x", "2x", "4x", "8x"} and not any("10^" in x or "times" in x for x in ticks)


def test_a_plan_never_predicts_more_than_was_measured():
    """Two layers that each gain 5 points when pruned: the additive model would predict 100%,
    more than any measured point; the prediction stops at the best measured (95%)."""
    from prune_lab.workflows.sensitivity import SensitivityResult

    records = [{"layer": n, "level": lv, "accuracy": 0.9 if lv == 0 else 0.95, "loss": 0.1} for n in ("a", "b")
               for lv in (0.0, 0.5)]
    r = SensitivityResult(["a", "b"], [0.0, 0.5], {"a": 10, "b": 10}, {"a": 0.0, "b": 0.0}, "magnitude", "accuracy",
                          {"accuracy": 0.9, "loss": 0.1}, {"accuracy": 0.9, "loss": 0.1}, records, True)
    assert r.allocate(target_sparsity=0.5).predicted == 0.95


def test_scripts_with_a_window_backend_get_pyplot_figures(demo_session, monkeypatch):
    """plt.show() shows prune_lab's figures in a script with an interactive backend; headless
    (Agg) and notebooks keep them out of pyplot (no duplicates, no leaks)."""
    import matplotlib
    import matplotlib.pyplot as plt

    before = set(plt.get_fignums())
    pl.plots.weight_histograms(demo_session)
    assert set(plt.get_fignums()) == before  # Agg: not registered
    monkeypatch.setattr(matplotlib, "get_backend", lambda: "TkAgg")
    fig = pl.plots.weight_histograms(demo_session)
    try:
        assert fig.number in plt.get_fignums()
    finally:
        plt.close(fig)


@pytest.mark.parametrize("base, lo, hi", [(1024, 27_000, 130_000), (1024, 100_000, 130_000), (1024, 3_000, 2_000_000),
                                          (1024, 50, 900), (1000, 26_000, 54_000), (1000, 100, 100_000), (1000, 1, 64),
                                          (1000, 1e6, 1e9), (1000, 41_000, 42_000)])
def test_log_axes_get_at_least_three_round_ticks(base, lo, hi):
    """The trade-off panel's narrow log axes had one tick label or none."""
    from prune_lab.plots import ReadableLogLocator

    ticks = ReadableLogLocator(base=base).tick_values(lo, hi)
    assert 3 <= len(ticks) <= 7 and ticks == sorted(set(ticks)) and all(lo <= t <= hi for t in ticks)
    digits = 2 if hi / lo > 1.1 else 3  # two significant digits in the unit shown (KB, MB; or counts)
    for t in ticks:
        shown = t / base ** max(0, math.floor(math.log(t, base) + 1e-12))
        assert float(f"{shown:.{digits}g}") == pytest.approx(shown), (t, shown)


def test_the_labs_tradeoff_panel_reads_bytes_counts_and_percent(demo_session):
    lab = pl.Lab(demo_session)
    for v in (30, 60, 80, 90):
        lab.sliders["fc1"].value = v
    fig = lab._figures["tradeoff"]
    fig.canvas.draw()
    for ax, unit in zip(fig.axes, (r"^[\d.,]+ (B|KB|MB)$", r"^[\d,]+$")):
        lo, hi = ax.get_xlim()
        labels = [t.label1.get_text() for t in ax.xaxis.get_major_ticks() if lo <= t.get_loc() <= hi]
        assert len(labels) >= 3 and all(re.match(unit, x) for x in labels), labels
    lo, hi = fig.axes[0].get_ylim()
    ys = [t.label1.get_text() for t in fig.axes[0].yaxis.get_major_ticks() if lo <= t.get_loc() <= hi]
    assert len(ys) >= 3 and all(y.endswith("%") for y in ys), ys


def test_tradeoff_points_fit_once_then_only_grow():
    """The live trade-off panel: limits fitted to the first points, then widened only when a
    point falls outside (a redraw), never shrunk (no redraw per slider move)."""
    pts = [{"accuracy": 0.9, "sparse_bytes": 1000, "effective_macs": 500},
           {"accuracy": 0.8, "sparse_bytes": 2000, "effective_macs": 900}]
    fig = pl.plots.tradeoff_points(pts, current=1)
    assert fig.fitted
    ax = fig.axes[0]
    assert ax.get_xlim() == pytest.approx((1000 / 1.3, 2000 * 1.3))
    pad = max(0.01, 0.1 * 0.08)
    assert ax.get_ylim() == pytest.approx((0.8 - pad, 0.9 + pad))
    inside = pts + [{"accuracy": 0.85, "sparse_bytes": 1500, "effective_macs": 700}]
    assert pl.plots.update_tradeoff_points(fig, inside, 2, grow_only=True) is False
    assert ax.get_xlim() == pytest.approx((1000 / 1.3, 2000 * 1.3))
    current = [l for l in ax.lines if l.get_gid() == "current"][0]
    assert list(current.get_xdata()) == [1500] and list(current.get_ydata()) == [0.85]
    outside = inside + [{"accuracy": 0.5, "sparse_bytes": 100, "effective_macs": 50}]
    assert pl.plots.update_tradeoff_points(fig, outside, 3, grow_only=True) is True
    assert ax.get_xlim() == pytest.approx((100 / 2, 2000 * 2))  # widened with room on both sides
    pareto = [l for l in ax.lines if l.get_gid() == "pareto"][0]
    assert sorted(pareto.get_xdata()) == [100, 1000]  # the cheapest and the best: 2000 B and 1500 B are dominated


def test_grain_curves_draw_each_grains_sweep(demo_session):
    results = {p: demo_session.sensitivity(levels=levels, layers=["conv2"], pattern=p, progress=False)
               for p, levels in [("unstructured", [0.25, 0.5]), ("2:4", [0.5]), ("channels", [0.25, 0.5])]}
    fig = pl.plots.grain_curves(results, "conv2")
    ax = fig.axes[0]
    for grain, result in results.items():
        (line,) = _artists(ax, f"grain:{grain}")
        assert list(zip(line.get_xdata(), line.get_ydata())) == result.curve("conv2", "accuracy")
    (ref,) = _artists(ax, "reference")
    assert ref.get_ydata()[0] == demo_session.evaluate()["accuracy"]


def test_kernel_speedup_plots_the_ratios_and_marks_the_break_even():
    from prune_lab.sparse_kernels import KernelRow, KernelTimings

    rows = [KernelRow(0.5, 50, 1.0, 2.0, 0.0), KernelRow(0.8, 20, 1.0, 1.0 / 1.5, 0.0), KernelRow(0.9, 10, 3.0, 1.0, 0.0)]
    t = KernelTimings((10, 10), 4, "csr", "cpu", 2, 5, rows)
    ax = pl.plots.kernel_speedup(t).axes[0]
    (line,) = _artists(ax, "speedup")
    assert list(line.get_xdata()) == [0.5, 0.8, 0.9]
    assert list(line.get_ydata()) == pytest.approx([0.5, 1.5, 3.0])
    (mark,) = _artists(ax, "break-even")
    assert mark.get_xdata()[0] == pytest.approx(0.5 + 0.5 * 0.3 / 1.0)
    assert "(measured)" in ax.get_title()
    losing = KernelTimings((10, 10), 4, "coo", "cpu", 2, 5, rows[:1])
    assert not _artists(pl.plots.kernel_speedup(losing).axes[0], "break-even")


def test_bn_scale_histograms_count_every_channel(digits):
    import torch

    torch.manual_seed(0)
    a, b = pl.models.small_vgg(digits, (4, 6, 8)), pl.models.small_vgg(digits, (4, 6, 8))
    with torch.no_grad():
        for m in b.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.mul_(torch.linspace(-0.5, 0.5, m.weight.numel()))
    ax = pl.plots.bn_scale_histograms({"plain": a, "slimmed": b}, bins=10).axes[0]
    heights = [[p.get_height() for p in c.patches] for c in ax.containers]
    assert sum(heights[0]) == 18 and sum(heights[1]) == 18
    values = np.concatenate([m.weight.detach().abs().numpy() for m in b.modules() if isinstance(m, torch.nn.BatchNorm2d)])
    edges = np.linspace(0, 1.0, 11)  # the plain model's gammas are all 1: the top of the shared axis
    assert heights[1] == list(np.histogram(values, bins=edges)[0])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["plain (18 channels)", "slimmed (18 channels)"]


def test_grain_masks_show_each_grains_mask(demo_session):
    import torch

    masks = {"a": torch.ones(4, 2, 3, 3, dtype=torch.bool), "b": torch.zeros(4, 2, 3, 3, dtype=torch.bool)}
    masks["b"][0] = True
    fig = pl.plots.grain_masks(masks, "conv2")
    for ax, (grain, mask) in zip(fig.axes, masks.items()):
        (im,) = _artists(ax, f"mask:{grain}")
        assert np.array_equal(im.get_array(), mask.reshape(4, 18).numpy())
    assert [ax.get_title() for ax in fig.axes] == ["a\n0% pruned", "b\n75% pruned"]
