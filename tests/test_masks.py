"""Mask invariants: exact counts, deterministic ties, nesting, multi-tensor == concatenation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from prune_lab.masks import count_to_prune, k_smallest_mask, k_smallest_masks, magnitude_keys, ordered_keys

# small value sets force many ties; floats include negatives, zeros and -0.0
values = st.one_of(
    st.sampled_from([-2.0, -1.0, -0.0, 0.0, 0.5, 1.0, 3.0]),
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32),
)
tensors = st.lists(values, min_size=1, max_size=200).map(lambda v: torch.tensor(v, dtype=torch.float32))


def reference_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Independent reference: numpy stable sort by (value, index), prune the first k."""
    a = scores.reshape(-1).double().numpy() + 0.0  # -0.0 == 0.0
    order = np.lexsort((np.arange(a.size), a))
    keep = np.ones(a.size, dtype=bool)
    keep[order[:k]] = False
    return torch.from_numpy(keep).reshape(scores.shape)


METHODS = pytest.mark.parametrize("method", ["radix", "sort"])


@METHODS
@given(tensors, st.data())
def test_exact_count_and_reference(method, t, data):
    k = data.draw(st.integers(0, t.numel()))
    mask = k_smallest_mask(t, k, method)
    assert int((~mask).sum()) == k
    assert torch.equal(mask, reference_mask(t, k))


@METHODS
@given(tensors)
def test_masks_nest_as_k_grows(method, t):
    prev = torch.ones_like(t, dtype=torch.bool)
    for k in range(t.numel() + 1):
        mask = k_smallest_mask(t, k, method)
        assert not bool((mask & ~prev).any()), "a weight pruned at smaller k came back"
        prev = mask


@given(tensors, st.data())
def test_idempotent(t, data):
    k = data.draw(st.integers(0, t.numel()))
    assert torch.equal(k_smallest_mask(t, k), k_smallest_mask(t.clone(), k))


@METHODS
@given(st.lists(tensors, min_size=1, max_size=5), st.data())
def test_many_tensors_equal_concatenation(method, ts, data):
    total = sum(t.numel() for t in ts)
    k = data.draw(st.integers(0, total))
    masks = k_smallest_masks([ordered_keys(t) for t in ts], k, [t.shape for t in ts], method)
    ref = reference_mask(torch.cat(ts), k)
    assert torch.equal(torch.cat(masks), ref)


@given(tensors)
def test_ordered_keys_preserve_order(t):
    keys = ordered_keys(t).numpy()
    a = t.numpy() + 0.0
    i, j = np.meshgrid(np.arange(a.size), np.arange(a.size))
    assert np.array_equal(a[i] < a[j], keys[i] < keys[j])
    assert np.array_equal(a[i] == a[j], keys[i] == keys[j])


@given(tensors)
def test_magnitude_keys_order_abs(t):
    keys = magnitude_keys(t).numpy()
    a = np.abs(t.numpy())
    i, j = np.meshgrid(np.arange(a.size), np.arange(a.size))
    assert np.array_equal(a[i] < a[j], keys[i] < keys[j])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64])
def test_other_dtypes(dtype):
    t = (torch.randn(500, generator=torch.Generator().manual_seed(1)) * 100).to(dtype)
    for k in (0, 1, 250, 499, 500):
        for method in ("radix", "sort"):
            assert torch.equal(k_smallest_mask(t, k, method), reference_mask(t.double(), k))


def test_large_tensor_matches_topk():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(300_000, generator=g)
    for k in (1, 150_000, 299_999):
        ref = torch.ones(t.numel(), dtype=torch.bool)
        ref[torch.topk(t, k, largest=False).indices] = False
        assert torch.equal(k_smallest_mask(t, k), ref)


def test_k_out_of_range():
    with pytest.raises(ValueError, match=r"k must be in \[0, 3\]"):
        k_smallest_mask(torch.ones(3), 4)


@pytest.mark.parametrize("s,n,expected", [(0.5, 3, 2), (0.25, 2, 0), (0.9, 100, 90), (1.0, 7, 7), (0.0, 7, 0)])
def test_count_rounds_like_torch(s, n, expected):
    from torch.nn.utils.prune import _compute_nparams_toprune

    assert count_to_prune(s, n) == expected == _compute_nparams_toprune(s, n)
