"""The pruning state's invariants, each against the tensors themselves: live weight = base *
mask; apply is all or nothing; a trial restores the recorded masks whatever happens; a
snapshot restores exactly; Snapshot.to moves every tensor and keeps every field."""
from __future__ import annotations

from dataclasses import fields

import pytest
import torch

import prune_lab as pl
from prune_lab.criteria import get_criterion
from tests.conftest import state_equal, zoo_model


@pytest.fixture
def s(digits):
    return pl.Session(zoo_model("resnet", digits), digits.test, device="cpu")


def test_live_weights_are_base_times_mask_and_apply_is_all_or_nothing(s):
    s.set_sparsity({"stem": 0.5, "fc": 0.25})
    for name in ("stem", "fc"):
        assert torch.equal(s.state.weights[name].detach(), s.state.base(name) * s.mask(name))
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    mag = get_criterion("magnitude")
    with pytest.raises(ValueError, match="layer 'fc': cannot prune 641 of 640 weights"):
        s.state.set_counts({"stem": 10, "fc": 641}, mag, 0)  # stem's change is computed, then refused with fc's
    assert state_equal(s.model.state_dict(), before)


def test_a_trial_restores_the_recorded_masks_even_when_it_raises(s):
    s.set_sparsity({"fc": 0.5})
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        with s.state.trial({"fc": None, "stem": torch.zeros(s.layer("stem").shape, dtype=torch.bool)}):
            assert int((s.state.weights["stem"] != 0).sum()) == 0 and s.state.in_trial
            raise RuntimeError("boom")
    assert state_equal(s.model.state_dict(), before) and not s.state.in_trial


def test_snapshots_restore_exactly_across_channels_and_finetuning(s, digits):
    s.set_sparsity({"layers.0.conv1": 0.5}, pattern="channels")
    snap = s.snapshot()
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    s.finetune((digits.train.tensors[0][:64], digits.train.tensors[1][:64]), steps=3, progress=False)
    s.set_sparsity({"fc": 0.9})
    assert not state_equal(s.model.state_dict(), before)
    s.restore(snap)
    assert state_equal(s.model.state_dict(), before) and s.snapshot() == snap


def test_snapshot_to_moves_every_tensor_and_keeps_every_field(s, digits):
    s.set_sparsity({"layers.0.conv1": 0.5}, pattern="channels")
    s.finetune((digits.train.tensors[0][:64], digits.train.tensors[1][:64]), steps=2, progress=False)
    s.set_bits({"fc": 4})
    snap = s.snapshot()
    moved = snap.to("cpu")
    assert {f.name for f in fields(moved)} == {f.name for f in fields(snap)}
    assert moved.generation == snap.generation and moved.settings == snap.settings
    assert set(moved.channels) == set(snap.channels) and all(torch.equal(moved.channels[g].keep, c.keep)
                                                            for g, c in snap.channels.items())
    assert all(torch.equal(moved.member_bases[k], v) for k, v in snap.member_bases.items()) and moved.member_bases
    assert all(torch.equal(moved.others[k], v) for k, v in snap.others.items())
    assert all(torch.equal(moved.bases[k], v) for k, v in snap.bases.items())
    fresh = pl.Session(zoo_model("resnet", digits), digits.test, device="cpu")
    fresh.groups
    fresh.state.adopt(moved)  # another process's state, adopted: the same model
    assert state_equal(fresh.model.state_dict(), s.model.state_dict())
