"""One slider step on the demo model: set_sparsity on one layer + evaluate() + stats().

Baseline: the same by hand with torch.nn.utils.prune — reload the original weights (torch's
masks cannot be lowered), l1_unstructured, evaluate over a DataLoader, count nonzeros, remove.
Prints one JSON line with medians over the same sequence of sparsities.
"""
from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.nn.utils import prune  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import prune_lab as pl  # noqa: E402

LAYER = "fc1"
STEPS = [0.1 * (i % 10) for i in range(1, 61)]


def ours(model, data) -> list[float]:
    s = pl.Session(model, data.test, device="cpu")
    times = []
    for sp in STEPS:
        t = time.perf_counter()
        s.set_sparsity({LAYER: sp})
        s.evaluate()
        s.stats()
        times.append(time.perf_counter() - t)
    s.reset()
    return times


def baseline(model, data) -> list[float]:
    model = copy.deepcopy(model)
    original = copy.deepcopy(model.state_dict())
    loader = DataLoader(data.test, batch_size=256)
    module = model.get_submodule(LAYER)
    times = []
    for sp in STEPS:
        t = time.perf_counter()
        model.load_state_dict(original)
        prune.l1_unstructured(module, "weight", amount=sp)
        model.eval()
        correct = total = 0
        loss = 0.0
        with torch.no_grad():
            for x, y in loader:
                out = model(x)
                loss += torch.nn.functional.cross_entropy(out, y, reduction="sum").item()
                correct += (out.argmax(1) == y).sum().item()
                total += len(y)
        nonzeros = sum(int((p != 0).sum()) for p in model.parameters())
        prune.remove(module, "weight")
        times.append(time.perf_counter() - t)
    _ = (correct / total, loss / total, nonzeros)
    return times


def main() -> None:
    torch.set_num_threads(torch.get_num_threads())
    model, data = pl.demo(progress=False)
    ours(model, data), baseline(model, data)  # warm-up
    o = statistics.median(ours(model, data)) * 1000
    b = statistics.median(baseline(model, data)) * 1000
    print(json.dumps({"name": "session_latency", "ours_ms": round(o, 2), "baseline_ms": round(b, 2), "ratio": round(b / o, 2), "steps": len(STEPS)}))


if __name__ == "__main__":
    main()
