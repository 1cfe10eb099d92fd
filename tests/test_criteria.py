"""Data-aware criteria against independent computations: autograd on a copy of the model,
per-sample gradients one sample at a time, the exact Hessian, explicit loops over features."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prune_lab as pl
from prune_lab.masks import k_smallest_mask


class SmallConvNet(nn.Module):
    """A grouped conv, a plain conv and a Linear: every way Wanda unfolds its inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, stride=2, groups=2)
        self.fc = nn.Linear(4 * 3 * 3, 10)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        h = torch.tanh(self.grouped(h))
        return self.fc(h.flatten(1))


@pytest.fixture
def setup(digits):
    torch.manual_seed(0)
    model = SmallConvNet()
    x, y = digits.train.tensors
    s = pl.Session(model, digits.test, device="cpu")
    return s, model, (x[:40], y[:40])


def test_taylor_meangrad_gradient_equals_autograd_on_a_copy(setup):
    s, model, (x, y) = setup
    s.calibrate((x, y), samples=40, batch_size=16, criteria=["taylor-meangrad"], progress=False)
    ref = copy.deepcopy(model).eval()
    loss = F.cross_entropy(ref(x), y)
    grads = torch.autograd.grad(loss, [ref.conv.weight, ref.grouped.weight, ref.fc.weight])
    for name, g in zip(("conv", "grouped", "fc"), grads):
        assert torch.allclose(s.state.calibration.layer(name).grad, g, rtol=1e-4, atol=1e-7)  # batch sums in float32
    s.set_sparsity({"fc": 0.5}, criterion="taylor-meangrad")
    scores = (ref.fc.weight * grads[2]).abs()
    assert torch.equal(s.mask("fc"), k_smallest_mask(scores.double(), 180))


def test_taylor_is_the_mean_over_minibatches_of_the_squared_first_order_term(setup):
    """Molchanov et al. 2019: per minibatch b, (g_b * w)^2 with g_b the gradient of b's mean loss
    (autograd on a copy, batches of 16, 16 and 8 samples), averaged over the batches."""
    s, model, (x, y) = setup
    s.calibrate((x, y), samples=40, batch_size=16, criteria=["taylor"], progress=False)
    ref = copy.deepcopy(model).eval()
    params = [ref.conv.weight, ref.grouped.weight, ref.fc.weight]
    batches = [torch.autograd.grad(F.cross_entropy(ref(x[b : b + 16]), y[b : b + 16]), params) for b in (0, 16, 32)]
    for j, name in enumerate(("conv", "grouped", "fc")):
        w = params[j].detach().double()
        want = sum((g[j].double() * w) ** 2 for g in batches) / 3
        got = pl.criteria.get_criterion("taylor").scores_fn(s.original_weight(name), layer=name, seed=0,
                                                           stats=s.state.calibration.layer(name))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-12)
    s.set_sparsity({"fc": 0.5}, criterion="taylor")
    want_fc = sum((g[2].double() * params[2].detach().double()) ** 2 for g in batches) / 3
    got_fc = pl.criteria.get_criterion("taylor").scores_fn(s.original_weight("fc"), layer="fc", seed=0,
                                                          stats=s.state.calibration.layer("fc"))
    assert torch.equal(s.mask("fc"), k_smallest_mask(got_fc, 180))
    assert int((s.mask("fc") == k_smallest_mask(want_fc, 180)).sum()) >= s.mask("fc").numel() - 2  # float32 sums: ties at most


def test_fisher_equals_per_sample_gradients_squared_and_averaged(setup):
    s, model, (x, y) = setup
    s.calibrate((x, y), samples=40, batch_size=16, criteria=["obd"], progress=False)
    ref = copy.deepcopy(model).eval()
    total = [torch.zeros_like(p) for p in (ref.conv.weight, ref.grouped.weight, ref.fc.weight)]
    for i in range(len(x)):
        gs = torch.autograd.grad(F.cross_entropy(ref(x[i : i + 1]), y[i : i + 1]), [ref.conv.weight, ref.grouped.weight, ref.fc.weight])
        for t, g in zip(total, gs):
            t += g ** 2
    for name, t in zip(("conv", "grouped", "fc"), total):
        assert torch.allclose(s.state.calibration.layer(name).fisher, t / len(x), rtol=1e-4, atol=1e-9)
    s.set_sparsity({"grouped": 0.25}, criterion="obd")
    scores = 0.5 * (total[1] / len(x)) * ref.grouped.weight ** 2
    assert torch.equal(s.mask("grouped"), k_smallest_mask(scores.double(), round(0.25 * 72)))


