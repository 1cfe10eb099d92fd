"""Attention heads (``heads.py``, ``pattern="heads"``): masks equal the compact model, MACs drop by
exactly the hand-counted amount, scores by hand, bad input refused with the state unchanged."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prune_lab as pl
from prune_lab.heads import PrunedMultiheadAttention, remove_heads
from prune_lab.measure import model_macs

T, D, H = 12, 32, 4  # tokens, width, heads
DH = D // H


def gpt_session(seed: int = 0) -> pl.Session:
    torch.manual_seed(seed)
    tokens = torch.randint(0, 20, (16, T + 1))
    data = torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])
    model = pl.models.TinyGPT(20, T, d=D, heads=H, layers=2)
    return pl.Session(model, data)


class Encoder(nn.Module):
    """nn.TransformerEncoder (nn.MultiheadAttention inside) over a sequence, mean-pooled."""

    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Linear(6, D)
        layer = nn.TransformerEncoderLayer(D, H, 2 * D, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.fc = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        if not self.batch_first:
            return self.fc(self.enc(h.transpose(0, 1)).mean(0))
        return self.fc(self.enc(h).mean(1))


def encoder_session(batch_first: bool = True) -> pl.Session:
    torch.manual_seed(1)
    x, y = torch.randn(24, 7, 6), torch.randint(0, 3, (24,))
    return pl.Session(Encoder(batch_first), torch.utils.data.TensorDataset(x, y))


def masked_by_hand(model: nn.Module, attn: str, heads: list[int]) -> nn.Module:
    """Independent oracle: zero head h's q/k/v rows (and biases) and o columns by hand."""
    import copy

    twin = copy.deepcopy(model)
    m = twin.get_submodule(attn)
    with torch.no_grad():
        for h in heads:
            rows = slice(h * DH, (h + 1) * DH)
            if isinstance(m, nn.MultiheadAttention):
                for part in range(3):
                    r = slice(part * D + h * DH, part * D + (h + 1) * DH)
                    m.in_proj_weight[r] = 0
                    m.in_proj_bias[r] = 0
                m.out_proj.weight[:, rows] = 0
            else:
                for lin in (m.q, m.k, m.v):
                    lin.weight[rows] = 0
                    lin.bias[rows] = 0
                m.o.weight[:, rows] = 0
    return twin


def test_gpt_heads_are_found_and_masks_match_the_hand_masked_model():
    s = gpt_session()
    assert s.heads == {"blocks.0.attn": (H, H), "blocks.1.attn": (H, H)}
    assert s.groups.heads["blocks.0.attn"].layers == ("blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v",
                                                      "blocks.0.attn.o")
    s.set_sparsity({"blocks.0.attn": 0.5}, pattern="heads")
    removed = (~s.channel_keep("blocks.0.attn")).nonzero().flatten().tolist()
    assert len(removed) == 2 and s.heads["blocks.0.attn"] == (2, H)
    x = s.data.sample(4)[0]
    oracle = masked_by_hand(_dense(s), "blocks.0.attn", removed)
    with torch.no_grad():
        assert torch.equal(s.model(x), oracle(x))


def _dense(s: pl.Session) -> nn.Module:
    import copy

    snap = s.snapshot()
    s.reset()
    dense = copy.deepcopy(s.model)
    s.restore(snap)
    return dense


