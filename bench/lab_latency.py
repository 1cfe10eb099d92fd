"""Time from a Lab slider change to every number and plot updated.

Demo model on the CPU (and the small ResNet over 2,000 MNIST images, numbers only), versus a
naive baseline in the same run: re-prune with torch.nn.utils.prune from the original weights, full
evaluation, stats counted by hand, and the same plots redrawn from scratch. On a CUDA machine the
ResNet figure is taken on the GPU. Prints one JSON line.
"""
from __future__ import annotations

import copy
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import trained_on_mnist  # noqa: E402
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402
from torch.nn.utils import prune  # noqa: E402

import prune_lab as pl  # noqa: E402

# drags: 8 moves of one slider, then the next layer's slider (a layer switch redraws its histogram)
DRAG = 8
VALUES = [0.1 * (i % DRAG + 1) for i in range(5 * DRAG)]


def p(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def lab_times(session, layers):
    lab = pl.Lab(session, defer=False)
    session.sensitivity(levels=[0.0, 0.5, 0.9], progress=False)
    lab.refresh()
    total, numbers = [], []
    for i, v in enumerate(VALUES):
        name = layers[(i // DRAG) % len(layers)]
        t = time.perf_counter()
        lab.sliders[name].value = round(v * 100)
        total.append((time.perf_counter() - t) * 1000)
        numbers.append(lab.timings["numbers_ms"])
    assert lab.last_error is None, lab.last_error
    session.reset()
    return numbers, total


def naive_times(model, data, layers, result):
    model = copy.deepcopy(model)
    original = copy.deepcopy(model.state_dict())
    loader = torch.utils.data.DataLoader(data.test, batch_size=256)
    points = []
    times = []
    for i, v in enumerate(VALUES):
        name = layers[(i // DRAG) % len(layers)]
        t = time.perf_counter()
        model.load_state_dict(original)
        module = model.get_submodule(name)
        prune.l1_unstructured(module, "weight", amount=round(v, 2))
        model.eval()
        correct = n = 0
        with torch.no_grad():
            for x, y in loader:
                correct += (model(x).argmax(1) == y).sum().item()
                n += len(y)
        nonzeros = sum(int((p_ != 0).sum()) for p_ in model.parameters())
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        points.append({"accuracy": correct / n, "sparse_bytes": len(buf.getvalue()), "effective_macs": nonzeros})
        prune.remove(module, "weight")
        # plots from scratch, as a notebook without the Lab would
        s = session_for_plots(model, data)
        for fig in (pl.plots.weight_histograms(s, layers=[name]), pl.plots.sensitivity(result), pl.plots.tradeoff_points(points, len(points) - 1)):
            fig.savefig(io.BytesIO(), format="png", dpi=72)
        times.append((time.perf_counter() - t) * 1000)
    return times


_plot_sessions: dict = {}


def session_for_plots(model, data):
    key = id(model)
    if key not in _plot_sessions:
        _plot_sessions[key] = pl.Session(model, data.test, device="cpu")
    return _plot_sessions[key]


def main() -> None:
    model, data = pl.demo(progress=False)
    s = pl.Session(model, data.test, device="cpu")
    layers = [i.name for i in s.layers]
    lab_times(s, layers)  # warm-up
    numbers, total = lab_times(s, layers)
    result = s.sensitivity(levels=[0.0, 0.5, 0.9], progress=False)
    baseline = naive_times(model, data, layers, result)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    resnet, mnist = trained_on_mnist("small_resnet")  # untrained: only its timings are measured
    rs = pl.Session(resnet, mnist.test, device=device, batch_size=500)
    r_numbers, _ = lab_times(rs, [i.name for i in rs.layers])

    print(json.dumps({
        "name": "lab_latency",
        "numbers_ms_p50": round(statistics.median(numbers), 2),
        "all_ms_p50": round(statistics.median(total), 2),
        "all_ms_p95": round(p(total, 0.95), 2),
        "baseline_ms_p50": round(statistics.median(baseline), 2),
        "ratio": round(statistics.median(baseline) / statistics.median(total), 2),
        "resnet_numbers_ms_p50": round(statistics.median(r_numbers), 2),
        "device": device,
    }))


if __name__ == "__main__":
    main()
