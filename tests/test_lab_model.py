"""The headless Lab (lab_model.py): typed events per change, undo/redo, preview policy. No widgets."""
from __future__ import annotations

import pytest

import prune_lab as pl
from prune_lab.lab_model import LAB_EVENTS, History, LabEvent, LabModel, PreviewPolicy

LAYERS = ["conv1", "conv2", "fc1", "fc2", "fc3"]


@pytest.fixture
def lab(demo_session, digits):
    return LabModel(demo_session, train_data=digits.train)


def record(lab: LabModel, *kinds: str) -> list[LabEvent]:
    seen: list[LabEvent] = []
    lab.observe(seen.append, *kinds)
    return seen


def test_a_slider_move_is_one_sparsity_event_naming_its_layer(lab):
    seen = record(lab)
    lab.set_layer("fc1", 0.37)
    assert seen == [LabEvent("sparsity", ("fc1",))]
    assert lab.session.pruned_counts["fc1"] == round(0.37 * 120 * 64)


def test_the_global_slider_is_one_event_naming_every_layer_it_changed(lab):
    seen = record(lab, "sparsity")
    lab.set_global(0.5)
    changed = tuple(n for n in LAYERS if lab.session.pruned_counts[n])
    assert seen == [LabEvent("sparsity", changed)] and len(changed) >= 2
    assert lab.status == ""  # no layer collapsed, no pattern warning


def test_a_change_made_elsewhere_reaches_the_lab(lab):
    seen = record(lab)
    lab.session.set_sparsity({"fc2": 0.5})  # another cell, a script
    assert seen == [LabEvent("sparsity", ("fc2",))]


def test_each_choice_has_its_own_event(lab):
    seen = record(lab, "criterion", "allocation", "locks", "pattern", "bits")
    lab.set_locked("fc3", True)
    lab.set_allocation("uniform")
    lab.set_quant((8, "uniform"))
    lab.set_pattern("2:4")
    assert [e.kind for e in seen] == ["locks", "allocation", "bits", "pattern"]
    assert seen[0].layers == ("fc3",) and seen[2].layers == tuple(LAYERS)
    assert lab.quant == (8, "uniform") and lab.session.quant["fc1"] == (8, "uniform")


def test_changing_the_criterion_says_so_then_re_masks(lab):
    lab.set_layer("fc1", 0.5)
    seen = record(lab)
    lab.set_criterion("random")
    assert seen == [LabEvent("criterion"), LabEvent("sparsity", ("fc1",))]
    assert lab.session.criteria["fc1"] == "random"


def test_reset_and_undo_say_masks_and_bits_changed(lab):
    lab.set_layer("fc1", 0.5)
    lab.set_quant((4, "uniform"))
    seen = record(lab)
    lab.reset()
    assert [e.kind for e in seen] == ["sparsity", "bits"] and seen[0].layers == tuple(LAYERS)
    assert lab.session.total_sparsity() == 0 and lab.quant is None
    seen.clear()
    assert lab.undo()
    assert [e.kind for e in seen] == ["sparsity", "bits"] and lab.session.pruned_counts["fc1"] == 3840


def test_listeners_get_only_the_kinds_they_asked_for(lab):
    status = record(lab, "status")
    lab.set_layer("fc1", 0.5)
    lab.set_status("hello")
    assert status == [LabEvent("status")]
    with pytest.raises(ValueError, match="unknown Lab event 'state'; the kinds are sparsity"):
        lab.observe(print, "state")
    stop = lab.observe(status.append)
    stop()
    lab.set_status("again")
    assert len(status) == 2  # the one subscription left


def test_a_sweep_reports_its_job_and_every_point(lab):
    jobs, progress = record(lab, "job"), record(lab, "progress")
    lab.run_sweep(levels=(0.0, 0.5))
    assert len(progress) == lab.job.total == 10 == lab.job.done
    assert jobs[0] == LabEvent("job") and len(jobs) >= 2 and not lab.job.running
    assert lab.session.last_sensitivity.complete


def test_a_failed_action_changes_nothing_and_says_nothing(lab):
    seen = record(lab, "sparsity")
    with pytest.raises(ValueError, match="sparsity"):
        lab.set_layer("fc1", 1.5)
    assert seen == [] and lab.session.total_sparsity() == 0


def test_history_stores_equal_states_once_and_coalesces_quick_moves(lab):
    lab.push_undo(coalesce="layer:fc1", now=100.0)
    lab.push_undo(coalesce="layer:fc1", now=100.0 + lab.coalesce_s / 2)  # the same drag
    assert len(lab.history.undo_stack) == 1
    lab.session.set_sparsity({"fc1": 0.5})
    lab.push_undo(coalesce="layer:fc1", now=100.0 + lab.coalesce_s * 2)  # a new move
    assert len(lab.history.undo_stack) == 2
    h = History(limit=2)
    for i in range(4):
        h.push(i)
    assert h.undo_stack == [2, 3] and h.undo(9) == 3 and h.redo_stack == [9]


@pytest.mark.parametrize("mode, last_full_s, dragging, preview", [
    ("auto", 0.2, True, True), ("auto", 0.01, True, False), ("auto", 0.2, False, False),
    ("always", 0.0, True, True), ("never", 9.0, True, False),
])
def test_preview_policy_reads_the_recorded_duration_only(mode, last_full_s, dragging, preview):
    policy = PreviewPolicy(mode, frame_budget_s=0.05, last_full_s=last_full_s)
    assert policy.use_preview(dragging) is preview


def test_a_preview_measures_the_first_samples_against_a_plain_pass(lab):
    lab.policy.samples = 100
    lab.set_layer("fc1", 0.9)
    numbers = lab.measure(preview=True)
    model, data = lab.session.model, lab.session.data
    x, y = data.inputs[:100], data.targets[:100]
    correct = int((model(x).argmax(1) == y).sum())
    assert numbers["evaluation"]["accuracy"] == correct / 100
    assert numbers["evaluation"]["samples"] == 100 and numbers["evaluation"]["preview"]
    n = len(lab.points)
    lab.measure()
    assert len(lab.points) == n + 1 and lab.points[-1]["sparsity"] == lab.session.stats().total["sparsity"]


def test_every_event_kind_is_documented():
    assert all(f"'{k}'" in LabEvent.__doc__ for k in LAB_EVENTS)
    assert pl.LabModel is LabModel
