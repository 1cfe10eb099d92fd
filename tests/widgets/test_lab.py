"""The Lab driven through real ipywidgets objects, no browser: every label is the Session's number."""
from __future__ import annotations

import pytest
import torch
import traitlets

import prune_lab as pl
from tests.conftest import snapshot, state_equal
from tests.widgets import sweep_stopped_after, value_of


def test_slider_prunes_exactly_and_labels_are_measured(lab):
    s = lab.session
    lab.sliders["fc1"].value = 37
    assert lab.last_error is None
    assert s.pruned_counts["fc1"] == round(0.37 * 7680)
    assert int((s.model.fc1.weight == 0).sum()) == round(0.37 * 7680)
    ev, st = s.evaluate(), s.stats()
    assert value_of(lab.labels["accuracy"]) == f"{ev['accuracy']:.2%}"
    assert value_of(lab.labels["loss"]) == f"{ev['loss']:.4f}"
    assert value_of(lab.labels["nonzeros"]) == f"{st.total['nonzeros']:,}"
    assert value_of(lab.labels["sparsity"]) == f"{st.total['sparsity']:.2%}"
    assert value_of(lab.labels["speedup"]) == f"{st.total['speedup']:.2f}x"
    delta = (ev["accuracy"] - s.baseline()["accuracy"]) * 100
    assert value_of(lab.labels["delta"]) == f"{delta:+.2f} points"
    assert "full eval set: 359 samples" in lab.labels["mode"].value
    assert lab.layer_select.value == "fc1"  # the histogram follows the moved slider


def test_plots_follow_the_sliders(lab):
    before = lab.images["histogram"].value
    n = len(lab.points)
    lab.sliders["fc1"].value = 80
    assert lab.images["histogram"].value != before
    assert len(lab.points) == n + 1
    fig = lab._figures["tradeoff"]
    current = [l for l in fig.axes[0].lines if l.get_gid() == "current"][0]
    assert current.get_xdata()[0] == lab.session.stats().total["sparse_file_bytes"]
    assert current.get_ydata()[0] == pytest.approx(lab.session.evaluate()["accuracy"])
    hist_ax = lab._figures["histogram"].axes[0]
    assert "80.0% pruned" in hist_ax.get_title()
    assert [a for a in hist_ax.get_children() if a.get_gid() == "threshold"]


def test_global_slider_moves_layer_sliders_and_respects_locks(lab):
    s = lab.session
    lab.sliders["fc3"].value = 10
    lab.locks["fc3"].value = True
    lab.allocation.value = "uniform"
    lab.global_slider.value = 60
    total = sum(i.n_params for i in s.layers)
    assert sum(s.pruned_counts.values()) == round(0.6 * total)
    assert s.pruned_counts["fc3"] == round(0.1 * 840)
    for name, slider in lab.sliders.items():
        assert slider.value == round(s.sparsity[name] * 100)  # whole percent
    lab.allocation.value = "global"
    lab.global_slider.value = 70
    assert sum(s.pruned_counts.values()) == round(0.7 * total)


def test_undo_redo_reset_restore_exact_states(lab):
    s = lab.session
    states, weights = [], []
    for v in (20, 50, 90):
        lab.sliders["fc2"].value = v
        states.append(s.snapshot())
        weights.append(snapshot(s.model))
    lab.undo()
    assert s.snapshot() == states[1] and state_equal(snapshot(s.model), weights[1])
    assert lab.sliders["fc2"].value == 50
    lab.undo()
    assert state_equal(snapshot(s.model), weights[0])
    lab.redo()
    assert state_equal(snapshot(s.model), weights[1])
    lab.reset_button.click()
    assert state_equal(snapshot(s.model), s.original_state())
    assert all(sl.value == 0 for sl in lab.sliders.values())
    lab.undo()  # reset is undoable too
    assert state_equal(snapshot(s.model), weights[1])


def test_criterion_dropdown_reprunes(lab):
    s = lab.session
    lab.sliders["fc1"].value = 50
    magnitude = s.mask("fc1").clone()
    lab.criterion.value = "random"
    assert s.criteria["fc1"] == "random"
    assert not torch.equal(s.mask("fc1"), magnitude)
    assert s.pruned_counts["fc1"] == round(0.5 * 7680)


