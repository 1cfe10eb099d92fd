"""Channel pruning through the Session and physical removal: the masked model, the compact
model, a plain forward pass and counts written out by hand must all agree."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import prune_lab as pl
from tests import zoo_extra as z
from tests.conftest import state_equal, zoo_model
from tests.test_groups import GroupedMiddle


def images(n=64, seed=0, shape=(1, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


MODELS = {
    "mlp": lambda d: zoo_model("mlp", d),
    "lenet5": lambda d: zoo_model("lenet5", d),
    "resnet": lambda d: zoo_model("resnet", d),  # residual adds, BatchNorm, strided shortcuts
    "densenet_concat": lambda d: z.DenseBlock(),
    "mobilenet_depthwise_se": lambda d: z.MobileSE(),
    "grouped_conv": lambda d: GroupedMiddle(),
    "pointwise_grouped": lambda d: z.PointwiseGrouped(),
    "resnext": lambda d: z.ResNeXtBlock(),
    "regnet": lambda d: z.RegNetBlock(),
    "transformer_mlp": lambda d: z.TinyTransformer(),
    "vit": lambda d: z.ViTMasked(),
    "convnext": lambda d: z.ConvNeXtBlock(),
}


def _max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    a.eval(), b.eval()
    with torch.no_grad():
        ya, yb = a(x).double(), b(x).double()
    return float((ya - yb).abs().max()), float(ya.abs().max())


@pytest.mark.parametrize("kind", list(MODELS))
def test_compact_computes_what_the_masked_model_computes(kind, digits, tmp_path):
    torch.manual_seed(0)
    model = MODELS[kind](digits)
    with torch.no_grad():  # no parameter entry starts at zero (BatchNorm shifts do), so zeros count what masks did
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x, y = images(48)
    s = pl.Session(model, (x, y), device="cpu")
    assert s.groups.groups, f"{kind}: no channel group found"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s.set_global_sparsity(0.5, allocation="uniform", pattern="channels")
    masked = {k: v.clone() for k, v in model.state_dict().items()}
    small = s.compact(measure=False)
    assert state_equal(model.state_dict(), masked)  # the session's model is untouched
    diff, scale = _max_diff(model, small, x)
    assert diff <= 1e-4 * scale
    n_small = sum(p.numel() for p in small.parameters())
    removed_params = sum(int((t == 0).sum()) - int((before[k] == 0).sum()) for k, t in masked.items()
                         if k in dict(model.named_parameters()))
    assert sum(p.numel() for p in model.parameters()) - n_small == removed_params  # exactly the zeroed entries went
    assert n_small < sum(p.numel() for p in model.parameters())
    path = pl.save_compact(small, tmp_path / "small.pt")
    rebuilt = pl.load_compact(path, MODELS[kind](digits))
    assert state_equal(rebuilt.state_dict(), small.state_dict())
    assert _max_diff(small, rebuilt, x)[0] == 0.0
    s.reset()
    assert state_equal(model.state_dict(), before)


def test_channel_masks_zero_every_member_and_only_those(digits):
    torch.manual_seed(1)
    model = zoo_model("resnet", digits)
    s = pl.Session(model, images(32), device="cpu")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    s.set_sparsity({"stem": 0.25}, pattern="channels")
    keep = s.channel_keep("stem")
    gone = torch.nonzero(~keep).flatten().tolist()
    assert len(gone) == 4 and s.channels["stem"] == (12, 16)
    scores = [float(sum(base[k].double().abs().index_select(d, torch.tensor([c])).sum()
                        for k, d in [("stem.weight", 0), ("bn.weight", 0), ("bn.bias", 0), ("layers.0.conv2.weight", 0),
                                     ("layers.0.bn2.weight", 0), ("layers.0.bn2.bias", 0), ("layers.0.conv1.weight", 1),
                                     ("layers.1.conv1.weight", 1), ("layers.1.shortcut.0.weight", 1)]))
              for c in range(16)]
    assert sorted(gone) == sorted(sorted(range(16), key=lambda c: (scores[c], c))[:4])  # l1 of the group, written out
    live = model.state_dict()
    for key, dim in [("stem.weight", 0), ("bn.weight", 0), ("bn.bias", 0), ("layers.0.conv2.weight", 0),
                     ("layers.0.bn2.weight", 0), ("layers.0.bn2.bias", 0), ("layers.0.conv1.weight", 1),
                     ("layers.1.conv1.weight", 1), ("layers.1.shortcut.0.weight", 1)]:
        t = live[key]
        for c in range(16):
            part, ref = t.select(dim, c), base[key].select(dim, c)
            assert torch.equal(part, torch.zeros_like(part) if c in gone else ref), (key, c)
    assert torch.equal(live["bn.running_mean"], base["bn.running_mean"])  # buffers are not parameters: untouched
    untouched = [k for k in base if not k.startswith(("stem.", "bn.", "layers.0.conv2", "layers.0.bn2", "layers.0.conv1",
                                                      "layers.1.conv1", "layers.1.shortcut.0"))]
    assert all(torch.equal(live[k], base[k]) for k in untouched)
    # the per-layer sparsity counts the zeroed entries
    assert s.sparsity["stem"] == 4 * 9 / (16 * 9)
    assert s.sparsity["layers.0.conv1"] == 16 * 4 * 9 / (16 * 16 * 9)
    # evaluate() (incremental) equals a plain forward pass of the masked model
    x, y = images(32)
    model.eval()
    with torch.no_grad():
        plain = (model(x).argmax(1) == y).double().mean().item()
    assert s.evaluate()["accuracy"] == pytest.approx(plain, abs=1e-12)


def vgg_cifar() -> nn.Sequential:
    layers, c = [], 3
    for v in [64, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
            c = v
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))


def test_vgg_cifar_with_30_percent_channels_removed_has_the_macs_and_params_counted_by_hand():
    torch.manual_seed(0)
    model = vgg_cifar()
    x = torch.randn(4, 3, 16, 16)  # 16x16 rather than CIFAR's 32: the same counts by hand, a quarter of the time
    s = pl.Session(model, (x, torch.randint(0, 10, (4,))), device="cpu")
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    s.set_sparsity({n: 0.3 for n in convs[:-1]}, pattern="channels")
    small = s.compact(measure=True)
    # by hand: widths after removing round(0.3 * c) channels; 3x3 convs at 16, 16, 8, 8, 4, 4, 2, 2 pixels
    full = [64, 128, 256, 256, 512, 512, 512, 512]
    kept = [c - round(0.3 * c) for c in full[:-1]] + [512]
    assert kept == [45, 90, 179, 179, 358, 358, 358, 512]
    sides = [16, 16, 8, 8, 4, 4, 2, 2]
    ins = [3] + kept[:-1]
    conv_macs = sum(o * i * 9 * h * h for o, i, h in zip(kept, ins, sides))
    linear_macs = 512 * 10
    params = sum(o * i * 9 + 2 * o for o, i in zip(kept, ins)) + 512 * 10 + 10  # conv weights, BN scale+shift, Linear
    assert s.last_compact.compact["macs"] == conv_macs + linear_macs
    assert s.last_compact.compact["params"] == params == sum(p.numel() for p in small.parameters())
    dense_macs = sum(o * i * 9 * h * h for o, i, h in zip(full, [3] + full[:-1], sides)) + linear_macs
    assert s.last_compact.dense["macs"] == dense_macs
    # under channel masks the counted effective MACs are already the compact model's
    assert s.stats().total["effective_macs"] == conv_macs + linear_macs
    import io

    for which, module in (("compact", small), ("dense", model)):  # file bytes: torch.save of the tensors, as export() writes
        buf = io.BytesIO()
        torch.save(dict(module.state_dict()), buf)
        assert getattr(s.last_compact, which)["file_bytes"] == len(buf.getvalue())
    assert s.stats().compact is s.last_compact  # measured rows while the masks are those compacted
    assert set(s.last_compact.compact) >= {"latency_ms_b1", "latency_ms_b64", "file_bytes"}
    s.set_sparsity({convs[0]: 0.5}, pattern="channels")
    assert s.stats().compact is None  # the masks changed: no stale measurement shown


def test_bad_channel_input_gets_a_clear_error_and_changes_nothing(digits):
    model = zoo_model("resnet", digits)
    s = pl.Session(model, images(16), device="cpu")
    s.set_sparsity({"stem": 0.25}, pattern="channels")
    s.set_sparsity({"fc": 0.5})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    snap = s.snapshot()
    cases = [
        ({"fc": 0.5}, {}, "layer 'fc' has no channel group: its channels are the model's output"),
        ({"layers.0.conv1": 1.0}, {}, "would remove every one of its 16 channels.*at most 15"),
        ({"layers.0.conv1": 1.5}, {}, "layers.0.conv1"),
        ({"stem": 0.5, "layers.0.conv2": 0.25}, {}, "share channel group 'stem'"),
        ({"stem": 0.5}, {"criterion": "l3"}, "unknown channel criterion 'l3'.*l1"),
        ({"stem": 0.5}, {"criterion": "taylor"}, "calibrate"),
        ({"stem": 0.5}, {"round_to": 0}, "round_to must be a positive integer"),
        ({"nope": 0.5}, {}, "no layer 'nope'"),
    ]
    for sparsities, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            s.set_sparsity(sparsities, pattern="channels", **kwargs)
        assert state_equal(model.state_dict(), before) and s.snapshot() == snap
    with pytest.raises(ValueError, match="layer 'stem' has whole channels removed"):
        s.set_sparsity({"stem": 0.5})  # unstructured over channels
    with pytest.raises(ValueError, match="layer 'layers.2.conv1' is pruned unstructured"):
        s.set_sparsity({"layers.2.conv1": 0.3})
        s.set_sparsity({"layers.2.conv1": 0.25}, pattern="channels")
    s.set_sparsity({"layers.2.conv1": 0.0})
    with pytest.raises(ValueError, match="round_to applies to pattern='channels'"):
        s.set_sparsity({"fc": 0.5}, round_to=8)
    with pytest.raises(ValueError, match="bn_scale.*has no BatchNorm"):
        pl.Session(zoo_model("mlp", digits), digits.test).set_sparsity({"fc1": 0.5}, pattern="channels", criterion="bn_scale")
    assert state_equal(model.state_dict(), before)


def test_reset_restore_and_recipes_are_exact(digits, tmp_path):
    torch.manual_seed(2)
    model = zoo_model("resnet", digits)
    data = images(32)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    s = pl.Session(model, data, device="cpu")
    s.set_sparsity({"stem": 0.5, "layers.1.conv1": 0.25, "layers.2.conv1": 0.5}, pattern="channels", criterion="l2")
    s.set_sparsity({"fc": 0.4})
    pruned = {k: v.clone() for k, v in model.state_dict().items()}
    snap = s.snapshot()
    recipe = s.recipe()
    assert recipe["channels"]["stem"]["removed"] == 8 and recipe["channels"]["stem"]["criterion"] == "l2"
    s.set_sparsity({"stem": 0.75}, pattern="channels")
    s.restore(snap)
    assert state_equal(model.state_dict(), pruned)
    s.reset()
    assert state_equal(model.state_dict(), original) and not s.state.channels
    twin = zoo_model("resnet", digits)
    twin.load_state_dict(original)
    t = pl.Session(twin, data, device="cpu")
    t.apply_recipe(recipe)
    assert state_equal(twin.state_dict(), pruned)
    assert t.channels == {**{g: (n, n) for g, (_, n) in t.channels.items()}, "stem": (8, 16), "layers.1.conv1": (24, 32),
                          "layers.2.conv1": (32, 64)}
    t.apply_recipe(pl.Session(zoo_model("resnet", digits), data).recipe())  # an unpruned recipe clears the channels
    assert state_equal(twin.state_dict(), original)


def test_global_channel_allocations_count_as_documented(digits):
    torch.manual_seed(3)
    model = zoo_model("resnet", digits)
    s = pl.Session(model, images(16), device="cpu")
    sizes = {g: grp.size for g, grp in s.groups.groups.items()}
    s.set_global_sparsity(0.25, allocation="uniform", pattern="channels")
    assert s.channels == {g: (n - round(0.25 * n), n) for g, n in sizes.items()}
    s.set_global_sparsity(0.4, allocation="global", pattern="channels")
    removed = {g: n - k for g, (k, n) in s.channels.items()}
    assert sum(removed.values()) == round(0.4 * sum(sizes.values()))
    assert all(k >= 1 for k, _ in s.channels.values())
    # global ranks each group's scores over their mean: the channels removed are the lowest of those
    normalized = []
    for g in sizes:
        sc = s.channel_scores(g)
        normalized += [(float(v / sc.mean()), g, c) for c, v in enumerate(sc)]
    expected = {g: 0 for g in sizes}
    for _, g, _ in sorted(normalized)[: sum(removed.values())]:
        expected[g] += 1
    assert removed == expected
    s.set_global_sparsity(0.99, allocation="global", pattern="channels")  # nearly everything: each group keeps its best
    assert all(k == 1 for k, _ in s.channels.values())
    for g in sizes:
        assert torch.nonzero(s.channel_keep(g)).flatten().tolist() == [int(torch.argmax(s.channel_scores(g)))]
    with pytest.raises(ValueError, match="allocation 'uniform' or 'global'"):
        s.set_global_sparsity(0.4, allocation="erk", pattern="channels")


def test_channel_sensitivity_points_equal_the_pruned_model(digits):
    torch.manual_seed(4)
    model = zoo_model("lenet5", digits)
    data = (digits.test.tensors[0][:200], digits.test.tensors[1][:200])
    s = pl.Session(model, data, device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = s.sensitivity(levels=(0.0, 0.5, 0.9), pattern="channels", progress=False)
    assert r.complete and set(r.layers) == set(s.groups.groups) and r.n_params["conv1"] == 6
    assert state_equal(model.state_dict(), before)
    for g in ("conv1", "fc1"):
        for level in (0.5, 0.9):
            s.set_sparsity({g: level}, pattern="channels")
            assert r.curve(g)[[0.0, 0.5, 0.9].index(level)][1] == s.evaluate()["accuracy"]
            s.reset()


def test_finetuning_keeps_removed_channels_at_zero_and_compacts(digits):
    torch.manual_seed(5)
    model = zoo_model("resnet", digits)
    with torch.no_grad():
        model.bn.bias.normal_()  # not zero, so coming back is visible
    s = pl.Session(model, images(32), device="cpu")
    shift = model.bn.bias.detach().clone()
    s.set_sparsity({"stem": 0.5, "layers.2.conv1": 0.5}, pattern="channels")
    gone, gone2 = ~s.channel_keep("stem"), ~s.channel_keep("layers.2.conv1")
    s.finetune(images(128, seed=9), steps=5, lr=0.05, progress=False)
    live = model.state_dict()
    for key in ("stem.weight", "bn.weight", "bn.bias", "layers.0.bn2.bias", "layers.0.conv2.weight"):
        assert bool((live[key][gone] == 0).all()) and bool((live[key][~gone] != 0).any()), key
    assert bool((live["layers.2.conv2.weight"][:, gone2] == 0).all()) and bool((live["layers.2.bn1.bias"][gone2] == 0).all())
    small = s.compact(measure=False)
    diff, scale = _max_diff(model, small, images(32)[0])
    assert diff <= 1e-4 * scale
    trained = model.bn.bias.detach().clone()
    s.set_sparsity({"stem": 0.0}, pattern="channels")  # un-pruning after fine-tuning brings back the earlier values
    assert s.channels["stem"] == (16, 16)
    assert torch.equal(model.bn.bias[gone], shift[gone]) and torch.equal(model.bn.bias[~gone], trained[~gone])


def test_compact_without_channels_or_in_a_trial_says_what_to_do(digits):
    s = pl.Session(zoo_model("lenet5", digits), images(8), device="cpu")
    with pytest.raises(ValueError, match="no channels are removed"):
        s.compact()
    s.set_sparsity({"conv1": 0.5}, pattern="channels")
    with s.dense(), pytest.raises(RuntimeError, match="trial"):
        s.compact()


def _identity_twin(model: nn.Module, block: str) -> nn.Module:
    """The oracle: a copy of the model with ``block`` replaced by the identity, written out here."""
    import copy

    class Skip(nn.Module):
        def forward(self, x, *args, **kwargs):
            return x

    twin = copy.deepcopy(model)
    parent, _, child = block.rpartition(".")
    setattr(twin.get_submodule(parent) if parent else twin, child, Skip())
    return twin


def test_blocks_are_found_removed_swept_and_compacted_like_the_identity(digits, tmp_path):
    torch.manual_seed(6)
    model = pl.models.small_resnet(digits, blocks=2)
    x, y = digits.test.tensors[0][:64], digits.test.tensors[1][:64]
    s = pl.Session(model, (x, y), device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # identity shortcuts only: the first block of stages 2 and 3 changes the shape
    assert list(s.blocks) == ["layers.0", "layers.1", "layers.3", "layers.5"]
    r = s.sensitivity(pattern="blocks", progress=False)
    for block in s.blocks:
        oracle = _identity_twin(model, block).eval()
        with torch.no_grad():
            expected = (oracle(x).argmax(1) == y).double().mean().item()
        assert dict(r.curve(block))[1.0] == pytest.approx(expected, abs=1e-12)
    assert state_equal(model.state_dict(), before)
    s.set_sparsity({"layers.3": 1}, pattern="blocks")
    assert s.blocks["layers.3"] and s.sparsity["layers.3.conv1"] == 1.0
    assert all(bool((p == 0).all()) for p in model.layers[3].parameters())
    small = s.compact()
    diff, scale = _max_diff(_identity_twin(s.state.original_model(), "layers.3"), small, x)
    assert diff <= 1e-4 * scale  # the compact model is the original with the block skipped
    # by hand: two 3x3 convs of 32 -> 32 channels on the 4x4 maps of stage 2
    assert s.last_compact.dense["macs"] - s.last_compact.compact["macs"] == 2 * 32 * 32 * 9 * 4 * 4
    rebuilt = pl.load_compact(pl.save_compact(small, tmp_path / "b.pt"), pl.models.small_resnet(digits, blocks=2))
    assert _max_diff(small, rebuilt, x)[0] == 0.0
    with pytest.raises(ValueError, match="'layers.2' is not a removable block.*layers.0, layers.1, layers.3, layers.5"):
        s.set_sparsity({"layers.2": 1}, pattern="blocks")
    with pytest.raises(ValueError, match="takes 1 .* or 0"):
        s.set_sparsity({"layers.1": 0.5}, pattern="blocks")
    s.set_sparsity({"layers.3": 0}, pattern="blocks")
    assert state_equal(model.state_dict(), before)


def test_transformer_blocks_called_with_a_mask_are_removable():
    torch.manual_seed(7)
    model = z.ViTMasked()
    x, y = images(16)
    s = pl.Session(model, (x, y), device="cpu")
    assert list(s.blocks) == ["blocks.0", "blocks.1"]
    s.set_sparsity({"blocks.1": 1}, pattern="blocks")
    small = s.compact(measure=False)
    oracle = _identity_twin(model, "blocks.1")
    diff, scale = _max_diff(oracle, small, x)
    assert diff <= 1e-5 * scale


def test_grouped_convolutions_lose_the_same_channels_in_every_convolution_group(digits):
    """pw2 (16 channels) feeds a groups=4 convolution: pruning half of pw2 removes 2 channels
    from each convolution group of 4 (the same positions), the compact grouped convolution keeps
    groups=4 with 8 inputs, and computes what the masked model computes."""
    torch.manual_seed(0)
    model = z.PointwiseGrouped()
    x, y = images(48)
    s = pl.Session(model, (x, y), device="cpu")
    s.set_sparsity({"pw2": 0.5}, pattern="channels")
    keep = s.channel_keep("pw2").view(4, 4)  # [convolution group, position]
    assert (keep == keep[0]).all() and int(keep[0].sum()) == 2  # the same 2 of 4 positions in every group
    w = s.original_weight("pw2").double().abs().sum((1, 2, 3)) + s.original_state()["pw2.bias"].double().abs()
    cols = s.original_weight("grp").double().abs().sum((0, 2, 3))  # input column j: class j, all output rows
    classes = w.view(4, 4).sum(0) + cols + 0  # l1 of each class of tied channels, written out
    assert sorted((~keep[0]).nonzero().flatten().tolist()) == sorted(torch.argsort(classes, stable=True)[:2].tolist())
    small = s.compact(measure=False)
    assert (small.grp.in_channels, small.grp.out_channels, small.grp.groups) == (8, 8, 4)
    assert tuple(small.grp.weight.shape) == (8, 2, 3, 3) and small.pw2.out_channels == 8
    diff, scale = _max_diff(model, small, x)
    assert diff <= 1e-4 * scale
    s.set_sparsity({"grp": 0.5}, pattern="channels")  # the grouped conv's own outputs: one per convolution group
    assert s.channel_keep("grp").view(4, 2).sum(1).tolist() == [1, 1, 1, 1]
    s.reset()
    s.set_global_sparsity(0.4, allocation="global", pattern="channels")
    for g, (kept, total) in s.channels.items():
        assert (total - kept) % s.groups.groups[g].period == 0
    small = s.compact(measure=False)
    assert small.grp.groups == 4 and _max_diff(model, small, x)[0] <= 1e-4 * _max_diff(model, small, x)[1]
    s.reset()
    with pytest.raises(ValueError, match=r"layer 'pw2': sparsity 0.9 would remove every one of its 16 channels .*at most 12"):
        s.set_sparsity({"pw2": 0.9}, pattern="channels")
    assert s.channels["pw2"] == (16, 16)
