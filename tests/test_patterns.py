"""The pattern registry and each pattern: parsing, the layers it fits, its count for a sparsity,
its mask (against a computation written out here), how it snaps, and that a pattern added to the
registry works in every entry point (the ``kernel`` pattern is the proof: nothing else knows it)."""
from __future__ import annotations

import warnings

import pytest
import torch

import prune_lab as pl
from prune_lab.patterns import PATTERNS, Pattern, get_pattern, lab_patterns, list_patterns, same_pattern


def test_names_parse_to_their_patterns_and_unknown_ones_list_the_valid():
    assert get_pattern(None).name == get_pattern("weights").name == "unstructured"
    assert get_pattern(" 1 : 4").name == "1:4" and get_pattern("2:4") is PATTERNS.get("2:4")
    assert get_pattern("kernel").norm == 1 and get_pattern("kernel-l2").norm == 2
    assert same_pattern("weights", "unstructured") and not same_pattern("2:4", "1:4")
    assert {"unstructured", "2:4", "kernel", "kernel-l2", "channels", "blocks", "N:M"} <= set(list_patterns())
    assert ("kernels", "kernel") in lab_patterns() and ("channels", "channels") in lab_patterns()
    with pytest.raises(ValueError, match=r"pattern 'kernal': use .*'kernel'.* Did you mean 'kernel'"):
        get_pattern("kernal")
    with pytest.raises(ValueError, match="N:M needs 0 < N < M"):
        get_pattern("4:2")
    assert get_pattern("channels").structured and get_pattern("blocks").removes_blocks
    assert not get_pattern("kernel").structured and not get_pattern("2:4").grouped


def conv_session(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, 8, 3, padding=1),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10))
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(40, 1, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g)
    return pl.Session(model, (x, y), device="cpu"), model


@pytest.mark.parametrize("name, norm", [("kernel", 1), ("kernel-l2", 2)])
def test_kernel_masks_remove_the_lowest_norm_kernels_written_out(name, norm):
    s, model = conv_session()
    s.set_sparsity({"2": 0.3}, pattern=name)  # 48 kernels: round(14.4) = 14 go
    w = model[2].weight.detach().clone()
    base = s.original_weight("2").double()
    norms = base.abs().sum((2, 3)) if norm == 1 else (base ** 2).sum((2, 3)).sqrt()
    flat = norms.flatten()
    gone = sorted(range(48), key=lambda i: (float(flat[i]), i))[:14]
    expect = torch.ones(48, dtype=torch.bool)
    expect[gone] = False
    keep = s.mask("2")
    assert torch.equal(keep, expect.view(8, 6, 1, 1).expand(8, 6, 3, 3))
    assert torch.equal(w, base.float() * keep)  # the live weights are base * mask
    assert s.pruned_counts["2"] == 14 * 9 and s.sparsity["2"] == 14 * 9 / 432
    assert s.stats().layers["2"]["nonzeros"] == int((w != 0).sum())


def test_kernel_counts_snap_to_whole_kernels_and_bad_input_changes_nothing():
    s, model = conv_session()
    k = get_pattern("kernel")
    info = s.layer("2")
    assert [k.count(info, f) for f in (0.0, 0.01, 0.03, 0.5, 1.0)] == [0, 0, 9, 24 * 9, 48 * 9]  # round(f * 48) kernels
    assert k.snap(0.03, info) == 1 / 48 and k.snap(0.5, info) == 0.5
    assert k.fits(info) and not k.fits(s.layer("5"))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer '5': pattern 'kernel' removes whole k x k kernels .*Linear .*\(10, 512\)"):
        s.set_sparsity({"2": 0.5, "5": 0.5}, pattern="kernel")
    with pytest.raises(ValueError, match=r"prunes whole kernels of 9 weights .*not 10 weights"):
        s.state.set_counts({"2": 10}, pl.criteria.get_criterion("magnitude"), 0, pattern="kernel")
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_kernel_works_in_global_sparsity_sweeps_recipes_stats_and_the_lab(tmp_path):
    s, model = conv_session()
    with pytest.warns(UserWarning, match="pattern kernel: left as they were .*: 5"):
        s.set_global_sparsity(0.5, allocation="uniform", pattern="kernel")
    conv_params = 54 + 432
    assert s.sparsity["5"] == 0.0
    zeros = s.pruned_counts["0"] + s.pruned_counts["2"]
    assert abs(zeros - 0.5 * conv_params) <= 9  # the convolutions' sparsity, within one kernel of each layer
    for n in ("0", "2"):
        m = s.mask(n)
        assert torch.equal(m, m[:, :, :1, :1].expand_as(m))  # whole kernels only
    # a sweep point is the same mask set_sparsity makes, evaluated
    r = s.sensitivity(pattern="kernel", levels=(0.0, 0.5), progress=False)
    assert r.layers == ["0", "2"] and r.pattern == "kernel"
    snap = s.snapshot()
    s.set_sparsity({"2": 0.5}, pattern="kernel")
    assert next(x for x in r.records if (x["layer"], x["level"]) == ("2", 0.5))["accuracy"] == s.evaluate()["accuracy"]
    s.restore(snap)
    # a recipe rebuilds the masks on a fresh session
    recipe = s.recipe()
    assert recipe["layers"]["2"]["pattern"] == "kernel"
    fresh, _ = conv_session()
    fresh.apply_recipe(recipe)
    assert all(torch.equal(fresh.mask(n), s.mask(n)) for n in ("0", "2", "5"))
    # the Lab's dropdown offers it and its sliders snap to whole kernels
    lab = pl.LabModel(s)
    assert ("kernels", "kernel") in lab.pattern_options()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lab.set_pattern("kernel")
    lab.set_layer("2", 0.3)
    assert s.pruned_counts["2"] == 14 * 9 and s.state.record("2").pattern == "kernel"


def test_a_registered_pattern_works_with_no_other_edit():
    """The extension point: a pattern that keeps every other output row, written here."""

    class Rows(Pattern):
        name, label = "even-rows", ""

        def fits(self, info):
            return len(info.shape) >= 2 and info.shape[0] % 2 == 0

        def levels(self, info=None):
            return [0.0, 0.5]

        def count(self, info, sparsity):
            self.check(info)
            return 0 if sparsity == 0 else info.n_params // 2

        def check_count(self, info, count):
            if count not in (0, info.n_params // 2):
                raise ValueError(f"layer {info.name!r}: half or nothing")

        def mask(self, info, count, keys, scores):
            keep = torch.zeros(info.shape, dtype=torch.bool)
            keep[::2] = True
            return keep

    pl.register_pattern(Rows())
    try:
        s, model = conv_session()
        s.set_sparsity({"2": 0.5}, pattern="even-rows")
        assert torch.equal(model[2].weight[1::2], torch.zeros_like(model[2].weight[1::2]))
        r = s.sensitivity(pattern="even-rows", progress=False)
        assert r.levels == [0.0, 0.5] and r.layers == ["0", "2", "5"]
    finally:
        PATTERNS._entries.pop("even-rows")
