"""When does a sparse kernel beat a dense one on this machine? ``W @ X`` with W 1024 x 1024 at
50-98% sparsity (zeros uniformly placed, as unstructured pruning leaves them) as CSR and as COO,
each timed against the same dense product in the same run, run by run alternating; also W at
batch 1 and W the size of the demo's fc1 (120 x 64), where the per-call overhead decides. The
figures are ratios (dense time / sparse time) and the break-even sparsity read from them
(``sparse_kernels.break_even``); ``None``: the sparse kernel lost at every level measured.
Prints one JSON line. Not a test: the numbers are this CPU's and this load's.

    python bench/sparse_kernels.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from prune_lab.sparse_kernels import time_sparse_matmul  # noqa: E402

CASES = {"1024x1024_b64_csr": (1024, 1024, 64, "csr"), "1024x1024_b64_coo": (1024, 1024, 64, "coo"),
         "1024x1024_b1_csr": (1024, 1024, 1, "csr"), "fc1_120x64_b64_csr": (120, 64, 64, "csr")}


def main() -> None:
    out: dict = {"name": "sparse_kernels", "threads": torch.get_num_threads(), "device": "cpu", "cases": {}}
    for name, (rows, cols, batch, layout) in CASES.items():
        t = time_sparse_matmul(rows, cols, batch, layout=layout, repeats=25)
        be = t.break_even
        out["cases"][name] = {
            "break_even": None if be is None else round(be, 3),
            "speedup": {f"{r.sparsity:.2f}": round(r.speedup, 2) for r in t.rows},
            "dense_ms_median": round(sorted(r.dense_ms for r in t.rows)[len(t.rows) // 2], 4),  # the baseline, same run
            "max_error": max(r.max_error for r in t.rows),
        }
    if torch.cuda.is_available():
        t = time_sparse_matmul(4096, 4096, 64, repeats=50, warmup=10, device="cuda")
        out["cases"]["cuda_4096x4096_b64_csr"] = {"device": t.device, "break_even": t.break_even,
                                                  "speedup": {f"{r.sparsity:.2f}": round(r.speedup, 2) for r in t.rows}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
