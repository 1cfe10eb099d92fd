from __future__ import annotations

import os
from pathlib import Path

# OpenMP threads that wait sleep instead of spinning. Set before torch loads its OpenMP runtime
# (so nothing in pyproject.toml may import prune_lab); notebook kernels and JupyterLab inherit it.
# CI machines are shared: two suites side by side on 2 cores took 3.2x as long as one with
# spinning threads and 1.6x with sleeping ones (tests/test_compact.py: 82.5 s vs 40.6 s each;
# alone 26.1 s vs 24.7 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

import prune_lab as pl  # noqa: E402


def pytest_configure(config):
    # untrained test models lose whole layers under global pruning; tests/test_allocation.py checks the warning itself
    config.addinivalue_line("filterwarnings", "ignore::prune_lab.session.LayerCollapseWarning")


# Checking mode for the whole suite: every Session.evaluate() is also computed by a plain full
# forward pass and compared (metric exactly, loss to 1e-5); a difference raises CheckError.
os.environ.setdefault("PRUNE_LAB_CHECK", "1")

settings.register_profile("prune_lab", deadline=None, max_examples=60)
settings.load_profile("prune_lab")

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PRUNE_LAB_SHARED", ROOT.parent / "shared"))
MNIST_ROOT = SHARED / "data" / "mnist"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tests never read or write the user's real cache."""
    if "PRUNE_LAB_CACHE" not in os.environ:
        os.environ["PRUNE_LAB_CACHE"] = str(tmp_path_factory.mktemp("prune_lab_cache"))
    os.environ.setdefault("PRUNE_LAB_FAST", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    yield


@pytest.fixture(scope="module")
def ray_runtime():
    """A local Ray runtime (2 CPUs) for one test module, stopped afterwards whatever happens."""
    import ray

    from prune_lab.workflows.distributed import _default_runtime_env

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=200 * 1024 * 1024, runtime_env=_default_runtime_env())
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def digits():
    return pl.datasets.digits()


@pytest.fixture(scope="session")
def demo(_isolated_cache):
    return pl.demo(progress=False)


@pytest.fixture(scope="session")
def demo_val(_isolated_cache):
    """The demo as notebooks 02, 03 and 10 load it: trained on 1150 digits, 288 held out as ``val``."""
    return pl.demo(progress=False, val=0.2)


@pytest.fixture
def demo_session(demo):
    model, data = demo
    s = pl.Session(model, data.test, device="cpu")
    yield s
    s.reset()


@pytest.fixture(scope="session")
def mnist_root():
    if not (MNIST_ROOT / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"shared MNIST files not found under {MNIST_ROOT}")
    return MNIST_ROOT


def zoo_model(kind: str, data) -> torch.nn.Module:
    torch.manual_seed(0)
    return {"mlp": pl.models.mlp, "lenet5": pl.models.lenet5, "resnet": pl.models.small_resnet}[kind](data)


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def snapshot(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
