"""Perplexity (``metrics.py``): exact over batches, checked against one plain cross-entropy over
every token; lower is better everywhere a "drop" is read (sweeps, allocation, planner, fronts)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import prune_lab as pl
from prune_lab.workflows.sensitivity import SensitivityResult
from prune_lab.workflows.tradeoff import pareto_front
from tests.test_planner import teacher


def lm_session(batch_size: int = 5) -> tuple[pl.Session, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    tokens = torch.randint(0, 11, (23, 9))
    x, y = tokens[:, :-1], tokens[:, 1:].clone()
    y[0, :3] = -100  # not scored
    model = pl.models.TinyGPT(11, 8, d=16, heads=2, layers=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
    return pl.Session(model, loader, metric=pl.metrics.perplexity), x, y


def test_perplexity_is_exp_of_the_mean_cross_entropy_over_all_tokens():
    s, x, y = lm_session()
    with torch.no_grad():
        logits = s.model(x)
    oracle = math.exp(float(F.cross_entropy(logits.reshape(-1, 11).double(), y.reshape(-1), ignore_index=-100)))
    got = s.evaluate()
    assert got["perplexity"] == pytest.approx(oracle, rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]), rel=1e-12)
    # not the mean of per-batch perplexities (23 sequences in batches of 5: the last one is short)
    per_batch = [pl.metrics.perplexity(logits[i:i + 5], y[i:i + 5]) for i in range(0, 23, 5)]
    assert abs(sum(per_batch) / len(per_batch) - oracle) > 1e-4
    assert s.metric_name == "perplexity" and s.evaluator.lower_is_better


def test_perplexity_of_a_uniform_guess_is_the_vocabulary_size():
    logits = torch.zeros(3, 4, 7)
    assert pl.metrics.perplexity(logits, torch.randint(0, 7, (3, 4))) == pytest.approx(7.0, rel=1e-6)  # float32 cross-entropy
    assert repr(pl.metrics.perplexity) == "<metric 'perplexity' (lower is better)>"


def result(lower: bool, reference: float, curves: dict[str, list[tuple[float, float]]]) -> SensitivityResult:
    layers = list(curves)
    levels = sorted({lv for c in curves.values() for lv, _ in c})
    records = [{"layer": n, "level": lv, "perplexity": v, "loss": 0.0} for n, c in curves.items() for lv, v in c]
    return SensitivityResult(layers, levels, {n: 100 for n in layers}, {n: 0.0 for n in layers}, "magnitude", "perplexity",
                             {"perplexity": reference, "loss": 0.0}, {"perplexity": reference, "loss": 0.0}, records,
                             True, lower_is_better=lower)


def test_a_drop_of_perplexity_is_a_rise_and_predictions_never_beat_the_best_measured():
    r = result(True, 10.0, {"a": [(0.0, 10.0), (0.5, 10.5), (0.9, 14.0)], "b": [(0.0, 10.0), (0.5, 9.0), (0.9, 30.0)]})
    assert r.drop("a", 0.5) == 0.5 and r.drop("a", 0.9) == 4.0 and r.drop("b", 0.5) == -1.0
    assert r.ranking(max_drop=1.0) == {"b": 0.5, "a": 0.5}
    assert r.ranking(max_drop=4.0) == {"a": 0.9, "b": 0.5}
    plan = r.allocate(target_sparsity=0.5)  # the cheapest 100 weights: b to 0.5 (gains 1), then a to 0.5 (loses 0.5)
    assert dict(plan) == {"a": 0.5, "b": 0.5}
    assert plan.predicted == 9.5
    assert r.predict(-5.0) == 9.0  # clipped at the best perplexity measured
    assert r.predict(3.0) == 13.0
    up = result(False, 0.9, {"a": [(0.0, 0.9), (0.5, 0.8)]})  # accuracy: the old direction
    assert up.drop("a", 0.5) == pytest.approx(0.1) and up.predict(0.2) == pytest.approx(0.7)


def test_the_pareto_front_of_a_lower_is_better_metric():
    costs, scores = [1.0, 2.0, 3.0, 4.0], [20.0, 10.0, 15.0, 9.0]
    assert pareto_front(costs, scores, lower_is_better=True) == [0, 1, 3]
    assert pareto_front(costs, scores) == [0]


@pytest.mark.parametrize("seed,refine,budget", [(0, True, 0.4), (1, True, 0.4), (0, False, 0.3)])
def test_the_planner_returns_the_lowest_perplexity_it_measured(seed, refine, budget, monkeypatch):
    if not refine:  # the plan the search itself picks, before the local search (its last default argument)
        defaults = pl.planner.plan_budget.__defaults__
        monkeypatch.setattr(pl.planner.plan_budget, "__defaults__", (*defaults[:-1], 0))
    model, data = teacher(seed)  # seeded weights, no training: the same on every CPU
    s = pl.Session(model, data, metric=pl.metrics.perplexity)
    r = s.sensitivity(levels=(0.0, 0.5, 0.75, 0.9), progress=False)
    plan = s.plan({"macs": budget}, sensitivity=r, progress=False)
    met = [p for p in plan.rounds if p["met"]]
    assert len(met) > 1
    assert plan.measured["perplexity"] == min(p["perplexity"] for p in met)
    s.set_sparsity(dict(plan), pattern=plan.pattern, criterion=plan.criterion)
    assert s.evaluate()["perplexity"] == plan.measured["perplexity"]


def test_finetune_restore_best_keeps_the_lowest_perplexity():
    s, x, y = lm_session()
    ft = s.finetune((x, y), steps=4, lr=0.05, schedule="iterative", target_sparsity=0.8, rounds=3, restore="best",
                    progress=False)
    values = [e["perplexity"] for e in ft.evaluations]
    assert len(set(values)) == 3 and ft.restored == "best"
    assert s.evaluate()["perplexity"] == min(values)
