"""Every notebook, run as a teacher runs it (no fast mode, a fresh cache), under other CPUs.

For each setting of ``ATEN_CPU_CAPABILITY`` (the machine's own, ``avx2``, ``default``) x
``OMP_NUM_THREADS`` (1, 2) every notebook runs in a fresh kernel with an empty cache (so the demo
model is trained anew, as on a student's first run), and every assert in it must hold. Prints one
JSON line: per setting the notebooks that failed (with the error's last line) and the wall time
per notebook, and the time of each setting relative to the machine's own at 2 threads.

    python bench/notebook_settings.py                  # every setting (about an hour on 2 cores)
    python bench/notebook_settings.py native/2 default/1
    PRUNE_LAB_NOTEBOOKS=08 python bench/notebook_settings.py    # one notebook, every setting
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [f"{cap}/{threads}" for cap in ("native", "avx2", "default") for threads in (1, 2)]


def run_notebook(path: Path, env: dict[str, str]) -> tuple[float, str]:
    """(seconds, error) for one notebook executed in a kernel that sees ``env``."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        nb = nbformat.read(path, as_version=4)
        workdir = tempfile.mkdtemp(prefix="pl-nb-")
        start = time.perf_counter()
        try:
            NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": workdir}}).execute()
            error = ""
        except CellExecutionError as e:
            error = str(e).strip().splitlines()[-1][:300]
        return time.perf_counter() - start, error
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main() -> None:
    settings = sys.argv[1:] or SETTINGS
    only = os.environ.get("PRUNE_LAB_NOTEBOOKS", "")  # e.g. "08" or "05,08": those notebooks only
    notebooks = [p for p in sorted((ROOT / "notebooks").glob("*.ipynb")) if not only or p.name[:2] in only.split(",")]
    mnist = os.environ.get("PRUNE_LAB_MNIST", str(ROOT.parent / "shared" / "data" / "mnist"))
    report: dict = {}
    for setting in settings:
        cap, threads = setting.split("/")
        env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "PRUNE_LAB_FAST", "MPLBACKEND")}
        env.update(OMP_NUM_THREADS=threads, PRUNE_LAB_MNIST=mnist, PRUNE_LAB_CACHE=tempfile.mkdtemp(prefix="pl-cache-"),
                   PYTHONPATH=str(ROOT))
        if cap != "native":
            env["ATEN_CPU_CAPABILITY"] = cap
        times, failed = {}, {}
        for nb in notebooks:
            seconds, error = run_notebook(nb, env)
            times[nb.name[:2]] = round(seconds, 1)
            if error:
                failed[nb.name] = error
        report[setting] = {"failed": failed, "seconds": times, "total_s": round(sum(times.values()), 1)}
        print(json.dumps({setting: report[setting]}), file=sys.stderr, flush=True)
    base = report.get("native/2", next(iter(report.values())))["total_s"]
    print(json.dumps({"name": "notebook_settings", "settings": report,
                      "all_passed": not any(r["failed"] for r in report.values()),
                      "time_vs_native_2_threads": {s: round(r["total_s"] / base, 2) for s, r in report.items()}}))


if __name__ == "__main__":
    main()
