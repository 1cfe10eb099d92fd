"""The budget planner against uniform and global allocation at the same *measured* budget.

LeNet-5 (4 epochs) and the small ResNet (2 epochs) trained on the MNIST split (8,000 / 2,000),
one-shot, no fine-tuning. Budget: half (and a third) of the dense model's MACs per sample, for
weights (unstructured; MACs of nonzero weights counted) and channels (the compact model's MACs
counted). Uniform and global get the lowest sparsity whose measured MACs meet the same budget
(bisection on the measured value, 14 steps); the planner gets one sensitivity sweep. Every
accuracy is evaluated on the 2,000 test samples, every MAC count measured on the planned model.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prune_lab as pl  # noqa: E402
from bench._common import trained_on_mnist  # noqa: E402
from prune_lab.planner import CostMeter  # noqa: E402
from prune_lab.patterns import get_pattern  # noqa: E402

BUDGETS = (0.5, 0.33)
MODELS = (("lenet5", 4, 2e-3), ("small_resnet", 2, 1e-3))


def at_budget(s: pl.Session, meter: CostMeter, allocation: str, pattern: str, limit: float) -> dict:
    """The least sparsity of ``allocation`` whose measured MACs meet ``limit``; its accuracy."""
    pat = get_pattern(pattern)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(14):
        mid = (lo + hi) / 2
        s.reset()
        s.set_global_sparsity(mid, allocation=allocation, pattern=pattern)
        macs = meter.measure(pat, ("macs",))["macs"]
        if macs <= limit:
            hi, best = mid, (mid, macs)
        else:
            lo = mid
    s.reset()
    if best is None:
        return {"met": False}
    s.set_global_sparsity(best[0], allocation=allocation, pattern=pattern)
    out = {"accuracy": round(s.evaluate()["accuracy"], 4), "macs": int(best[1]), "sparsity": round(best[0], 4)}
    s.reset()
    return out


def main() -> None:
    rows = []
    for factory, epochs, lr in MODELS:
        model, data = trained_on_mnist(factory, epochs=epochs, lr=lr)
        s = pl.Session(model, data.test, device="cpu")
        meter = CostMeter(s.state, s.sizes, s.data.sample(256)[0], 1)
        dense_acc = s.evaluate()["accuracy"]
        for pattern, criterion in (("unstructured", "magnitude"), ("channels", "l1")):
            t = time.perf_counter()
            r = s.sensitivity(criterion=criterion, pattern=pattern, progress=False)
            sweep_s = time.perf_counter() - t
            for fraction in BUDGETS:
                t = time.perf_counter()
                plan = s.plan({"macs": fraction}, sensitivity=r)
                plan_s = time.perf_counter() - t
                row = {"model": factory, "pattern": pattern, "budget_macs": fraction, "dense_accuracy": round(dense_acc, 4),
                       "planner": {"accuracy": round(plan.measured["accuracy"], 4), "macs": int(plan.measured["macs"]),
                                   "predicted_accuracy": round(plan.predicted["accuracy"], 4),
                                   "plans_measured": len(plan.rounds), "plan_s": round(plan_s, 2), "sweep_s": round(sweep_s, 2)},
                       "limit_macs": int(plan.budget.limit)}
                for allocation in ("uniform", "global"):
                    row[allocation] = at_budget(s, meter, allocation, pattern, plan.budget.limit)
                rows.append(row)
    wins = sum(r["planner"]["accuracy"] >= max(r[a].get("accuracy", 0) for a in ("uniform", "global")) for r in rows)
    gain = [round(r["planner"]["accuracy"] - max(r[a].get("accuracy", 0) for a in ("uniform", "global")), 4) for r in rows]
    print(json.dumps({"name": "planner", "rows": rows, "planner_best_or_equal": f"{wins}/{len(rows)}",
                      "gain_over_best_baseline": gain}))


if __name__ == "__main__":
    main()