def test_hutchinson_is_z_times_hz_of_the_exact_hessian(digits):
    """With the exact Hessian H (torch.autograd.functional.hessian) and the same Rademacher
    probes z, Hutchinson's estimate is mean(z * H z) to float precision; it is an unbiased
    estimate of diag(H), so more probes bring it closer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x, y = digits.train.tensors[0][:32], digits.train.tensors[1][:32]
    w = model[1].weight

    def loss_of(flat):
        return F.cross_entropy(F.linear(x.flatten(1), flat.reshape(w.shape), model[1].bias), y)

    H = torch.autograd.functional.hessian(loss_of, w.detach().reshape(-1))
    errors = []
    for probes in (10, 400):
        s = pl.Session(model, digits.test, device="cpu")
        s.calibrate((x, y), samples=32, batch_size=32, hessian="hutchinson", probes=probes, seed=3, criteria=["obd"], progress=False)
        est = s.state.calibration.layer("1").hessian
        g = torch.Generator().manual_seed(3)
        zs = [(torch.randint(0, 2, w.shape, generator=g) * 2 - 1).float().reshape(-1) for _ in range(probes)]
        expected = sum(z * (H @ z) for z in zs) / probes
        assert torch.allclose(est.reshape(-1), expected, rtol=1e-4, atol=1e-7)
        err2 = float(((est.reshape(-1) - H.diagonal()) ** 2).sum())
        # the stated tolerance: E[squared error] = sum_i sum_{j != i} H_ij^2 / probes exactly, for
        # Rademacher probes; the observed error stays within 4x that expectation
        off = H - torch.diag(H.diagonal())
        assert err2 <= 4 * float((off ** 2).sum()) / probes
        errors.append(err2)
    assert errors[1] < errors[0]


def test_wanda_norms_and_masks_equal_an_explicit_loop(setup):
    s, model, (x, y) = setup
    s.calibrate((x, y), samples=40, batch_size=16, criteria=["wanda"], progress=False)
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        h1 = torch.tanh(ref.conv(x))
        h2 = torch.tanh(ref.grouped(h1))
    # Linear: ||X_j|| over samples
    expect_fc = torch.tensor([sum(float(h2.flatten(1)[n, j]) ** 2 for n in range(len(x))) for j in range(36)]).sqrt()
    assert torch.allclose(s.state.calibration.layer("fc").act_norm, expect_fc.expand(10, 36), rtol=1e-5)
    # grouped conv: output o reads input channels of its group; feature (c, ki, kj) over samples and positions
    norms = torch.zeros(4, 2, 3, 3)
    for o in range(4):
        g = o // 2
        for c in range(2):
            for ki in range(3):
                for kj in range(3):
                    total = 0.0
                    for oi in range(3):
                        for oj in range(3):
                            total += float((h1[:, g * 2 + c, oi * 2 + ki, oj * 2 + kj] ** 2).sum())
                    norms[o, c, ki, kj] = total ** 0.5
    assert torch.allclose(s.state.calibration.layer("grouped").act_norm, norms, rtol=1e-5)
    # the mask: every output row loses the same number of weights, its lowest |W| * ||X||
    s.set_sparsity({"fc": 0.5}, criterion="wanda")
    scores = ref.fc.weight.abs() * expect_fc
    keep = s.mask("fc")
    for row in range(10):
        assert int((~keep[row]).sum()) == 18
        assert torch.equal(~keep[row], scores[row] <= scores[row].sort().values[17])


def test_calibration_is_cached_and_recomputed_after_finetuning(setup, digits):
    s, model, data = setup
    s.calibrate(data, samples=40, progress=False)
    s.calibrate(data, samples=40, progress=False)
    assert s.calibration_passes == 0  # nothing is computed before a criterion needs it
    s.set_sparsity({"fc": 0.5}, criterion="taylor")
    s.set_sparsity({"fc": 0.7}, criterion="taylor")
    s.set_sparsity({"conv": 0.5}, criterion="taylor")
    assert s.calibration_passes == 1
    s.finetune(data, steps=2, progress=False)
    s.set_sparsity({"fc": 0.6}, criterion="taylor")  # the base weights changed: re-calibrated first
    assert s.calibration_passes == 2
    s.calibrate(data, samples=40, progress=False)
    s.set_sparsity({"fc": 0.5}, criterion="taylor")
    assert s.calibration_passes == 2
    s.calibrate(data, samples=20, progress=False)  # other data: recomputed at the next use
    s.set_sparsity({"fc": 0.6}, criterion="taylor")
    assert s.calibration_passes == 3


def test_calibration_holds_at_most_one_copy_of_the_weights(setup):
    """Only the statistics of the criterion in use are held: switching criterion recomputes
    them from the stored samples (the same numbers), and drops the others."""
    s, model, data = setup
    weight_bytes = sum(i.n_params * 4 for i in s.layers)
    s.calibrate(data, samples=40, progress=False)
    cal = s.state.calibration
    assert cal.nbytes() == 0
    s.set_sparsity({"fc": 0.5}, criterion="taylor")
    first_grad = cal.layer("fc").batch_grad_sq.clone()
    assert cal.needs == ("batch_grad_sq",) and cal.nbytes() == weight_bytes
    for criterion, held in (("obd", ("fisher",)), ("wanda", ("act_norm",)), ("taylor", ("batch_grad_sq",))):
        s.set_sparsity({"fc": 0.5}, criterion=criterion)
        assert cal.needs == held and cal.nbytes() == weight_bytes
    assert torch.equal(cal.layer("fc").batch_grad_sq, first_grad)
    assert s.calibration_passes == 4
    s.calibrate(data, samples=40, criteria=["taylor", "obd", "wanda"], progress=False)  # asked for: all kept
    assert cal.needs == ("act_norm", "fisher", "batch_grad_sq") and cal.nbytes() == 3 * weight_bytes
    for criterion in ("obd", "wanda", "taylor"):
        s.set_sparsity({"fc": 0.5}, criterion=criterion)
    assert cal.needs == ("act_norm", "fisher", "batch_grad_sq") and s.calibration_passes == 5


def test_closed_form_fisher_equals_the_per_sample_path(digits):
    """The hooks' closed forms (Linear on 2-D and token inputs, Conv1d, Conv2d with groups,
    GPT-2's Conv1D) against torch.func per-sample gradients of the same weights."""
    from prune_lab.calibration import _closed_form_owners, collect, default_loss, per_sample_sq_gradient
    from tests import zoo_extra

    torch.manual_seed(0)

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(8, 6, 3, padding=2, dilation=2, stride=2)
            self.c2 = nn.Conv2d(1, 4, 3, padding=1)
            self.g2 = nn.Conv2d(4, 6, 3, stride=2, groups=2)
            self.tok = nn.Linear(6, 5)
            self.fc = nn.Linear(5 * 9 + 6 * 4, 10)

        def forward(self, x):
            img = torch.tanh(self.g2(torch.tanh(self.c2(x))))  # (N, 6, 3, 3)
            seq = torch.tanh(self.c1(x.reshape(len(x), 8, 8)))  # (N, 6, 4)
            t = torch.tanh(self.tok(torch.cat([img.flatten(2), seq], 2).transpose(1, 2)))  # (N, 13, 5)
            return self.fc(torch.cat([t[:, :9].flatten(1), seq.flatten(1)], 1))

    class Twice(nn.Module):  # a module run twice per sample: its hook sees neither use alone
        def __init__(self):
            super().__init__()
            self.shared, self.out = nn.Linear(64, 64), nn.Linear(64, 10)

        def forward(self, x):
            return self.out(torch.tanh(self.shared(torch.tanh(self.shared(x.flatten(1))))))

    x, y = digits.train.tensors[0][:20], digits.train.tensors[1][:20]
    for model, data, hooked in ((Mixed(), (x, y), {"c1", "c2", "g2", "tok", "fc"}), (Twice(), (x, y), {"shared", "out"}),
                                (zoo_extra.GPT2Block(), (x, y), {"embed", "c_fc", "c_proj", "head"})):
        s = pl.Session(model, data, device="cpu")
        assert set(_closed_form_owners(model, s.layers)) == hooked
        params = {i.name: s.state.weights[i.name] for i in s.layers}
        got = collect(model, params, x, y, ("fisher",), default_loss, 8, s.layers)["fisher"]
        ref = per_sample_sq_gradient(model, {i.param: s.state.weights[i.name] for i in s.layers}, x, y, default_loss, 8)
        for i in s.layers:
            assert torch.allclose(got[i.name], ref[i.param], rtol=1e-4, atol=1e-10), i.name


