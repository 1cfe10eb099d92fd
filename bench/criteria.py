"""One-shot accuracy by criterion: LeNet-5 on the MNIST split (8,000 train / 2,000 test).

Global allocation at 80, 90 and 95% sparsity for magnitude, taylor, obd, wanda and random, no
fine-tuning. Also measured in the same run: ``calibration_s`` (calibrate() on 512 training
samples, every statistic) against ``epoch_s`` (one training epoch of the same model), and, since
a global threshold compares scores across layers (where taylor and obd scores differ in scale),
the same criteria with the ``lamp`` allocation (counts from magnitudes, so only the criterion differs).
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

LEVELS = (0.8, 0.9, 0.95)
CRITERIA = ("magnitude", "taylor", "obd", "wanda", "random")


def main() -> None:
    warnings.simplefilter("ignore")
    model, data, epoch_s = timed_lenet5_epoch()
    s = pl.Session(model, data.test, device="cpu")
    dense = s.evaluate()["accuracy"]
    t = time.perf_counter()
    s.calibrate(data.train, samples=512, batch_size=64, criteria=CRITERIA, progress=False)  # every statistic, one pass
    calibration_s = time.perf_counter() - t
    out: dict = {"name": "criteria", "dense": round(dense, 4), "levels": list(LEVELS)}
    for allocation in ("global", "lamp"):
        table = {}
        for criterion in CRITERIA:
            accs = []
            for level in LEVELS:
                s.set_global_sparsity(level, allocation=allocation, criterion=criterion)
                accs.append(round(s.evaluate()["accuracy"], 4))
            table[criterion] = accs
        out[allocation] = table
    weight_bytes = sum(i.n_params * 4 for i in s.layers)
    fresh = pl.Session(model, data.test, device="cpu")
    fresh.calibrate(data.train, samples=512, batch_size=64, progress=False)  # the default: held per criterion in use
    held = {}
    for criterion in ("taylor", "obd", "wanda"):
        fresh.set_global_sparsity(0.5, criterion=criterion)
        held[criterion] = round(fresh.state.calibration.nbytes() / weight_bytes, 3)
    out["held_copies_of_weights"] = held
    out["calibration_s"] = round(calibration_s, 2)
    out["epoch_s"] = round(epoch_s, 2)
    out["calibration_per_epoch"] = round(calibration_s / epoch_s, 3)
    best = {lv: max(out["global"][c][i] for c in ("taylor", "obd", "wanda")) for i, lv in enumerate(LEVELS)}
    out["best_data_aware_ge_magnitude_90_95"] = all(best[lv] >= out["global"]["magnitude"][i] for i, lv in enumerate(LEVELS) if lv >= 0.9)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
