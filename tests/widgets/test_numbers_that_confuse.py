"""Issue 12's "numbers that confuse" list, one test per item, each against an independent value:
a fresh Session, the file system, the sweep's own records, or a format written out here."""
from __future__ import annotations

import re

import pytest

import prune_lab as pl
from prune_lab.formats import fmt_bytes, fmt_count, fmt_percent, fmt_ratio
from tests.widgets import sweep_stopped_after, value_of

LEVELS = [0.0, 0.5, 0.9]


def test_plan_predictions_are_clipped_to_what_was_measured_and_called_a_guess(lab):
    """'predicted accuracy 1.0325': above 100% and above the dense model."""
    lab.run_sensitivity(levels=LEVELS)
    result = lab.session.last_sensitivity
    plan = lab.model.apply_plan(0.5)
    best = max([r["accuracy"] for r in result.records] + [result.reference["accuracy"]])
    predicted = float(re.search(r"predicted accuracy ([\d.]+)%", lab.status.value).group(1)) / 100
    assert predicted == pytest.approx(plan.predicted, abs=5e-5) and 0.0 <= plan.predicted <= best
    assert "a guess from the curves, relative to the state the sweep started from" in lab.status.value
    assert f"measured {lab.session.evaluate()['accuracy']:.2%}" in lab.status.value


def test_the_sensitivity_panel_shows_a_hint_until_a_sweep_has_run(lab):
    """A broken-image icon was the first thing a student saw in Exercise 1."""
    panel = lab.panels["sensitivity"]
    assert panel.key == "placeholder" and lab.images["sensitivity"].value[:8] == b"\x89PNG\r\n\x1a\n"
    texts = [t.get_text() for t in panel.fig.texts + [t for ax in panel.fig.axes for t in ax.texts]]
    assert any("No sensitivity sweep yet" in t and "run sensitivity" in t for t in texts), texts
    lab.run_sensitivity(levels=LEVELS)
    assert panel.key != "placeholder"


def test_the_global_slider_shows_the_total_sparsity_after_layer_moves(lab):
    """The global slider stayed at 0% while total sparsity was 66%."""
    s = lab.session
    lab.sliders["fc1"].value = 80
    lab.sliders["fc2"].value = 70
    total = sum(s.pruned_counts.values()) / sum(i.n_params for i in s.layers)  # counted here
    assert lab.global_slider.value == round(total * 100) and lab.global_slider.value > 0
    assert value_of(lab.labels["sparsity"]) == f"{total:.2%}"


@pytest.mark.parametrize("control, value", [("allocation", "uniform"), ("criterion", "random")])
def test_changing_allocation_or_criterion_reapplies_at_the_current_total(lab, digits, demo, control, value):
    """Changing the allocation dropdown did nothing until the slider moved."""
    s = lab.session
    lab.global_slider.value = 60
    total = s.total_sparsity()
    getattr(lab, control).value = value
    assert s.total_sparsity() == pytest.approx(total, abs=1e-9)
    model, data = demo
    fresh = pl.Session(model, data.test, device="cpu")  # the oracle: a Session set directly
    try:
        allocation = value if control == "allocation" else "global"
        criterion = value if control == "criterion" else "magnitude"
        fresh.set_global_sparsity(0.6, allocation=allocation, criterion=criterion)
        if control == "criterion":  # the criterion re-masks every layer at its current sparsity
            fresh.set_sparsity(dict(s.sparsity), criterion=criterion)
        assert fresh.pruned_counts == s.pruned_counts
        assert value_of(lab.labels["accuracy"]) == f"{fresh.evaluate()['accuracy']:.2%}"
    finally:
        fresh.reset()


