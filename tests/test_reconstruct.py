"""Weight reconstruction checked against independent computations: torch.linalg.lstsq on the kept
columns of X (exact), and a direct transcription of SparseGPT's published fasterprune (the fast path)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from prune_lab import reconstruct as rc


def _layer(rows: int, cols: int, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x = torch.randn(cols, samples, generator=g, dtype=torch.float64) * torch.rand(cols, 1, generator=g, dtype=torch.float64)
    return w, x, x @ x.T


def _random_keep(rows: int, cols: int, p: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, cols, generator=g) >= p


def test_exact_equals_lstsq_on_the_kept_columns():
    w, x, h = _layer(7, 12, 50, 0)
    keep = _random_keep(7, 12, 0.5, 1)
    got = rc.exact(w, h, keep, damp=0.0)
    for r in range(7):
        k = keep[r].nonzero().flatten()
        want = torch.zeros(12, dtype=torch.float64)
        # min_v || w_r X - v X_K ||: X_K^T v^T = X^T w_r^T
        want[k] = torch.linalg.lstsq(x[k].T, (w[r] @ x).unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(got[r], want, rtol=1e-8, atol=1e-8)


def test_exact_with_damping_solves_the_damped_system():
    w, _, h = _layer(5, 9, 30, 2)
    keep = _random_keep(5, 9, 0.4, 3)
    damp = 0.05
    hd = h + damp * torch.diagonal(h).mean() * torch.eye(9, dtype=torch.float64)
    got = rc.exact(w, h, keep, damp=damp)
    for r in range(5):
        k = keep[r].nonzero().flatten()
        want = torch.zeros(9, dtype=torch.float64)
        want[k] = torch.linalg.solve(hd[k][:, k], (hd @ w[r])[k])
        torch.testing.assert_close(got[r], want, rtol=1e-9, atol=1e-9)


def _published_sparsegpt(W, H, sparsity=0.0, prunen=0, prunem=0, blocksize=128, percdamp=0.01, mask=None):
    """IST-DASLab/sparsegpt, sparsegpt.py, SparseGPT.fasterprune, transcribed (float64, no
    quantizer). One change, marked: the unstructured block mask prunes exactly the block's share of
    the layer's count (the published ``tmp <= thresh`` prunes int(p * numel) + ties entries)."""
    W = W.clone()
    rows, columns = W.shape
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0  # (prune_lab keeps kept dead weights; the tests' layers have no dead inputs)
    Losses = torch.zeros(rows, dtype=W.dtype)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    count = round(sparsity * rows * columns)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count_b = count * i2 // columns - count * i1 // columns  # (changed: the exact share)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            if mask is not None:
                mask1 = mask[:, i1:i2]
            else:
                tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
                order = torch.sort(tmp.flatten(), stable=True).indices  # (changed: exactly count_b smallest)
                mask1 = torch.zeros(tmp.numel(), dtype=torch.bool)
                mask1[order[:count_b]] = True
                mask1 = mask1.reshape(tmp.shape)
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d ** 2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        Losses += torch.sum(Losses1, 1) / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


@pytest.mark.parametrize("cols,blocksize", [(40, 16), (64, 128), (50, 8)])
def test_sparsegpt_own_mask_equals_the_published_algorithm(cols, blocksize):
    w, _, h = _layer(6, cols, 80, cols)
    count = round(0.6 * w.numel())
    got, keep = rc.sparsegpt(w, h, count=count, blocksize=blocksize)
    want = _published_sparsegpt(w, h, sparsity=0.6, blocksize=blocksize)
    assert int((~keep).sum()) == count
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert torch.equal(keep, want != 0)


def test_sparsegpt_nm_equals_the_published_algorithm_and_keeps_n_of_m():
    w, _, h = _layer(8, 32, 64, 5)
    got, keep = rc.sparsegpt(w, h, n=2, m=4, blocksize=16)
    want = _published_sparsegpt(w, h, prunen=4 - 2, prunem=4, blocksize=16)  # prunen: pruned of every m
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert (keep.reshape(8, 8, 4).sum(-1) == 2).all()


def test_sparsegpt_with_a_given_mask_equals_the_published_algorithm():
    w, _, h = _layer(5, 24, 40, 6)
    keep = _random_keep(5, 24, 0.5, 7)
    got, kept = rc.sparsegpt(w, h, keep=keep, blocksize=8)
    want = _published_sparsegpt(w, h, mask=~keep, blocksize=8)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert torch.equal(kept, keep)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(2, 20), samples=st.integers(1, 40), p=st.floats(0.0, 0.95),
       seed=st.integers(0, 10_000))
