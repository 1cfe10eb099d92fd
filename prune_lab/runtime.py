"""Measured paths to a faster runtime: latency measurement, int8 dynamic quantization of Linear
layers (``torch.ao``) and 2:4 semi-structured sparse weights on CUDA (compute capability >= 8.0).

Nothing here estimates: :func:`latency` times real forward passes (warm-up first, the median of
repeated runs, threads and device stated); where the installed torch or the hardware cannot do
a conversion, the function raises a ``RuntimeError`` that says why.
"""
from __future__ import annotations

import copy
import statistics
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from .devices import model_device, timed_ms


@dataclass
class Latency:
    """Median milliseconds per forward pass, per batch size, and how they were measured."""

    ms: dict[int, float]
    device: str
    threads: int
    repeats: int
    warmup: int
    spread: dict[int, tuple[float, float]] = field(default_factory=dict)  # (p10, p90) ms
    runtime: str = "torch"  # or "onnxruntime"

    def __repr__(self) -> str:
        per = ", ".join(f"batch {b}: {v:.3f} ms" for b, v in self.ms.items())
        return f"Latency({per}; median of {self.repeats} runs in {self.runtime} on {self.device}, {self.threads} threads)"


def latency(model: Any, example_input: Tensor, batch_sizes: Sequence[int] = (1, 64), repeats: int = 30,
            warmup: int = 5, runtime: str = "torch") -> Latency:
    """Median wall time of ``model(x)`` for ``x`` made of ``example_input``'s first sample
    repeated to each batch size, in eval mode under ``torch.inference_mode`` (CUDA synchronised
    around every run). ``repeats`` timed runs after ``warmup`` untimed ones. ``runtime="onnxruntime"``:
    ``model`` is an ``.onnx`` path, an ``OnnxExport``, or a module (exported and checked first, to a
    temporary file), run by ONNX Runtime's CPU provider with torch's thread count."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    if runtime == "onnxruntime":
        return _ort_latency(model, example_input, batch_sizes, repeats, warmup)
    if runtime != "torch":
        raise ValueError(f"runtime must be 'torch' or 'onnxruntime', got {runtime!r}")
    device = model_device(model)
    sample = example_input[:1].to(device)
    cuda = device.type == "cuda"
    was_training = model.training
    model.eval()
    ms: dict[int, float] = {}
    spread: dict[int, tuple[float, float]] = {}
    try:
        with torch.inference_mode():
            for b in batch_sizes:
                if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                    raise ValueError(f"batch sizes must be positive integers, got {b!r}")
                x = sample.expand(b, *sample.shape[1:]).contiguous()
                times = [timed_ms(lambda: model(x), device) for _ in range(warmup + repeats)][warmup:]
                ms[b] = statistics.median(times)
                q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
                spread[b] = (q[0], q[-1])
    finally:
        model.train(was_training)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    return Latency(ms, name, torch.get_num_threads(), repeats, warmup, spread)


def _check_batches(batch_sizes: Sequence[int]) -> None:
    for b in batch_sizes:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"batch sizes must be positive integers, got {b!r}")


def _ort_latency(model: Any, example_input: Tensor, batch_sizes: Sequence[int], repeats: int, warmup: int) -> Latency:
    """:func:`latency` in ONNX Runtime (CPU provider): the same inputs, medians and spreads."""
    import tempfile
    from pathlib import Path

    from .onnx_export import export_onnx, ort_session

    _check_batches(batch_sizes)
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model, nn.Module):
            path = export_onnx(model, example_input[:2], Path(tmp) / "model.onnx").path
        else:
            path = Path(getattr(model, "path", model))
            if not path.is_file():
                raise ValueError(f"runtime='onnxruntime' times an .onnx file, an OnnxExport or a module; {path} is not a file")
        threads = torch.get_num_threads()
        sess = ort_session(path, threads)
        name = sess.get_inputs()[0].name
        sample = example_input[:1].cpu().numpy()
        ms: dict[int, float] = {}
        spread: dict[int, tuple[float, float]] = {}
        for b in batch_sizes:
            x = sample.repeat(b, axis=0)
            times = [timed_ms(lambda: sess.run(None, {name: x}), torch.device("cpu")) for _ in range(warmup + repeats)][warmup:]
            ms[b] = statistics.median(times)
            q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
            spread[b] = (q[0], q[-1])
    return Latency(ms, "cpu (onnxruntime)", threads, repeats, warmup, spread, runtime="onnxruntime")


def int8_dynamic(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (on the CPU) whose Linear layers compute in int8 with weights
    quantized per tensor and activations quantized on the fly (``torch.ao``'s dynamic
    quantization). The model itself is untouched. Raises a RuntimeError where the installed
    torch has no quantized engine."""
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as e:  # pragma: no cover - depends on the torch build
        raise RuntimeError(f"this torch ({torch.__version__}) has no torch.ao dynamic quantization: {e}") from None
    if not torch.backends.quantized.supported_engines or torch.backends.quantized.supported_engines == ["none"]:
        raise RuntimeError(f"this torch ({torch.__version__}) has no quantized CPU engine")
    cpu = copy.deepcopy(model).cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices: the conversion itself is what we measure
        return quantize_dynamic(cpu, {nn.Linear}, dtype=torch.qint8)


def semi_structured_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """None when 2:4 semi-structured sparse weights can run here, else why not."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (none is available here)"
    device = device if device is not None and device.type == "cuda" else torch.device("cuda")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"needs compute capability >= 8.0; {torch.cuda.get_device_name(device)} has {major}.{minor}"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return f"this torch ({torch.__version__}) has no torch.sparse.to_sparse_semi_structured"
    return None


def to_semi_structured(model: nn.Module, layers: Sequence[str]) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` whose named Linear layers (already 2:4 along their input, on CUDA)
    hold ``torch.sparse.to_sparse_semi_structured`` weights; returns it and the layers converted.
    Layers whose shape the kernels do not take are left dense and not listed."""
    reason = semi_structured_reason(model_device(model))
    if reason is not None:
        raise RuntimeError(f"2:4 semi-structured weights {reason}")
    from torch.sparse import to_sparse_semi_structured

    out = copy.deepcopy(model)
    done = []
    for name in layers:
        module = out.get_submodule(name)
        if not isinstance(module, nn.Linear):
            continue
        try:
            module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
            done.append(name)
        except Exception:  # shape or dtype the kernels do not take: left dense
            continue
    return out, done


__all__ = ["Latency", "latency", "int8_dynamic", "semi_structured_reason", "to_semi_structured"]
