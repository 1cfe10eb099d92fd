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

if __name__ == "__main__":
    build("01_weights_and_masks.ipynb", NB01)
    extra = sys.modules[__name__].__dict__.get("EXTRA_NOTEBOOKS", {})
    for name, cells in extra.items():
        build(name, cells)
