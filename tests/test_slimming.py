"""Network slimming: the L1 term against a hand sum and autograd, the training step against a
hand-written loop, the global threshold against a hand count, and the refusals."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

import prune_lab as pl
from prune_lab import slimming

BN_NAMES = ["features.1", "features.4", "features.8"]  # conv, BN, ReLU | conv, BN, ReLU, pool | ...


def _vgg(digits, widths=(4, 6, 8), seed=0, gammas=None):
    torch.manual_seed(seed)
    model = pl.models.small_vgg(digits, widths)
    if gammas is not None:
        with torch.no_grad():
            for g, values in zip(slimming.bn_scales(model).values(), gammas):
                g.copy_(torch.tensor(values, dtype=torch.float32))
    return model.eval()


def test_bn_scales_are_the_live_gamma_of_every_affine_batchnorm(digits):
    model = _vgg(digits)
    scales = slimming.bn_scales(model)
    assert list(scales) == BN_NAMES
    for name, g in scales.items():
        assert g is model.get_submodule(name).weight
    no_affine = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, affine=False), nn.BatchNorm1d(3))
    assert list(slimming.bn_scales(no_affine)) == ["2"]


def test_penalty_is_strength_times_the_sum_of_absolute_scales_and_its_gradient_the_sign(digits):
    model = _vgg(digits)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))  # both signs
    by_hand = 0.0
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            by_hand += sum(abs(float(v)) for v in m.weight.detach())
    value = slimming.l1_on_bn_scales(0.25)(model)
    assert value.dim() == 0 and float(value.detach()) == pytest.approx(0.25 * by_hand, rel=1e-6)
    value.backward()
    for name in BN_NAMES:
        bn = model.get_submodule(name)
        assert torch.equal(bn.weight.grad, 0.25 * torch.sign(bn.weight.detach()))
        assert bn.bias.grad is None  # beta is not penalised
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert m.weight.grad is None
    assert float(slimming.l1_on_bn_scales(0)(model).detach()) == 0.0


def test_train_adds_the_penalty_to_every_batch_loss_as_a_hand_loop_does(digits):
    x, y = digits.train.tensors
    small = pl.datasets.DataBundle("few", TensorDataset(x[:40], y[:40]), digits.test, digits.input_shape, 10)
    penalty = slimming.l1_on_bn_scales(0.05)
    model = _vgg(digits)
    reference = copy.deepcopy(model)
    history = pl.train(model, small, epochs=1, lr=0.1, batch_size=16, device="cpu", seed=5, progress=False,
                       weight_decay=1e-4, optimizer="sgd", momentum=0.9, penalty=penalty)

    torch.manual_seed(5)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(5))
    reference.train()
    total = 0.0
    for start in range(0, 40, 16):
        idx = order[start:start + 16]
        opt.zero_grad()
        loss = F.cross_entropy(reference(x[idx]), y[idx])
        loss = loss + 0.05 * sum(reference.get_submodule(n).weight.abs().sum() for n in BN_NAMES)
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
    for (k, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), k
    assert history["loss"] == [pytest.approx(total / 40, rel=1e-6)]

    unpenalised = _vgg(digits)
    pl.train(unpenalised, small, epochs=1, lr=0.1, batch_size=16, device="cpu", seed=5, progress=False,
             weight_decay=1e-4, optimizer="sgd", momentum=0.9)
    gamma = model.get_submodule("features.1").weight
    assert not torch.allclose(gamma, unpenalised.get_submodule("features.1").weight, atol=1e-4)


def test_train_rejects_an_unknown_optimizer(digits):
    with pytest.raises(ValueError, match="optimizer must be 'sgd', 'adam'"):
        pl.train(_vgg(digits), digits, epochs=1, optimizer="rmsprop", progress=False)


GAMMAS = ([0.9, -0.05, 0.4, 0.01], [0.3, 0.02, -0.7, 0.6, 0.2, 0.5], [0.03, 0.8, 0.1, 0.9, 0.06, 0.7, 0.45, 0.25])


def test_threshold_plan_removes_the_globally_smallest_scales(digits):
    s = pl.Session(_vgg(digits, gammas=GAMMAS), digits.test)
    # 18 channels; |gamma| sorted: .01 .02 .03 .05 .06 .1 .2 .25 .3 ...
    # 30% -> round(5.4) = 5: features.0 loses .01 .05, features.3 loses .02, features.7 loses .03 .06
    assert slimming.threshold_plan(s, 0.3) == {"features.7": 2 / 8, "features.3": 1 / 6, "features.0": 2 / 4}
    assert s.channel_scores("features.0", "bn_scale").tolist() == pytest.approx([abs(v) for v in GAMMAS[0]])
    plan = slimming.threshold_plan(s, 0.5)  # 9: + .1 .2 .25 .3
    assert plan == {"features.7": 4 / 8, "features.3": 3 / 6, "features.0": 2 / 4}
    s.set_sparsity(plan, pattern="channels", criterion="bn_scale")
    assert s.channels == {**s.channels, "features.0": (2, 4), "features.3": (3, 6), "features.7": (4, 8)}
    removed = {name: (s.model.get_submodule(name).weight == 0).nonzero().flatten().tolist() for name in BN_NAMES}
    assert removed == {"features.1": [1, 3], "features.4": [0, 1, 4], "features.8": [0, 2, 4, 7]}


def test_threshold_plan_keeps_one_channel_per_group_and_takes_the_next_instead(digits):
    tiny = ([1e-4, 2e-4, 3e-4, 4e-4], [0.3, 0.02, -0.7, 0.6, 0.2, 0.5], [0.03, 0.8, 0.1, 0.9, 0.06, 0.7, 0.45, 0.25])
    s = pl.Session(_vgg(digits, gammas=tiny), digits.test)
    # 30% -> 5: features.0 may give only 3 of its 4 (all four are the smallest), then .02 and .03
    assert slimming.threshold_plan(s, 0.3) == {"features.7": 1 / 8, "features.3": 1 / 6, "features.0": 3 / 4}
    # 100%: every group keeps exactly one
    assert slimming.threshold_plan(s, 1.0) == {"features.7": 7 / 8, "features.3": 5 / 6, "features.0": 3 / 4}
    assert slimming.threshold_plan(s, 0.0) == {"features.7": 0.0, "features.3": 0.0, "features.0": 0.0}


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.floats(-2, 2, allow_nan=False, width=32), min_size=18, max_size=18),
       st.floats(0, 1))
def test_threshold_plan_invariants(digits, values, fraction):
    gammas = (values[:4], values[4:10], values[10:])
    s = pl.Session(_vgg(digits, gammas=gammas), digits.test)
    plan = slimming.threshold_plan(s, fraction)
    sizes = {"features.0": 4, "features.3": 6, "features.7": 8}
    removed = {g: round(f * sizes[g]) for g, f in plan.items()}
    assert all(math.isclose(removed[g] / sizes[g], plan[g]) for g in plan)
    assert all(0 <= removed[g] <= sizes[g] - 1 for g in plan)
    assert sum(removed.values()) == min(round(fraction * 18), 18 - 3)
    # below one threshold: no kept channel of an uncapped group is smaller than a removed one anywhere
    scores = {g: sorted(abs(v) for v in vals) for g, vals in zip(sizes, gammas)}
    worst_removed = max((scores[g][removed[g] - 1] for g in plan if removed[g]), default=-1.0)
    for g in plan:
        if removed[g] < sizes[g] - 1:
            assert scores[g][removed[g]] >= worst_removed


@pytest.mark.parametrize("strength", [-0.1, float("nan"), float("inf"), True, "0.1", None])
def test_bad_strength_is_named(strength):
    with pytest.raises(ValueError, match="strength is a finite number >= 0"):
        slimming.l1_on_bn_scales(strength)


def test_a_model_without_batchnorm_is_refused_by_name(digits, demo_session):
    with pytest.raises(ValueError, match="LeNet5 has no affine BatchNorm"):
        slimming.l1_on_bn_scales(0.1)(demo_session.model)
    with pytest.raises(ValueError, match="no channel group of this model has a BatchNorm; groups: "):
        slimming.threshold_plan(demo_session, 0.3)
    s = pl.Session(_vgg(digits), digits.test)
    with pytest.raises(ValueError, match="slimming fraction"):
        slimming.threshold_plan(s, 1.5)
