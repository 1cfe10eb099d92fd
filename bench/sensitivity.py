"""Full sensitivity sweep (20 levels, every layer) of the small ResNet over 2,000 MNIST test
images: incremental versus naive (a full forward per point), same run, same masks.

The ResNet is first trained for one epoch on the other 8,000 images of the shared 10k split.
Prints one JSON line.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import trained_on_mnist  # noqa: E402


import prune_lab as pl  # noqa: E402



def main() -> None:
    model, data = trained_on_mnist("small_resnet", epochs=1, lr=3e-3, batch_size=128)
    s = pl.Session(model, data.test, device="cpu", batch_size=500)
    s.evaluate()  # trace and fill the cache outside the timed region, as a Lab session would have
    t = time.perf_counter()
    inc = s.sensitivity(progress=False)
    ours = time.perf_counter() - t
    t = time.perf_counter()
    naive = s.sensitivity(progress=False, incremental=False)
    base = time.perf_counter() - t
    diff = max(float((inc.table(k) - naive.table(k)).abs().max()) for k in ("accuracy", "loss"))
    print(json.dumps({
        "name": "sensitivity",
        "points": len(inc.records),
        "layers": len(s.layers),
        "dense_accuracy": round(s.baseline()["accuracy"], 4),
        "ours_s": round(ours, 2),
        "baseline_s": round(base, 2),
        "ratio": round(base / ours, 2),
        "max_abs_diff": diff,
        "cache_mb": round(s.evaluator.engine().cache_bytes() / 2**20, 1),
    }))


if __name__ == "__main__":
    main()