def test_reconstruction_never_fits_worse_than_the_mask_alone(rows, cols, samples, p, seed):
    w, _, h = _layer(rows, cols, samples, seed)
    keep = _random_keep(rows, cols, p, seed + 1)
    masked = rc.error(w, w * keep, h)
    for w_hat in (rc.exact(w, h, keep), rc.no_worse(w, rc.sparsegpt(w, h, keep=keep, blocksize=8)[0], keep, h)):
        assert (rc.error(w, w_hat, h) <= masked * (1 + 1e-9) + 1e-9).all()
        assert torch.equal(w_hat[~keep], torch.zeros(int((~keep).sum()), dtype=w.dtype))


def test_exact_is_at_least_as_good_as_sparsegpt_with_the_same_mask():
    w, _, h = _layer(6, 30, 60, 8)
    keep = _random_keep(6, 30, 0.7, 9)
    ex, sg = rc.exact(w, h, keep, damp=0.0), rc.sparsegpt(w, h, keep=keep, damp=1e-9)[0]
    assert rc.error(w, ex, h).sum() <= rc.error(w, sg, h).sum() * (1 + 1e-9)
    assert rc.error(w, ex, h).sum() < rc.error(w, w * keep, h).sum()


def test_dead_inputs_leave_their_kept_weights_alone():
    w, x, _ = _layer(4, 10, 30, 10)
    x[3] = 0  # an input that is always zero (an image border pixel)
    h = x @ x.T
    keep = torch.ones(4, 10, dtype=torch.bool)
    keep[:, 5] = False
    for w_hat in (rc.exact(w, h, keep), rc.sparsegpt(w, h, keep=keep)[0]):
        torch.testing.assert_close(w_hat[:, 3], w[:, 3])


@pytest.mark.parametrize("kind,shape", [("Linear", (6, 8)), ("Conv2d", (4, 6, 3, 3)), ("Conv1D", (8, 5)), ("Conv1d", (3, 4, 5))])
def test_matrix_view_round_trips_and_puts_nm_groups_in_runs(kind, shape):
    from prune_lab.patterns import nm_mask
    from prune_lab.masks import ordered_keys

    w = torch.randn(shape)
    m = rc.to_matrix(w, kind)
    assert torch.equal(rc.from_matrix(m, shape, kind), w)
    keep = nm_mask(ordered_keys(w.abs()), shape, kind, 1, 2)
    km = rc.to_matrix(keep, kind)
    assert (km.reshape(km.shape[0], -1, 2).sum(-1) == 1).all()


def test_block_shares_sum_to_the_count():
    for count, cols, bs in [(0, 10, 3), (17, 10, 3), (1000, 128, 128), (5, 300, 128)]:
        shares = rc._block_counts(count, 7, cols, bs)
        assert sum(shares) == count and len(shares) == math.ceil(cols / bs)


def test_bad_arguments_are_refused_clearly():
    w, _, h = _layer(2, 8, 10, 11)
    with pytest.raises(ValueError, match="exactly one"):
        rc.sparsegpt(w, h)
    with pytest.raises(ValueError, match="multiple of M=3"):
        rc.sparsegpt(w, h, n=1, m=3, blocksize=8)
    with pytest.raises(ValueError, match="damp must be >= 0"):
        rc.exact(w, h, torch.ones(2, 8, dtype=torch.bool), damp=-1)


# ---------------------------------------------------------------------- through the Session and the state
import prune_lab as pl  # noqa: E402
from torch import nn  # noqa: E402


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc1 = nn.Linear(4 * 6 * 6, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


@pytest.fixture
def net_session():
    torch.manual_seed(0)
    net = _Net()
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    s = pl.Session(net, (torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))), device="cpu")
    s.calibrate((x, y), samples=64, batch_size=16, progress=False)
    return s, net, x