def test_a_nested_trial_restores_the_enclosing_trials_masks(setup):
    s, model, data = setup
    st = s.state
    s.set_sparsity({"fc": 0.5})
    recorded = model.fc.weight.detach().clone()
    m = torch.zeros(st.info("fc").shape, dtype=torch.bool)
    m[0] = True
    with st.trial({"fc": m}):
        outer = model.fc.weight.detach().clone()
        with st.trial({"fc": None}):
            assert torch.equal(model.fc.weight, st.base("fc"))
        assert torch.equal(model.fc.weight, outer)
    assert torch.equal(model.fc.weight, recorded)


def test_a_sweep_by_a_data_aware_criterion_computes_its_statistics_inside_the_sweep(setup):
    """First use inside a sensitivity sweep (a trial): the dense pass nests in the sweep's trial
    and the sweep's numbers equal plain forward passes of the same masks."""
    from tests.oracles import plain

    s, model, data = setup
    s.set_sparsity({"conv": 0.5})
    s.calibrate(data, samples=40, progress=False)
    r = s.sensitivity(levels=(0.5,), criterion="obd", layers=["fc"], progress=False)
    assert s.calibration_passes == 1 and s.sparsity["fc"] == 0.0
    s.set_sparsity({"fc": 0.5}, criterion="obd")
    x, y = s.data.inputs, s.data.targets
    assert float(r.table()[0, 0]) == plain(model, x, y)[0]


