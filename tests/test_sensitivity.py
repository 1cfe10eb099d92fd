"""Sensitivity sweep: incremental == naive, exact restore on interrupt, resume, plans."""
from __future__ import annotations

import math

import pytest
import torch

import prune_lab as pl
from prune_lab.workflows.sensitivity import SensitivityResult
from tests import zoo_extra
from tests.conftest import snapshot, state_equal

LEVELS = [0.0, 0.25, 0.5, 0.75, 0.95]
MODELS = zoo_extra.all_models()


@pytest.mark.parametrize("kind", list(MODELS))
def test_incremental_sweep_equals_naive(kind, digits):
    torch.manual_seed(0)
    model = MODELS[kind](digits)
    s = pl.Session(model, digits.test.tensors, device="cpu", batch_size=128)
    s.set_sparsity({s.layers[-1].name: 0.3})  # sweeps start from the current state
    before = snapshot(model)
    inc = s.sensitivity(levels=LEVELS, progress=False)
    naive = s.sensitivity(levels=LEVELS, progress=False, incremental=False)
    assert inc.complete and naive.complete and len(inc.records) == len(s.layers) * len(LEVELS)
    for key in ("accuracy", "loss"):
        assert float((inc.table(key) - naive.table(key)).abs().max()) <= 1e-6
    assert state_equal(snapshot(model), before), "the sweep must restore the model bit for bit"


def test_tied_weights_sweep_equals_naive():
    data = zoo_extra.token_data()
    s = pl.Session(zoo_extra.TiedLM(), data, extra_layers=["emb"])
    before = snapshot(s.model)
    a = s.sensitivity(levels=LEVELS, progress=False)
    b = s.sensitivity(levels=LEVELS, progress=False, incremental=False)
    assert float((a.table("loss") - b.table("loss")).abs().max()) <= 1e-6
    assert state_equal(snapshot(s.model), before)


def test_sweep_measures_what_set_sparsity_gives(demo_session):
    r = demo_session.sensitivity(levels=[0.5], layers=["fc1"], progress=False)
    demo_session.set_sparsity({"fc1": 0.5})
    assert r.records[0]["accuracy"] == pytest.approx(demo_session.evaluate()["accuracy"], abs=1e-12)
    assert r.records[0]["loss"] == pytest.approx(demo_session.evaluate()["loss"], abs=1e-6)


def test_interrupt_restores_and_resume_completes(demo_session):
    demo_session.set_sparsity({"fc2": 0.4})
    before = snapshot(demo_session.model)
    calls = {"n": 0}

    def boom(record):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt

    partial = demo_session.sensitivity(levels=LEVELS, progress=False, on_step=boom)
    assert not partial.complete and len(partial.records) == 7
    assert "INCOMPLETE" in repr(partial)
    assert state_equal(snapshot(demo_session.model), before)
    full = demo_session.sensitivity(levels=LEVELS, progress=False, resume=SensitivityResult.from_json(partial.to_json()))
    assert full.complete and len(full.records) == 5 * len(LEVELS)
    fresh = demo_session.sensitivity(levels=LEVELS, progress=False)
    assert torch.equal(full.table(), fresh.table())
    assert state_equal(snapshot(demo_session.model), before)


def test_any_exception_restores(demo_session):
    before = snapshot(demo_session.model)

    def fail(record):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        demo_session.sensitivity(levels=LEVELS, progress=False, on_step=fail)
    assert state_equal(snapshot(demo_session.model), before)


def test_stop_callback_keeps_partial(demo_session):
    seen = []
    r = demo_session.sensitivity(levels=LEVELS, progress=False, on_step=seen.append, should_stop=lambda: len(seen) >= 3)
    assert not r.complete and len(r.records) == 3


def test_random_criterion_and_bad_input(demo_session):
    r = demo_session.sensitivity(levels=[0.0, 0.9], criterion="random", layers=["fc1"], progress=False)
    assert r.criterion == "random" and len(r.records) == 2
    with pytest.raises(ValueError, match="no prunable layer named 'fc7'"):
        demo_session.sensitivity(layers=["fc7"], progress=False)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        demo_session.sensitivity(levels=[0.5, 1.2], progress=False)
    with pytest.raises(ValueError, match="measures 'accuracy'"):
        demo_session.sensitivity(metric="f1", progress=False)


