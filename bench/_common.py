"""Helpers shared by the benchmarks: fresh-process runs, peak-memory measurement, the MNIST split."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory above the level at ``__enter__``, sampled every millisecond and
    cross-checked with the kernel's high-water mark (VmHWM, reset via clear_refs where allowed)."""

    def __enter__(self) -> "PeakRSS":
        self._hwm_reset = _reset_hwm()
        self.start = rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        if self._hwm_reset:
            self.peak = max(self.peak, _vm_hwm())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_fresh(script: Path, *args: str) -> dict:
    """Run ``script`` in a new interpreter; it prints one JSON line last."""
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- the MNIST split
MNIST = Path(os.environ.get("PRUNE_LAB_MNIST", Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))


def trained_on_mnist(factory: str, epochs: int = 0, lr: float = 1e-3, batch_size: int = 64) -> tuple[Any, Any]:
    """``(model, data)``: ``pl.models.<factory>`` trained on the shared MNIST split (8,000 train /
    2,000 test) on the CPU, seeded, so every benchmark starts from the same model."""
    import torch

    import prune_lab as pl

    data = pl.datasets.mnist(MNIST, train_from_test=8000)
    torch.manual_seed(0)
    model = getattr(pl.models, factory)(data)
    if epochs:
        pl.train(model, data, epochs=epochs, lr=lr, batch_size=batch_size, device="cpu", progress=False)
    return model, data


def timed_lenet5_epoch() -> tuple[Any, Any, float]:
    """``(model, data, epoch_s)``: LeNet-5 trained 4 epochs on the MNIST split, then one more timed
    epoch (the unit data-aware work is compared with)."""
    import time

    import prune_lab as pl

    model, data = trained_on_mnist("lenet5", epochs=4, lr=2e-3, batch_size=64)
    t = time.perf_counter()
    pl.train(model, data, epochs=1, lr=5e-4, batch_size=64, device="cpu", progress=False)  # the timed epoch
    return model, data, time.perf_counter() - t
