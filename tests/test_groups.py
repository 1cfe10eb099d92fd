"""Channel groups: what Torch-Pruning's graph couples, turned into masks, scores and counts;
each checked against a count or a sum written out here."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import prune_lab as pl
from prune_lab.groups import channel_scores, channels_to_remove, find_groups
from prune_lab.masks import keep_mask
from prune_lab.layers import find_prunable
from tests import zoo_extra as z
from tests.conftest import zoo_model


def groups_of(model, x):
    infos, _ = find_prunable(model, ())
    return find_groups(model, infos, x)


class ConvBNConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 8 * 8, 10)
        with torch.no_grad():
            self.bn.weight.copy_(torch.tensor([0.5, -2.0, 1.0, 0.1]))
            self.bn.bias.copy_(torch.tensor([0.3, 0.2, -0.1, 0.0]))

    def forward(self, x):
        h = torch.relu(self.bn(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(h)).flatten(1))


class GroupedMiddle(nn.Module):
    """A grouped convolution between two prunable groups: the grouped conv's own channels are
    not offered, the stem's are not (they reach it), the head's inputs are."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.pw = nn.Conv2d(8, 12, 1)
        self.mid = nn.Conv2d(12, 6, 1)
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        x = torch.relu(self.grouped(torch.relu(self.stem(x))))
        x = torch.relu(self.mid(torch.relu(self.pw(x))))
        return self.fc(x.mean((2, 3)))


X = torch.randn(2, 1, 8, 8)


def test_residual_adds_share_one_group_and_the_output_layer_has_none(digits):
    g = groups_of(zoo_model("resnet", digits), X)
    stem = g.of("stem")
    assert g.of("layers.0.conv2") is stem  # added to the stem's output: the same channels
    assert set(stem.producers) == {"stem", "layers.0.conv2"}
    assert {"layers.0.conv1", "layers.1.conv1", "layers.1.shortcut.0"} <= set(stem.layers)
    assert stem.size == 16
    keys = {(m.key, m.dim, m.role) for m in stem.members}
    assert {("stem.weight", 0, "out"), ("bn.weight", 0, "bn"), ("bn.bias", 0, "bn_bias"),
            ("layers.0.conv1.weight", 1, "in"), ("layers.0.bn2.weight", 0, "bn")} <= keys
    assert "fc" in g.excluded and "output" in g.excluded["fc"]
    with pytest.raises(ValueError, match="fc.*no channel group.*output"):
        g.of("fc")


def test_concatenation_offsets_map_each_reader_column_to_its_channel():
    g = groups_of(z.DenseBlock(), X)
    conv0 = g.of("convs.0")  # 4 channels, concatenated after the stem's 8
    member = {m.key: m for m in conv0.members}
    root = member["convs.1.weight"].root
    assert root.tolist() == [-1] * 8 + [0, 1, 2, 3]
    assert member["convs.2.weight"].root.tolist() == [-1] * 8 + [0, 1, 2, 3] + [-1] * 4
    assert member["head.weight"].root.tolist() == [-1] * 8 + [0, 1, 2, 3] + [-1] * 8


def test_flatten_maps_each_channel_to_its_block_of_features(digits):
    g = groups_of(zoo_model("lenet5", digits), X)
    conv2 = g.of("conv2")
    fc1 = next(m for m in conv2.members if m.key == "fc1.weight")
    per = fc1.root.numel() // conv2.size  # features per channel after flattening
    assert fc1.dim == 1 and fc1.root.tolist() == [c for c in range(conv2.size) for _ in range(per)]