def _fc1_inputs(net: _Net, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.relu(net.conv(x)).flatten(1).double()  # (samples, 144): the dense model's fc1 inputs


def test_session_exact_equals_damped_lstsq_on_the_layers_own_inputs(net_session):
    """Independent oracle: the fc1 inputs of the dense model, and the damped objective
    ||w X - v X_K||^2 + lam ||w_K - v||^2 solved by lstsq on the stacked system."""
    s, net, x = net_session
    w = s.original_weight("fc1").double()
    X = _fc1_inputs(net, x)  # rows are samples
    lam = rc.DAMP * float((X ** 2).sum(0).mean())
    s.set_sparsity({"fc1": 0.6}, reconstruct="exact")
    keep = s.mask("fc1")
    live = net.fc1.weight.detach().double()
    for r in range(16):
        k = keep[r].nonzero().flatten()
        a = torch.cat([X[:, k], lam ** 0.5 * torch.eye(len(k), dtype=torch.float64)])
        b = torch.cat([X @ w[r], lam ** 0.5 * w[r, k]])
        want = torch.zeros(144, dtype=torch.float64)
        want[k] = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(live[r], want, rtol=1e-4, atol=1e-6)
    assert s.pruned_counts["fc1"] == round(0.6 * 16 * 144) == int((live == 0).sum())
    # the mask is magnitude's: reconstruction changes the kept values, not which are kept
    assert torch.equal(keep, pl.masks.k_smallest_mask(w.abs(), round(0.6 * 16 * 144)))


@pytest.mark.parametrize("how", [dict(reconstruct="exact"), dict(reconstruct="sparsegpt"), dict(criterion="sparsegpt"),
                                 dict(criterion="wanda", reconstruct=True)])
def test_reconstruction_fits_the_inputs_better_than_the_mask_and_reset_is_bit_exact(net_session, how):
    s, net, x = net_session
    before = {k: v.clone() for k, v in net.state_dict().items()}
    X = _fc1_inputs(net, x)
    dense_out = X @ s.original_weight("fc1").double().T
    s.set_sparsity({"fc1": 0.8, "conv": 0.5}, **how)
    live = net.fc1.weight.detach().double()
    masked = s.original_weight("fc1").double() * s.mask("fc1")
    assert ((dense_out - X @ live.T) ** 2).sum() < ((dense_out - X @ masked.T) ** 2).sum()
    conv = lambda w: torch.nn.functional.conv2d(x.double(), w.double())  # noqa: E731  (the conv's columns: in x kh x kw)
    ref = conv(s.original_weight("conv"))
    assert ((ref - conv(net.conv.weight.detach())) ** 2).sum() < ((ref - conv(s.original_weight("conv") * s.mask("conv"))) ** 2).sum()
    assert s.pruned_counts == {"conv": 18, "fc1": round(0.8 * 16 * 144), "fc2": 0}
    st = s.stats()
    assert st.layers["fc1"]["nonzeros"] == int((net.fc1.weight != 0).sum()) == 16 * 144 - s.pruned_counts["fc1"]
    snap = s.snapshot()
    s.reset()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    s.restore(snap)
    torch.testing.assert_close(net.fc1.weight.detach().double(), live, rtol=0, atol=0)
    s.set_sparsity({"fc1": 0.8})  # the same mask without the refit: the magnitude values come back
    if how.get("criterion") is None:
        assert torch.equal(net.fc1.weight.detach(), s.original_weight("fc1") * s.mask("fc1"))


def test_sparsegpt_criterion_takes_every_pattern_it_can_choose_itself(net_session):
    s, net, _ = net_session
    s.set_sparsity({"fc1": 0.5, "fc2": 0.5}, criterion="sparsegpt", pattern="2:4")
    for name in ("fc1", "fc2"):
        keep = s.mask(name)
        assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all()
        assert torch.equal(s.model.get_submodule(name).weight != 0, keep)
    s.set_global_sparsity(0.7, criterion="sparsegpt")
    assert sum(s.pruned_counts.values()) == round(0.7 * sum(i.n_params for i in s.layers))


def test_reconstruction_refusals_name_the_fix_and_change_nothing(net_session):
    s, net, _ = net_session
    fresh = pl.Session(_Net(), (torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))), device="cpu")
    with pytest.raises(ValueError, match=r"reconstruction refits .* call calibrate\(train_data\) first"):
        fresh.set_sparsity({"fc1": 0.5}, reconstruct=True)
    assert fresh.pruned_counts["fc1"] == 0
    before = net.fc1.weight.detach().clone()
    with pytest.raises(ValueError, match="pattern 'channels' removes channels"):
        s.set_sparsity({"fc1": 0.5}, pattern="channels", reconstruct=True)
    with pytest.raises(ValueError, match="criterion 'sparsegpt' chooses unstructured or N:M masks itself, not pattern 'kernel'"):
        s.set_sparsity({"conv": 0.5}, pattern="kernel", criterion="sparsegpt")
    with pytest.raises(ValueError, match="reconstruct must be True, False or one of 'exact', 'sparsegpt', 'auto', got 'obs'"):
        s.set_sparsity({"fc1": 0.5}, reconstruct="obs")
    assert torch.equal(net.fc1.weight, before) and s.pruned_counts["fc1"] == 0
    s.set_sparsity({"conv": 0.5}, pattern="kernel", reconstruct=True)  # a kernel mask can be refitted
    assert s.state.record("conv").reconstruct == "exact"