def test_changing_the_pattern_reapplies_at_the_current_total(lab):
    s = lab.session
    lab.global_slider.value = 50
    lab.pattern.value = "2:4"
    from prune_lab.patterns import nm_fits

    fits = {i.name for i in s.layers if nm_fits(i.kind, tuple(i.shape), 4)}
    assert fits and {s.state.record(n).pattern for n in fits} == {"2:4"}
    assert all(s.pruned_counts[n] == s.layer(n).n_params // 2 for n in fits)  # 2 of every 4
    assert all(n in lab.status.value for n in set(s.sparsity) - fits)  # the layers it does not fit are named
    at_2_4 = s.total_sparsity()
    lab.pattern.value = "unstructured"  # the same total, re-split by the allocation
    assert s.total_sparsity() == pytest.approx(at_2_4, abs=1 / sum(i.n_params for i in s.layers))
    assert {s.state.record(n).pattern for n in s.pruned_counts} == {"unstructured"}


def test_after_a_stopped_sweep_unmeasured_layers_say_so(lab):
    """After a stopped sweep, unmeasured layers were labelled '0% ok'."""
    sweep_stopped_after(lab, 4, LEVELS)
    partial = lab.session.last_sensitivity
    measured = {r["layer"] for r in partial.records}
    assert not partial.complete and len(partial.records) == 4
    seen = set()
    for name, bar in lab.sensitivity_bars.items():
        levels = sorted(r["level"] for r in partial.records if r["layer"] == name)
        if not levels:
            assert "not measured" in bar.value and "ok" not in bar.value, (name, bar.value)
        elif len(levels) < len(LEVELS):  # the sweep stopped inside this layer
            at = ", ".join(f"{v:.0%}" for v in levels)
            assert "partly measured" in bar.value and f"measured at {at} only" in bar.value and "ok" not in bar.value
        else:
            assert name in measured and f"{partial.ranking(0.01)[name]:.0%} ok" in bar.value
        seen.add("none" if not levels else "part" if len(levels) < len(LEVELS) else "all")
    assert seen == {"none", "part", "all"}  # 4 points of 3 levels: one layer whole, one begun, the rest not


def test_export_says_where_it_wrote_and_refuses_a_missing_folder(lab, tmp_path):
    """Export did not say where it wrote and silently created missing folders."""
    lab.sliders["fc1"].value = 90
    lab.export_path.value = str(tmp_path / "out" / "model.pt")
    lab.export_button.click()
    assert not (tmp_path / "out").exists()  # nothing created
    assert "does not exist" in lab.status.value and str(tmp_path / "out") in lab.status.value
    assert "prune-lab-error" in lab.status.value
    lab.export_path.value = str(tmp_path / "model.pt")
    lab.export_button.click()
    for path in (tmp_path / "model.pt", tmp_path / "model.recipe.json"):
        assert f"{path} ({fmt_bytes(path.stat().st_size)})" in lab.status.value


def test_finetune_result_repr_is_one_short_line(demo_session, digits):
    """FinetuneResult's repr dumped every loss value."""
    demo_session.set_global_sparsity(0.5)
    result = demo_session.finetune(digits.train, steps=60, lr=0.01, progress=False)
    text = repr(result)
    assert "\n" not in text and len(text) < 200 and len(result.losses) == 60
    assert text.startswith("FinetuneResult(60 steps") and f"last loss {result.losses[-1]:.4f}" in text
    assert f"{result.losses[0]:.4f}" not in text or result.losses[0] == result.losses[-1]


def test_one_number_format_per_kind():
    """Number formats varied (raw floats, .3f, .4f, %)."""
    assert [fmt_bytes(n) for n in (0, 1023, 83717, 5 * 1024 ** 2 + 1)] == ["0 B", "1,023 B", "81.8 KB", "5.0 MB"]
    assert fmt_count(12912) == "12,912" and fmt_count(7) == "7"
    assert fmt_percent(0.97214) == "97.21%" and fmt_ratio(1.5432) == "1.54x"


def test_the_labels_use_those_formats(lab):
    s = lab.session
    lab.sliders["fc1"].value = 90
    t = s.stats().total
    assert value_of(lab.labels["nonzeros"]) == fmt_count(t["nonzeros"]) and "," in value_of(lab.labels["nonzeros"])
    assert value_of(lab.labels["bytes"]) == fmt_bytes(t["sparse_file_bytes"]) and value_of(lab.labels["bytes"]).endswith("KB")
    assert value_of(lab.labels["sparsity"]) == fmt_percent(t["sparsity"])
    assert value_of(lab.labels["compression"]) == fmt_ratio(t["compression"])
