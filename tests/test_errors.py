"""Bad input: a clear ValueError/TypeError naming layer, value and valid range; nothing mutated."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import prune_lab as pl
from tests.conftest import snapshot, state_equal


@pytest.mark.parametrize(
    "spec,exc,match",
    [
        ({"fc1": 1.5}, ValueError, r"layer 'fc1': sparsity 1.5 is outside \[0, 1\]"),
        ({"fc1": -0.1}, ValueError, r"outside \[0, 1\]"),
        ({"fc1": math.nan}, ValueError, r"layer 'fc1': sparsity nan"),
        ({"fc1": "0.5"}, TypeError, r"layer 'fc1': sparsity must be a number"),
        ({"fc1": True}, TypeError, "must be a number"),
        ({"fc4": 0.5}, ValueError, r"no prunable layer named 'fc4'. Did you mean 'fc3'.*Prunable layers: conv1, conv2, fc1"),
        ({"fc1": 0.5, "conv9": 0.5}, ValueError, "conv9"),  # valid entry first: must not be applied
    ],
)
def test_bad_sparsity_leaves_session_unchanged(demo_session, spec, exc, match):
    demo_session.set_sparsity({"fc2": 0.3})
    before, counts = snapshot(demo_session.model), demo_session.pruned_counts
    with pytest.raises(exc, match=match):
        demo_session.set_sparsity(spec)
    assert state_equal(snapshot(demo_session.model), before)
    assert demo_session.pruned_counts == counts


@pytest.mark.parametrize("bad", [1.01, -1, math.nan, math.inf])
def test_bad_global_sparsity(demo_session, bad):
    before = snapshot(demo_session.model)
    with pytest.raises(ValueError, match=r"global sparsity .* outside \[0, 1\]"):
        demo_session.set_global_sparsity(bad)
    assert state_equal(snapshot(demo_session.model), before)


def test_unknown_allocation_and_criterion_list_valid(demo_session):
    with pytest.raises(ValueError, match=r"unknown allocation 'globl'.*'uniform', 'global'"):
        demo_session.set_global_sparsity(0.5, allocation="globl")
    with pytest.raises(ValueError, match=r"unknown criterion 'rand'.*'random'"):
        demo_session.set_sparsity({"fc1": 0.5}, criterion="rand")
    assert demo_session.total_sparsity() == 0


def test_set_sparsity_needs_a_dict(demo_session):
    with pytest.raises(TypeError, match="set_global_sparsity"):
        demo_session.set_sparsity(0.5)


def test_wrong_shape_eval_data_is_clear(demo):
    model, data = demo
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"cannot run on the eval data: inputs of shape \(1, 28, 28\)"):
        pl.Session(model, (torch.zeros(4, 28, 28), torch.zeros(4, dtype=torch.long)))
    assert state_equal(snapshot(model), before)


def test_mismatched_targets_and_empty_data(demo):
    model, _ = demo
    with pytest.raises(ValueError, match="3 inputs but 2 targets"):
        pl.Session(model, (torch.zeros(3, 1, 8, 8), torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match="empty"):
        pl.Session(model, (torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(TypeError, match="eval_data must be"):
        pl.Session(model, [1, 2, 3])


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_inf_weights_rejected(value):
    model = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight[1, 2] = value
    with pytest.raises(ValueError, match=r"layer '0': weight has 1 NaN/inf"):
        pl.Session(model, (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)))


def test_not_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        pl.Session("model", None)


def test_bad_device(demo):
    with pytest.raises(ValueError, match="not a device"):
        pl.Session(demo[0], demo[1].test, device="gpu0")