def test_grouped_convolutions_tie_one_channel_per_convolution_group():
    """Channel c of a group that reaches a grouped convolution (groups=g) is tied to c + size/g,
    c + 2 size/g, ...: each class holds one channel of every convolution group, so removing a
    class keeps every convolution group the same width. The grouped convolution's input column j
    belongs to class j."""
    g = groups_of(GroupedMiddle(), X)  # stem (8) -> grouped (8 -> 8, groups=2) -> pw -> mid -> fc
    assert set(g.groups) == {"stem", "grouped", "pw", "mid"}
    assert (g.groups["stem"].period, g.groups["grouped"].period, g.groups["pw"].period) == (2, 2, 1)
    stem = g.groups["stem"]
    cols = next(m for m in stem.members if m.key == "grouped.weight")
    assert cols.dim == 1 and cols.root.tolist() == [0, 1, 2, 3]  # 4 input columns per convolution group
    scores = torch.tensor([5.0, 1.0, 7.0, 2.0, 0.5, 9.0, 3.0, 6.0], dtype=torch.float64)
    # classes {0,4} 5.5, {1,5} 10, {2,6} 10, {3,7} 8: the lowest class goes, then the next
    assert stem.class_scores(scores).tolist() == [5.5, 10.0, 10.0, 8.0]
    assert stem.keep(scores, 2).tolist() == [False, True, True, True, False, True, True, True]
    assert stem.keep(scores, 4).tolist() == [False, True, True, False, False, True, True, False]
    with pytest.raises(ValueError, match="2 at a time"):
        stem.keep(scores, 3)
    assert [stem.removal(f) for f in (0.1, 0.2, 0.3, 0.5, 0.9, 1.0)] == [0, 2, 2, 4, 8, 8]  # whole classes, nearest
    mask = cols.mask(stem.keep(scores, 2), (8, 4, 3, 3))
    assert mask[:, 0].logical_not().all() and mask[:, 1:].all()  # column 0 of both convolution groups
    g2 = groups_of(z.DepthwiseGrouped(), X)  # the grouped conv's outputs are sliced into a residual add
    assert set(g2.groups) == {"stem"} and g2.groups["stem"].period == 4
    assert "grouped convolution 'grouped' (groups=4) through a concatenation or a slice" in g2.excluded["pw"]


def test_layernorm_attention_and_unfaithful_removals_are_excluded():
    g = groups_of(z.TinyTransformer(), torch.randn(2, 1, 8, 8))
    assert set(g.groups) == {"mlp.0"}  # the MLP's hidden neurons
    assert "MultiheadAttention" in g.excluded["embed"]
    skip = groups_of(z.SkipConcat(), X)  # a layer run twice into a concatenation: Torch-Pruning's removal is wrong
    assert not skip.groups and "does not compute what the masks compute" in skip.excluded["a"]


def test_depthwise_convolutions_join_their_input_group():
    g = groups_of(z.MobileSE(), X)
    expand = g.of("expand.0")
    assert g.of("dw.0") is expand and {"expand.0", "dw.0"} <= set(expand.producers)
    dw = next(m for m in expand.members if m.key == "dw.0.weight")
    assert dw.dim == 0 and dw.root.tolist() == list(range(24))


def test_l1_l2_and_bn_scale_scores_equal_their_sums_written_out():
    torch.manual_seed(0)
    m = ConvBNConv()
    g = groups_of(m, X).of("conv1")
    tensors = dict(m.named_parameters())
    l1 = channel_scores(g, tensors, "l1", 0)
    l2 = channel_scores(g, tensors, "l2", 0)
    bn = channel_scores(g, tensors, "bn_scale", 0)
    for c in range(4):
        parts = [m.conv1.weight[c], m.conv1.bias[c:c + 1], m.bn.weight[c:c + 1], m.bn.bias[c:c + 1], m.conv2.weight[:, c]]
        assert l1[c].item() == pytest.approx(sum(float(p.detach().double().abs().sum()) for p in parts), rel=1e-12)
        assert l2[c].item() == pytest.approx(sum(float((p.detach().double() ** 2).sum()) for p in parts) ** 0.5, rel=1e-12)
    assert bn.tolist() == pytest.approx([0.5, 2.0, 1.0, 0.1], rel=1e-7)
    assert keep_mask(bn, 2).tolist() == [False, True, True, False]  # |gamma| 0.5 (channel 0) and 0.1 (channel 3) go
    r1, r2 = channel_scores(g, tensors, "random", 3), channel_scores(g, tensors, "random", 3)
    assert torch.equal(r1, r2) and not torch.equal(r1, channel_scores(g, tensors, "random", 4))
    with pytest.raises(ValueError, match="unknown channel criterion 'l3'.*Valid: l1, l2"):
        channel_scores(g, tensors, "l3", 0)