@pytest.mark.parametrize("fraction,k", [(0.25, 1), (0.5, 2), (0.75, 3)])
def test_compact_gpt_equals_masks_and_drops_exactly_the_counted_macs(fraction, k):
    s = gpt_session()
    x = s.data.sample(1)[0]
    dense_macs = model_macs(s.model, x)
    # hand count per token: q, k, v (D x D) and o (D x D), the MLP (D x 4D twice), the head (D x 20)
    per_block = 4 * D * D + 2 * D * 4 * D
    assert dense_macs == T * (2 * per_block + D * 20)
    s.set_sparsity({"blocks.1.attn": fraction}, pattern="heads")
    small = s.compact()
    attn = small.blocks[1].attn
    assert attn.heads == H - k and attn.q.out_features == (H - k) * DH and attn.o.in_features == (H - k) * DH
    xs = s.data.sample(8)[0]
    with torch.no_grad():
        torch.testing.assert_close(small(xs), s.model(xs), rtol=0, atol=1e-5)
    # removing k heads removes k * (3 D DH + DH D) multiply-adds per token, nothing else
    assert dense_macs - model_macs(small, x) == k * T * (3 * D * DH + DH * D)
    assert s.last_compact.compact["macs"] == dense_macs - k * T * 4 * D * DH
    assert s.stats().total["effective_macs"] == dense_macs - k * T * 4 * D * DH


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_heads_compact_to_the_masked_model(batch_first):
    s = encoder_session(batch_first)
    assert set(s.heads) == {"enc.layers.0.self_attn", "enc.layers.1.self_attn"}
    s.set_global_sparsity(0.5, pattern="heads", allocation="uniform")
    assert s.heads == {"enc.layers.0.self_attn": (2, H), "enc.layers.1.self_attn": (2, H)}
    removed = (~s.channel_keep("enc.layers.0.self_attn")).nonzero().flatten().tolist()
    x = s.data.sample(5)[0]
    with torch.no_grad():
        oracle = masked_by_hand(_dense(s), "enc.layers.0.self_attn", removed)
        oracle = masked_by_hand(oracle, "enc.layers.1.self_attn",
                                (~s.channel_keep("enc.layers.1.self_attn")).nonzero().flatten().tolist())
        torch.testing.assert_close(s.model(x), oracle(x), rtol=0, atol=1e-6)
    small = s.compact()
    assert isinstance(small.enc.layers[0].self_attn, PrunedMultiheadAttention)
    assert small.enc.layers[0].self_attn.in_proj_weight.shape == (3 * 2 * DH, D)
    with torch.no_grad():
        torch.testing.assert_close(small(x), s.model(x), rtol=0, atol=1e-5)
    assert s.last_compact.dense["macs"] - s.last_compact.compact["macs"] == 2 * 2 * 7 * 4 * D * DH


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
def test_pruned_mha_follows_masks_and_per_head_3d_masks():
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(D, H, batch_first=True).eval()
    q, kv = torch.randn(2, 5, D), torch.randn(2, 6, D)
    pad = torch.tensor([[False] * 5 + [True], [False] * 6])
    per_head = torch.randn(2 * H, 5, 6)
    holder = nn.Module()
    holder.attn = mha
    masked = masked_by_hand(holder, "attn", [1, 2]).attn
    small = remove_heads(holder, {"attn": [1, 2]}).attn
    assert isinstance(small, PrunedMultiheadAttention) and small.kept == [0, 3]
    with torch.no_grad():
        for kwargs in ({}, {"key_padding_mask": pad}, {"attn_mask": torch.rand(5, 6) > 0.7},
                       {"attn_mask": per_head, "key_padding_mask": pad}):
            want = masked(q, kv, kv, need_weights=False, **kwargs)[0]
            got = small(q, kv, kv, need_weights=False, **kwargs)[0]
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            got_w, weights = small(q, kv, kv, need_weights=True, **kwargs)
            torch.testing.assert_close(got_w, want, rtol=0, atol=1e-5)
            per = masked(q, kv, kv, need_weights=True, average_attn_weights=False, **kwargs)[1]
            torch.testing.assert_close(weights, per[:, [0, 3]].mean(1), rtol=0, atol=1e-6)  # the heads that remain
            torch.testing.assert_close(small(q, kv, kv, average_attn_weights=False, **kwargs)[1], per[:, [0, 3]],
                                       rtol=0, atol=1e-6)
        # unbatched input, as nn.MultiheadAttention takes it
        torch.testing.assert_close(small(q[0], kv[0], kv[0])[0], masked(q[0], kv[0], kv[0])[0], rtol=0, atol=1e-5)


def test_head_scores_are_the_l1_norm_of_each_heads_entries():
    s = gpt_session()
    a = s.model.blocks[0].attn
    rows = lambda t, h: t.detach().double()[h * DH:(h + 1) * DH].abs().sum()  # noqa: E731
    want = torch.tensor([float(sum(rows(lin.weight, h) + rows(lin.bias, h) for lin in (a.q, a.k, a.v))
                               + a.o.weight.detach().double()[:, h * DH:(h + 1) * DH].abs().sum()) for h in range(H)],
                        dtype=torch.float64)
    torch.testing.assert_close(s.channel_scores("blocks.0.attn", "l1"), want, rtol=1e-12, atol=1e-9)
    s.set_sparsity({"blocks.0.attn.v": 0.25}, pattern="heads", criterion="l1")  # a projection names its module
    assert (~s.channel_keep("blocks.0.attn")).nonzero().flatten().tolist() == [int(want.argmin())]


