"""The granularity spectrum on the demo LeNet-5 (8x8 digits, conv 8 and 16 channels): every
count by hand, the accuracy of the finest grain against torch.nn.utils.prune and a plain forward
pass, the file against the exported bytes, and the session left exactly as it was."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.utils.prune as tprune

import prune_lab as pl
from prune_lab import granularity

from .oracles import plain

# MACs per sample by hand: conv1 8 out x 8x8 positions x 1x3x3, conv2 16 x 4x4 x 8x3x3, fc1 64x120,
# fc2 120x84, fc3 84x10
CONV1, CONV2, FC = 8 * 64 * 9, 16 * 16 * 8 * 9, 64 * 120 + 120 * 84 + 84 * 10
DENSE_MACS = CONV1 + CONV2 + FC
CONV2_WEIGHTS = 16 * 8 * 9


def _state(session):
    return ({k: v.clone() for k, v in session.model.state_dict().items()},
            {i.name: session.mask(i.name).clone() for i in session.layers}, dict(session.channels))


def _same(a, b):
    assert a[2] == b[2]
    for x, y in ((a[0], b[0]), (a[1], b[1])):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_spectrum_counts_by_hand_and_restores_the_session(demo_session):
    before = _state(demo_session)
    sp = granularity.spectrum(demo_session, ["conv2"], 0.5)
    _same(_state(demo_session), before)
    assert [r.grain for r in sp.rows] == list(granularity.GRAINS)
    assert (sp.dense.zeroed, sp.dense.effective_macs, sp.dense.dense_macs) == (0, DENSE_MACS, DENSE_MACS)
    half = CONV2_WEIGHTS // 2
    for r in sp.rows[:3]:  # unstructured, 2:4, 64 of 128 whole 3x3 kernels: 576 weights each, the model unchanged
        assert (r.zeroed, r.effective_macs, r.dense_macs) == (half, DENSE_MACS - CONV2 // 2, DENSE_MACS), r.grain
    channels = sp.rows[3]
    # 8 of 16 conv2 filters (8x3x3 each) and their fc1 columns (2x2 positions x 120 outputs each)
    assert channels.zeroed == 8 * 8 * 9 + 8 * 4 * 120
    small = CONV1 + CONV2 // 2 + 32 * 120 + 120 * 84 + 84 * 10
    assert (channels.effective_macs, channels.dense_macs) == (small, small)
    assert sp.metric_name == "accuracy" and sp.layers == ("conv2",) and sp.sparsity == 0.5
    text = repr(sp)
    assert "conv2 at 50% sparsity" in text and all(g in text for g in granularity.GRAINS)


def test_each_row_is_the_model_pruned_at_that_grain(demo_session, demo, tmp_path):
    model, data = demo
    sp = granularity.spectrum(demo_session, ["conv2"], 0.5)
    x, y = data.test.tensors
    assert sp.dense.metric == plain(model, x, y)[0]
    # unstructured magnitude is torch's L1 unstructured pruning of the same 576 weights
    oracle = copy.deepcopy(model)
    tprune.l1_unstructured(oracle.conv2, "weight", amount=CONV2_WEIGHTS // 2)
    assert sp.rows[0].metric == plain(oracle, x, y)[0]
    for row in sp.rows:
        s = pl.Session(copy.deepcopy(model), data.test)
        s.set_sparsity({"conv2": 0.5}, pattern=row.grain)
        assert row.metric == s.evaluate()["accuracy"]
        path = s.export(tmp_path / f"{row.grain.replace(':', '_')}.pt", sparse=True)["model"]
        assert row.sparse_file_bytes == path.stat().st_size


def test_spectrum_starts_from_the_current_state_and_returns_to_it(demo_session):
    demo_session.set_sparsity({"fc2": 0.5})
    before = _state(demo_session)
    sp = granularity.spectrum(demo_session, ["conv2"], 0.5, grains=("unstructured", "channels"))
    _same(_state(demo_session), before)
    fc2_half = (120 * 84) // 2
    assert sp.dense.zeroed == 0 and sp.dense.effective_macs == DENSE_MACS - fc2_half
    assert sp.rows[0].zeroed == CONV2_WEIGHTS // 2 and sp.rows[0].effective_macs == DENSE_MACS - fc2_half - CONV2 // 2


def test_a_grain_that_does_not_fit_is_refused_by_name_and_nothing_changes(demo_session):
    before = _state(demo_session)
    with pytest.raises(ValueError, match="conv1"):
        granularity.spectrum(demo_session, ["conv1"], 0.5, grains=("unstructured", "2:4"))
    _same(_state(demo_session), before)
    demo_session.set_sparsity({"fc1": 0.5})  # a reader of conv2's channels, pruned weight by weight
    before = _state(demo_session)
    with pytest.raises(ValueError, match="layer 'fc1' is pruned unstructured"):
        granularity.spectrum(demo_session, ["conv2"], 0.5)  # the channels grain would discard fc1's mask
    _same(_state(demo_session), before)


def test_grain_masks_are_the_masks_each_grain_leaves_and_the_session_is_restored(demo_session):
    before = _state(demo_session)
    masks = granularity.grain_masks(demo_session, "conv2", 0.5)
    _same(_state(demo_session), before)
    assert list(masks) == list(granularity.GRAINS)
    assert all(m.shape == (16, 8, 3, 3) and m.dtype == torch.bool for m in masks.values())
    assert [int((~m).sum()) for m in masks.values()] == [576, 576, 576, 576]
    pairs = masks["2:4"].permute(0, 2, 3, 1).reshape(-1, 4)  # 2:4 runs along the input channels
    assert bool((pairs.sum(1) == 2).all())
    kernels = masks["kernel"].reshape(16 * 8, 9).sum(1)
    assert sorted(set(kernels.tolist())) == [0, 9]  # whole 3x3 kernels, nothing in between
    rows = masks["channels"].reshape(16, -1).sum(1)
    assert sorted(rows.tolist()) == [0] * 8 + [72] * 8  # whole filters
    assert torch.equal(masks["unstructured"], demo_session.original_weight("conv2").abs()
                       > demo_session.original_weight("conv2").abs().flatten().kthvalue(576).values)
