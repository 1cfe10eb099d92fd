"""Exports round-trip; recipes reproduce masks; the torch.nn.utils.prune bridge agrees."""
from __future__ import annotations

import json

import pytest
import torch

import prune_lab as pl
from tests.conftest import snapshot, state_equal, zoo_model


@pytest.mark.parametrize("sparse", [False, True])
def test_export_roundtrips_into_fresh_architecture(demo_session, digits, tmp_path, sparse):
    demo_session.set_global_sparsity(0.85)
    paths = demo_session.export(tmp_path / "m.pt", sparse=sparse)
    fresh = pl.models.lenet5(digits, pl.models.DEMO_CHANNELS)
    fresh.load_state_dict(pl.load_state_dict(paths["model"]))
    assert state_equal(fresh.state_dict(), snapshot(demo_session.model))
    if not sparse:  # a dense export is a plain state_dict
        assert state_equal(torch.load(paths["model"], weights_only=True), snapshot(demo_session.model))


def test_recipe_on_fresh_copy_reproduces_masks(demo, tmp_path):
    model, data = demo
    s = pl.Session(model, data.test, device="cpu")
    s.set_global_sparsity(0.7)
    s.set_sparsity({"fc3": 0.2}, criterion="random", seed=7)
    paths = s.export(tmp_path / "m.pt")
    recipe = json.loads(paths["recipe"].read_text())
    assert recipe["layers"]["fc3"]["criterion"] == "random"
    assert recipe["prune_lab_version"] == pl.__version__
    copy = pl.models.lenet5(data, pl.models.DEMO_CHANNELS)
    copy.load_state_dict(s.original_state())
    s2 = pl.Session(copy, data.test, device="cpu").apply_recipe(paths["recipe"])
    for info in s.layers:
        assert torch.equal(s.mask(info.name), s2.mask(info.name)), info.name
    assert state_equal(snapshot(copy), snapshot(model))
    s.reset()


def test_to_torch_prune_bridge(demo_session, digits):
    demo_session.set_global_sparsity(0.6)
    fresh = pl.models.lenet5(digits, pl.models.DEMO_CHANNELS)
    fresh.load_state_dict(demo_session.original_state())
    demo_session.to_torch_prune(fresh)
    for info in demo_session.layers:
        m = fresh.get_submodule(info.name)
        assert torch.equal(m.weight_mask.bool(), demo_session.mask(info.name))
        assert torch.equal(m.weight, demo_session.model.get_submodule(info.name).weight)
    x = digits.test.tensors[0][:16]
    with torch.no_grad():
        assert torch.equal(fresh(x), demo_session.model(x))


# ------------------------------------------------------------------ bad recipes
@pytest.mark.parametrize(
    "content,match",
    [
        ("{not json", "not valid JSON"),
        ('{"layers": {}}', "not a prune_lab recipe"),
        ('{"prune_lab_recipe": 1, "layers": {"fc1": {"shape": [120, 64], "pruned": -1, "criterion": "magnitude"}}}', "prunes -1 of 7680"),
        ('{"prune_lab_recipe": 1, "layers": {"fc1": {"shape": [120, 64], "pruned": "x", "criterion": "magnitude"}}}', "'pruned' of type int"),
        ('{"prune_lab_recipe": 99, "prune_lab_version": "9.0.0", "layers": {}}', "newer|Upgrade"),
        ('{"prune_lab_recipe": 1, "prune_lab_version": "99.0", "layers": {"a": {}}}', "Upgrade prune_lab"),
    ],
)
def test_malformed_recipe_is_clear_error_and_session_unchanged(demo_session, tmp_path, content, match):
    demo_session.set_sparsity({"fc1": 0.4})
    before = snapshot(demo_session.model)
    p = tmp_path / "r.json"
    p.write_text(content)
    with pytest.raises(ValueError, match=match):
        demo_session.apply_recipe(p)
    assert state_equal(snapshot(demo_session.model), before)
    assert demo_session.pruned_counts["fc1"] == round(0.4 * 7680)


def test_recipe_from_other_architecture(demo_session, digits, tmp_path):
    other = pl.Session(zoo_model("mlp", digits), digits.test, device="cpu")
    other.set_global_sparsity(0.5)
    path = other.export(tmp_path / "mlp.pt")["recipe"]
    before = snapshot(demo_session.model)
    with pytest.raises(ValueError, match="another architecture"):
        demo_session.apply_recipe(path)
    assert state_equal(snapshot(demo_session.model), before)


def test_recipe_unknown_criterion_leaves_session_unchanged(demo_session):
    r = demo_session.recipe()
    r["layers"]["fc1"]["criterion"] = "magnitud"
    r["layers"]["fc1"]["pruned"] = 100
    with pytest.raises(ValueError, match="unknown criterion 'magnitud'.*'magnitude'"):
        demo_session.apply_recipe(r)
    assert demo_session.pruned_counts["fc1"] == 0


def test_files_in_the_earlier_sparse_format_still_load(demo_session, tmp_path):
    from prune_lab.export import sparse_bytes

    demo_session.set_sparsity({"fc1": 0.97, "conv2": 0.5})
    state = demo_session.model.state_dict()
    path = tmp_path / "old.pt"
    path.write_bytes(sparse_bytes(state, {i.param for i in demo_session.layers}))
    loaded = pl.load_state_dict(path)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
