"""How far the notebooks' trained targets are from failing, on other CPUs.

Training sums floats in an order that depends on the CPU's vector width and the thread count, so
the demo model and every fine-tuning run differ from machine to machine. This runs the reference
answers of notebook 02 (a quarter of the file, at most 5 more test digits wrong; the plan chosen on
validation digits, ``pl.demo(val=0.2)``) and notebook 03
(exercise 1: within a point; exercise 2: 90% sparsity, at most 7 more digits wrong; exercise 3:
global beats uniform at 90%) and notebook 05 (at 90%, one-shot: magnitude under LAMP beats random
by at least 10 points; how the data-aware criteria compare is printed as a range) for demo seeds 0-4, and notebook 08
(at 2:4 the next best criterion's perplexity is at least 1.05x SparseGPT's; seeds 0-2, ``PRUNE_LAB_TARGETS=08``)
under every setting of
``ATEN_CPU_CAPABILITY`` (``default``, ``avx2``, the machine's own) x ``OMP_NUM_THREADS`` (1, 2),
each setting in a fresh process with a fresh cache. It prints one JSON line: per target the worst
outcome, the target and the margin (in test samples where the target is a count of samples).

    python bench/targets.py            # all settings (about 10 minutes on 2 cores)
    python bench/targets.py --one 0    # one process: seed 0 in this process's setting
    PRUNE_LAB_TARGETS=05 python bench/targets.py   # notebook 05's targets only
    PRUNE_LAB_TARGETS=A2 python bench/targets.py   # assignment 2's (plan, timid plan, masked training)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SEEDS = (0, 1, 2, 3, 4)
SETTINGS = [(cap, threads) for cap in ("native", "avx2", "default") for threads in (1, 2)]
# (worst is the largest of these; the target is an upper bound) or (smallest; lower bound)
TARGETS = {
    "02_more_wrong": ("max", 5),
    "02_file_fraction": ("max", 0.25),
    "03e1_drop_points": ("max", 1.0),
    "03e2_more_wrong": ("max", 7),
    "03e2_sparsity": ("min", 0.9),
    "03e3_global_minus_uniform_points": ("min", 0.0),
    "05_magnitude_minus_random_points": ("min", 10.0),
    "08_next_best_over_sparsegpt_at_2_4": ("min", 1.05),
    "A2_plan_more_wrong_val": ("max", 2),
    "A2_timid_plan_more_wrong_val": ("max", 2),
    "A2_plan_file_fraction": ("max", 0.25),
    "A2_masked_training_val_accuracy": ("min", 0.9),
}
REPORTED = ["05_best_data_aware_minus_magnitude_digits"]  # no target: the range is printed


def one(seed: int) -> dict:
    """The reference answers' outcomes for the demo of ``seed``, as the notebooks compute them."""
    import torch

    import prune_lab as pl

    if os.environ.get("PRUNE_LAB_TARGETS") == "08":
        return notebook_08(seed)
    if os.environ.get("PRUNE_LAB_TARGETS") == "A2":
        return assignment_02(seed)

    model, data = pl.demo(progress=False, seed=seed)
    s = pl.Session(model, data.test)
    dense = s.evaluate()["accuracy"]
    out: dict = {"seed": seed, "threads": torch.get_num_threads(), "dense": dense}
    out.update(notebook_05(s, data))
    if os.environ.get("PRUNE_LAB_TARGETS") == "05":
        return out
    out.update(notebooks_02_03(seed))
    return out


