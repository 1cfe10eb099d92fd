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


class _Attention(torch.nn.Module):
    """MHA with dropout beside a TransformerEncoder: both take PyTorch's fused path in eval mode."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(16, 2, dropout=0.3, batch_first=True)
        layer = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.2, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

    def forward(self, x):
        y, _ = self.attn(x, x, x, need_weights=False)
        return self.encoder(y)


def test_attention_products_are_counted_on_torch_without_the_fastpath_switch(monkeypatch):
    """torch < 2.4 has no torch.backends.mha switch: the attention modules alone go to training
    mode with attention dropout 0, which counts the same products and computes the same outputs."""
    from prune_lab.measure import weight_uses

    torch.manual_seed(0)
    model = _Attention().eval()
    x = torch.randn(2, 5, 16)
    weights = {n: p for n, p in model.named_parameters() if p.dim() == 2}
    with torch.no_grad():
        expected = model(x)
        uses, out = weight_uses(model, weights, x)
        monkeypatch.setattr("prune_lab.measure._fastpath_switch", lambda: None)  # as on torch < 2.4
        old_uses, old_out = weight_uses(model, weights, x)
    assert old_uses == uses and all(uses[n] for n in weights)  # every projection's product seen
    assert torch.allclose(old_out, expected, atol=1e-6) and torch.allclose(out, expected, atol=1e-6)
    assert not model.training and not any(m.training for m in model.modules())  # put back
    assert model.attn.dropout == 0.3
    from prune_lab.measure import unfused

    layer = model.encoder.layers[0]
    with unfused(model):  # (torch 2.13 skips the fused path under a dispatch mode anyway: look inside)
        assert model.attn.training and model.attn.dropout == 0.0 and layer.training and layer.self_attn.dropout == 0.0
        assert not layer.dropout1.training and not layer.linear1.training and not model.training