def test_data_aware_criteria_need_calibration_and_training_data(setup, digits):
    s, model, data = setup
    before = s.snapshot()
    with pytest.raises(ValueError, match=r"calibrate\(train_data\)"):
        s.set_sparsity({"fc": 0.5}, criterion="taylor")
    with pytest.raises(ValueError, match=r"calibrate\(train_data\)"):
        s.set_global_sparsity(0.5, criterion="wanda")
    with pytest.raises(ValueError, match=r"strategies with obd, taylor need calibrate\(train_data\) first"):
        s.tradeoff(strategies=["global/taylor", "lamp/obd"], compressions=(2,), cache=False, progress=False)
    assert s.snapshot() == before
    with pytest.warns(UserWarning, match="eval data makes the accuracy it reports optimistic"):
        s.calibrate(digits.test, samples=64, progress=False)
    with pytest.raises(ValueError, match="hessian must be"):
        s.calibrate(data, hessian="exact")


def test_interrupted_calibration_changes_nothing(setup, monkeypatch):
    s, model, data = setup
    s.set_sparsity({"fc": 0.5})
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    import prune_lab.calibration as cal

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cal, "collect", interrupted)
    with pytest.raises(KeyboardInterrupt):
        s.calibrate(data, criteria=["taylor"], progress=False)
    assert s.state.calibration is None
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    s.calibrate(data, progress=False)  # computed at first use: interrupted there, nothing changes either
    before = s.snapshot()
    with pytest.raises(KeyboardInterrupt):
        s.set_sparsity({"conv": 0.5}, criterion="obd")
    assert s.snapshot() == before and s.state.calibration.needs == ()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("criterion", ["taylor", "obd", "wanda"])