def test_default_levels(demo_session):
    r = demo_session.sensitivity(layers=["fc3"], progress=False)
    assert r.levels == [round(0.05 * i, 2) for i in range(20)]


def test_csv_json_roundtrip_and_plots(demo_session, tmp_path):
    r = demo_session.sensitivity(levels=LEVELS, progress=False)
    back = SensitivityResult.from_json(r.to_json(tmp_path / "r.json"))
    assert back == r
    csv = r.to_csv()
    assert csv.splitlines()[0] == "layer,level,accuracy,loss" and len(csv.splitlines()) == 1 + len(r.records)
    fig = r.plot()
    ax = fig.axes[0]
    curves = [l for l in ax.lines if str(l.get_gid()).startswith("curve:")]
    assert len(curves) == len(r.layers)
    marks = {l.get_gid(): l.get_xdata()[0] for l in ax.lines if str(l.get_gid()).startswith("current:")}
    assert marks == {f"current:{n}": pytest.approx(v) for n, v in r.current.items()}
    hm = r.heatmap()
    assert hm.axes[0].images[0].get_array().shape == (len(r.layers), len(LEVELS))


# ------------------------------------------------------------------ plans on synthetic curves
def synthetic(curves: dict[str, list[float]], n_params: dict[str, int], levels=(0.0, 0.25, 0.5, 0.75)) -> SensitivityResult:
    records = [
        {"layer": n, "level": lv, "accuracy": acc, "loss": 0.0}
        for n, accs in curves.items()
        for lv, acc in zip(levels, accs)
    ]
    return SensitivityResult(
        layers=list(curves), levels=list(levels), n_params=n_params, current={n: 0.0 for n in curves},
        criterion="magnitude", metric="accuracy", reference={"accuracy": 1.0, "loss": 0.0},
        dense={"accuracy": 1.0, "loss": 0.0}, records=records, complete=True,
    )


def test_ranking_on_synthetic_curves():
    r = synthetic({"a": [1.0, 1.0, 0.995, 0.9], "b": [1.0, 0.98, 0.999, 0.99], "c": [1.0, 1.0, 1.0, 1.0]}, {"a": 100, "b": 100, "c": 100})
    assert r.ranking(max_drop=0.01) == {"c": 0.75, "a": 0.5, "b": 0.0}
    assert list(r.ranking(max_drop=0.01)) == ["c", "a", "b"]


def test_allocate_hits_target_exactly():
    r = synthetic({"big": [1.0, 1.0, 0.999, 0.99], "small": [1.0, 0.9, 0.8, 0.7]}, {"big": 1000, "small": 10})
    for target in (0.1, 0.37, 0.5, 0.7):
        plan = r.allocate(target_sparsity=target)
        pruned = sum(round(plan[n] * r.n_params[n]) for n in plan)
        assert pruned == round(target * 1010), target
    plan = r.allocate(target_sparsity=0.5)
    assert plan["small"] == 0.0  # the cheap big layer is pruned first
    with pytest.raises(ValueError, match="reach only"):
        r.allocate(target_sparsity=0.9)
    with pytest.raises(ValueError, match="exactly one"):
        r.allocate()


def test_allocate_max_drop_stays_within_and_is_maximal():
    r = synthetic({"a": [1.0, 0.999, 0.995, 0.95], "b": [1.0, 0.998, 0.99, 0.9]}, {"a": 100, "b": 100})
    plan = r.allocate(max_drop=0.01)
    assert 1.0 - plan.predicted <= 0.01 + 1e-12
    assert dict(plan) == {"a": 0.5, "b": 0.25}  # adding any further measured step would exceed 0.01
    assert math.isclose(plan.predicted, 1.0 - 0.005 - 0.002)


def test_plan_applies_and_is_measured(demo_session):
    r = demo_session.sensitivity(levels=[0.0, 0.3, 0.6, 0.9], progress=False)
    plan = r.allocate(target_sparsity=0.6)
    demo_session.set_sparsity(plan)
    total = sum(i.n_params for i in demo_session.layers)
    assert sum(demo_session.pruned_counts.values()) == round(0.6 * total)
    measured = demo_session.evaluate()["accuracy"]
    assert 0 <= measured <= 1 and isinstance(plan.predicted, float)
