"""Ray workers rebuild the *whole* pruning state (``Snapshot.to("cpu")``, adopted): a sweep or a
trade-off measured on Ray equals the in-process one point for point, from every kind of state:
channel-pruned (removed channels' biases and BatchNorm entries included), block-removed, N:M,
quantized, calibrated and fine-tuned; channel and block sweeps and channel trade-offs too."""
from __future__ import annotations

import pytest
import torch

import prune_lab as pl
from prune_lab.workflows.distributed import RayExecutor



@pytest.fixture(scope="module")
def trained(digits):
    """A residual CNN with BatchNorm, trained briefly so that every channel and point matters."""
    torch.manual_seed(0)
    model = pl.models.small_resnet(digits, widths=(8, 16, 16), blocks=2)
    pl.train(model, digits, epochs=1, progress=False)
    return model


def train_batch(digits, n=128):
    return digits.train.tensors[0][:n], digits.train.tensors[1][:n]


def channels(s, digits):
    s.set_sparsity({"layers.0.conv1": 0.5, "stem": 0.25}, pattern="channels")


def blocks(s, digits):
    s.set_sparsity({"layers.1": 1}, pattern="blocks")
    s.set_sparsity({"layers.3.conv1": 0.5}, pattern="channels")


def nm(s, digits):
    s.set_sparsity({"fc": 0.5, "layers.2.conv2": 0.5}, pattern="2:4")


def quantized(s, digits):
    s.set_sparsity({"layers.2.conv1": 0.6})
    s.set_bits({"layers.2.conv1": 4, "fc": 3}, method="kmeans")


def finetuned(s, digits):
    channels(s, digits)
    s.finetune(train_batch(digits), steps=4, lr=0.05, progress=False)  # new bases, BatchNorm statistics, member bases


def reconstructed(s, digits):
    s.calibrate(train_batch(digits), samples=128, progress=False)
    s.set_sparsity({"layers.2.conv1": 0.6, "fc": 0.5}, reconstruct="exact")  # refitted values travel in the records


STATES = {"channels": channels, "blocks": blocks, "2:4": nm, "quantized": quantized, "finetuned": finetuned,
          "reconstructed": reconstructed}


@pytest.mark.parametrize("kind", list(STATES))
def test_a_sweep_from_every_kind_of_state_equals_in_process(ray_runtime, trained, digits, kind):
    s = pl.Session(trained, digits.test, device="cpu")
    STATES[kind](s, digits)
    layers = ["stem", "layers.0.conv2", "layers.4.conv1", "fc"]
    local = s.sensitivity(levels=(0.0, 0.5, 0.9), layers=layers, progress=False)
    before = s.snapshot()
    remote = s.sensitivity(levels=(0.0, 0.5, 0.9), layers=layers, progress=False, executor=RayExecutor(workers=2))
    assert remote.complete and remote.missing == []
    assert remote.records == local.records
    assert remote.reference == local.reference
    assert s.snapshot() == before
    s.reset()


def test_a_data_aware_sweep_from_a_calibrated_channel_pruned_state_equals_in_process(ray_runtime, trained, digits):
    s = pl.Session(trained, digits.test, device="cpu")
    finetuned(s, digits)
    s.calibrate(train_batch(digits), samples=128, batch_size=32, progress=False)
    local = s.sensitivity(levels=(0.5, 0.9), criterion="obd", layers=["layers.0.conv1", "fc"], progress=False)
    remote = s.sensitivity(levels=(0.5, 0.9), criterion="obd", layers=["layers.0.conv1", "fc"], progress=False,
                           executor="ray")
    assert remote.complete and remote.records == local.records


@pytest.mark.parametrize("pattern, criterion", [("channels", "l1"), ("channels", "taylor"), ("blocks", "magnitude")])
def test_channel_and_block_sweeps_run_on_ray_with_identical_points(ray_runtime, trained, digits, pattern, criterion):
    s = pl.Session(trained, digits.test, device="cpu")
    finetuned(s, digits)
    if criterion == "taylor":
        s.calibrate(train_batch(digits), samples=128, batch_size=32, progress=False)
    levels = (0.0, 0.5, 0.75) if pattern == "channels" else None
    local = s.sensitivity(levels=levels, pattern=pattern, criterion=criterion, progress=False)
    before = s.snapshot()
    remote = s.sensitivity(levels=levels, pattern=pattern, criterion=criterion, progress=False, executor="ray")
    assert remote.complete and remote.missing == []
    assert len(remote.records) == len(local.records) > 0
    assert remote.records == local.records
    assert s.snapshot() == before


def test_channel_tradeoffs_run_on_ray_with_identical_points(ray_runtime, trained, digits):
    s = pl.Session(trained, digits.test, device="cpu")
    grid = dict(strategies=["channels", "channels-global/bn_scale", "lamp"], compressions=(1.5, 3), cache=False,
                progress=False, finetune={"train_data": train_batch(digits, 64), "steps": 2, "batch_size": 32})
    local = s.tradeoff(**grid)
    remote = s.tradeoff(**grid, executor="ray")
    assert remote.missing == [] and not remote.config.get("interrupted")
    assert len(remote.records) == 6 and remote.records == local.records


def test_head_sweeps_and_perplexity_run_on_ray_with_identical_points(ray_runtime):
    """Head groups are traced again on the workers (``ensure_groups``) and perplexity travels
    with the scorer: the remote points equal the local ones."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 20, (16, 13))
    data = torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])
    s = pl.Session(pl.models.TinyGPT(20, 12, d=32, heads=4, layers=2), data, device="cpu", metric=pl.metrics.perplexity)
    s.set_sparsity({"blocks.0.attn": 0.25}, pattern="heads")
    local = s.sensitivity(levels=(0.0, 0.5, 0.75), pattern="heads", progress=False)
    remote = s.sensitivity(levels=(0.0, 0.5, 0.75), pattern="heads", progress=False, executor="ray")
    assert remote.complete and remote.lower_is_better and remote.records == local.records and len(local.records) == 6
