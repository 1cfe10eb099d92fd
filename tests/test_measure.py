"""stats(): every number checked against an independent count."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import prune_lab as pl
from tests.conftest import zoo_model


def test_lenet5_macs_by_hand(digits):
    s = pl.Session(zoo_model("lenet5", digits), digits.test, device="cpu")
    st = s.stats()
    # digits 8x8, 3x3 kernels: conv1 keeps 8x8, pool -> 4x4, conv2 (pad 1) keeps 4x4
    assert st.layers["conv1"]["macs"] == 6 * 1 * 3 * 3 * 8 * 8
    assert st.layers["conv2"]["macs"] == 16 * 6 * 3 * 3 * 4 * 4
    assert st.layers["fc1"]["macs"] == 64 * 120
    assert st.layers["fc3"]["macs"] == 84 * 10


def test_resnet_macs_by_hand(digits):
    s = pl.Session(zoo_model("resnet", digits), digits.test, device="cpu")
    m = s.stats().layers
    assert m["stem"]["macs"] == 16 * 9 * 64  # 8x8 output
    assert m["layers.1.conv1"]["macs"] == 32 * 16 * 9 * 16  # stride 2 -> 4x4
    assert m["layers.1.shortcut.0"]["macs"] == 32 * 16 * 16
    assert m["layers.2.conv2"]["macs"] == 64 * 64 * 9 * 4  # 2x2


def test_grouped_depthwise_transpose_and_sequence_macs():
    model = nn.Sequential(
        nn.Conv1d(4, 8, 3, padding=1, groups=2),  # grouped
        nn.Conv1d(8, 8, 3, padding=1, groups=8),  # depthwise
        nn.ConvTranspose1d(8, 4, 2, stride=2),
    )
    x = torch.randn(5, 4, 10)
    s = pl.Session(model, (x, torch.zeros(5, dtype=torch.long)), loss_fn=None, metric=lambda o, t: o.mean())
    m = s.stats().layers
    assert m["0"]["macs"] == 8 * (4 // 2) * 3 * 10
    assert m["1"]["macs"] == 8 * 1 * 3 * 10
    assert m["2"]["macs"] == 10 * 8 * 4 * 2  # each input position scatters in*out*k
    lin = nn.Linear(6, 3)
    s2 = pl.Session(lin, (torch.randn(4, 7, 6), torch.zeros(4, dtype=torch.long)), loss_fn=None, metric=lambda o, t: o.mean())
    assert s2.stats().layers[""]["macs"] == 6 * 3 * 7  # once per token


def test_effective_macs_and_nonzeros_follow_masks(demo_session):
    demo_session.set_sparsity({"conv2": 0.5, "fc1": 0.9})
    st = demo_session.stats()
    model = demo_session.model
    for info in demo_session.layers:
        w = model.get_submodule(info.name).weight
        nnz = sum(1 for v in w.detach().reshape(-1).tolist() if v != 0.0)  # independent count
        row = st.layers[info.name]
        assert row["nonzeros"] == nnz
        assert row["params"] == w.numel()
        assert row["sparsity"] == pytest.approx(1 - nnz / w.numel())
        assert row["effective_macs"] * row["params"] == row["macs"] * nnz
        assert row["dense_bytes"] == w.numel() * 4
    assert st.total["nonzeros"] == sum(r["nonzeros"] for r in st.layers.values())
    all_params = list(model.parameters())
    assert st.total["model_params"] == sum(p.numel() for p in all_params)
    assert st.total["speedup"] == pytest.approx(st.total["macs"] / st.total["effective_macs"])


def test_sparse_bytes_are_actual_encoded_and_file_sizes(demo_session, tmp_path):
    """Each pruned layer's share of the compressed export: its Huffman-coded gaps (whole bytes)
    and its float32 values; an unpruned layer is stored raw; the totals are the files' lengths."""
    from tests.oracles import gaps, huffman_total_bits

    demo_session.set_sparsity({"conv1": 0.3, "fc1": 0.97, "fc2": 0.6})
    st = demo_session.stats()
    for info in demo_session.layers:
        w = demo_session.model.get_submodule(info.name).weight
        if demo_session.pruned_counts[info.name]:
            g = gaps(w)
            expected = -(-huffman_total_bits(g) // 8) + len(g) * 4
        else:
            expected = w.numel() * 4
        assert st.layers[info.name]["sparse_bytes"] == expected, info.name
    assert st.layers["fc1"]["sparse_bytes"] < st.layers["fc1"]["dense_bytes"] / 10
    assert st.layers["fc3"]["sparse_bytes"] == st.layers["fc3"]["dense_bytes"]  # a dense layer is stored raw
    sparse = demo_session.export(tmp_path / "sparse.pt", sparse=True)["model"]
    dense = demo_session.export(tmp_path / "dense.pt")["model"]
    assert st.total["sparse_file_bytes"] == sparse.stat().st_size
    assert st.total["dense_file_bytes"] == dense.stat().st_size
    assert st.total["file_compression"] == pytest.approx(dense.stat().st_size / sparse.stat().st_size)
    loaded = pl.load_state_dict(sparse)
    assert all(torch.equal(loaded[k], v) for k, v in demo_session.model.state_dict().items())


def test_bitmap_vs_index_layout_choice():
    from prune_lab.export import decode_sparse, encode_sparse, sparse_payload_bytes

    n = 10_000
    for nnz, layout in [(9_800, "dense"), (5_000, "bitmap"), (100, "indices")]:
        t = torch.zeros(n)
        t[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:nnz]] = torch.rand(nnz) + 0.1
        enc = encode_sparse(t.reshape(100, 100))
        assert enc["layout"] == layout
        assert torch.equal(decode_sparse(enc), t.reshape(100, 100))
        expected = {"dense": n * 4, "bitmap": math.ceil(n / 8) + nnz * 4, "indices": nnz * 8}[layout]
        assert sparse_payload_bytes(n, nnz, 4) == expected


def test_weight_uses_count_every_sample_and_position():
    from prune_lab.measure import count_macs, weight_uses

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    tconv = torch.nn.ConvTranspose2d(4, 2, 2, stride=2)
    model = torch.nn.Sequential(conv, tconv)
    uses, out = weight_uses(model, {"conv": conv.weight, "tconv": tconv.weight}, torch.randn(2, 3, 5, 5))
    assert out.shape == (2, 2, 10, 10)
    assert count_macs(conv.weight, uses["conv"]) == (4 * 3 * 9 * 2 * 25,) * 2  # every entry at 2 x 25 positions
    assert count_macs(tconv.weight, uses["tconv"]) == (4 * 2 * 4 * 2 * 25,) * 2  # transposed: at every input position
    uses, _ = weight_uses(conv, {"conv": conv.weight}, torch.randn(3, 5, 5))  # unbatched input
    assert count_macs(conv.weight, uses["conv"])[0] == 4 * 3 * 9 * 25
