"""Quantization against its definitions written out here: uniform is round(w / scale) * scale
with scale = max|w_c| / (2**(bits-1) - 1) per output channel; k-means is Lloyd's algorithm from
a linear initialisation, every kept weight at its nearest centroid; pruned weights stay 0."""
from __future__ import annotations

import pytest
import torch

from prune_lab.quantize import check_bits, quantize


def test_uniform_is_round_to_the_channel_scale_written_out():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, generator=g)
    keep = torch.rand(5, 7, generator=g) > 0.3
    q = quantize(w, keep, 4, "uniform")
    for c in range(5):
        scale = float((w[c] * keep[c]).abs().max()) / 7
        expect = torch.round(w[c] / scale) * scale * keep[c]
        assert torch.allclose(q.values[c], expect, atol=1e-6, rtol=0)
        assert float(q.codebook[c]) == pytest.approx(scale, rel=1e-6)
        kept = keep[c]
        assert float((q.values[c][kept] - w[c][kept]).abs().max()) <= scale / 2 + 1e-6  # at most half a step
    assert int(q.codes.abs().max()) <= 7 and torch.equal(q.values[~keep], torch.zeros(int((~keep).sum())))


def test_kmeans_holds_at_most_2_to_the_bits_values_each_kept_weight_at_its_nearest_centroid():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 9, generator=g)
    keep = torch.rand(64, 9, generator=g) > 0.5
    q = quantize(w, keep, 3, "kmeans")
    assert q.codebook.numel() == 8 and torch.equal(q.codebook, torch.sort(q.codebook).values)
    kept_values = q.values[keep]
    assert len(torch.unique(kept_values)) <= 8
    nearest = q.codebook[(w[keep].unsqueeze(1) - q.codebook.unsqueeze(0)).abs().argmin(1)]
    assert torch.equal(kept_values, nearest)
    assert torch.equal(q.values[~keep], torch.zeros(int((~keep).sum())))
    # Lloyd's fixed point: every used centroid is the mean of the kept weights assigned to it
    for c in range(8):
        assigned = w[keep][(q.codes[keep] == c)]
        if len(assigned):
            assert float(q.codebook[c]) == pytest.approx(float(assigned.mean()), abs=1e-5)


def test_bad_bits_and_methods_name_what_is_valid():
    with pytest.raises(ValueError, match=r"layer 'fc1': bits=3 is not supported by 'uniform' quantization; use one of 2, 4, 8"):
        check_bits(3, "uniform", "fc1")
    with pytest.raises(ValueError, match="quantization method 'log': use one of uniform, kmeans"):
        check_bits(4, "log")
    with pytest.raises(ValueError, match="bits=True"):
        check_bits(True, "kmeans")
