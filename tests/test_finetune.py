"""Masked fine-tuning keeps pruned weights at exactly zero; schedules; LTH rewinding is exact."""
from __future__ import annotations

import pytest
import torch

import prune_lab as pl
from tests.conftest import snapshot, state_equal, zoo_model


def pruned_session(digits, kind="mlp", sparsity=0.8):
    s = pl.Session(zoo_model(kind, digits), digits.test, device="cpu")
    s.set_global_sparsity(sparsity)
    return s


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_pruned_weights_stay_exactly_zero(optimizer, digits):
    s = pruned_session(digits)
    masks = {i.name: s.mask(i.name).clone() for i in s.layers}
    checks = []

    def check(step, loss):
        checks.append(all(int((s.state.weights[n][~m] != 0).sum()) == 0 for n, m in masks.items()))

    s.finetune(digits.train, steps=30, lr=0.05 if optimizer == "sgd" else 1e-3, optimizer=optimizer, momentum=0.9, weight_decay=1e-4, progress=False, on_step=check)
    assert len(checks) == 30 and all(checks)
    for n, m in masks.items():
        assert torch.equal(s.mask(n), m)
    assert s.stats().total["nonzeros"] == sum(int(m.sum()) for m in masks.values())


def test_finetune_recovers_and_reset_is_still_exact(digits):
    s = pl.Session(zoo_model("mlp", digits), digits.test, device="cpu")
    pl.train(s.model, digits, epochs=3, progress=False)
    s = pl.Session(s.model, digits.test, device="cpu")
    before = snapshot(s.model)
    s.set_global_sparsity(0.95, allocation="uniform")  # global magnitude would cut a whole layer here
    pruned = s.evaluate()["accuracy"]
    r = s.finetune(digits.train, epochs=2, lr=0.05, progress=False)
    # measured 30.6% -> 47.9% under ATEN_CPU_CAPABILITY default/avx2/avx512 x 1/2 threads (the MLP's
    # products do not depend on them): a 10-point bar leaves 7 points (25 test digits) of margin
    assert r.evaluations[-1]["accuracy"] > pruned + 0.10
    assert s.evaluate()["accuracy"] == r.evaluations[-1]["accuracy"]
    s.reset()
    assert state_equal(snapshot(s.model), before)


def test_iterative_and_agp_reach_the_target(digits):
    for schedule in ("iterative", "agp"):
        s = pruned_session(digits, sparsity=0.0)
        r = s.finetune(digits.train, steps=10, schedule=schedule, target_sparsity=0.9, rounds=3, progress=False)
        total = sum(i.n_params for i in s.layers)
        assert sum(s.pruned_counts.values()) == round(0.9 * total)
        sparsities = [e["sparsity"] for e in r.evaluations]
        assert sparsities == sorted(sparsities) and len(sparsities) == 3


def test_lottery_rewinding_restores_recorded_weights_bit_for_bit(digits):
    s = pruned_session(digits, sparsity=0.0)
    recorded = {k: v.clone() for k, v in s.model.state_dict().items()}
    s.finetune(digits.train, steps=20, lr=0.05, progress=False)  # weights move
    assert not state_equal(snapshot(s.model), recorded)
    s.set_global_sparsity(0.8)
    s.rewind_to(recorded)
    for info in s.layers:
        w = s.model.get_submodule(info.name).weight.detach()
        m = s.mask(info.name)
        assert torch.equal(w[m], recorded[f"{info.name}.weight"][m])
        assert int((w[~m] != 0).sum()) == 0
    r = s.finetune(digits.train, steps=5, schedule="lottery", target_sparsity=0.9, rewind_step=0, progress=False)
    assert sum(s.pruned_counts.values()) == round(0.9 * sum(i.n_params for i in s.layers))
    assert len(r.evaluations) == 2


def test_interrupt_keeps_progress(digits):
    s = pruned_session(digits)

    def stop(step, loss):
        if step == 4:
            raise KeyboardInterrupt

    r = s.finetune(digits.train, steps=50, progress=False, on_step=stop)
    assert r.interrupted and r.steps == 5


def test_restore_best(digits):
    s = pruned_session(digits, sparsity=0.5)
    r = s.finetune(digits.train, steps=5, schedule="iterative", target_sparsity=0.6, rounds=3, restore="best", progress=False)
    best = max(e["accuracy"] for e in r.evaluations)
    assert r.restored == "best" and s.evaluate()["accuracy"] == best


def test_bad_arguments(digits):
    s = pruned_session(digits)
    with pytest.raises(ValueError, match="schedule must be"):
        s.finetune(digits.train, steps=1, schedule="cosine")
    with pytest.raises(ValueError, match="needs target_sparsity"):
        s.finetune(digits.train, steps=1, schedule="agp")
    with pytest.raises(ValueError, match="steps=... or epochs"):
        s.finetune(digits.train)