def test_sensitivity_stop_keeps_partial_then_resumes(lab):
    sweep_stopped_after(lab, 4, [0.0, 0.5, 0.9])
    partial = lab.session.last_sensitivity
    assert not partial.complete and len(partial.records) == 4
    assert "stopped, 4/15 points kept" in lab.status.value
    assert lab.stop_button.disabled and not lab.sliders["fc1"].disabled
    lab.sensitivity_button.click()  # resumes with the default levels? no: with the partial's levels
    full = lab.session.last_sensitivity
    assert full.complete and len(full.records) == 15
    assert lab.images["sensitivity"].value
    assert "ok" in lab.sensitivity_bars["fc1"].value


def test_apply_plan_shows_predicted_and_measured(lab):
    lab.run_sensitivity(levels=[0.0, 0.3, 0.6, 0.9])
    lab.global_slider.value = 50
    lab.apply_plan()
    s = lab.session
    total = sum(i.n_params for i in s.layers)
    assert sum(s.pruned_counts.values()) == round(0.5 * total)
    measured = s.evaluate()["accuracy"]
    assert f"measured {measured:.2%}" in lab.status.value and "predicted" in lab.status.value and "a guess" in lab.status.value


def test_budget_box_applies_a_measured_plan(lab):
    lab.budget_button.click()  # before any sweep: a clear error in the Lab
    assert "run sensitivity" in lab.status.value and "prune-lab-error" in lab.status.value
    lab.run_sensitivity(levels=[0.0, 0.3, 0.6, 0.9])
    lab.budget_key.value, lab.budget_value.value = "macs", 0.5
    lab.budget_button.click()
    s = lab.session
    total = s.stats().total
    assert total["effective_macs"] <= 0.5 * total["macs"]  # met, counted independently of the plan
    assert f"measured {total['effective_macs']:,.4g}" in lab.status.value
    assert f"{s.evaluate()['accuracy']:.2%}" in lab.status.value and "predicted" in lab.status.value
    lab.undo()
    assert s.total_sparsity() == 0
    lab.budget_key.value = "latency_ms"  # unstructured: refused by name, nothing changed
    lab.budget_button.click()
    assert "dense kernels" in lab.status.value and s.total_sparsity() == 0


def test_errors_show_in_the_lab(lab):
    lab.apply_plan()
    assert isinstance(lab.last_error, ValueError)
    assert "run sensitivity" in lab.status.value and "prune-lab-error" in lab.status.value


def test_export_button(lab, tmp_path):
    lab.sliders["fc1"].value = 90
    lab.export_path.value = str(tmp_path / "lab.pt")
    lab.export_button.click()
    assert (tmp_path / "lab.pt").exists() and (tmp_path / "lab.recipe.json").exists()
    back = pl.load_state_dict(tmp_path / "lab.pt")
    assert torch.equal(back["fc1.weight"], lab.session.model.fc1.weight.detach())


def test_preview_is_labelled_and_measured(lab):
    lab.sliders["fc1"].value = 60
    lab.refresh(preview=True)
    assert "preview: first 256 samples" in lab.labels["mode"].value
    assert value_of(lab.labels["accuracy"]) == f"{lab.session.evaluate(limit=256)['accuracy']:.2%}"
    lab.refresh()
    assert "full eval set" in lab.labels["mode"].value


def test_device_selector_lists_devices(lab):
    expected = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    assert list(lab.device.options) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_selector_moves_session(lab):
    lab.sliders["fc1"].value = 50
    cpu_acc = lab.session.evaluate()["accuracy"]
    lab.device.value = "cuda:0"
    assert lab.session.device.type == "cuda"
    assert value_of(lab.labels["accuracy"]) == f"{cpu_acc:.2%}"
    lab.device.value = "cpu"


def test_widgets_carry_css_classes(lab):
    assert "prune-lab-slider-fc1" in lab.sliders["fc1]".rstrip("]")]._dom_classes
    assert "prune-lab-metric-accuracy" in lab.labels["accuracy"]._dom_classes
    assert "prune-lab" in lab.widget._dom_classes


class FakeLoop:
    """Stands in for the kernel's IO loop: callbacks wait until the test runs them."""

    def __init__(self):
        self.soon, self.later = [], []

    def add_callback(self, fn):
        self.soon.append(fn)

    def call_later(self, delay, fn):
        self.later.append(fn)

    def run(self):
        while self.soon:
            self.soon.pop(0)()


