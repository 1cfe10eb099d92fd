"""Writes the notebooks from plain cell lists, so their source is reviewable as Python.

Run: python tools/make_notebooks.py  (outputs are left empty; the tests execute them).
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parents[1] / "notebooks"


def build(name: str, cells: list[tuple[str, str]]) -> None:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells]
    nbformat.write(nb, HERE / name)


NB01 = [
    ("md", """# 1 · Weights and masks

What does pruning actually do to a network? In this notebook you take a small trained CNN, look at
the distribution of its weights layer by layer, zero the smallest ones, and watch what that costs in
accuracy and buys in size and compute. Every number here is **measured** on the model, not estimated.

The demo model is a LeNet-5-style CNN trained on scikit-learn's bundled 8×8 handwritten digits
(no download; the first run trains it in a few seconds and caches the weights)."""),
    ("code", """import prune_lab as pl

model, data = pl.demo()
data"""),
    ("md", """A `Session` wraps the model and the data we evaluate on. It finds the layers that can be pruned
(Linear and convolution layers), and keeps a copy of every original weight so nothing is ever lost."""),
    ("code", """session = pl.Session(model, data.test)
session"""),
    ("code", """session.evaluate()"""),
    ("md", """## The weights before pruning

Each panel is one layer's weight histogram. Most weights sit close to zero: magnitude pruning bets
that those matter least."""),
    ("code", """pl.plots.weight_histograms(session)"""),
    ("md", """## Prune one layer

`set_sparsity` zeroes exactly `round(sparsity × n)` weights of a layer — here the 80% of `fc1`'s
weights with the smallest magnitude. The red part of the histogram is what was removed; the dashed
lines are the magnitude threshold."""),
    ("code", """session.set_sparsity({"fc1": 0.8})
pl.plots.weight_histograms(session, layers=["fc1"])"""),
    ("code", """print(session.evaluate())
session.stats()"""),
    ("md", """`nonzeros`, `sparse B` (bytes of the compact encoding) and `eff. MACs` (multiply-accumulates
with a nonzero weight, per input) all dropped for `fc1`. The file sizes at the bottom are the real
lengths of the dense and the sparse export.

Moving the slider *down* un-prunes: masks are always recomputed from the original weights."""),
    ("code", """session.set_sparsity({"fc1": 0.3})
session.evaluate()"""),
    ("md", """## The whole model at once

`set_global_sparsity` prunes to a total sparsity. `"global"` uses one magnitude threshold across
all layers (like `torch.nn.utils.prune.global_unstructured`), so big redundant layers give up more;
`"uniform"` prunes every layer by the same fraction. A log count axis shows the tails."""),
    ("code", """for allocation in ("uniform", "global"):
    session.set_global_sparsity(0.8, allocation=allocation)
    acc = session.evaluate()["accuracy"]
    per_layer = ", ".join(f"{k} {v:.0%}" for k, v in session.sparsity.items())
    print(f"{allocation:>8}: accuracy {acc:.3f} | {per_layer}")"""),
    ("code", """pl.plots.weight_histograms(session, log=True)"""),
    ("md", """## Reset is exact

`reset()` restores every parameter and buffer bit for bit."""),
    ("code", """import torch

session.reset()
original = session.original_state()
assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
session.evaluate()"""),
    ("md", """## Keep the result

`export` writes the pruned state_dict (loadable into the same architecture) and a JSON recipe that
reproduces the masks on a fresh copy of the model."""),
    ("code", """import tempfile, pathlib

session.set_global_sparsity(0.8)
out = pathlib.Path(tempfile.mkdtemp())
paths = session.export(out / "lenet5_80.pt", sparse=True)
print({k: f"{p.name}: {p.stat().st_size:,} bytes" for k, p in paths.items()})
session.reset();"""),
    ("md", """Next: `02_layer_sensitivity.ipynb` asks *which* layers tolerate pruning."""),
]

NB02 = [
    ("md", """# 2 · Layer sensitivity

