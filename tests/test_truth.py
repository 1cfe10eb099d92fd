"""Every number true on the shapes real models have (issue: truth/core). Each test names the
bug it pins; each compares with an independent computation (a plain forward pass, a hand count)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prune_lab as pl
from tests import zoo_extra


def plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """The oracle: one plain forward pass, accuracy and cross-entropy over non-ignored targets."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(was)
    out = out["logits"] if isinstance(out, dict) else out
    logits, flat = out.reshape(-1, out.shape[-1]).double(), y.reshape(-1)
    valid = flat != -100
    acc = float(((logits.argmax(-1) == flat) & valid).sum()) / float(valid.sum())
    loss = float(F.cross_entropy(logits, flat, ignore_index=-100))
    return acc, loss


def assert_true_numbers(s: pl.Session, x: torch.Tensor, y: torch.Tensor) -> None:
    acc, loss = plain(s.model, x, y)
    ev = s.evaluate()
    assert ev["accuracy"] == acc
    assert ev["loss"] == pytest.approx(loss, rel=1e-6, abs=1e-6)  # float32 logits, float64 reference


def digits_xy(digits, n=200):
    x, y = digits.test.tensors
    return x[:n], y[:n]


# 1 ---------------------------------------------------------------------------------------------
def test_sweep_from_a_pruned_state_leaves_evaluate_true(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))
    x, y = digits_xy(digits)
    s = pl.Session(model, (x, y), device="cpu", check=False)
    s.set_sparsity({"1": 0.9})
    s.evaluate()
    r = s.sensitivity(levels=(0, 0.5), progress=False)
    assert_true_numbers(s, x, y)
    # a recorded point equals that layer alone at that level, the others as they were
    s.set_sparsity({"3": 0.5})
    expected = plain(model, x, y)[0]
    s.set_sparsity({"3": 0.0})
    point = [rec for rec in r.records if rec["layer"] == "3" and rec["level"] == 0.5][0]
    assert point["accuracy"] == expected
    assert r.reference["accuracy"] == plain(model, x, y)[0]
    assert_true_numbers(s, x, y)


# 2 ---------------------------------------------------------------------------------------------
def test_forward_with_an_optional_argument_is_traced_and_true(digits):
    torch.manual_seed(0)
    x, y = digits_xy(digits)
    s = pl.Session(zoo_extra.OptionalArg(), (x, y), device="cpu", check=False)
    assert s.evaluator.engine() is not None
    s.set_sparsity({"fc1": 0.7})
    assert_true_numbers(s, x, y)
    assert s.evaluator.counts["incremental"] >= 1 and s.evaluator.fallback_reason is None


def test_a_failing_traced_program_falls_back_to_full_passes(digits, capsys):
    torch.manual_seed(0)
    x, y = digits_xy(digits)
    s = pl.Session(zoo_extra.OptionalArg(), (x, y), device="cpu", check=False)
    engine = s.evaluator.engine()
    engine.outputs = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    s.set_sparsity({"fc1": 0.5})
    assert_true_numbers(s, x, y)
    assert "boom" in s.evaluator.fallback_reason and "full forward passes" in capsys.readouterr().out


# 3 ---------------------------------------------------------------------------------------------
def test_a_failing_metric_leaves_no_global_torch_state_changed(digits):
    x, y = digits_xy(digits)
    calls = {"n": 0}

    def flaky(out, t):
        calls["n"] += 1
        if calls["n"] > 1:  # the Session's own check passes; evaluations fail
            raise RuntimeError("metric failed")
        return (out.argmax(-1) == t).double().mean()

    torch.manual_seed(0)
    s = pl.Session(zoo_extra.Untraceable(), (x, y), device="cpu", metric=flaky, check=False)
    for limit in (None, 50):
        with pytest.raises(RuntimeError, match="metric failed"):
            s.evaluate(limit=limit)
        assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
    model = nn.Linear(64, 10)
    loss = F.cross_entropy(model(x.flatten(1)), y)
    loss.backward()  # training still works
    assert model.weight.grad is not None
    pl.Session(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), (x, y), device="cpu").set_sparsity({"1": 0.5})


