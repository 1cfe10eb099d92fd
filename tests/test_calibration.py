"""The state's calibration: statistics from the stored request, equal to autograd's on the
weights they describe, recomputed by the state itself once fine-tuning changed those weights."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import prune_lab as pl
from prune_lab.criteria import get_criterion
from tests.conftest import zoo_model


def mean_loss_gradient(model, x, y, names_to_params):
    model.eval()
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(names_to_params.values()))
    return dict(zip(names_to_params, grads))


def test_statistics_follow_the_weights_after_finetuning(digits):
    s = pl.Session(zoo_model("mlp", digits), digits.test, device="cpu")
    x, y = digits.train.tensors[0][:64], digits.train.tensors[1][:64]
    s.calibrate((x, y), samples=64, batch_size=64, progress=False)
    taylor = get_criterion("taylor-meangrad")  # the statistic of the mean gradient, checked against autograd
    s.state.refresh_calibration(taylor)
    assert s.calibration_passes == 0  # nothing needed the statistics yet
    s.set_sparsity({"fc1": 0.5}, criterion="taylor-meangrad")
    assert s.calibration_passes == 1
    s.state.refresh_calibration(taylor)
    assert s.calibration_passes == 1  # same weights: served from the cache
    s.finetune((x, y), steps=3, progress=False)
    s.state.refresh_calibration(taylor)  # new base weights: computed again from the stored request
    s.state.calibration.ensure(taylor.needs)
    assert s.calibration_passes == 2
    with s.dense():  # the statistics describe the dense base weights
        expect = mean_loss_gradient(s.model, x, y, {n: s.state.weights[n] for n in ("fc1", "fc2", "fc3")})
    for n, g in expect.items():
        assert torch.allclose(s.state.calibration.layer(n).grad, g, rtol=1e-4, atol=1e-7), n


def test_a_request_is_validated_before_anything_is_computed(digits):
    s = pl.Session(zoo_model("mlp", digits), digits.test, device="cpu")
    train = (digits.train.tensors[0][:32], digits.train.tensors[1][:32])
    with pytest.raises(ValueError, match="hessian must be 'fisher' or 'hutchinson'"):
        s.calibrate(train, hessian="exact", progress=False)
    with pytest.raises(ValueError, match="unknown criterion 'tayler'"):
        s.calibrate(train, criteria=["tayler"], progress=False)
    assert s.state.calibration is None and s.state.calibration_request is None
