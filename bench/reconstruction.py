"""One-shot pruning with and without weight reconstruction: LeNet-5 on the MNIST split.

Uniform per-layer sparsity (every layer the same fraction, as SparseGPT and Wanda prune) at 50,
70 and 90% and 2:4 (conv1, whose 1 input channel cannot hold 2:4, stays dense), no fine-tuning,
for magnitude, wanda, obd, sparsegpt (SparseGPT's own masks and refit) and magnitude + exact
refit (``reconstruct="exact"``: per-row least squares on magnitude's mask). Measured in the same
run: one training epoch of the model, the calibration pass that computes the input Gram
matrices, the time the refit itself takes per setting (set_sparsity with it minus without), and
the Gram matrices' bytes (8 * cols**2 per layer). Layer-wise reconstruction from the dense
model's inputs, not SparseGPT's sequential pass over pruned layers (stated in the README).
The language model: ``models.tiny_gpt`` (d=64, 2 blocks, q/k/v/o attention) trained 4 epochs on
``datasets.python_text`` (200,000 characters of Python's bundled documentation), pruned in its
blocks' Linear layers (embeddings and head dense, as the Wanda and SparseGPT papers do), scored
by perplexity exp(token cross-entropy) on the held-out tail.
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import timed_lenet5_epoch  # noqa: E402

import prune_lab as pl  # noqa: E402

LEVELS = (0.5, 0.7, 0.9, "2:4")
SETTINGS = {"magnitude": dict(criterion="magnitude"), "wanda": dict(criterion="wanda"), "obd": dict(criterion="obd"),
            "sparsegpt": dict(criterion="sparsegpt"), "magnitude+exact": dict(criterion="magnitude", reconstruct="exact")}


def prune(s: pl.Session, level, how: dict) -> float:
    t = time.perf_counter()
    if level == "2:4":
        s.set_global_sparsity(0.5, pattern="2:4", **how)
    else:
        s.set_global_sparsity(level, allocation="uniform", **how)
    return time.perf_counter() - t


def main() -> None:
    warnings.simplefilter("ignore")
    model, data, epoch_s = timed_lenet5_epoch()
    s = pl.Session(model, data.test, device="cpu")
    dense = s.evaluate()["accuracy"]
    s.calibrate(data.train, samples=512, batch_size=64, progress=False)
    t = time.perf_counter()
    s.state.calibration.ensure(("xtx",))
    gram_s = time.perf_counter() - t
    gram_bytes = s.state.calibration.nbytes()
    table, refit_s = {}, {}
    for name, how in SETTINGS.items():
        accs = []
        for level in LEVELS:
            s.reset()
            took = prune(s, level, how)
            accs.append(round(s.evaluate()["accuracy"], 4))
            if how.get("reconstruct") or name == "sparsegpt":
                s.reset()
                plain = prune(s, level, {"criterion": "magnitude"})
                refit_s[f"{name}@{level}"] = round(took - plain, 4)
        table[name] = accs
    s.reset()
    best_refit = [max(table["sparsegpt"][i], table["magnitude+exact"][i]) for i in range(len(LEVELS))]
    mag = table["magnitude"]
    lost = dense - mag[2]
    out = {
        "name": "reconstruction", "model": "lenet5", "dense": round(dense, 4), "levels": [str(lv) for lv in LEVELS],
        "accuracy": table,
        "beats_magnitude_at_70_90": all(best_refit[i] > mag[i] for i in (1, 2)),
        "recovered_at_90": round((best_refit[2] - mag[2]) / lost, 3) if lost > 0 else None,
        "epoch_s": round(epoch_s, 2), "gram_pass_s": round(gram_s, 3), "gram_pass_per_epoch": round(gram_s / epoch_s, 3),
        "refit_s_max": max(refit_s.values()), "refit_per_epoch_max": round(max(refit_s.values()) / epoch_s, 3),
        "gram_bytes": gram_bytes, "weight_bytes": sum(i.n_params * 4 for i in s.layers),
    }
    out["lm"] = language_model()
    print(json.dumps(out))


def language_model() -> dict:
    import math

    import torch

    torch.manual_seed(0)
    text = pl.datasets.python_text(seq_len=64, max_chars=200_000)
    model = pl.models.tiny_gpt(text, d=64, heads=4, layers=2)
    t = time.perf_counter()
    pl.train(model, text, epochs=4, lr=3e-3, batch_size=32, progress=False)
    epoch_s = (time.perf_counter() - t) / 4
    s = pl.Session(model, text.test, device="cpu")
    dense = math.exp(s.evaluate()["loss"])
    s.calibrate(text.train, samples=256, batch_size=32, progress=False)
    blocks = [i.name for i in s.layers if i.name.startswith("blocks")]
    table, took = {}, {}
    for crit in ("magnitude", "wanda", "obd", "sparsegpt"):
        row = []
        for level in LEVELS:
            s.reset()
            t = time.perf_counter()
            if level == "2:4":
                s.set_sparsity({n: 0.5 for n in blocks}, criterion=crit, pattern="2:4")
            else:
                s.set_sparsity({n: level for n in blocks}, criterion=crit)
            took[f"{crit}@{level}"] = time.perf_counter() - t
            row.append(round(math.exp(s.evaluate()["loss"]), 3))
        table[crit] = row
    s.reset()
    best = lambda i: min(table, key=lambda c: table[c][i])  # noqa: E731
    return {"dense_perplexity": round(dense, 3), "perplexity": table, "epoch_s": round(epoch_s, 2),
            "sparsegpt_s_max": round(max(v for k, v in took.items() if k.startswith("sparsegpt")), 3),
            "sparsegpt_beats_magnitude_at_70_90": all(table["sparsegpt"][i] < table["magnitude"][i] for i in (1, 2)),
            "lowest_at_2_4": best(3), "gram_bytes": s.state.calibration.nbytes() if s.state.calibration else 0}


if __name__ == "__main__":
    main()