Which layers can you prune, and how far? A sensitivity sweep prunes **one layer at a time** to
each level (0%, 5%, … 95%), keeps the others as they are, measures accuracy, and restores the
layer exactly. The sweep only recomputes the part of the network *after* the pruned layer, from
cached activations, so it is much cheaper than evaluating the whole model at every point — and
gives the same numbers.

Press the stop button (or Ctrl-C in a script) mid-sweep: you get the partial result back, the
model untouched, and `resume=` continues it."""),
    ("code", """import prune_lab as pl

model, data = pl.demo()
session = pl.Session(model, data.test)
result = session.sensitivity()          # magnitude criterion, 20 levels, every layer
result"""),
    ("code", """result.plot()"""),
    ("md", """Each curve is one layer. Flat curves are layers you can prune hard; steep ones are fragile.
The big fully connected layers (`fc1`, `fc2`) tolerate much more than the first convolution,
which has only 72 weights and sees the raw pixels."""),
    ("code", """result.heatmap()"""),
    ("code", """result.ranking(max_drop=0.01)   # per layer: how far it goes within 1 point of accuracy"""),
    ("md", """## Magnitude versus random

Is "smallest magnitude first" better than chance? Sweep again with the `random` criterion (seeded)
and compare: the gap is what the magnitude heuristic buys."""),
    ("code", """random_result = session.sensitivity(criterion="random")
for layer in ["conv2", "fc1"]:
    mag = dict(result.curve(layer))
    rnd = dict(random_result.curve(layer))
    print(layer, "at 70%:", f"magnitude {mag[0.7]:.3f}", f"random {rnd[0.7]:.3f}")
random_result.plot()"""),
    ("md", """## From sensitivity to a plan

`allocate` turns the curves into per-layer sparsities: it greedily prunes where accuracy costs
least per weight removed, until exactly 80% of all weights are gone. The predicted accuracy adds up
the per-layer drops — a guess, since layers interact. Applying the plan and evaluating gives the
**measured** number."""),
    ("code", """plan = result.allocate(target_sparsity=0.8)
session.set_sparsity(plan)
measured = session.evaluate()["accuracy"]
print(plan)
print(f"predicted {plan.predicted:.4f}  |  measured {measured:.4f}  |  total sparsity {session.total_sparsity():.1%}")"""),
    ("code", """session.set_global_sparsity(0.8, allocation="uniform")
uniform = session.evaluate()["accuracy"]
session.set_global_sparsity(0.8, allocation="global")
global_ = session.evaluate()["accuracy"]
print(f"at 80%: sensitivity plan {measured:.4f} | global magnitude {global_:.4f} | uniform {uniform:.4f}")
session.reset();"""),
    ("md", """Next: `03_interactive_lab.ipynb` puts a slider on every layer."""),
]

NB03 = [
    ("md", """# 3 · The interactive Lab

One slider per layer. Every time you move one, the Lab prunes that layer for real (exact masks,
recomputed from the original weights), re-evaluates the model, and updates every number and plot:
accuracy and its change from the dense model, loss, sparsity, nonzero weights, file size, and
multiply-accumulates. Nothing is estimated.

- **lock** a layer to keep it fixed while the *all layers* slider moves;
- **allocation** decides how the *all layers* slider splits the pruning across layers;
- **run sensitivity** sweeps every layer (with a progress bar; **stop** keeps what it measured);
- **undo / redo / reset** step through what you tried; reset is exact.

If an evaluation takes longer than a frame while you drag, the Lab shows a *preview* on the first
256 samples and finishes on the whole eval set when you let go — the label says which."""),
    ("code", """import prune_lab as pl

model, data = pl.demo()
session = pl.Session(model, data.test)
lab = pl.Lab(session)
lab"""),
    ("md", """## Exercise 1 — the most prunable layer

Drag each layer's slider to the right until accuracy drops by a point. Which layer goes furthest?
Then click **run sensitivity** and compare with the sweep's answer below (it runs the same
experiment systematically)."""),
    ("code", """result = session.sensitivity(progress=False)
ranking = result.ranking(max_drop=0.01)
print("prunable within 1 point of accuracy:", {k: f"{v:.0%}" for k, v in ranking.items()})
print("most prunable layer:", next(iter(ranking)))
session.reset();"""),
    ("md", """## Exercise 2 — 90% sparsity within 1 point

Reach a total sparsity of at least 90% while losing at most one point of accuracy. Lock the layers
that hurt, move the others. The cell below checks the Lab's current state. (Hint: which layers hold
most of the weights?)"""),
    ("code", """def check():
    acc = session.evaluate()["accuracy"]
    drop = (session.baseline()["accuracy"] - acc) * 100
    total = session.total_sparsity()
    verdict = "done!" if total >= 0.9 and drop <= 1 else "not yet"
    print(f"sparsity {total:.1%}, accuracy {acc:.2%} ({drop:+.2f} points lost): {verdict}")

check()"""),
    ("md", """One answer, with the API the Lab uses (your own slider settings may do better):"""),
    ("code", """lab.locks["conv1"].value = True
lab.allocation.value = "global"
lab.global_slider.value = 0.9
check()
lab.locks["conv1"].value = False"""),
    ("md", """## Exercise 3 — uniform versus global

Set the allocation to `uniform` and to `global` at the same total sparsity and compare. The
trade-off panel at the bottom keeps every configuration you tried; the line is the Pareto front."""),
    ("code", """for allocation in ("uniform", "global"):
    lab.allocation.value = allocation
    for sparsity in (0.5, 0.8, 0.9):
        lab.global_slider.value = sparsity
        print(f"{allocation:>8} {sparsity:.0%}: accuracy {session.evaluate()['accuracy']:.2%}")
lab.reset()"""),
]