# 4 ---------------------------------------------------------------------------------------------
def test_embedding_tied_to_the_head_is_recomputed_and_shown():
    torch.manual_seed(0)
    x, y = zoo_extra.lm_data()
    model = zoo_extra.TiedHeadLM()
    s = pl.Session(model, (x, y), device="cpu", check=False)
    assert s.evaluator.engine() is not None
    assert [i.name for i in s.layers] == ["mix", "head"]
    assert s.layer("head").aliases == ("emb.weight",)
    assert "tied with emb.weight" in repr(s)
    s.evaluate()
    s.set_sparsity({"head": 0.8})
    assert_true_numbers(s, x, y)
    assert int((model.emb.weight == 0).sum()) == round(0.8 * 12 * 16)


# 5 ---------------------------------------------------------------------------------------------
def test_attention_conv1d_rnn_and_raw_weights_are_prunable(digits):
    x, y = digits_xy(digits, 64)
    torch.manual_seed(0)
    s = pl.Session(zoo_extra.TinyTransformer(), (x, y), device="cpu")
    names = [i.name for i in s.layers]
    assert "attn.in_proj_weight" in names and "attn.out_proj" in names
    s.set_sparsity({"attn.in_proj_weight": 0.5})
    assert int((s.model.attn.in_proj_weight == 0).sum()) == round(0.5 * 3 * 16 * 16)
    assert_true_numbers(s, x, y)

    s = pl.Session(zoo_extra.GPT2Block(), (x, y), device="cpu")
    assert {"c_fc", "c_proj"} <= {i.name for i in s.layers}
    assert s.layer("c_fc").kind == "Conv1D"

    s = pl.Session(zoo_extra.LSTMClassifier(), (x, y), device="cpu")
    assert {"lstm.weight_ih_l0", "lstm.weight_hh_l0", "gru.weight_ih_l0", "gru.weight_hh_l0"} <= {i.name for i in s.layers}
    s.set_sparsity({"lstm.weight_hh_l0": 0.9})
    assert_true_numbers(s, x, y)

    s = pl.Session(zoo_extra.RawParam(), (x, y), device="cpu", extra_layers=["w"])
    assert s.layer("w").kind == "Parameter"
    s.set_sparsity({"w": 0.5})
    assert_true_numbers(s, x, y)


def test_coverage_says_what_is_not_prunable(digits):
    torch.manual_seed(0)
    model = zoo_extra.TinyTransformer()
    s = pl.Session(model, digits_xy(digits, 32), device="cpu")
    total = sum(p.numel() for p in model.parameters())
    covered = sum(i.n_params for i in s.layers)
    assert (s.coverage.total_params, s.coverage.prunable_params) == (total, covered)
    assert f"prunable: {covered / total:.0%} of the parameters ({covered:,} of {total:,})" in repr(s)
    assert ("pos", "TinyTransformer", 8 * 16, (8, 16)) in s.coverage.not_covered
    assert "pos (TinyTransformer, 128)" in repr(s.coverage) and "vectors: biases, norms, scales" in repr(s.coverage)
    with pytest.raises(ValueError, match="neither a parameter nor a module.*'pos'"):
        pl.Session(model, digits_xy(digits, 32), device="cpu", extra_layers=["poss"])
    with pytest.raises(TypeError, match="only floating-point"):
        m = zoo_extra.RawParam()
        m.register_parameter("ints", nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False))
        pl.Session(m, digits_xy(digits, 32), device="cpu", extra_layers=["ints"])