def notebooks_02_03(seed: int) -> dict:
    """Notebooks 02 and 03 as they run: the demo trained on 1150 digits, every choice (sweep,
    plan, ranking, allocation) on the 288 validation digits, the targets counted on the 359
    test digits by a plain forward pass (exercise 1 and 3 on validation, where they choose)."""
    import prune_lab as pl

    model, data = pl.demo(progress=False, seed=seed, val=0.2)
    n = len(data.test)
    dense_test = pl.models.test_accuracy(model, data)
    s = pl.Session(model, data.val)
    dense_val = s.evaluate()["accuracy"]
    out: dict = {"dense_test_val_demo": dense_test}
    result = s.sensitivity(progress=False)
    s.set_sparsity(result.allocate(target_sparsity=0.8))  # notebook 02's exercise
    size = s.stats().total
    out["02_file_fraction"] = size["sparse_file_bytes"] / size["dense_file_bytes"]
    s.finetune(data.train, steps=1000, lr=0.01, progress=False)
    out["02_more_wrong"] = round((dense_test - pl.models.test_accuracy(model, data)) * n)
    s.reset()
    ranking = result.ranking(max_drop=0.01)  # notebook 03, exercise 1
    best = next(iter(ranking))
    s.set_sparsity({best: ranking[best]})
    out["03e1_drop_points"] = (dense_val - s.evaluate()["accuracy"]) * 100
    s.reset()
    s.set_global_sparsity(0.9, allocation="global")  # exercise 2: what the Lab's "global" at 90% applies
    pl.LabModel(s, train_data=data.train).run_finetune(steps=1000, lr=0.01)  # the fine-tune tab's run
    out["03e2_more_wrong"] = round((dense_test - pl.models.test_accuracy(model, data)) * n)
    out["03e2_sparsity"] = s.total_sparsity()
    s.reset()
    acc = {}
    for allocation in ("uniform", "global"):  # exercise 3
        s.set_global_sparsity(0.9, allocation=allocation)
        acc[allocation] = s.evaluate()["accuracy"]
    out["03e3_global_minus_uniform_points"] = (acc["global"] - acc["uniform"]) * 100
    return out


def notebook_05(s, data) -> dict:
    """Notebook 05's one-shot table at 10x (90%): magnitude against random (its answer's
    assert) and against the best data-aware criterion (which one wins differs between demo
    models: reported, not a target)."""
    n = len(data.test)
    s.calibrate(data.train, samples=512, criteria=["taylor", "obd", "wanda"], progress=False)
    one_shot = s.tradeoff(strategies=["lamp", "lamp/taylor", "lamp/obd", "lamp/wanda", "random"], compressions=(10,),
                          cache=False, progress=False)
    at_90 = {r["strategy"]: r["accuracy"] for r in one_shot.records}
    s.reset()
    best = max(v for k, v in at_90.items() if k.startswith("lamp/"))
    return {"05_magnitude_minus_random_points": (at_90["lamp"] - at_90["random"]) * 100,
            "05_best_data_aware_minus_magnitude_digits": round((best - at_90["lamp"]) * n)}


def notebook_08(seed: int) -> dict:
    """Notebook 08's 2:4 table (its training, calibration and pruning, with the seed varied):
    the next best criterion's perplexity over SparseGPT's (the answer asserts >= 1.05)."""
    import torch

    import prune_lab as pl

    torch.manual_seed(seed)
    text = pl.datasets.python_text(seq_len=64, max_chars=200_000)
    model = pl.models.tiny_gpt(text)
    pl.train(model, text, epochs=6, lr=3e-3, batch_size=32, progress=False, seed=seed)
    s = pl.Session(model, text.test, metric=pl.metrics.perplexity)
    dense = s.evaluate()["perplexity"]
    s.calibrate(text.train, samples=256, batch_size=32, progress=False)
    blocks = [i.name for i in s.layers if i.name.startswith("blocks.")]
    at = {}
    for criterion in ("magnitude", "wanda", "sparsegpt"):
        s.set_sparsity({n: 0.5 for n in blocks}, criterion=criterion, pattern="2:4")
        at[criterion] = s.evaluate()["perplexity"]
        s.reset()
    return {"seed": seed, "threads": torch.get_num_threads(), "dense": dense, "at_2_4": at,
            "08_next_best_over_sparsegpt_at_2_4": min(at["magnitude"], at["wanda"]) / at["sparsegpt"]}