def test_a_layer_without_refittable_inputs_is_named():
    class Emb(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.head = nn.Linear(8, 20)

        def forward(self, t):
            return self.head(self.emb(t)).mean(1)

    torch.manual_seed(0)
    t, y = torch.randint(0, 20, (16, 5)), torch.randint(0, 20, (16,))
    s = pl.Session(Emb(), (t[:8], y[:8]), device="cpu", extra_layers=["emb.weight"])
    s.calibrate((t[8:], y[8:]), samples=8, progress=False)
    s.set_sparsity({"head": 0.5}, reconstruct=True)  # the Linear head is served
    with pytest.raises(ValueError, match=r"layer 'emb' \(a Embedding\): reconstruction refits weights from the inputs of nn.Linear"):
        s.set_sparsity({"emb": 0.5}, reconstruct=True)
    assert s.pruned_counts["emb"] == 0


def test_gram_budget_is_stated_in_bytes(net_session, monkeypatch):
    from prune_lab import calibration

    s, _, x = net_session
    monkeypatch.setattr(calibration, "GRAM_BUDGET_BYTES", 1000)
    s.calibrate((x, torch.zeros(64, dtype=torch.long)), samples=32, progress=False)
    with pytest.raises(ValueError, match=r"reconstruction needs 168,584 bytes .*layer 'fc1' alone 165,888 B, 144 columns"):
        s.set_sparsity({"fc1": 0.5}, reconstruct=True)


def test_sensitivity_with_reconstruction_measures_what_set_sparsity_gives(net_session):
    s, net, _ = net_session
    before = {k: v.clone() for k, v in net.state_dict().items()}
    res = s.sensitivity(levels=[0.0, 0.5, 0.9], layers=["fc1"], reconstruct=True, progress=False)
    assert res.reconstruct == "auto" or res.reconstruct == "exact" or res.reconstruct
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    for rec in res.records:
        s.set_sparsity({"fc1": rec["level"]}, reconstruct=True)
        assert s.evaluate()["loss"] == rec["loss"]
        s.reset()
    with pytest.raises(ValueError, match="runs in this process only"):
        s.sensitivity(levels=[0.5], layers=["fc1"], reconstruct=True, executor="ray", progress=False)


def test_recipe_refits_from_its_mask_and_the_calibration(net_session):
    s, net, x = net_session
    s.set_sparsity({"fc1": 0.7}, criterion="sparsegpt")
    recipe = s.recipe()
    assert recipe["layers"]["fc1"]["reconstruct"] == "sparsegpt" and "mask" in recipe["layers"]["fc1"]
    live = net.fc1.weight.detach().clone()
    s.reset()
    s.apply_recipe(recipe)
    assert torch.equal(net.fc1.weight.detach(), live)


def test_stats_report_the_refit_error_against_the_layers_own_inputs(net_session):
    s, net, x = net_session
    assert s.stats().total["refit_error"] is None
    s.set_sparsity({"fc1": 0.8}, reconstruct=True)
    X = _fc1_inputs(net, x)
    w = s.original_weight("fc1").double()
    ref = X @ w.T
    signal = float((ref ** 2).sum())
    refit = float(((ref - X @ net.fc1.weight.detach().double().T) ** 2).sum()) / signal
    masked = float(((ref - X @ (w * s.mask("fc1")).T) ** 2).sum()) / signal
    st = s.stats()
    assert st.layers["fc1"]["refit_error"] == pytest.approx(refit, rel=1e-6)
    assert st.layers["fc1"]["mask_error"] == pytest.approx(masked, rel=1e-6)
    assert st.total["refit_error"] == pytest.approx(refit, rel=1e-6) and st.layers["conv"]["refit_error"] is None
    assert refit < masked