def test_in_a_kernel_only_the_newest_value_is_evaluated(lab, monkeypatch):
    loop = FakeLoop()
    lab._loop = loop
    lab.model.policy.mode = "never"  # no wall-clock decides this test: full evaluations only
    evaluations = []
    real = lab.session.evaluate
    monkeypatch.setattr(lab.session, "evaluate", lambda limit=None: evaluations.append(limit) or real(limit))
    for v in (10, 20, 30, 40, 50):  # a drag: five values arrive before the kernel is free
        lab.sliders["fc1"].value = v
    assert len(loop.soon) == 1 and evaluations == []  # nothing stale is queued
    loop.run()
    assert len(evaluations) == 1
    assert value_of(lab.labels["accuracy"]) == f"{real()['accuracy']:.2%}"
    assert lab.session.pruned_counts["fc1"] == round(0.5 * 7680)


def test_slow_model_previews_while_dragging_then_finishes(lab):
    loop = FakeLoop()
    lab._loop = loop
    lab.model.policy.mode = "always"  # as if a full evaluation took longer than the frame budget
    lab.sliders["fc1"].value = 70
    loop.run()
    assert lab.evaluation["preview"] and "preview: first 256 samples" in lab.labels["mode"].value
    assert value_of(lab.labels["accuracy"]) == f"{lab.session.evaluate(limit=256)['accuracy']:.2%}"
    lab._last_event -= 1.0  # the drag ended
    for fn in loop.later:
        fn()
    assert not lab.evaluation["preview"] and "full eval set" in lab.labels["mode"].value
    assert value_of(lab.labels["accuracy"]) == f"{lab.session.evaluate()['accuracy']:.2%}"


def test_sliders_are_whole_percent_and_refuse_fractions_clearly(lab):
    """Integer sliders: their browser view never sends back a value the kernel set (a float
    slider's does, with float noise, late, as a move nobody made)."""
    s = lab.session
    lab.sliders["fc1"].value = 46
    assert s.sparsity["fc1"] == round(0.46 * 7680) / 7680 and lab.sliders["fc1"].value == 46
    assert type(lab.sliders["fc1"].value) is int and lab.sliders["fc1"].get_state()["value"] == 46
    state = s.snapshot()
    with pytest.raises(traitlets.TraitError, match=r"fc1: 0.9 is not a whole percent; the sliders take 0-99 \(write 90 for 90%\)"):
        lab.sliders["fc1"].value = 0.9
    with pytest.raises(traitlets.TraitError, match=r"all layers: 100% is out of range; the slider takes 0-99 \(percent\)"):
        lab.global_slider.value = 100
    assert s.snapshot() == state and lab.sliders["fc1"].value == 46 and lab.global_slider.value == round(s.total_sparsity() * 100)
    lab.global_slider.value = 90.0  # a whole number written as a float is fine
    assert lab.global_slider.value == 90 and round(s.total_sparsity(), 2) == 0.9
    assert "prune-lab-percent" in lab.global_slider._dom_classes


def test_slider_positions_round_to_the_nearest_percent():
    from prune_lab.widgets.percent_slider import to_percent

    assert [to_percent(f) for f in (0.0, 0.004, 0.006, 0.4449, 0.455, 0.46, 0.994, 0.996, 1.0)] == [0, 0, 1, 44, 46, 46, 99, 99, 99]


def test_layer_collapse_shows_in_the_lab(digits):
    from tests.conftest import zoo_model

    lab = pl.Lab(pl.Session(zoo_model("mlp", digits), digits.test, device="cpu"))  # untrained: global cuts fc2 at 95%
    lab.allocation.value = "global"
    lab.global_slider.value = 50
    assert "prune-lab-warning" not in lab.status.value
    lab.global_slider.value = 95
    assert "prune-lab-warning" in lab.status.value and "pruned every weight of fc2" in lab.status.value
    lab.allocation.value = "lamp"
    lab.global_slider.value = 96
    assert "prune-lab-warning" not in lab.status.value


def test_data_aware_criterion_in_the_lab(demo_session, digits):
    lab = pl.Lab(demo_session)
    lab.sliders["fc1"].value = 50
    lab.criterion.value = "taylor"  # no training data: the Lab says what to do, nothing changes
    assert "train_data" in lab.status.value and demo_session.criteria["fc1"] == "magnitude"
    lab = pl.Lab(demo_session, train_data=digits.train)
    magnitude = demo_session.mask("fc1").clone()
    lab.criterion.value = "wanda"  # calibrates once, then re-masks every pruned layer
    assert demo_session.criteria["fc1"] == "wanda" and demo_session.calibration_passes == 1
    assert not torch.equal(demo_session.mask("fc1"), magnitude)
    assert demo_session.pruned_counts["fc1"] == round(0.5 * 7680)
    lab.criterion.value = "taylor"  # its statistics replace wanda's (one criterion's are held at a time)
    assert demo_session.calibration_passes == 2 and demo_session.criteria["fc1"] == "taylor"
    assert demo_session.state.calibration.needs == ("batch_grad_sq",)
    lab.undo()  # the masks come back from the history: nothing is recomputed
    assert demo_session.criteria["fc1"] == "wanda" and demo_session.calibration_passes == 2


