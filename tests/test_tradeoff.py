"""Trade-off runs: measured records, JSON round-trip, cache reuse and invalidation, session kept."""
from __future__ import annotations

import pytest
import torch

import prune_lab as pl
from prune_lab.workflows.tradeoff import TradeoffResult, pareto_front
from tests.conftest import snapshot, state_equal


def test_pareto_front():
    costs = [1, 2, 3, 4, 2]
    scores = [0.5, 0.7, 0.6, 0.9, 0.7]
    assert pareto_front(costs, scores) == [0, 1, 3]


def test_records_are_measured_and_session_is_left_as_found(demo_session):
    demo_session.set_sparsity({"fc1": 0.3})
    before, state = snapshot(demo_session.model), demo_session.snapshot()
    r = demo_session.tradeoff(strategies=["global", "random"], compressions=(1, 4, 16), cache=False, progress=False)
    assert state_equal(snapshot(demo_session.model), before) and demo_session.snapshot() == state
    assert len(r.records) == 6
    rec = next(x for x in r.records if x["strategy"] == "global" and x["target_compression"] == 4)
    demo_session.reset().set_global_sparsity(0.75, allocation="global")
    assert rec["accuracy"] == demo_session.evaluate()["accuracy"]
    st = demo_session.stats().total
    assert rec["compression"] == st["params"] / st["nonzeros"] and rec["sparse_bytes"] == st["sparse_file_bytes"]
    assert rec["compression"] == pytest.approx(4, rel=1e-3)


def test_json_roundtrip_csv_and_plot(demo_session, tmp_path):
    r = demo_session.tradeoff(strategies=["uniform", "global"], compressions=(1, 8), seeds=2, cache=False, progress=False)
    back = TradeoffResult.from_json(r.to_json(tmp_path / "t.json"))
    assert back.records == r.records and back.dense == r.dense and back.config == r.config
    assert r.to_csv().splitlines()[0].startswith("strategy,")
    rows = r.summary()
    assert all(row["seeds"] == 2 for row in rows)
    for x in ("compression", "bytes", "speedup"):
        fig = r.plot(x=x)
        curves = [l for l in fig.axes[0].get_children() if str(l.get_gid()).startswith("curve:")]
        assert curves
    assert "uniform" in r.table()


def test_cache_reused_and_invalidated(demo, digits, monkeypatch):
    model, data = demo
    calls = {"n": 0}
    from prune_lab.evaluate import Evaluator

    real = Evaluator.evaluate

    def counting(self, *a, **k):
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(Evaluator, "evaluate", counting)
    s = pl.Session(model, data.test, device="cpu")
    first = s.tradeoff(strategies=["global"], compressions=(1, 2), progress=False)
    n = calls["n"]
    assert n >= 2 and not first.cached
    again = pl.Session(model, data.test, device="cpu").tradeoff(strategies=["global"], compressions=(1, 2), progress=False)
    assert again.cached and calls["n"] == n and again.records == first.records
    other = pl.models.lenet5(digits, pl.models.DEMO_CHANNELS)  # a different model: recomputed
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.fc1.weight.mul_(1.01)
    changed = pl.Session(other, data.test, device="cpu").tradeoff(strategies=["global"], compressions=(1, 2), progress=False)
    assert not changed.cached and calls["n"] > n


def test_with_finetuning(demo_session, digits):
    r = demo_session.tradeoff(strategies=["global"], compressions=(8,), finetune={"train_data": digits.train, "steps": 30, "lr": 0.02},
                              cache=False, progress=False)
    rec = r.records[0]
    assert rec["accuracy_finetuned"] is not None and rec["compression_finetuned"] == pytest.approx(rec["compression"])


def test_bad_config(demo_session):
    with pytest.raises(ValueError, match="compression 0.5 must be a number >= 1"):
        demo_session.tradeoff(compressions=(0.5,), progress=False)
    with pytest.raises(ValueError, match="needs 'train_data'"):
        demo_session.tradeoff(finetune={"steps": 3}, progress=False)
    with pytest.raises(ValueError, match="unknown allocation 'gloabl'"):
        demo_session.tradeoff(strategies=["gloabl"], cache=False, progress=False)


def test_channel_strategies_reach_each_compression_from_below_and_leave_the_session_as_found(digits):
    import prune_lab as pl
    from tests.conftest import state_equal, zoo_model

    torch.manual_seed(8)
    model = zoo_model("lenet5", digits)
    s = pl.Session(model, (digits.test.tensors[0][:100], digits.test.tensors[1][:100]), device="cpu")
    s.set_sparsity({"fc1": 0.3})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = s.tradeoff(strategies=["channels", "channels-global/l2", "global"], compressions=(1, 2, 4), cache=False, progress=False)
    assert state_equal(model.state_dict(), before)
    for r in t.records:
        assert r["compression"] <= r["target_compression"] + 1e-9
        if r["strategy"].startswith("channels") and r["target_compression"] > 1:
            assert r["compression"] > 0.9 * r["target_compression"]  # the bisection gets close
    # the point is the session pruned that way, measured: redo it and compare
    point = next(r for r in t.records if r["strategy"] == "channels" and r["target_compression"] == 4)
    from prune_lab.workflows.tradeoff import channel_fraction

    s.reset()
    fraction = channel_fraction(s.state, s.sizes, 4, lambda f: s.set_global_sparsity(f, allocation="uniform", pattern="channels"))
    assert 0 < fraction < 0.99
    assert s.evaluate()["accuracy"] == point["accuracy"] and s.stats().total["compression"] == point["compression"]
    with pytest.raises(ValueError, match="channel strategies take a group criterion"):
        s.tradeoff(strategies=["channels/wanda"], compressions=(2,), cache=False, progress=False)