NB04 = [
    ("md", """# 4 · Accuracy / size trade-offs

How much accuracy does each pruning strategy keep at each size, and how much comes back with
fine-tuning? Every point below is **measured**: the model is pruned to that compression
(dense size / nonzero weights), evaluated, and (where stated) fine-tuned with the masks held.

Strategies (how a total sparsity is split across layers):
`uniform` (same fraction everywhere), `global` (one magnitude threshold), `erk` (Erdős–Rényi-Kernel,
as in RigL), `lamp` (layer-adaptive magnitude, Lee et al. 2021) and `random` (the floor).
Results are cached on disk, so re-running the notebook does not recompute them."""),
    ("code", """import os
import prune_lab as pl

FAST = os.environ.get("PRUNE_LAB_FAST") == "1"   # the test suite sets this: fewer training steps
model, data = pl.demo()
session = pl.Session(model, data.test)
result = session.tradeoff(compressions=(1, 2, 4, 8, 16, 32, 64))
result"""),
    ("code", """result.plot(x="compression")"""),
    ("md", """Read the plot: `random` collapses first — it is the floor any real criterion must beat. At high
compression `global` and `lamp` beat `uniform`: they take more from the big, redundant layers and
spare the small ones. The x-axis can also be bytes on disk or theoretical speedup (fewer
multiply-accumulates), where the ranking can change: small conv layers are cheap in bytes but
expensive in compute."""),
    ("code", """result.plot(x="speedup")"""),
    ("md", """## With fine-tuning

Now each pruned model is fine-tuned briefly with its masks held (pruned weights stay exactly zero).
Dashed lines are after fine-tuning."""),
    ("code", """steps = 40 if FAST else 200
tuned = session.tradeoff(strategies=["uniform", "global", "random"], compressions=(2, 8, 32),
                         finetune={"train_data": data.train, "steps": steps, "lr": 0.02})
print(tuned.table())
tuned.plot()"""),
    ("md", """## MNIST: LeNet-300-100 and LeNet-5, iterative pruning

Iterative magnitude pruning (Han et al. 2015): remove 30% of the remaining weights, fine-tune,
repeat. We use the MNIST 10k test split (8,000 images to train, 2,000 to test). Set
`PRUNE_LAB_MNIST` to a folder with the MNIST files, or let the loader download them."""),
    ("code", """root = os.environ.get("PRUNE_LAB_MNIST", "data/mnist")
mnist = pl.datasets.mnist(root, download=True, train_from_test=8000)
rounds, epochs = (4, 1) if FAST else (10, 2)

for name, factory in [("LeNet-300-100", pl.models.mlp), ("LeNet-5", pl.models.lenet5)]:
    net = factory(mnist)
    pl.train(net, mnist, epochs=2 if FAST else 8, progress=False)
    s = pl.Session(net, mnist.test)
    dense = s.evaluate()["accuracy"]
    s.set_global_sparsity(1 - 0.7 ** rounds)
    oneshot = s.evaluate()["accuracy"]
    s.reset()
    print(f"{name}: dense {dense:.4f}; one-shot at {1 / 0.7 ** rounds:.1f}x without fine-tuning: {oneshot:.4f}")
    for r in range(1, rounds + 1):
        out = s.finetune(mnist.train, epochs=epochs, lr=0.01, target_sparsity=1 - 0.7 ** r, progress=False)
        st = s.stats().total
        print(f"  round {r}: {st['compression']:5.1f}x smaller, {st['speedup']:4.1f}x fewer MACs, accuracy {out.evaluations[-1]['accuracy']:.4f}")
    s.reset()"""),
    ("md", """Fine-tuning recovers most of what one-shot pruning loses: the same compression that costs many
points in one shot costs almost nothing when reached gradually with retraining in between."""),
]