def test_pattern_and_quantization_controls(demo_session):
    from prune_lab.patterns import nm_groups

    lab = pl.Lab(demo_session)
    s = demo_session
    lab.pattern.value = "2:4"  # every layer it fits takes 2:4; the others are named
    assert "left as they were" in lab.model.status and "conv1" in lab.model.status
    assert all(s.sparsity[n] == 0.5 for n in ("conv2", "fc1", "fc2", "fc3")) and s.sparsity["conv1"] == 0.0
    assert bool((nm_groups(s.mask("fc1"), "Linear", 4).sum(1) == 2).all())
    lab.sliders["fc2"].value = 20  # under a pattern a slider snaps: below half of 50% is dense
    assert s.sparsity["fc2"] == 0.0 and lab.sliders["fc2"].value == 0
    lab.sliders["fc2"].value = 30
    assert s.sparsity["fc2"] == 0.5 and s.state.record("fc2").pattern == "2:4"
    lab.global_slider.value = 0
    assert s.total_sparsity() == 0.0
    lab.global_slider.value = 30
    assert s.sparsity["fc1"] == 0.5
    lab.quant.value = "4/kmeans"
    assert set(s.bits.values()) == {4} and int(torch.unique(s.model.fc1.weight).numel()) <= 17
    assert lab.labels["accuracy"].value  # measured again
    lab.undo()
    assert set(s.bits.values()) == {None} and lab.quant.value == "float32"
    lab.pattern.value = "unstructured"  # back: the same total, unstructured
    assert s.state.record("fc1").pattern == "unstructured" and s.total_sparsity() > 0.4


def test_finetune_panel_trains_with_masks_held_and_undo_goes_back(demo_session, digits):
    s = demo_session
    no_data = pl.Lab(s)
    assert no_data.finetune_button.disabled
    with pytest.raises(ValueError, match=r"train_data=\.\.\."):
        no_data.model.run_finetune(steps=5)
    lab = pl.Lab(s, train_data=digits.train)
    lab.global_slider.value = 80
    before = s.snapshot()
    pruned = {n: s.mask(n).clone() for n in s.pruned_counts}
    points = len(lab.points)
    lab.ft_steps.value, lab.ft_lr.value = 20, 0.02
    lab.finetune_button.click()
    assert lab.model.job.kind == "finetune" and lab.model.job.done == 20 and not lab.model.job.running
    assert all(torch.equal(s.mask(n), m) for n, m in pruned.items())  # masks held
    assert s.snapshot() != before and len(lab.points) >= points + 2  # a point before and after
    assert "fine-tuning done: 20 steps" in lab.status.value
    lab.undo()
    assert s.snapshot() == before


def test_finetune_stop_keeps_what_was_learned(demo_session, digits):
    s = demo_session
    lab = pl.LabModel(s, train_data=digits.train)
    lab.set_global(0.5)
    before = s.snapshot()
    stops = []

    def stop_after_3(event):
        if event.kind == "progress" and lab.job.done == 3:
            stops.append(1)
            lab.stop()

    lab.observe(stop_after_3)
    lab.run_finetune(steps=50, lr=0.02)
    assert stops and lab.job.done == 3 and lab.job.result.steps == 3  # stopped right after the step that asked
    assert lab.job.result.interrupted and s.snapshot() != before
    assert "fine-tuning stopped after 3 steps" in lab.status
    with pytest.raises(ValueError, match="schedule must be"):
        lab.run_finetune(steps=5, schedule="cosine")


