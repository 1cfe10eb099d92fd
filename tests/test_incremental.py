"""Incremental evaluation equals full forward passes on every architecture users bring."""
from __future__ import annotations

import pytest
import torch

import prune_lab as pl
from tests import zoo_extra

MODELS = zoo_extra.all_models()


def pair(kind, digits, **kw):
    torch.manual_seed(0)
    model = MODELS[kind](digits)
    data = (digits.test.tensors[0], digits.test.tensors[1])
    inc = pl.Session(model, data, device="cpu", batch_size=128, **kw)
    torch.manual_seed(0)
    ref_model = MODELS[kind](digits)
    ref = pl.Session(ref_model, data, device="cpu", batch_size=128, incremental=False)
    return inc, ref


def steps(session, seed=0):
    g = torch.Generator().manual_seed(seed)
    names = [i.name for i in session.layers]
    for _ in range(12):
        name = names[int(torch.randint(len(names), (1,), generator=g))]
        yield {name: float(torch.rand(1, generator=g)) * 0.95}


@pytest.mark.parametrize("kind", list(MODELS))
def test_incremental_equals_full(kind, digits):
    inc, ref = pair(kind, digits)
    assert inc.evaluator.engine() is not None, "these models must trace"
    assert inc.evaluate() == ref.evaluate()
    for spec in steps(inc):
        inc.set_sparsity(spec)
        ref.set_sparsity(spec)
        a, b = inc.evaluate(), ref.evaluate()
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert inc.evaluator.engine().stats["incremental"] >= 10
    inc.reset()
    ref.reset()
    assert inc.evaluate()["loss"] == pytest.approx(ref.evaluate()["loss"], abs=1e-6)


def test_tied_weights_used_functionally():
    data = zoo_extra.token_data()
    torch.manual_seed(0)
    inc = pl.Session(zoo_extra.TiedLM(), data, extra_layers=["emb"])
    torch.manual_seed(0)
    ref = pl.Session(zoo_extra.TiedLM(), data, extra_layers=["emb"], incremental=False)
    assert [i.name for i in inc.layers] == ["emb", "proj"]
    for s in (0.3, 0.7):
        for sess in (inc, ref):
            sess.set_sparsity({"emb": s})
        assert inc.evaluate()["loss"] == pytest.approx(ref.evaluate()["loss"], abs=1e-6)


def test_outside_changes_are_noticed(digits):
    """An optimizer step or a user edit outside the Session must not leave stale cached results."""
    inc, ref = pair("resnet", digits)
    inc.evaluate()
    with torch.no_grad():
        inc.model.bn.running_mean.add_(0.5)  # a buffer, not a prunable weight
        ref.model.bn.running_mean.add_(0.5)
    assert inc.evaluate()["loss"] == pytest.approx(ref.evaluate()["loss"], abs=1e-6)
    with torch.no_grad():
        inc.model.fc.weight.mul_(0.5)  # a prunable weight edited by hand
        ref.model.fc.weight.mul_(0.5)
    assert inc.evaluate()["loss"] == pytest.approx(ref.evaluate()["loss"], abs=1e-6)


def test_cache_budget_chunks_beyond_it(digits):
    inc, ref = pair("lenet5", digits, cache_budget_bytes=300_000)
    inc.evaluate()
    ev = inc.evaluator.engine()
    assert 0 < ev.cached_chunks < len(range(0, len(digits.test), 128))
    assert ev.cache_bytes() <= 300_000
    for spec in steps(inc, seed=1):
        inc.set_sparsity(spec)
        ref.set_sparsity(spec)
        assert inc.evaluate()["loss"] == pytest.approx(ref.evaluate()["loss"], abs=1e-6)


def test_untraceable_model_falls_back_with_notice(digits, capsys):
    s = pl.Session(zoo_extra.Untraceable(), digits.test)
    r = s.evaluate()
    assert s.evaluator.engine() is None
    out = capsys.readouterr().out
    assert out.count("cannot be traced") == 1 and "full forward passes" in out
    assert 0 <= r["accuracy"] <= 1


def test_changes_behind_the_sessions_back_are_noticed(demo):
    """Weights written by hand, a bias edited, a buffer swapped, the eval data edited in place:
    each invalidates what the cache was computed from."""
    import copy

    model, data = demo
    model = copy.deepcopy(model)
    x, y = (t.clone() for t in data.test.tensors)
    s = pl.Session(model, (x, y), device="cpu", check=False)
    from tests.oracles import plain

    def true() -> None:
        acc, loss = plain(model, x, y)
        ev = s.evaluate()
        assert ev["accuracy"] == acc and abs(ev["loss"] - loss) < 1e-6

    true()
    with torch.no_grad():
        model.fc1.weight[:5].zero_()  # a prunable weight, by hand
    true()
    with torch.no_grad():
        model.fc2.bias.add_(0.5)  # a parameter that is not a layer
    true()
    with torch.no_grad():
        x[:100].mul_(0.1)  # the eval data itself
    true()
