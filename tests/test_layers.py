"""Finding the prunable layers (layers.py): which tensors, their names, shapes, ties and coverage."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from prune_lab.layers import find_prunable, prunable_layers


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, x):
        return self.head(self.norm(self.body(self.emb(x))))


def test_layers_in_module_order_with_shapes_and_coverage_counted_by_hand():
    m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 5))
    infos, cov = find_prunable(m)
    assert [(i.name, i.kind, i.shape, i.n_params) for i in infos] == [
        ("0", "Conv2d", (3, 1, 3, 3), 27), ("3", "Linear", (5, 12), 60)]
    total = sum(p.numel() for p in m.parameters())
    assert (cov.prunable_params, cov.total_params) == (87, total) and total == 27 + 3 + 3 + 3 + 60 + 5


def test_a_tied_weight_is_one_layer_with_its_other_name():
    infos, cov = find_prunable(Tied())
    names = {i.name: i for i in infos}
    assert "body" in names and len([i for i in infos if i.shape == (10, 4)]) <= 1
    tied = [i for i in infos if "head.weight" in (i.param, *i.aliases) or "emb.weight" in (i.param, *i.aliases)]
    assert len(tied) == 1 and set((tied[0].param, *tied[0].aliases)) == {"emb.weight", "head.weight"}
    assert cov.total_params == sum(p.numel() for p in Tied().parameters())  # the tied tensor counted once


def test_extra_layers_by_parameter_or_module_name():
    infos, _ = find_prunable(Tied(), extra_layers=["norm"])
    assert [i for i in infos if i.param == "norm.weight"][0].shape == (4,)
    with pytest.raises(ValueError, match="extra_layers: 'nrom' is neither a parameter"):
        find_prunable(Tied(), extra_layers=["nrom"])
    with pytest.raises(TypeError, match="extra_layers must be a list of names"):
        find_prunable(Tied(), extra_layers="norm")


def test_no_prunable_layer_or_a_nan_weight_is_refused_by_name():
    with pytest.raises(ValueError, match="LayerNorm has no prunable layers"):
        prunable_layers(nn.LayerNorm(4))
    m = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    with torch.no_grad():
        m[1].weight[0, 0] = float("nan")
        m[1].weight[1, 2] = float("inf")
    with pytest.raises(ValueError, match="layer '1': weight has 2 NaN/inf values"):
        prunable_layers(m)