def test_head_sweep_points_equal_separate_evaluations():
    s = gpt_session()
    r = s.sensitivity(pattern="heads", levels=[0.0, 0.25, 0.5], progress=False)
    assert r.layers == ["blocks.0.attn", "blocks.1.attn"] and r.n_params == {"blocks.0.attn": H, "blocks.1.attn": H}
    for name in r.layers:
        for level, value in r.curve(name):
            s.set_sparsity({name: level}, pattern="heads")
            assert s.evaluate()["accuracy"] == value
            s.reset()


def test_reset_recipe_and_saved_compact_model_round_trip(tmp_path):
    s = gpt_session()
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    s.set_sparsity({"blocks.0.attn": 0.25, "blocks.1.attn": 0.5}, pattern="heads")
    recipe = s.recipe()
    small = s.compact()
    path = pl.save_compact(small, tmp_path / "small.pt")
    fresh = pl.models.TinyGPT(20, T, d=D, heads=H, layers=2)
    loaded = pl.load_compact(path, fresh)
    x = s.data.sample(4)[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    assert loaded.blocks[1].attn.heads == 2
    s.reset()
    assert all(torch.equal(v, before[k]) for k, v in s.model.state_dict().items())
    s.apply_recipe(recipe)
    assert s.heads == {"blocks.0.attn": (3, H), "blocks.1.attn": (2, H)}


def test_bad_head_requests_are_refused_and_change_nothing():
    s = gpt_session()
    s.set_sparsity({"blocks.0.attn": 0.25}, pattern="heads")
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'blocks\.0\.atn' is not an attention module.*Did you mean 'blocks\.0\.attn'"):
        s.set_sparsity({"blocks.0.atn": 0.5}, pattern="heads")
    with pytest.raises(ValueError, match=r"would remove every one of its 4 heads.*at most 3 can go"):
        s.set_sparsity({"blocks.1.attn": 1.0}, pattern="heads")
    with pytest.raises(ValueError, match=r"not an attention module"):
        s.set_sparsity({"blocks.0.fc1": 0.5}, pattern="heads")
    assert all(torch.equal(v, before[k]) for k, v in s.model.state_dict().items())
    assert s.heads["blocks.0.attn"] == (3, H)


class WidthHeads(nn.Module):
    """Attention that takes the head size from the model width (``d // heads``): fewer heads
    cannot run, so it must not be offered."""

    def __init__(self):
        super().__init__()
        self.heads = H
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        split = lambda z: z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(y.transpose(1, 2).reshape(b, t, d)).mean(1)


def test_attention_that_cannot_lose_heads_is_excluded_with_the_reason():
    torch.manual_seed(0)
    s = pl.Session(nn.Sequential(WidthHeads()), (torch.randn(8, 5, D), torch.randint(0, D, (8,))))
    assert s.heads == {}
    assert "forward fails with a head removed" in s.groups.heads_excluded["0"]
    with pytest.raises(ValueError, match="no head group: its forward fails"):
        s.set_sparsity({"0": 0.5}, pattern="heads")


def test_lenet_has_no_heads_and_the_lab_says_so():
    model, data = pl.demo()
    s = pl.Session(model, data.test)
    assert s.heads == {}
    lm = pl.LabModel(s)
    with pytest.raises(ValueError, match="no attention heads"):
        lm.set_pattern("heads")
    assert lm.pattern == "unstructured"


def test_lab_sliders_move_heads():
    s = gpt_session()
    lm = pl.LabModel(s)
    lm.set_pattern("heads")
    lm.set_layer("blocks.0.attn.k", 0.5)
    assert s.heads["blocks.0.attn"] == (2, H)
    assert lm.channel_text("blocks.0.attn.o") == "2 of 4 heads of blocks.0.attn"
    assert lm.channel_fraction("blocks.0.fc1") is None
    lm.set_global(0.25)
    assert s.heads == {"blocks.0.attn": (3, H), "blocks.1.attn": (3, H)}
    assert lm.channel_total() == 0.25
    lm.undo()
    assert s.heads["blocks.0.attn"] == (2, H)
    assert math.isclose(lm.channel_total(), 2 / 8)
