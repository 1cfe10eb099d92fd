"""What a session costs on real-size models, in plain forward passes of the same model and data.

Models (random weights: costs, not accuracies, are measured here):
- ``resnet50``: torchvision's ResNet-50 layout (bottlenecks 3-4-6-3; 23.5M parameters with a
  10-class head, 25.6M with ImageNet's), written here, on 3x64x64 inputs (not 224x224: a 2-core
  CPU; MACs scale with the pixels);
- ``gpt2_small``: ``models.tiny_gpt`` at GPT-2-small's size (d=768, 12 heads, 12 blocks, 85M
  parameters in the blocks), on 64-character windows of ``python_text``.
- ``bert_base``: a BERT-base-size encoder from torch's own ``nn.TransformerEncoder`` (d=768,
  12 heads, 12 layers, feed-forward 3072; ``nn.MultiheadAttention``, so the fused attention
  path), predicting each character of the same windows (85M parameters with this vocabulary;
  BERT-base's 110M include a 30,522-word embedding).

Per model and eval set (1x and 4x samples) and width (1x and 0.5x): Session creation, the
memory it holds (base weights copy, the incremental activation cache), the first evaluation,
one slider move (prune + evaluate) at the first, middle and last layer, full and a 1/8 preview,
a sweep point (average of 6), channel compaction (50% of every group) and the ONNX export of
the compact model. Every time is divided by one plain forward pass over the same eval set,
measured in the same run (median of 3). One JSON line.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import prune_lab as pl  # noqa: E402


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int):
        super().__init__()
        cout = mid * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


def resnet50(width: float = 1.0, classes: int = 10) -> nn.Module:
    w = lambda c: max(int(c * width), 8)  # noqa: E731
    layers: list[nn.Module] = [nn.Conv2d(3, w(64), 7, 2, 3, bias=False), nn.BatchNorm2d(w(64)), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = w(64)
    for i, (mid, n) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
        for j in range(n):
            layers.append(Bottleneck(cin, w(mid), 2 if j == 0 and i > 0 else 1))
            cin = w(mid) * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Token embedding + learned positions + ``nn.TransformerEncoder`` + a per-token head."""

    def __init__(self, vocab: int, seq: int, d: int = 768, heads: int = 12, layers: int = 12):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.zeros(seq, d))
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.emb(x) + self.pos[: x.shape[1]]))


def timed(fn, repeats: int = 1) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def forward_s(model: nn.Module, x: torch.Tensor, batch: int = 64) -> float:
    model.eval()
    with torch.inference_mode():
        return timed(lambda: [model(x[i:i + batch]) for i in range(0, len(x), batch)], repeats=3)


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, channels: bool) -> dict:
    fwd = forward_s(model, x)
    t = time.perf_counter()
    s = pl.Session(model, (x, y), device="cpu")
    session_s = time.perf_counter() - t
    first = timed(s.evaluate)
    names = [i.name for i in s.layers]
    picks = {"first": names[0], "middle": names[len(names) // 2], "last": names[-1]}
    out = {"forward_s": round(fwd, 3), "params": sum(p.numel() for p in model.parameters()), "layers": len(names),
           "session_x": round(session_s / fwd, 2), "first_eval_x": round(first / fwd, 2),
           "base_copy_mb": round(sum(s.state.base(n).numel() * s.state.base(n).element_size() for n in names) / 2**20, 1)}
    engine = s.evaluator.engine()
    out["activation_cache_mb"] = round(engine.cache_bytes() / 2**20, 1) if engine is not None else None
    for where, name in picks.items():
        full = timed(lambda: (s.set_sparsity({name: 0.5}), s.evaluate()))
        s.reset()
        preview = timed(lambda: (s.set_sparsity({name: 0.5}), s.evaluate(limit=max(len(x) // 8, 1))))
        s.reset()
        out[f"move_{where}_x"] = round(full / fwd, 3)
        out[f"preview_{where}_x"] = round(preview / fwd, 3)
    t = time.perf_counter()
    r = s.sensitivity(levels=(0.5, 0.9), layers=list(picks.values()), progress=False)
    out["sweep_point_x"] = round((time.perf_counter() - t) / len(r.records) / fwd, 3)
    out["full_sweep_points"] = len(names) * 20
    if channels:
        t = time.perf_counter()
        s.set_global_sparsity(0.5, allocation="uniform", pattern="channels")
        small = s.compact(measure=False)
        out["compact_x"] = round((time.perf_counter() - t) / fwd, 2)
        target = small
    else:
        target = model
    try:
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            pl.export_onnx(target, x[:2], Path(d) / "m.onnx", check_inputs=x[:8])
            out["onnx_export_x"] = round((time.perf_counter() - t) / fwd, 2)
    except Exception as e:  # stated, not hidden
        out["onnx_export_x"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
    return out


def main() -> None:
    torch.manual_seed(0)
    rows = {}
    for width in (1.0, 0.5):
        for scale in (1, 4):
            n = 32 * scale
            x, y = torch.randn(n, 3, 64, 64), torch.randint(0, 10, (n,))
            rows[f"resnet50_w{width}_n{n}"] = measure(resnet50(width), x, y, channels=True)
    text = pl.datasets.python_text(seq_len=64, max_chars=400_000)
    xs, ys = text.test.tensors
    for d, heads, blocks in ((768, 12, 12), (384, 6, 12)):
        for scale in (1, 4):
            n = 8 * scale
            model = pl.models.tiny_gpt(text, d=d, heads=heads, layers=blocks)
            rows[f"gpt2_d{d}_n{n}"] = measure(model, xs[:n], ys[:n], channels=False)
    for scale in (1, 4):
        n = 8 * scale
        model = Encoder(text.num_classes, xs.shape[1])
        rows[f"bert_base_n{n}"] = measure(model, xs[:n], ys[:n], channels=False)
    print(json.dumps({"name": "scale", "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