def test_only_another_threads_trial_makes_the_lab_wait(demo_session):
    """A sweep in another thread holds trial masks: the Lab is busy and pruning is refused with a
    clear message. A short trial of the Lab's own thread (a preview baseline) is not 'busy'."""
    import threading

    s = demo_session
    lab = pl.LabModel(s)
    with s.state.trial({"fc1": None}):
        assert not lab.busy
    entered, release = threading.Event(), threading.Event()

    def sweep():
        with s.state.trial({"fc1": None}):
            entered.set()
            release.wait(10)

    t = threading.Thread(target=sweep)
    t.start()
    try:
        entered.wait(10)
        assert lab.busy
        with pytest.raises(RuntimeError, match="cannot prune while the sensitivity sweep runs"):
            lab.set_layer("fc1", 0.5)
    finally:
        release.set()
        t.join()
    assert not lab.busy
    lab.set_layer("fc1", 0.5)
    assert s.sparsity["fc1"] == 0.5


def test_channels_pattern_moves_whole_channels_and_measures_the_compact_model(demo_session):
    s = demo_session
    lab = pl.Lab(s)
    lab.sliders["fc1"].value = 30  # weights first: switching to channels clears them
    lab.pattern.value = "channels"
    assert lab.last_error is None and s.pruned_counts["fc1"] == 0 and not s.state.channels
    groups = s.groups
    producer = next(iter(groups.by_layer))
    group = groups.by_layer[producer]
    size = groups.groups[group].size
    assert f"{size} of {size} channels" in lab.meta[producer].value
    output = next(n for n in lab.sliders if n not in groups.by_layer)
    assert lab.sliders[output].disabled and "no channel group" in lab.meta[output].value
    lab.sliders[producer].value = 50
    assert lab.last_error is None
    kept = size - round(0.5 * size)
    assert s.channels[group] == (kept, size)
    assert f"{kept} of {size} channels" in lab.meta[producer].value
    st = s.stats()
    assert value_of(lab.labels["measured"]) == f"{st.total['speedup']:.2f}x" and "counted" in lab.labels["measured"].value
    lab.measure_speed()
    r = s.last_compact.ratios()
    assert f"MACs <span class='prune-lab-value'>{r['macs']:.2f}x</span> fewer, measured" in lab.labels["measured"].value
    assert f"{r['latency_ms_b64']:.2f}x</span> faster" in lab.labels["measured"].value
    lab.allocation.value = "uniform"  # re-splits the channels removed so far, group by group
    share = lab.model.channel_total()
    lab.global_slider.value = 25
    assert all(k == n - round(0.25 * n) for k, n in s.channels.values())
    assert lab.global_slider.value == round(lab.model.channel_total() * 100)
    lab.undo()
    assert lab.model.channel_total() == pytest.approx(share, abs=0.02)
    lab.undo()
    assert s.channels[group] == (kept, size)
    lab.pattern.value = "unstructured"
    assert not s.state.channels and lab.labels["measured"].value == ""
    assert not lab.sliders[output].disabled


def test_a_slider_move_re_syncs_only_its_own_slider(lab, monkeypatch):
    """Typed events: the Lab hears 'sparsity of fc2' and touches that slider, not every control."""
    synced, choices = [], []
    sync_sliders = lab._sync_sliders
    monkeypatch.setattr(lab, "_sync_sliders", lambda layers: (synced.append(layers), sync_sliders(layers)))
    monkeypatch.setattr(lab, "_sync_choices", lambda: choices.append(1))
    lab.sliders["fc2"].value = 40
    assert synced == [("fc2",)] and choices == []
    assert lab.session.pruned_counts["fc2"] == round(0.4 * 84 * 120)
    lab.session.set_sparsity({"conv2": 0.5, "fc1": 0.25})  # from another cell: both follow
    assert synced[-1] == ("conv2", "fc1") and lab.sliders["fc1"].value == 25


def test_sparsegpt_in_the_lab_shows_its_refit_error_beside_the_loss(demo_session, digits):
    lab = pl.Lab(demo_session, train_data=digits.train)
    lab.sliders["fc1"].value = 80
    assert "refit error" not in lab.labels["loss"].value
    lab.criterion.value = "sparsegpt"  # SparseGPT chooses fc1's mask and refits the kept weights
    assert demo_session.criteria["fc1"] == "sparsegpt" and demo_session.state.record("fc1").reconstruct == "sparsegpt"
    st = demo_session.stats()
    label = lab.labels["loss"].value
    assert f"refit error <span class='prune-lab-value'>{st.total['refit_error']:.1%}</span>" in label
    assert f"mask alone {st.total['mask_error']:.1%}" in label and st.total["refit_error"] < st.total["mask_error"]
    lab.criterion.value = "magnitude"
    assert "refit error" not in lab.labels["loss"].value
