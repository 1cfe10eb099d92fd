"""Deep Compression (Han et al. 2016) on LeNet-300-100, MNIST split (8,000 train / 2,000 test):
prune (iterative magnitude pruning with fine-tuning), quantize (k-means weight sharing, then a
short fine-tune with the codes re-fitted), Huffman-code (the compressed export). Prints one JSON
line: the dense accuracy, and the highest ``file_compression`` (dense fp32 ``torch.save`` bytes /
compressed export bytes, Huffman included, the file actually written) whose accuracy is within
0.5 points of dense, with the size after each stage and ``wall_s``. The paper reports 40x for
LeNet-300-100 on full MNIST.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import trained_on_mnist  # noqa: E402


import prune_lab as pl  # noqa: E402

TOLERANCE = 0.005
PER_ROUND = 0.3
ROUNDS = 12
EPOCHS_PER_ROUND = 2
BITS = (6, 5, 4, 3)


def main() -> None:
    start = time.perf_counter()
    model, data = trained_on_mnist("mlp", epochs=15, lr=1e-3, batch_size=64)
    s = pl.Session(model, data.test, device="cpu")
    dense = s.evaluate()["accuracy"]
    dense_bytes = s.dense_file_bytes()

    # stage 1: prune, keeping every round's state within the tolerance
    pruned = []
    for r in range(1, ROUNDS + 1):
        res = s.finetune(data.train, epochs=EPOCHS_PER_ROUND, lr=0.01, momentum=0.9, target_sparsity=1 - (1 - PER_ROUND) ** r,
                         allocation="global", progress=False, seed=r)
        if res.evaluations[-1]["accuracy"] >= dense - TOLERANCE:
            pruned.append((s.stats().total, s.snapshot(), res.evaluations[-1]["accuracy"]))
    # stages 2 and 3: quantize the most pruned states, fine-tune with the codes re-fitted, Huffman-code
    best: dict = {"file_compression": 1.0}
    for total, snap, acc_pruned in reversed(pruned[-3:]):
        for bits in BITS:
            s.restore(snap)
            s.set_global_bits(bits, method="kmeans")
            acc_q = s.evaluate()["accuracy"]
            res = s.finetune(data.train, epochs=1, lr=0.002, momentum=0.9, progress=False, seed=100 + bits)
            if res.evaluations and res.evaluations[-1]["accuracy"] < acc_q:
                s.restore(snap)
                s.set_global_bits(bits, method="kmeans")  # the fine-tune did not help: its start
            acc = s.evaluate()["accuracy"]
            with tempfile.TemporaryDirectory() as d:
                path = s.export(Path(d) / "lenet300.pt", sparse=True)["model"]
                file_bytes = path.stat().st_size
                assert file_bytes == s.stats().total["sparse_file_bytes"]
            if acc >= dense - TOLERANCE and dense_bytes / file_bytes > best["file_compression"]:
                best = {"file_compression": round(dense_bytes / file_bytes, 1), "accuracy": round(acc, 4), "bits": bits,
                        "weights_kept": round(total["nonzeros"] / total["params"], 4),
                        "sizes": {"dense_fp32": dense_bytes, "pruned": total["sparse_file_bytes"],
                                  "pruned_quantized_huffman": file_bytes},
                        "accuracy_after": {"pruning": round(acc_pruned, 4), "quantization": round(acc_q, 4),
                                           "fine_tune": round(acc, 4)}}
    s.reset()
    print(json.dumps({"name": "deep_compression", "dense_accuracy": round(dense, 4), **best,
                      "paper_lenet300_100": 40, "wall_s": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