def test_every_workflow_works_with_data_aware_criteria(setup, criterion, tmp_path):
    s, model, data = setup
    s.calibrate(data, samples=40, progress=False)
    total = sum(i.n_params for i in s.layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for allocation in ("uniform", "global", "erk", "lamp", "random"):
            s.set_global_sparsity(0.6, allocation=allocation, criterion=criterion)
            assert sum(s.pruned_counts.values()) == round(0.6 * total)
    s.set_global_sparsity(0.6, allocation="uniform", criterion=criterion)  # ("random" allocation masks at random)
    r = s.sensitivity(levels=(0.0, 0.5), criterion=criterion, progress=False)
    assert r.complete and r.criterion == criterion
    paths = s.export(tmp_path / "m.pt")
    recipe = pl.load_recipe(paths["recipe"])
    pruned = [n for n, e in recipe["layers"].items() if e["pruned"]]
    assert all("mask" in recipe["layers"][n] and "calibration_sha256" in recipe["layers"][n] for n in pruned)
    torch.manual_seed(0)
    fresh = pl.Session(SmallConvNet(), (s.data.inputs, s.data.targets), device="cpu")
    fresh.apply_recipe(paths["recipe"])  # no calibration needed: the masks travel in the recipe
    for name in pruned:
        assert torch.equal(fresh.mask(name), s.mask(name))
    t = s.tradeoff(strategies=[f"uniform/{criterion}", "uniform"], compressions=(2,), cache=False, progress=False)
    assert [r_["strategy"] for r_ in t.records] == [f"uniform/{criterion}", "uniform"]
    ft = s.finetune(data, steps=2, schedule="iterative", target_sparsity=0.5, rounds=2, criterion=criterion, progress=False)
    assert s.criteria["fc"] == criterion and len(ft.evaluations) == 2


@pytest.mark.parametrize("kind", ["resnet", "skip_concat_reuse", "depthwise_grouped_inplace", "attention", "lstm",
                                  "gpt2_block", "raw_param", "tied_embedding_head", "untraceable"])
def test_every_architecture_calibrates_and_prunes_with_every_criterion(kind, digits):
    from tests import zoo_extra
    from tests.conftest import zoo_model
    from tests.oracles import plain

    torch.manual_seed(0)
    if kind == "tied_embedding_head":
        model, (x, y) = zoo_extra.TiedHeadLM(), zoo_extra.lm_data(24)
        train, extra = zoo_extra.lm_data(24, seed=1), ()
    else:
        model = {"resnet": lambda: zoo_model("resnet", digits), "skip_concat_reuse": zoo_extra.SkipConcat,
                 "depthwise_grouped_inplace": zoo_extra.DepthwiseGrouped, "attention": zoo_extra.TinyTransformer,
                 "lstm": zoo_extra.LSTMClassifier, "gpt2_block": zoo_extra.GPT2Block, "raw_param": zoo_extra.RawParam,
                 "untraceable": zoo_extra.Untraceable}[kind]()
        x, y = digits.test.tensors[0][:32], digits.test.tensors[1][:32]
        train, extra = (digits.train.tensors[0][:24], digits.train.tensors[1][:24]), (["w"] if kind == "raw_param" else ())
    s = pl.Session(model, (x, y), device="cpu", extra_layers=extra)
    s.calibrate(train, samples=24, batch_size=8, criteria=["taylor", "obd", "wanda"], progress=False)
    for name in (i.name for i in s.layers):
        st = s.state.calibration.layer(name)
        for t in (st.act_norm, st.batch_grad_sq, st.fisher):
            assert t.shape == s.layer(name).shape and bool(torch.isfinite(t).all())
        assert float(st.act_norm.sum()) > 0  # every weight's inputs were seen
    total = sum(i.n_params for i in s.layers)
    for criterion in ("taylor", "obd", "wanda"):
        s.set_global_sparsity(0.5, allocation="uniform", criterion=criterion)
        assert sum(s.pruned_counts.values()) == round(0.5 * total)
        assert s.evaluate()["accuracy"] == plain(model, x, y)[0]


def test_a_user_criterion_asks_for_statistics(setup):
    s, model, data = setup
    from prune_lab.criteria import CRITERIA

    @pl.register_criterion("grad_only", needs=("grad",))
    def grad_only(weight, *, layer, seed, stats):
        return stats.grad.abs()

    try:
        with pytest.raises(ValueError, match=r"calibrate\(train_data\)"):
            s.set_sparsity({"fc": 0.5}, criterion="grad_only")
        s.calibrate(data, samples=40, criteria=["grad_only"], progress=False)
        assert s.state.calibration.needs == ("grad",)  # only what was asked for
        s.set_sparsity({"fc": 0.5}, criterion="grad_only")
        g = s.state.calibration.layer("fc").grad
        assert torch.equal(s.mask("fc"), k_smallest_mask(g.abs(), 180))
        s.set_sparsity({"conv": 0.5}, criterion="obd")  # computed on first use; the gradients asked for stay
        assert s.state.calibration.needs == ("grad", "fisher")
        with pytest.raises(ValueError, match="unknown statistics"):
            pl.register_criterion("bad", needs=("hessian_full",))
    finally:
        CRITERIA._entries.pop("grad_only", None)
