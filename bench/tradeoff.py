"""LeNet-300-100 on MNIST (8,000 training / 2,000 test images of the shared 10k split): the highest
compression (params / nonzeros) that keeps accuracy within 0.5 points of dense, for iterative
magnitude pruning with fine-tuning versus one-shot global magnitude without it. Prints one JSON line.
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

TOLERANCE = 0.005
PER_ROUND = 0.3  # iterative pruning removes this fraction of the remaining weights per round
ROUNDS = 12
EPOCHS_PER_ROUND = 2


def main() -> None:
    start = time.perf_counter()
    model, data = trained_on_mnist("mlp", epochs=15, lr=1e-3, batch_size=64)
    s = pl.Session(model, data.test, device="cpu")
    dense = s.evaluate()["accuracy"]

    # one-shot global magnitude, no fine-tuning: a fine grid of compressions
    oneshot = 1.0
    for c in (1.5, 2, 2.5, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64):
        s.set_global_sparsity(1 - 1 / c, allocation="global")
        if s.evaluate()["accuracy"] >= dense - TOLERANCE:
            oneshot = c
    s.reset()
    t_oneshot = time.perf_counter() - start

    # iterative magnitude pruning with fine-tuning (Han et al. 2015 style)
    finetuned, history = 1.0, []
    for r in range(1, ROUNDS + 1):
        sparsity = 1 - (1 - PER_ROUND) ** r
        res = s.finetune(data.train, epochs=EPOCHS_PER_ROUND, lr=0.01, momentum=0.9, schedule="oneshot",
                         target_sparsity=sparsity, allocation="global", progress=False, seed=r)
        st = s.stats().total
        acc = res.evaluations[-1]["accuracy"]
        compression = st["params"] / st["nonzeros"]
        history.append((round(compression, 2), round(acc, 4)))
        if acc >= dense - TOLERANCE:
            finetuned = compression
    s.reset()
    print(json.dumps({
        "name": "tradeoff",
        "dense_acc": round(dense, 4),
        "compression_finetuned": round(finetuned, 2),
        "compression_oneshot": round(oneshot, 2),
        "wall_s": round(time.perf_counter() - start, 1),
        "oneshot_wall_s": round(t_oneshot, 1),
        "iterative_rounds": history,
    }))


if __name__ == "__main__":
    main()
