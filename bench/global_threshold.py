"""set_global_sparsity(0.9) vs torch.nn.utils.prune.global_unstructured on ~100M parameters.

Each side runs in its own fresh process; prints one JSON line. Peak extra memory is the rise in
resident memory during the call alone. Our Session also holds a copy of the original weights,
made at construction (reported as ours_session_mb), which torch keeps as ``weight_orig``.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import PeakRSS, rss_bytes, run_fresh  # noqa: E402

LAYERS, WIDTH, SPARSITY = 25, 2000, 0.9  # 25 x 2000 x 2000 = 100M weights


def build():
    """Linear layers whose |weights| are all distinct (tie-free), so any correct k-smallest
    selection gives the same mask: float32 bit patterns from a seeded permutation, random signs.
    (PyTorch's default init draws 100M floats with many exact ties, where torch.topk picks
    arbitrary tied entries.)"""
    import torch

    g = torch.Generator().manual_seed(0)
    n = WIDTH * WIDTH
    bits = torch.randperm(LAYERS * n, generator=g, dtype=torch.int32).add_(0x30000000)
    sign = torch.randint(0, 2, (LAYERS * n,), generator=g, dtype=torch.int32).mul_(-(2**31))
    values = bits.bitwise_or_(sign).view(torch.float32)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])
    with torch.no_grad():
        for i, layer in enumerate(model):
            layer.weight.copy_(values[i * n : (i + 1) * n].view(WIDTH, WIDTH))
    del bits, sign, values
    return model


def child(side: str, mask_path: str) -> None:
    import numpy as np
    import torch

    model = build()
    layers = list(model)
    if side == "ours":
        import prune_lab as pl

        before = rss_bytes()
        s = pl.Session(model, (torch.zeros(1, WIDTH), torch.zeros(1, dtype=torch.long)), device="cpu")
        session_mb = (rss_bytes() - before) / 2**20
        with PeakRSS() as mem:
            t = time.perf_counter()
            s.set_global_sparsity(SPARSITY, allocation="global")
            elapsed = time.perf_counter() - t
        masks = [s.mask(str(i)) for i in range(LAYERS)]
    else:
        from torch.nn.utils import prune

        session_mb = 0.0
        with PeakRSS() as mem:
            t = time.perf_counter()
            prune.global_unstructured([(l, "weight") for l in layers], pruning_method=prune.L1Unstructured, amount=SPARSITY)
            elapsed = time.perf_counter() - t
        masks = [l.weight_mask.bool() for l in layers]
    np.save(mask_path, np.packbits(torch.cat([m.reshape(-1) for m in masks]).numpy()))
    print(json.dumps({"s": elapsed, "peak_mb": mem.extra_mb, "session_mb": session_mb}))


def main() -> None:
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        ours_path, base_path = f"{tmp}/ours.npy", f"{tmp}/base.npy"
        ours = run_fresh(Path(__file__), "ours", ours_path)
        base = run_fresh(Path(__file__), "baseline", base_path)
        equal = bool(np.array_equal(np.load(ours_path), np.load(base_path)))
    print(json.dumps({
        "name": "global_threshold",
        "params": LAYERS * WIDTH * WIDTH,
        "ours_s": round(ours["s"], 3),
        "baseline_s": round(base["s"], 3),
        "ratio": round(base["s"] / ours["s"], 2),
        "ours_peak_mb": round(ours["peak_mb"], 1),
        "baseline_peak_mb": round(base["peak_mb"], 1),
        "mem_frac": round(ours["peak_mb"] / base["peak_mb"], 4),
        "ours_session_mb": round(ours["session_mb"], 1),
        "masks_equal": equal,
    }))


if __name__ == "__main__":
    if len(sys.argv) == 3:
        child(sys.argv[1], sys.argv[2])
    else:
        main()