# 6 ---------------------------------------------------------------------------------------------
def test_macs_of_functionally_used_weights_are_counted(digits):
    torch.manual_seed(0)
    s = pl.Session(zoo_extra.TinyTransformer(), digits_xy(digits, 32), device="cpu")
    st = s.stats()
    tokens, dim = 8, 16  # one sample: 8 rows, each a token
    assert st.layers["attn.in_proj_weight"]["macs"] == tokens * 3 * dim * dim
    assert st.layers["attn.out_proj"]["macs"] == tokens * dim * dim
    assert st.layers["mlp.0"]["macs"] == tokens * dim * 2 * dim
    s.set_sparsity({"attn.in_proj_weight": 0.25, "attn.out_proj": 0.5})
    st = s.stats()
    nnz = int((s.model.attn.in_proj_weight != 0).sum())
    assert st.layers["attn.in_proj_weight"]["effective_macs"] == tokens * nnz
    assert st.layers["attn.out_proj"]["effective_macs"] == tokens * int((s.model.attn.out_proj.weight != 0).sum())

    s = pl.Session(zoo_extra.LSTMClassifier(), digits_xy(digits, 32), device="cpu")
    st = s.stats()
    assert st.layers["lstm.weight_ih_l0"]["macs"] == 8 * 4 * 12 * 8  # 8 steps, 4 gates x hidden x input
    assert st.layers["gru.weight_hh_l0"]["macs"] == 8 * 3 * 12 * 12
    s = pl.Session(zoo_extra.RawParam(), digits_xy(digits, 32), device="cpu", extra_layers=["w"])
    assert s.stats().layers["w"]["macs"] == 32 * 64


# 7 ---------------------------------------------------------------------------------------------
def test_sequence_logits_are_scored_per_token():
    torch.manual_seed(0)
    x, y = zoo_extra.lm_data()
    s = pl.Session(zoo_extra.TiedHeadLM(), (x, y), device="cpu", check=False)
    acc, loss = plain(s.model, x, y)
    ev = s.evaluate()
    assert 0 <= ev["accuracy"] <= 1 and ev["accuracy"] == acc
    assert ev["loss"] == pytest.approx(loss, rel=1e-6)
    ev = s.evaluate(limit=20)  # a preview weights tokens the same way
    assert ev["accuracy"] == plain(s.model, x[:20], y[:20])[0]


def test_logits_field_outputs_and_bad_outputs(digits):
    x, y = digits_xy(digits)
    torch.manual_seed(0)
    s = pl.Session(zoo_extra.LogitsOutput(), (x, y), device="cpu")
    assert_true_numbers(s, x, y)

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(x.flatten(1)), x

    with pytest.raises(ValueError, match=r"returns a tuple \(\(1, 10\), \(1, 1, 8, 8\)\).*metric="):
        pl.Session(Pair(), (x, y), device="cpu")

    class Regression(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 1)

        def forward(self, x):
            return self.fc(x.flatten(1))

    with pytest.raises(ValueError, match=r"returns \(1, 1\) for targets \(1,\).*metric="):
        pl.Session(Regression(), (x, y.float()), device="cpu")
    s = pl.Session(Regression(), (x, y.float()), device="cpu", metric=lambda o, t: -F.mse_loss(o[:, 0], t), loss_fn=None)
    assert math.isnan(s.evaluate()["loss"])
    with pytest.raises(ValueError, match=r"the default loss \(cross-entropy\) needs.*loss_fn=None"):
        pl.Session(Regression(), (x, y.float()), device="cpu", metric=lambda o, t: -F.mse_loss(o[:, 0], t))
    with pytest.raises(ValueError, match="the metric or loss fails.*RuntimeError"):
        pl.Session(Regression(), (x, y.float()), device="cpu", metric=lambda o, t: o.view(3), loss_fn=None)


# 8 ---------------------------------------------------------------------------------------------
def test_recipe_with_a_callable_criterion_reproduces_its_masks(digits, tmp_path):
    def row_l2(w, *, layer, seed):
        return w.norm(dim=1, keepdim=True).expand_as(w) + 1e-3 * w.abs()

    torch.manual_seed(0)
    model = zoo_extra.RawParam()
    s = pl.Session(model, digits_xy(digits, 32), device="cpu", extra_layers=["w"])
    s.set_sparsity({"w": 0.5, "out": 0.3}, criterion=row_l2)
    s.set_sparsity({"out": 0.3})  # a registered criterion: no mask stored
    paths = s.export(tmp_path / "m.pt", sparse=True)
    torch.manual_seed(0)
    fresh = pl.Session(zoo_extra.RawParam(), digits_xy(digits, 32), device="cpu", extra_layers=["w"])
    fresh.apply_recipe(paths["recipe"])
    for name in ("w", "out"):
        assert torch.equal(fresh.mask(name), s.mask(name))
    assert fresh.criteria["w"] == "row_l2"
    recipe = s.recipe()
    assert "mask" in recipe["layers"]["w"] and "mask" not in recipe["layers"]["out"]
    bad = dict(recipe, layers={**recipe["layers"], "w": {**recipe["layers"]["w"], "pruned": 3}})
    before = fresh.snapshot()
    with pytest.raises(ValueError, match="its mask zeroes 1024 weights, not 3"):
        fresh.apply_recipe(bad)
    assert fresh.snapshot() == before