def test_taylor_and_obd_channel_scores_sum_the_autograd_scores_of_each_channels_entries():
    """Taylor ((g * w)^2, g the gradient of the calibration batch's mean loss: one batch here) and OBD (1/2 h w^2, h the
    mean squared per-sample gradient) summed over conv1's row c and conv2's column c: the
    convolution weights of the channel (bias and BatchNorm are not prunable layers)."""
    torch.manual_seed(0)
    m = ConvBNConv().eval()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    s = pl.Session(m, (torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))), device="cpu")
    s.calibrate((x, y), samples=16, batch_size=16, progress=False)
    weights = [m.conv1.weight, m.conv2.weight]
    grads = torch.autograd.grad(nn.functional.cross_entropy(m(x), y), weights)
    per_sample = [torch.autograd.grad(nn.functional.cross_entropy(m(x[i:i + 1]), y[i:i + 1]), weights) for i in range(16)]
    weights = [w.detach() for w in weights]
    fisher = [sum(g[j].double() ** 2 for g in per_sample) / 16 for j in range(2)]
    taylor = s.channel_scores("conv1", "taylor")
    obd = s.channel_scores("conv1", "obd")
    for c in range(4):
        t = ((weights[0][c].double() * grads[0][c].double()) ** 2).sum() + \
            ((weights[1][:, c].double() * grads[1][:, c].double()) ** 2).sum()
        o = (0.5 * fisher[0][c] * weights[0][c].double() ** 2).sum() + (0.5 * fisher[1][:, c] * weights[1][:, c].double() ** 2).sum()
        assert taylor[c].item() == pytest.approx(float(t), rel=1e-5)
        assert obd[c].item() == pytest.approx(float(o), rel=1e-5)
    s.set_sparsity({"conv1": 0.5}, pattern="channels", criterion="taylor")
    assert s.channel_keep("conv1").tolist() == keep_mask(taylor, 2).tolist()


def test_bn_scale_needs_a_batchnorm(digits):
    m = zoo_model("mlp", digits)
    g = groups_of(m, digits.test.tensors[0][:2])
    with pytest.raises(ValueError, match="group 'fc1' has no BatchNorm"):
        channel_scores(g.of("fc1"), dict(m.named_parameters()), "bn_scale", 0)


@pytest.mark.parametrize("fraction,size,round_to,removed", [
    (0.3, 64, None, 19), (0.3, 512, None, 154), (0.5, 16, None, 8), (0.0, 16, 8, 0),
    (0.3, 64, 8, 16),    # 45 kept -> 48 (the nearest multiple of 8)
    (0.9, 16, 8, 8),     # never fewer than round_to kept
    (0.26, 100, 8, 28),  # 74 kept -> 72
])
def test_channel_counts_round_as_documented(fraction, size, round_to, removed):
    assert channels_to_remove(fraction, size, round_to) == removed


def test_keep_mask_removes_the_lowest_and_breaks_ties_by_index():
    scores = torch.tensor([3.0, 1.0, 1.0, 2.0, 0.5], dtype=torch.float64)
    assert keep_mask(scores, 2).tolist() == [True, False, True, True, False]
    assert keep_mask(scores, 3).tolist() == [True, False, False, True, False]
    assert keep_mask(scores, 0).all()


def test_an_untraceable_model_gets_no_groups_and_a_reason(digits):
    g = groups_of(z.Untraceable(), torch.zeros(2, 64))  # data-dependent branch: Torch-Pruning still traces it
    assert set(g.groups) | set(g.excluded) == {"fc1", "fc2"}
    s = pl.Session(torch.nn.Sequential(torch.nn.Linear(64, 10)), (digits.test.tensors[0][:8].flatten(1), digits.test.tensors[1][:8]))
    with pytest.raises(ValueError, match="has no channel group"):
        s.set_sparsity({"0": 0.5}, pattern="channels")