NB05 = [
    ("md", """# 5 · Criteria that look at data

Which weights matter least? Magnitude pruning answers with the weights alone. Four families of
criteria look further:

| criterion | score of weight $w$ | what it looks at | source |
|---|---|---|---|
| `magnitude` | $\\lvert w \\rvert$ | the weight | Han et al. 2015 |
| `taylor` | $\\lvert w \\cdot g \\rvert$, $g$ = gradient of the loss | first-order change of the loss if $w$ is removed | Molchanov et al. 2017, 2019 |
| `obd` | $\\tfrac12 h w^2$, $h$ = Hessian diagonal | second-order change of the loss (Fisher estimate, or Hutchinson's) | LeCun et al. 1990 (Optimal Brain Damage) |
| `wanda` | $\\lvert W_{ij} \\rvert \\cdot \\lVert X_j \\rVert_2$, compared within each output row | the weight times how large its input is | Sun et al. 2023 |
| `random` | a seeded permutation | nothing: the floor | |

The data-aware ones need statistics from **training** data. `session.calibrate(train_data)` keeps
the calibration samples; a criterion's statistics are computed the first time it is used (one
forward and one backward pass per batch) and cached until fine-tuning changes the weights. Only the
criterion in use keeps its statistics (one copy of the weights at most); `criteria=[...]` computes
and keeps several at once. (Calibrating on the evaluation data would make the accuracy it reports
optimistic; prune_lab warns.)"""),
    ("code", """import os
import warnings
import prune_lab as pl

warnings.simplefilter("ignore", pl.session.LayerCollapseWarning)  # we compare allocations on purpose
FAST = os.environ.get("PRUNE_LAB_FAST") == "1"   # the test suite sets this: fewer steps
model, data = pl.demo()
session = pl.Session(model, data.test)
session.calibrate(data.train, samples=512, criteria=["taylor", "obd", "wanda"], progress=False)"""),
    ("md", """## What each criterion looks at

Every weight of `fc1`, coloured by its importance rank under each criterion (dark: pruned first).
Magnitude sees only the weights; Wanda multiplies them by the size of their inputs, so whole
columns (input features that are always small, such as the image border) go dark together;
Taylor and OBD weigh by how much the loss reacts."""),
    ("code", """pl.plots.criterion_scores(session, "fc1")"""),
    ("md", """## One-shot: accuracy by criterion and sparsity

Each strategy is an allocation with a criterion (`"lamp/taylor"`). LAMP chooses how many weights
each layer loses from magnitudes (its definition), so the criterion only picks *which* weights:
that isolates the criterion. `global` thresholds the raw scores across layers, where Taylor and
OBD scores differ in scale between layers."""),
    ("code", """strategies = ["lamp", "lamp/taylor", "lamp/obd", "lamp/wanda", "random"]
oneshot = session.tradeoff(strategies=strategies, compressions=(2, 4, 10, 20), cache=False, progress=False)
print(oneshot.table())
oneshot.plot()"""),
    ("md", """## After a short fine-tune

The same points, each fine-tuned briefly with its masks held (dashed lines)."""),
    ("code", """steps = 20 if FAST else 100
tuned = session.tradeoff(strategies=strategies, compressions=(4, 20), cache=False, progress=False,
                         finetune={"train_data": data.train, "steps": steps, "lr": 0.02})
print(tuned.table())
tuned.plot()"""),
    ("md", """## MNIST: LeNet-5 and LeNet-300-100

The same comparison on real MNIST (the 10k test split: 8,000 images to train, 2,000 to test),
at 50-95% sparsity. Set `PRUNE_LAB_MNIST` to the folder holding the MNIST files."""),
    ("code", """from pathlib import Path

root = Path(os.environ.get("PRUNE_LAB_MNIST", "../../shared/data/mnist"))
if not (root / "t10k-images-idx3-ubyte.gz").exists():
    print(f"MNIST not found under {root}: set PRUNE_LAB_MNIST to the folder with t10k-images-idx3-ubyte.gz")
else:
    mnist = pl.datasets.mnist(root, train_from_test=8000)
    for name, factory in [("LeNet-5", pl.models.lenet5), ("LeNet-300-100", pl.models.mlp)]:
        net = factory(mnist)
        pl.train(net, mnist, epochs=1 if FAST else 3, progress=False)
        s = pl.Session(net, mnist.test)
        s.calibrate(mnist.train, samples=256 if FAST else 512, progress=False)
        print(f"{name}: dense {s.evaluate()['accuracy']:.2%}")
        for criterion in ("magnitude", "taylor", "obd", "wanda", "random"):
            accs = []
            for sparsity in (0.5, 0.8, 0.9, 0.95):
                s.set_global_sparsity(sparsity, allocation="lamp", criterion=criterion)
                accs.append(f"{s.evaluate()['accuracy']:.2%}")
            print(f"  {criterion:>9} at 50/80/90/95%: {', '.join(accs)}")
        s.reset()"""),
    ("md", """## Exercise — where does looking at data win?

1. In the tables above, at which sparsities does a data-aware criterion beat magnitude, and which one?
2. Wanda was designed for large language models, whose activations have a few huge features. Why
   would it help less on 8×8 digits? (Look at the picture of `fc1`'s ranks again.)
3. Taylor uses the *mean* gradient. On a well-trained model that gradient is close to zero. What
   does that do to its scores, and why does OBD (squared per-sample gradients) not suffer from it?

A reference answer for question 1, computed from the one-shot results:"""),
    ("code", """acc = {(r["strategy"], r["target_compression"]): r["accuracy"] for r in oneshot.records}
for c in (2, 4, 10, 20):
    best = max(["lamp/taylor", "lamp/obd", "lamp/wanda"], key=lambda s: acc[(s, c)])
    verdict = "beats" if acc[(best, c)] > acc[("lamp", c)] else "does not beat"
    print(f"{c:>2}x ({1 - 1 / c:.0%} sparse): best data-aware {best} {acc[(best, c)]:.2%} {verdict} magnitude {acc[('lamp', c)]:.2%}")"""),
]

