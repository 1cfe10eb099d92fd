"""Sweeps on a local Ray runtime (2 CPUs, started here and stopped afterwards whatever happens):
the merged results equal the in-process ones bit for bit, Stop keeps finished points, a killed
worker neither loses nor invents points, a point that fails is reported missing, and an
unreachable address fails before any work."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import ray
import torch

import prune_lab as pl
from prune_lab.workflows.distributed import RayExecutor



@pytest.fixture
def session(digits):
    torch.manual_seed(0)
    model = pl.models.mlp(digits)
    s = pl.Session(model, digits.test, device="cpu")
    s.set_sparsity({"fc1": 0.5})
    return s


def test_sensitivity_on_ray_equals_in_process(ray_runtime, session, digits):
    levels = (0.0, 0.3, 0.6, 0.9)
    local = session.sensitivity(levels=levels, progress=False)
    before = session.snapshot()
    seen = []
    remote = session.sensitivity(levels=levels, progress=False, executor="ray", on_step=seen.append)
    assert remote.complete and remote.missing == []
    assert remote.records == local.records  # bit for bit, in the in-process order
    assert sorted(map(str, seen)) == sorted(map(str, local.records))  # progress fed by the workers
    assert remote.reference == local.reference and remote.dense == local.dense
    assert session.snapshot() == before


def test_data_aware_sweep_after_finetuning_on_ray_equals_in_process(ray_runtime, session, digits):
    """Workers get the fine-tuned base weights, the masks and the calibration samples."""
    train = (digits.train.tensors[0][:64], digits.train.tensors[1][:64])
    session.finetune(train, steps=3, progress=False)
    session.calibrate(train, samples=64, batch_size=16, progress=False)
    local = session.sensitivity(levels=(0.5, 0.9), criterion="obd", progress=False)
    remote = session.sensitivity(levels=(0.5, 0.9), criterion="obd", progress=False,
                                 executor=RayExecutor(workers=2))
    assert remote.complete and remote.records == local.records


def test_tradeoff_grid_on_ray_equals_in_process(ray_runtime, session, digits):
    train = (digits.train.tensors[0][:64], digits.train.tensors[1][:64])
    session.calibrate(train, samples=64, progress=False)
    grid = dict(strategies=["uniform", "global/taylor"], compressions=(2, 8), cache=False, progress=False,
                finetune={"train_data": train, "steps": 2, "batch_size": 32})
    before = session.snapshot()
    local = session.tradeoff(**grid)
    remote = session.tradeoff(**grid, executor="ray")
    assert remote.missing == [] and not remote.config.get("interrupted")
    assert remote.records == local.records
    assert session.snapshot() == before


def test_stop_keeps_every_finished_point(ray_runtime, session):
    local = session.sensitivity(levels=(0.0, 0.3, 0.6, 0.9), progress=False)
    done = []
    remote = session.sensitivity(levels=(0.0, 0.3, 0.6, 0.9), progress=False, executor="ray",
                                 on_step=done.append, should_stop=lambda: len(done) >= 3)
    assert not remote.complete
    assert 3 <= len(remote.records) < len(local.records)
    by_point = {(r["layer"], r["level"]): r for r in local.records}
    assert all(by_point[(r["layer"], r["level"])] == r for r in remote.records)  # finished ones, measured right
    resumed = session.sensitivity(progress=False, executor="ray", resume=remote)  # resume continues on Ray too
    assert resumed.complete and sorted(map(str, resumed.records)) == sorted(map(str, local.records))


def test_a_killed_worker_loses_and_invents_no_point(ray_runtime, session):
    local = session.sensitivity(levels=(0.0, 0.3, 0.6, 0.9), progress=False)
    ex = RayExecutor(workers=2, max_retries=1)  # the killed worker's points get exactly one more try
    killed = []

    def kill_one(record):
        if not killed:
            killed.append(ex.actors[0])
            ray.kill(ex.actors[0])

    remote = session.sensitivity(levels=(0.0, 0.3, 0.6, 0.9), progress=False, executor=ex, on_step=kill_one)
    assert killed and remote.missing == [] and remote.complete, remote.missing
    assert remote.records == local.records  # every point once, none twice, none made up


def test_a_point_that_cannot_be_measured_is_reported_missing(ray_runtime, session):
    from prune_lab.criteria import CRITERIA, magnitude_keys

    @pl.register_criterion("fails_on_fc2")
    def fails_on_fc2(weight, *, layer, seed):
        if layer == "fc2":
            raise RuntimeError("cannot score fc2")
        return magnitude_keys(weight)

    try:
        remote = session.sensitivity(levels=(0.0, 0.5), criterion="fails_on_fc2", progress=False, executor="ray")
    finally:
        CRITERIA._entries.pop("fails_on_fc2", None)
    assert not remote.complete
    assert sorted((m["layer"], m["level"]) for m in remote.missing) == [("fc2", 0.5)]
    assert "cannot score fc2" in remote.missing[0]["error"]
    assert ("fc2", 0.5) not in remote.done() and len(remote.records) == 2 * len(remote.layers) - 1


def test_bad_executors_fail_clearly_before_any_work(session):
    before = session.snapshot()
    with pytest.raises(ValueError, match="executor must be None, 'local', 'ray'"):
        session.sensitivity(levels=(0.5,), progress=False, executor=42)
    with pytest.raises(ValueError, match="must be 'host:port'"):
        RayExecutor(address="nowhere")
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        RayExecutor(workers=0)
    assert session.snapshot() == before


def test_an_unreachable_address_fails_before_any_work():
    """In a fresh process (this one's runtime would answer instead): nothing listens on port 1."""
    code = textwrap.dedent("""
        import prune_lab as pl
        model, data = pl.demo()
        s = pl.Session(model, data.test, device="cpu")
        steps = []
        try:
            s.sensitivity(levels=(0.5,), progress=False, executor="ray://127.0.0.1:1", on_step=steps.append)
        except ConnectionError as e:
            print("ERR", e)
        print("STEPS", len(steps), s.total_sparsity())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout
    assert "ERR cannot reach the Ray cluster at 'ray://127.0.0.1:1'" in out
    assert "STEPS 0 0.0" in out


def test_the_lab_sweep_runs_on_the_executor(ray_runtime, session):
    local = session.sensitivity(levels=(0.0, 0.5), progress=False)
    lab = pl.LabModel(session, executor="ray")
    lab.run_sweep(levels=(0.0, 0.5))
    assert lab.job.result.complete and lab.job.result.records == local.records
    assert lab.job.done == len(local.records)  # the progress counted every worker's point
