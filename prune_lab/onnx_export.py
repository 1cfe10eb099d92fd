"""ONNX export of a model (dense, masked, quantized or compact) and its check in ONNX Runtime.

The export goes through ``torch.onnx.export(dynamo=True)`` (``torch.export`` then onnxscript),
with a dynamic batch dimension, into ``<path>.partial``; it becomes ``path`` only after ONNX
Runtime ran it on the check inputs and its outputs matched PyTorch's within the tolerance, so a
failed export never leaves a file behind. Needs the ``onnx`` extra (``onnx``, ``onnxscript``,
``onnxruntime``). Masks are zeros in dense initializers: an ONNX file of a masked model is as
large and as fast as the dense one; only ``compact()`` makes it smaller and faster.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from torch import Tensor, nn

INSTALL = 'pip install -e ".[onnx]"  (onnx, onnxscript and onnxruntime)'


def require_onnx() -> None:
    """A clear RuntimeError when the optional ONNX packages are missing."""
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise RuntimeError(f"ONNX export and timing need {', '.join(missing)}: {INSTALL}")


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote and how it was checked."""

    path: Path
    bytes: int  # the file's length
    max_abs_diff: float  # ONNX Runtime against PyTorch on the check inputs
    tolerance: float
    checked_samples: int
    dynamic_batch: bool
    opset: int

    def __repr__(self) -> str:
        return (f"OnnxExport({self.path.name}: {self.bytes:,} B, opset {self.opset}, "
                f"{'dynamic' if self.dynamic_batch else 'fixed'} batch; ONNX Runtime matches PyTorch on "
                f"{self.checked_samples} samples: max |diff| {self.max_abs_diff:.2e} <= {self.tolerance:.1e})")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's warnings and log lines (torchvision ops it skips, deprecations) kept off the notebook."""
    loggers = [logging.getLogger(n) for n in ("", "torch.onnx", "torch.export", "torch._export", "onnxscript")]  # "": root
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _why(model: nn.Module, error: BaseException) -> str:
    """The exporter's failure, with the op and the model's source line where the message names them."""
    text = f"{type(error).__name__}: {error}"
    op = re.search(r"(aten[.:]{1,2}[A-Za-z_0-9]+(?:\.[A-Za-z_0-9]+)?)", text)
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', text)
    user = [f for f in frames if "site-packages" not in f[0] and "/torch/" not in f[0]]
    where = f" at {Path(user[-1][0]).name}:{user[-1][1]} in {user[-1][2]}()" if user else ""
    first = next((ln for ln in str(error).splitlines() if ln.strip()), type(error).__name__)
    return (f"cannot export {type(model).__name__} to ONNX{where}" + (f" (op {op.group(1)})" if op else "") +
            f": {first[:300]}. Data-dependent control flow (an `if` on a tensor's value) and ops without an ONNX "
            "translation cannot be exported; rewrite that part with torch.where / torch.cond, or export a submodule")


def _run_ort(path: Path, x: Tensor, threads: Optional[int] = None) -> Tensor:
    sess = ort_session(path, threads)
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[s : s + 256].cpu().numpy()})[0] for s in range(0, len(x), 256)]
    return torch.cat([torch.from_numpy(o) for o in outs])


def export_onnx(model: nn.Module, example: Tensor, path: Union[str, Path], check_inputs: Optional[Tensor] = None,
                dynamic_batch: bool = True, tolerance: Optional[float] = None, opset: int = 18) -> OnnxExport:
    """Write ``model`` (called as ``model(x)``, in eval mode) as ONNX to ``path`` and check it: ONNX
    Runtime's outputs on ``check_inputs`` (default ``example``) must match PyTorch's within
    ``tolerance`` (default 1e-4 of the outputs' largest magnitude, at least 1e-5), else a
    RuntimeError and no file. ``dynamic_batch``: the first dimension is symbolic."""
    require_onnx()
    if not isinstance(model, nn.Module) or not isinstance(example, Tensor):
        raise TypeError(f"export_onnx takes an nn.Module and an example input tensor, got {type(model).__name__}, "
                        f"{type(example).__name__}")
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = example.to(device)
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    try:
        try:
            with _quiet():
                torch.onnx.export(model, (example,), str(partial), dynamo=True, dynamic_shapes=shapes, opset_version=opset,
                                  report=False, verbose=False, external_data=False)  # one self-contained file
        except Exception as e:
            raise RuntimeError(_why(model, e)) from e
        x = example if check_inputs is None else check_inputs.to(device)
        with torch.no_grad():
            want = model(x).detach().float().cpu()
        got = _run_ort(partial, x).float()
        if got.shape != want.shape:
            raise RuntimeError(f"ONNX Runtime returned shape {tuple(got.shape)}, PyTorch {tuple(want.shape)}")
        diff = float((got - want).abs().max()) if want.numel() else 0.0
        tol = tolerance if tolerance is not None else max(1e-5, 1e-4 * float(want.abs().max()))
        if not diff <= tol:
            raise RuntimeError(f"ONNX Runtime's outputs differ from PyTorch's by {diff:.3g} (> {tol:.3g}); not written")
        os.replace(partial, path)
    finally:
        model.train(was_training)
        for leftover in (partial, partial.with_name(partial.name + ".data")):
            if leftover.exists():
                leftover.unlink()
    return OnnxExport(path, path.stat().st_size, diff, tol, len(x), dynamic_batch, opset)


@dataclass(frozen=True)
class Int8Onnx:
    """What :func:`int8_onnx` wrote and how far it is from the float model (int8 is not exact)."""

    path: Path
    bytes: int
    max_abs_diff: float  # against the float PyTorch model on the check inputs
    top1_agreement: float  # fraction of check samples (or tokens) whose argmax matches the float model's
    checked_samples: int

    def __repr__(self) -> str:
        return (f"Int8Onnx({self.path.name}: {self.bytes:,} B; against float on {self.checked_samples} samples: "
                f"max |diff| {self.max_abs_diff:.3g}, top-1 agreement {self.top1_agreement:.1%})")


def int8_onnx(source: Any, path: Union[str, Path], model: nn.Module, check_inputs: Tensor) -> Int8Onnx:
    """ONNX Runtime's dynamic int8 quantization of an exported file (``source``: a path or an
    :class:`OnnxExport`): MatMul/Gemm weights stored as int8, activations quantized on the fly, so
    ``pl.latency(path, ..., runtime="onnxruntime")`` times real int8 kernels. Compared with the float
    ``model`` on ``check_inputs``; written through ``<path>.partial`` like :func:`export_onnx`."""
    require_onnx()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, path = Path(getattr(source, "path", source)), Path(path)
    if not src.is_file():
        raise ValueError(f"int8_onnx quantizes an exported .onnx file; {src} is not a file")
    partial = path.with_name(path.name + ".partial")
    try:
        with _quiet():
            quantize_dynamic(str(src), str(partial), weight_type=QuantType.QInt8)
        got = _run_ort(partial, check_inputs).float()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.no_grad():
            want = model.eval()(check_inputs.to(device)).detach().float().cpu()
        agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
        diff = float((got - want).abs().max())
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()
    return Int8Onnx(path, path.stat().st_size, diff, agree, len(check_inputs))


def ort_session(path: Union[str, Path], threads: Optional[int] = None) -> Any:
    """An ONNX Runtime CPU session of ``path`` with ``threads`` intra-op threads (default torch's)."""
    require_onnx()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


__all__ = ["OnnxExport", "Int8Onnx", "export_onnx", "int8_onnx", "ort_session", "require_onnx"]
