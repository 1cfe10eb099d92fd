"""Dense against compact, in PyTorch and in ONNX Runtime: the small ResNet trained on the MNIST
split with 50% of every channel group removed (``pattern="channels"``) and compacted. Both models
are exported with ``pl.export_onnx`` (checked against PyTorch on 256 test images) and timed with
``pl.latency`` at batch 1 and 64 in each runtime, interleaved so both see the same machine load.
Also a masked (unstructured, 50%) export: same file size and speed as dense (zeros are stored)."""
from __future__ import annotations

import json
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import prune_lab as pl  # noqa: E402
from bench._common import trained_on_mnist  # noqa: E402

ROUNDS = 5


def main() -> None:
    warnings.simplefilter("ignore")
    model, data = trained_on_mnist("small_resnet", epochs=1)
    x = data.test.tensors[0][:256]
    s = pl.Session(model, data.test, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        dense = pl.export_onnx(model, x[:2], Path(tmp) / "dense.onnx", check_inputs=x)
        s.set_global_sparsity(0.5)
        masked = s.export_onnx(Path(tmp) / "masked.onnx")
        s.reset()
        s.set_global_sparsity(0.5, allocation="uniform", pattern="channels")
        small = s.compact(measure=False)
        compact = pl.export_onnx(small, x[:2], Path(tmp) / "compact.onnx", check_inputs=x)
        s.reset()
        int8 = pl.onnx_export.int8_onnx(dense.path, Path(tmp) / "dense.int8.onnx", model, x)  # dynamic int8 (ORT)
        times: dict = {}
        for _ in range(ROUNDS):
            for key, m, runtime in (("torch_dense", model, "torch"), ("torch_compact", small, "torch"),
                                    ("ort_dense", dense, "onnxruntime"), ("ort_compact", compact, "onnxruntime"),
                                    ("ort_masked", masked, "onnxruntime"), ("ort_int8", int8.path, "onnxruntime")):
                lat = pl.latency(m, x, batch_sizes=(1, 64), repeats=10, warmup=3, runtime=runtime)
                for b, ms in lat.ms.items():
                    times.setdefault(f"{key}_b{b}", []).append(ms)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    out = {"name": "onnx_runtime", "threads": torch.get_num_threads(),
           "file_bytes": {"dense": dense.bytes, "masked": masked.bytes, "compact": compact.bytes, "int8": int8.bytes},
           "int8_vs_float": {"max_abs_diff": int8.max_abs_diff, "top1_agreement": int8.top1_agreement,
                             "samples": int8.checked_samples},
           "max_abs_diff": {"dense": dense.max_abs_diff, "masked": masked.max_abs_diff, "compact": compact.max_abs_diff},
           "ms": {k: round(v, 3) for k, v in med.items()}}
    for b in (1, 64):
        out[f"ort_speedup_b{b}"] = round(med[f"ort_dense_b{b}"] / med[f"ort_compact_b{b}"], 2)
        out[f"torch_speedup_b{b}"] = round(med[f"torch_dense_b{b}"] / med[f"torch_compact_b{b}"], 2)
        out[f"ort_vs_torch_dense_b{b}"] = round(med[f"torch_dense_b{b}"] / med[f"ort_dense_b{b}"], 2)
        out[f"ort_masked_vs_dense_b{b}"] = round(med[f"ort_dense_b{b}"] / med[f"ort_masked_b{b}"], 2)
        out[f"ort_int8_vs_dense_b{b}"] = round(med[f"ort_dense_b{b}"] / med[f"ort_int8_b{b}"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
