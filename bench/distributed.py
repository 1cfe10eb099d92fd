"""Full sensitivity sweep (20 levels, every layer) of the small ResNet over 2,000 MNIST test
images: in-process (this machine's torch threads) versus Ray with 2 single-threaded workers,
same run, same masks. Prints one JSON line: ``ours_s`` (the Ray sweep, worker start-up
included), ``baseline_s`` (in-process), ``ratio`` (baseline / ours), ``identical`` (records
equal bit for bit), and what Ray adds: the runtime's start (``ray_init_s``, paid once per
process), the workers' start per sweep (``workers_start_s``) and the overhead per point
(``per_point_overhead_ms``: Ray's time per point per worker, start excluded, minus a
single-threaded in-process point).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import trained_on_mnist  # noqa: E402

import torch  # noqa: E402

import prune_lab as pl  # noqa: E402
from prune_lab.workflows.distributed import RayExecutor  # noqa: E402

WORKERS = 2


def main() -> None:
    import ray

    model, data = trained_on_mnist("small_resnet", epochs=1, lr=3e-3, batch_size=128)
    s = pl.Session(model, data.test, device="cpu", batch_size=500)
    s.evaluate()  # trace and fill the cache outside the timed region, as the workers do before their first point
    threads = torch.get_num_threads()
    t = time.perf_counter()
    local = s.sensitivity(progress=False)
    baseline = time.perf_counter() - t
    torch.set_num_threads(1)
    t = time.perf_counter()
    single = s.sensitivity(progress=False)
    single_s = time.perf_counter() - t
    torch.set_num_threads(threads)
    t = time.perf_counter()
    ex = RayExecutor(workers=WORKERS, num_cpus=WORKERS, threads_per_worker=1)
    ex.connect()
    ray_init = time.perf_counter() - t
    try:
        t = time.perf_counter()
        remote = s.sensitivity(progress=False, executor=ex)
        ours = time.perf_counter() - t
    finally:
        ray.shutdown()
    points = len(local.records)
    per_point_ray = (ours - ex.overhead_s) * WORKERS / points
    print(json.dumps({
        "name": "distributed",
        "points": points,
        "workers": WORKERS,
        "in_process_threads": threads,
        "ours_s": round(ours, 2),
        "baseline_s": round(baseline, 2),
        "ratio": round(baseline / ours, 2),
        "identical": remote.records == local.records and single.records == local.records,
        "ray_init_s": round(ray_init, 2),
        "workers_start_s": round(ex.overhead_s, 2),
        "single_thread_s": round(single_s, 2),
        "per_point_overhead_ms": round((per_point_ray - single_s / points) * 1000, 1),
    }))


if __name__ == "__main__":
    main()
