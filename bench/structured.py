"""Structured pruning, measured: the small ResNet trained on the MNIST split (8,000 / 2,000) with
50% of the channels of every channel group removed (``set_global_sparsity(0.5,
allocation="uniform", pattern="channels")``) and compacted, against the dense model in the same
run: MACs ratio, measured CPU latency ratios at batch 1 and 64, accuracy before and after a short
masked fine-tune. The same for unstructured (global magnitude) pruning at the same parameter
count, whose model keeps its dense shapes: its latency ratio is measured too (honestly ~1).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import prune_lab as pl  # noqa: E402
from bench._common import trained_on_mnist  # noqa: E402

FINETUNE_STEPS = 150


def main() -> None:
    model, data = trained_on_mnist("small_resnet", epochs=2)
    s = pl.Session(model, data.test, device="cpu")
    dense_acc = s.evaluate()["accuracy"]
    x = data.test.tensors[0][:64]

    s.set_global_sparsity(0.5, allocation="uniform", pattern="channels")
    structured_before = s.evaluate()["accuracy"]
    s.finetune(data.train, steps=FINETUNE_STEPS, lr=0.01, progress=False)
    structured_after = s.evaluate()["accuracy"]
    small = s.compact(measure=False)
    dense_params = sum(p.numel() for p in model.parameters())
    removed = dense_params - sum(p.numel() for p in small.parameters())
    from prune_lab.measure import model_macs

    lat = {b: {"dense": [], "compact": []} for b in (1, 64)}  # interleaved repeats: both see the same machine load

    macs_dense, macs_small = model_macs(model, x[:1]), model_macs(small, x[:1])
    dense_model = s.state.original_model()
    for _ in range(3):
        for b in (1, 64):
            lat[b]["dense"].append(pl.latency(dense_model, x, batch_sizes=(b,), repeats=20).ms[b])
            lat[b]["compact"].append(pl.latency(small, x, batch_sizes=(b,), repeats=20).ms[b])

    # unstructured at the same parameter count: the same number of entries zeroed, shapes kept
    s.reset()
    prunable = sum(i.n_params for i in s.layers)
    s.set_global_sparsity(min(removed / prunable, 0.99), allocation="global")
    unstructured_before = s.evaluate()["accuracy"]
    s.finetune(data.train, steps=FINETUNE_STEPS, lr=0.01, progress=False)
    unstructured_after = s.evaluate()["accuracy"]
    nonzero_removed = s.stats().total["params"] - s.stats().total["nonzeros"]
    lat_u = {b: [] for b in (1, 64)}
    lat_d = {b: [] for b in (1, 64)}
    for _ in range(3):
        for b in (1, 64):
            lat_d[b].append(pl.latency(dense_model, x, batch_sizes=(b,), repeats=20).ms[b])
            lat_u[b].append(pl.latency(model, x, batch_sizes=(b,), repeats=20).ms[b])

    def med(v: list[float]) -> float:
        return sorted(v)[len(v) // 2]

    out = {
        "name": "structured",
        "model": "small_resnet", "data": "MNIST 8000/2000", "channels_removed": 0.5, "threads": torch.get_num_threads(),
        "dense_accuracy": round(dense_acc, 4),
        "params_dense": dense_params, "params_compact": dense_params - removed,
        "macs_dense": macs_dense, "macs_compact": macs_small,
        "macs_ratio": round(macs_dense / macs_small, 2),
        "latency_ms_b1": {"dense": round(med(lat[1]["dense"]), 3), "compact": round(med(lat[1]["compact"]), 3)},
        "latency_ms_b64": {"dense": round(med(lat[64]["dense"]), 3), "compact": round(med(lat[64]["compact"]), 3)},
        "latency_ratio_b1": round(med(lat[1]["dense"]) / med(lat[1]["compact"]), 2),
        "latency_ratio_b64": round(med(lat[64]["dense"]) / med(lat[64]["compact"]), 2),
        "accuracy_structured": {"before_finetune": round(structured_before, 4), "after_finetune": round(structured_after, 4)},
        "unstructured_same_params": {
            "zeroed": nonzero_removed, "compact_removed": removed,
            "accuracy": {"before_finetune": round(unstructured_before, 4), "after_finetune": round(unstructured_after, 4)},
            "latency_ratio_b1": round(med(lat_d[1]) / med(lat_u[1]), 2),
            "latency_ratio_b64": round(med(lat_d[64]) / med(lat_u[64]), 2),
        },
        "finetune_steps": FINETUNE_STEPS,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