def assignment_02(seed: int) -> dict:
    """Assignment 2's trained outcomes with the source notebook's own solution code (its solution
    cells run here) and the checks' own settings: the reference plan's validation digits lost after
    the checked fine-tuning (at most 2), the "timid" wrong submission's (every layer at 0.3; it came
    within a digit of the target on one setting, so the test does not assert that cell), and the reference ``train_masked``'s
    validation accuracy from prune_lab's rewound ticket (at least 0.9)."""
    import copy

    import torch

    import prune_lab as pl
    from prune_lab.plan_checks import plan_file_fraction
    from prune_lab.ticket_checks import library_masks

    source = Path(__file__).resolve().parents[1] / "assignments/source/02_plan_and_ticket/02_plan_and_ticket.ipynb"
    cells = json.loads(source.read_text())["cells"]
    space: dict = {"torch": torch, "nn": torch.nn}
    for c in cells:
        if c["metadata"].get("nbgrader", {}).get("solution"):
            exec("".join(c["source"]), space)
    model, data = pl.demo(progress=False, seed=seed, val=0.2)
    s = pl.Session(model, data.val)
    n, dense = len(data.val), s.evaluate()["accuracy"]
    out: dict = {"seed": seed, "threads": torch.get_num_threads(), "dense": dense}
    for key, plan in (("A2_plan_more_wrong_val", space["plan"]), ("A2_timid_plan_more_wrong_val", {i.name: 0.3 for i in s.layers})):
        s.set_sparsity(plan)
        s.finetune(data.train, steps=300, lr=0.01, progress=False, seed=0)  # what check_plan_accuracy runs
        out[key] = round((dense - s.evaluate()["accuracy"]) * n)
        s.reset()
    sparse, dense_bytes = plan_file_fraction(space["plan"], s)
    out["A2_plan_file_fraction"] = sparse / dense_bytes
    torch.manual_seed(1 + seed)
    net = pl.models.mlp(data)
    theta0 = {k: v.clone() for k, v in net.state_dict().items()}
    pl.Session(net, data.val).finetune(data.train, steps=300, lr=0.05, progress=False)
    start = pl.Session(copy.deepcopy(net), data.val)
    start.set_global_sparsity(0.9, allocation="global")
    start.rewind_to(theta0)
    trained = space["train_masked"](start.model, library_masks(net, 0.9, data.val), data, 300, 0.05)
    x, y = data.val.tensors
    with torch.no_grad():
        out["A2_masked_training_val_accuracy"] = float((trained.eval()(x).argmax(1) == y).float().mean())
    return out


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(one(int(sys.argv[2]))), flush=True)
        return
    from concurrent.futures import ThreadPoolExecutor

    def run(cap: str, threads: int, seed: int) -> dict:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PRUNE_LAB_CACHE": tempfile.mkdtemp(prefix="pl-targets-")}
        env.pop("ATEN_CPU_CAPABILITY", None)
        if cap != "native":
            env["ATEN_CPU_CAPABILITY"] = cap
        done = subprocess.run([sys.executable, __file__, "--one", str(seed)], env=env, stdout=subprocess.PIPE, text=True,
                              check=True)
        return {"cpu": cap, **json.loads(done.stdout.strip().splitlines()[-1])}

    seeds = SEEDS[:3] if os.environ.get("PRUNE_LAB_TARGETS") == "08" else SEEDS
    with ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) // 2)) as pool:
        rows = list(pool.map(lambda job: run(*job), [(c, t, s) for c, t in SETTINGS for s in seeds]))
    worst = {}
    for name, (kind, target) in TARGETS.items():
        values = [r[name] for r in rows if name in r]
        if not values:
            continue  # not measured in this run (PRUNE_LAB_TARGETS)
        w = max(values) if kind == "max" else min(values)
        worst[name] = {"worst": round(w, 4), "target": target, "margin": round((target - w) if kind == "max" else (w - target), 4)}
    print(json.dumps({"name": "notebook_targets", "runs": len(rows), "settings": [f"{c}/{t}" for c, t in SETTINGS],
                      "only": os.environ.get("PRUNE_LAB_TARGETS", "all"),
                      "seeds": list(seeds), "dense_range": [round(min(r["dense"] for r in rows), 4),
                                                            round(max(r["dense"] for r in rows), 4)],
                      **({"perplexity_2_4": [r["at_2_4"] for r in rows]} if os.environ.get("PRUNE_LAB_TARGETS") == "08" else {}),
                      **({"dense_test_val_demo_range": [round(min(r["dense_test_val_demo"] for r in rows), 4),
                                                        round(max(r["dense_test_val_demo"] for r in rows), 4)]}
                         if all("dense_test_val_demo" in r for r in rows) else {}),
                      "targets": worst, "all_met": all(v["margin"] >= 0 for v in worst.values()),
                      "reported": {k: [min(r[k] for r in rows), max(r[k] for r in rows)] for k in REPORTED
                                   if all(k in r for r in rows)}}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