# 9 ---------------------------------------------------------------------------------------------
def test_the_lab_follows_changes_made_elsewhere(demo_session):
    lab = pl.Lab(demo_session)
    demo_session.set_sparsity({"fc1": 0.6})  # another cell
    assert lab.sliders["fc1"].value == 60  # percent
    assert lab.global_slider.value == round(demo_session.total_sparsity() * 100)
    assert f"{demo_session.evaluate()['accuracy']:.2%}" in lab.labels["accuracy"].value


def test_the_lab_is_locked_while_a_sweep_holds_trial_masks(demo_session):
    lab = pl.Lab(demo_session)
    seen = []

    def during(change):
        if change["new"] == 2:
            seen.append({"export": lab.export_button.disabled, "lock": lab.locks["fc1"].disabled,
                         "select": lab.layer_select.disabled, "slider": lab.sliders["fc2"].disabled,
                         "stop": lab.stop_button.disabled, "max": lab.progress.max})
            with pytest.raises(RuntimeError, match="sweep"):
                demo_session.export("never.pt")
            lab.export()  # a click that slipped through: refused, shown, nothing written
            seen.append(lab.model.last_error)

    lab.progress.observe(during, names="value")
    lab.run_sensitivity(levels=[0.0, 0.5, 0.9])
    assert seen[0] == {"export": True, "lock": True, "select": True, "slider": True, "stop": False, "max": 15}
    assert isinstance(seen[1], RuntimeError)
    assert not lab.export_button.disabled and lab.stop_button.disabled


# 10 --------------------------------------------------------------------------------------------
def test_preview_policy_reads_a_recorded_duration_never_the_clock():
    from prune_lab.lab_model import PreviewPolicy

    p = PreviewPolicy("auto", frame_budget_s=0.05)
    assert not p.use_preview(dragging=True)  # nothing measured yet
    p.last_full_s = 0.2
    assert p.use_preview(dragging=True) and not p.use_preview(dragging=False)
    assert PreviewPolicy("always").use_preview(True) and not PreviewPolicy("never").use_preview(True)
    with pytest.raises(ValueError, match="preview must be"):
        PreviewPolicy("sometimes")


def test_macs_of_batched_products_with_a_broadcast_weight():
    class Batched(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 4))
            self.head = nn.Linear(15, 3)

        def forward(self, x):  # x: (B, 2, 4, 3): two groups per sample, the weight broadcast over them
            g = x.reshape(-1, 4, 3)
            h = torch.bmm(self.w.expand(g.shape[0], 5, 4), g)
            return self.head(h.reshape(x.shape[0], 2, 15).sum(1))

    torch.manual_seed(0)
    x, y = torch.randn(6, 2, 4, 3), torch.randint(0, 3, (6,))
    s = pl.Session(Batched(), (x, y), device="cpu", extra_layers=["w"])
    assert s.stats().layers["w"]["macs"] == 2 * 5 * 4 * 3  # per sample: 2 groups, 5x4 entries each at 3 columns
    s.set_sparsity({"w": 0.25})
    assert s.stats().layers["w"]["effective_macs"] == 2 * 15 * 3


def test_trial_evaluations_never_overwrite_the_cache(demo_session):
    s = demo_session
    s.set_sparsity({"fc1": 0.5})
    s.evaluate()
    s.sensitivity(levels=(0.0, 0.5, 0.9), progress=False)
    engine = s.evaluator.engine()
    before = dict(engine.stats)
    s.evaluate()  # the cache still holds the committed state: nothing is recomputed
    assert engine.stats["cached"] == before["cached"] + 1
    assert (engine.stats["incremental"], engine.stats["full"]) == (before["incremental"], before["full"])