NB07 = [
    ("md", """# 7 · Beyond masks: N:M sparsity, quantization and distillation

Deep Compression (Han et al. 2016) made networks 35-49x smaller without losing accuracy, in three
stages: **prune** (magnitude, with fine-tuning), **quantize** by weight sharing (k-means: every
weight of a layer becomes one of 2^bits shared values), and **Huffman-code** the codes and the
gaps between kept weights. The paper's LeNet-300-100 went from 1,070 KB to 27 KB (40x) at the
dense accuracy. We reproduce the three stages on MNIST, with every size the length of a file we
actually write. Then: 2:4 sparsity, the pattern GPUs accelerate, and distillation."""),
    ("code", """import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import prune_lab as pl

FAST = os.environ.get("PRUNE_LAB_FAST") == "1"   # the test suite sets this: fewer epochs
root = Path(os.environ.get("PRUNE_LAB_MNIST", "../../shared/data/mnist"))
if (root / "t10k-images-idx3-ubyte.gz").exists():
    data = pl.datasets.mnist(root, train_from_test=8000)   # 8,000 images to train, 2,000 to test
    name = "MNIST"
else:
    print(f"MNIST not found under {root} (set PRUNE_LAB_MNIST to the folder with t10k-images-idx3-ubyte.gz); "
          "using the bundled 8x8 digits instead")
    data = pl.datasets.digits()
    name = "digits"
model = pl.models.mlp(data)   # LeNet-300-100
pl.train(model, data, epochs=4 if FAST else 15, lr=1e-3, progress=False)
s = pl.Session(model, data.test)
dense = s.evaluate()["accuracy"]
sizes = {"dense fp32": s.dense_file_bytes()}
print(f"LeNet-300-100 on {name}: dense accuracy {dense:.2%}, {pl.formats.fmt_bytes(sizes['dense fp32'])} as torch.save")"""),
    ("md", """## Stage 1 — prune

Each round removes 30% of the remaining weights (global magnitude) and fine-tunes with the masks
held. We keep the last round within half a point of dense."""),
    ("code", """kept = None
for r in range(1, (7 if FAST else 12) + 1):
    out = s.finetune(data.train, epochs=1 if FAST else 2, lr=0.01, target_sparsity=1 - 0.7 ** r, seed=r, progress=False)
    acc = out.evaluations[-1]["accuracy"]
    total = s.stats().total
    print(f"round {r:>2}: {total['compression']:5.1f}x fewer weights, accuracy {acc:.2%}")
    if acc >= dense - 0.005:
        kept = (s.snapshot(), acc, total)
s.restore(kept[0])
acc_pruned, total = kept[1], kept[2]
sizes["pruned"] = total["sparse_file_bytes"]
print(f"kept: {total['compression']:.1f}x fewer weights at {acc_pruned:.2%}; "
      f"file (gaps + float32 values): {pl.formats.fmt_bytes(sizes['pruned'])}")"""),
    ("md", """## Stage 2 — quantize by weight sharing

`set_global_bits(bits, method="kmeans")` replaces each layer's kept weights by the nearest of
2^bits centroids fitted on them (pruned weights stay exactly 0). It is reversible like the masks:
the float weights are kept, `reset()` is still exact. A short fine-tune adjusts the shared values."""),
    ("code", """pruned_state = s.snapshot()
for bits in (6, 5, 4, 3, 2):
    s.restore(pruned_state)
    s.set_global_bits(bits, method="kmeans")
    print(f"{bits} bits: {s.evaluate()['accuracy']:.2%}, file {pl.formats.fmt_bytes(s.stats().total['sparse_file_bytes'])}")
s.restore(pruned_state)
s.set_global_bits(4, method="kmeans")
acc_quantized = s.evaluate()["accuracy"]
s.finetune(data.train, epochs=1, lr=0.002, progress=False)
acc_final = s.evaluate()["accuracy"]
print(f"4 bits: {acc_quantized:.2%} right after quantizing, {acc_final:.2%} after fine-tuning")
print("fc1's weights now take", int(model.fc1.weight.unique().numel()), "distinct values (zero included)")"""),
    ("md", """## Stage 3 — Huffman coding, and the file we write

`export(path, sparse=True)` writes each pruned or quantized layer as Huffman-coded gaps between its
nonzeros, Huffman-coded codes and its codebook; `stats()` reports that file's exact length, and
`pl.load_state_dict` reads back the same weights."""),
    ("code", """with tempfile.TemporaryDirectory() as d:
    path = s.export(Path(d) / "lenet300.pt", sparse=True)["model"]
    sizes["pruned + quantized + Huffman"] = path.stat().st_size
    same = all((pl.load_state_dict(path)[k] == v).all() for k, v in model.state_dict().items())
print(f"written: {pl.formats.fmt_bytes(sizes['pruned + quantized + Huffman'])}, equals stats(): "
      f"{sizes['pruned + quantized + Huffman'] == s.stats().total['sparse_file_bytes']}, reads back exactly: {same}")
print(f"{'stage':<30}{'size':>12}{'vs dense':>10}")
for stage, b in sizes.items():
    print(f"{stage:<30}{pl.formats.fmt_bytes(b):>12}{sizes['dense fp32'] / b:>9.1f}x")
print(f"accuracy: dense {dense:.2%}, pruned {acc_pruned:.2%}, quantized {acc_quantized:.2%}, fine-tuned {acc_final:.2%}")
print("Han et al. 2016, LeNet-300-100 on full MNIST: 1,070 KB -> 27 KB (40x), 1.64% -> 1.58% error")
fig, ax = plt.subplots(figsize=(6, 2.6), dpi=100)
ax.barh(list(sizes)[::-1], [b / 1024 for b in sizes.values()][::-1], color=["#8a8a8a", "#4c72b0", "#dd8452"][::-1])
ax.set_xscale("log")
ax.set_xlabel("file size (KiB, log scale)")
ax.set_title("Deep Compression, measured")
fig.tight_layout()"""),
    ("md", """## 2:4 versus unstructured at 50%

NVIDIA GPUs from compute capability 8.0 (A100, H100, RTX 30xx+) multiply a matrix faster when
every group of 4 consecutive input weights has at most 2 nonzeros (2:4). Unstructured 50% keeps
the same number of weights but anywhere, which dense kernels cannot skip. The price of 2:4 is
accuracy: the pattern forbids keeping 3 large weights of one group."""),
    ("code", """s.reset()
for pattern in ("unstructured", "2:4"):
    s.set_global_sparsity(0.5, pattern=pattern) if pattern == "2:4" else s.set_global_sparsity(0.5, allocation="uniform")
    one_shot = s.evaluate()["accuracy"]
    s.finetune(data.train, epochs=1, lr=0.005, progress=False)
    print(f"{pattern:>12} 50%: one-shot {one_shot:.2%}, after one epoch of fine-tuning {s.evaluate()['accuracy']:.2%}")
    s.reset()"""),
    ("md", """On the CPU neither is faster: dense kernels multiply the zeros. On a CUDA GPU with compute
capability >= 8.0, `torch.sparse.to_sparse_semi_structured` stores a 2:4 weight in half the space
and runs it on the sparse tensor cores (`bench/nm.py` measures it where such a GPU exists).

## Distillation

Fine-tuning a heavily pruned network can also learn from the dense one: `distill={"temperature": T,
"alpha": a}` adds the teacher's softened outputs to the loss (Hinton et al. 2015)."""),
    ("code", """for distill in (None, {"temperature": 4.0, "alpha": 0.9}):
    s.reset()
    s.set_global_sparsity(0.98)
    s.finetune(data.train, epochs=1 if FAST else 3, lr=0.01, distill=distill, progress=False)
    print(f"98% sparse, fine-tuned {'with distillation' if distill else 'plainly':<18}: {s.evaluate()['accuracy']:.2%}")
s.reset()"""),
    ("md", """## Exercise

1. Which stage saves the most bytes on this model, and why does quantization save less after
   pruning than it would on the dense model?
2. Lower the bits until accuracy drops more than half a point. Where is the knee?
3. Why can 2:4 never go beyond 50% sparsity, and what would 1:4 cost?

A reference answer for question 1, from the sizes above:"""),
    ("code", """steps = list(sizes.items())
savings = {f"{a} -> {b}": sa - sb for (a, sa), (b, sb) in zip(steps, steps[1:])}
biggest = max(savings, key=savings.get)
print(f"largest saving: {biggest} ({pl.formats.fmt_bytes(savings[biggest])}); "
      f"pruning alone gives {sizes['dense fp32'] / sizes['pruned']:.1f}x, the rest {sizes['pruned'] / sizes['pruned + quantized + Huffman']:.1f}x more")"""),
]

if __name__ == "__main__":
    build("01_weights_and_masks.ipynb", NB01)
    build("02_layer_sensitivity.ipynb", NB02)
    build("03_interactive_lab.ipynb", NB03)
    build("04_tradeoffs.ipynb", NB04)
    build("05_criteria.ipynb", NB05)
    build("07_deep_compression.ipynb", NB07)
    extra = sys.modules[__name__].__dict__.get("EXTRA_NOTEBOOKS", {})
    for name, cells in extra.items():
        build(name, cells)
