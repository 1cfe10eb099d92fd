"""Measured numbers: eval data, metric and loss sums, nonzeros, MACs. Nothing here is estimated."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .metrics import SummedMetric, lower_is_better

Metric = Callable[[Tensor, Tensor], Tensor]

#: materialise eval data into device tensors up to this many bytes; larger data streams
MATERIALISE_LIMIT_BYTES = 1 << 30


class EvalData:
    """Eval data normalised to batches on one device.

    Accepts ``(inputs, targets)`` tensors, a Dataset of ``(input, target)`` pairs, or a
    DataLoader. Data that fits :data:`MATERIALISE_LIMIT_BYTES` is stacked once into device
    tensors (fast, no loader overhead per evaluation); a larger DataLoader is iterated each time.
    """

    def __init__(self, data: Any, device: torch.device, batch_size: int = 1024):
        self.batch_size = batch_size
        self.loader: Optional[DataLoader] = None
        self.inputs: Optional[Tensor] = None
        self.targets: Optional[Tensor] = None
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
            inputs, targets = data
        elif isinstance(data, DataLoader):
            self.batch_size = data.batch_size or batch_size
            inputs, targets = self._stack(data) if _loader_small(data) else (None, None)
            if inputs is None:
                self.loader = data
        elif isinstance(data, Dataset):
            inputs, targets = self._stack(DataLoader(data, batch_size=batch_size))
        else:
            raise TypeError(
                "eval_data must be a DataLoader, a Dataset of (input, target) pairs, or an "
                f"(inputs, targets) pair of tensors; got {type(data).__name__}"
            )
        if self.loader is None:
            if len(inputs) != len(targets):
                raise ValueError(f"eval data: {len(inputs)} inputs but {len(targets)} targets")
            if len(inputs) == 0:
                raise ValueError("eval data is empty")
            self.inputs, self.targets = inputs.to(device), targets.to(device)
        self.device = device

    @staticmethod
    def _stack(loader: DataLoader) -> tuple[Tensor, Tensor]:
        xs, ys = [], []
        for batch in loader:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise TypeError("eval data must yield (input, target) pairs")
            xs.append(torch.as_tensor(batch[0]))
            ys.append(torch.as_tensor(batch[1]))
        if not xs:
            raise ValueError("eval data is empty")
        return torch.cat(xs), torch.cat(ys)

    def to(self, device: torch.device) -> "EvalData":
        if self.inputs is not None:
            self.inputs, self.targets = self.inputs.to(device), self.targets.to(device)
        self.device = device
        return self

    def __len__(self) -> int:
        if self.inputs is not None:
            return len(self.inputs)
        return len(self.loader.dataset)  # type: ignore[arg-type, union-attr]

    def sample(self, n: int = 1) -> tuple[Tensor, Tensor]:
        """The first ``n`` (inputs, targets), on the device (for shape checks and MAC counting)."""
        if self.inputs is not None:
            return self.inputs[:n], self.targets[:n]  # type: ignore[index]
        x, y, *_ = next(iter(self.loader))  # type: ignore[arg-type]
        return x[:n].to(self.device), y[:n].to(self.device)

    def fingerprint(self) -> str:
        """sha256 of the materialised inputs and targets (streamed data: its length only)."""
        import hashlib

        h = hashlib.sha256()
        if self.inputs is None:
            h.update(f"stream:{len(self)}".encode())
            return h.hexdigest()
        for t in (self.inputs, self.targets):
            h.update(str((tuple(t.shape), t.dtype)).encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def batches(self, limit: Optional[int] = None) -> Iterator[tuple[Tensor, Tensor]]:
        """``(inputs, targets)`` batches on the device; ``limit`` caps the number of samples."""
        if self.inputs is not None:
            n = len(self.inputs) if limit is None else min(limit, len(self.inputs))
            for start in range(0, n, self.batch_size):
                end = min(start + self.batch_size, n)
                yield self.inputs[start:end], self.targets[start:end]  # type: ignore[index]
            return
        seen = 0
        for x, y, *_ in self.loader:  # type: ignore[union-attr]
            if limit is not None and seen >= limit:
                return
            if limit is not None and seen + len(x) > limit:
                x, y = x[: limit - seen], y[: limit - seen]
            seen += len(x)
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def _loader_small(loader: DataLoader) -> bool:
    try:
        first = next(iter(loader))
        per_batch = sum(t.element_size() * t.numel() for t in first[:2] if isinstance(t, Tensor))
        return per_batch * len(loader) <= MATERIALISE_LIMIT_BYTES
    except TypeError:
        return False


# ---------------------------------------------------------------------- metric and loss
IGNORE_INDEX = -100  # targets equal to this are not counted (Hugging Face's convention)
LossFn = Callable[[Tensor, Tensor], Tensor]
AUTO = "auto"


def model_logits(outputs: Any) -> Tensor:
    """The tensor a metric reads: the output itself, or its ``.logits`` / ``["logits"]`` field."""
    if isinstance(outputs, Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, dict):
        logits = outputs.get("logits")
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(_describe(outputs))


def _describe(outputs: Any) -> str:
    if isinstance(outputs, (tuple, list)):
        inner = ", ".join(tuple(o.shape).__repr__() if isinstance(o, Tensor) else type(o).__name__ for o in outputs)
        what = f"a {type(outputs).__name__} ({inner})"
    elif isinstance(outputs, dict):
        what = f"a dict with keys {list(outputs)} and no 'logits'"
    else:
        what = f"a {type(outputs).__name__}"
    return (f"the model returns {what}; prune_lab reads a tensor of logits, or an output with a "
            "'.logits' field. Wrap the model so it returns the logits tensor, or pass metric= and "
            "loss_fn= that take (outputs, targets)")


@dataclass(frozen=True)
class Scorer:
    """Sums of a metric and a loss over batches, so a mean over many batches is exact.

    With ``metric=None`` the metric is accuracy along the class dimension, counted per target
    (per token for sequence logits ``(B, T, V)`` with targets ``(B, T)``, per pixel for dense
    logits ``(B, C, H, W)`` with targets ``(B, H, W)``), ignoring targets equal to -100. With
    ``loss_fn="auto"`` the loss is the matching cross-entropy. A user's metric or loss returns a
    batch mean, weighted by the batch size.
    """

    metric: Optional[Metric] = None
    loss_fn: Any = AUTO
    class_dim: int = -1

    def __post_init__(self) -> None:
        if self.metric is not None and not callable(self.metric):
            raise TypeError(f"metric must be a callable (outputs, targets) -> value, got {type(self.metric).__name__}")
        if self.loss_fn is not None and self.loss_fn != AUTO and not callable(self.loss_fn):
            raise TypeError(f"loss_fn must be a callable (outputs, targets) -> loss, 'auto' or None, got {self.loss_fn!r}")

    def batch(self, outputs: Any, targets: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
        """``(metric_sum, metric_count, loss_sum or None, loss_count)`` for one batch."""
        out = model_logits(outputs)
        b = torch.tensor(float(len(targets)), dtype=torch.float64, device=out.device)
        if self.metric is None:
            valid = targets != IGNORE_INDEX
            correct = (out.argmax(dim=self.class_dim) == targets) & valid
            m_sum, m_n = correct.sum(dtype=torch.float64), valid.sum(dtype=torch.float64)
        elif isinstance(self.metric, SummedMetric):
            m_sum, m_n = self.metric.batch(out, targets)
        else:
            m_sum, m_n = torch.as_tensor(self.metric(out, targets)).double() * b, b
        if self.loss_fn is None:
            return m_sum, m_n, None, b
        if self.loss_fn == AUTO:
            logits = out.movedim(self.class_dim, -1).reshape(-1, out.shape[self.class_dim])
            flat = targets.reshape(-1)
            l_sum = F.cross_entropy(logits.float(), flat, reduction="sum", ignore_index=IGNORE_INDEX).double()
            return m_sum, m_n, l_sum, (flat != IGNORE_INDEX).sum(dtype=torch.float64)
        return m_sum, m_n, torch.as_tensor(self.loss_fn(out, targets)).double() * b, b

    def totals(self) -> "Totals":
        """Running sums for this scorer's batches (a summed metric finishes the mean)."""
        return Totals(self.metric.finish if isinstance(self.metric, SummedMetric) else None)

    @property
    def lower_is_better(self) -> bool:
        return lower_is_better(self.metric)

    def check(self, outputs: Any, targets: Tensor) -> "Scorer":
        """This scorer fitted to the model's output layout, or a ValueError that says what to pass."""
        try:
            out = model_logits(outputs)
        except TypeError as e:
            raise ValueError(str(e)) from None
        shape, tshape = tuple(out.shape), tuple(targets.shape)
        scorer = self
        if self.metric is None or self.loss_fn == AUTO:
            dim = _class_dim(out, targets)
            if dim is None:
                what = ("the default accuracy and cross-entropy need" if self.metric is None else
                        "the default loss (cross-entropy) needs")
                raise ValueError(
                    f"{what} logits (batch, classes) with integer "
                    f"targets (batch,), or (batch, tokens, classes) with (batch, tokens); the model "
                    f"returns {shape} for targets {tshape} ({targets.dtype}). Pass metric=(outputs, targets) "
                    f"-> batch mean and loss_fn=(outputs, targets) -> loss (or loss_fn=None)"
                )
            scorer = Scorer(self.metric, self.loss_fn, dim)
        try:
            with torch.no_grad():
                scorer.batch(outputs, targets)
        except Exception as e:
            raise ValueError(
                f"the metric or loss fails on the model's outputs {shape} and targets {tshape}: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Pass metric= and "
                "loss_fn= that take (outputs, targets), or loss_fn=None"
            ) from None
        return scorer


def _class_dim(out: Tensor, targets: Tensor) -> Optional[int]:
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or out.dim() != targets.dim() + 1:
        return None
    if tuple(out.shape[:-1]) == tuple(targets.shape):
        return -1
    if out.dim() >= 3 and out.shape[0] == targets.shape[0] and tuple(out.shape[2:]) == tuple(targets.shape[1:]):
        return 1
    return None


@dataclass
class Evaluation:
    metric: float
    loss: Optional[float]
    n: int


class Totals:
    """Running sums of :meth:`Scorer.batch` results; ``result()`` syncs with the host once."""

    def __init__(self, finish: Optional[Callable[[float], float]] = None) -> None:
        self.finish = finish
        self.m_sum: Any = 0.0
        self.m_n: Any = 0.0
        self.l_sum: Any = None
        self.l_n: Any = 0.0
        self.n = 0

    def add(self, parts: tuple[Tensor, Tensor, Optional[Tensor], Tensor], batch: int) -> None:
        m_sum, m_n, l_sum, l_n = parts
        self.m_sum, self.m_n, self.n = self.m_sum + m_sum, self.m_n + m_n, self.n + batch
        if l_sum is not None:
            self.l_sum = l_sum if self.l_sum is None else self.l_sum + l_sum
            self.l_n = self.l_n + l_n

    def result(self) -> Evaluation:
        m_n = float(self.m_n)
        metric = float(self.m_sum) / m_n if m_n else math.nan
        if self.finish is not None and m_n:
            metric = self.finish(metric)
        loss = None if self.l_sum is None else float(self.l_sum) / max(float(self.l_n), 1.0)
        return Evaluation(metric, loss, self.n)


def accuracy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Top-1 accuracy of a batch along the last dimension, a fraction in [0, 1]."""
    return (outputs.argmax(dim=-1) == targets).sum(dtype=torch.float64) / targets.numel()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the block, the previous train/eval mode of every module restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def full_pass(model: nn.Module, data: EvalData, scorer: Scorer, limit: Optional[int] = None) -> Evaluation:
    """Plain forward passes over the eval data: the oracle every faster path must equal.

    Grad mode and train/eval mode are restored whatever happens (no generator holds a mode)."""
    totals = scorer.totals()
    with eval_mode(model), torch.inference_mode():
        for x, y in data.batches(limit):
            totals.add(scorer.batch(model(x), y), len(y))
    return totals.result()


# ---------------------------------------------------------------------- MACs
@dataclass(frozen=True)
class WeightUse:
    """One use of (part of) a prunable weight in a matrix product or convolution, per input
    sample: the region used (``weight.as_strided(size, stride, offset)``) and the MACs of that
    use. Every entry of the region takes part in ``macs / region entries`` multiply-adds."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    macs: int

    @property
    def entries(self) -> int:
        return math.prod(self.size)

    def region(self, weight: Tensor) -> Tensor:
        return weight.detach().as_strided(self.size, self.stride, self.offset)


def _mm_macs(func: Any, args: tuple, out: Any) -> Optional[tuple[int, list[Tensor]]]:
    """MACs of a matrix product or convolution and the operands that may be weights."""
    aten = torch.ops.aten  # (torch < 2.3 cannot import it by name)

    packet = getattr(func, "overloadpacket", None)
    if packet in (aten.mm, aten.bmm):
        a, b = args[0], args[1]
    elif packet in (aten.addmm, aten.baddbmm, aten.addbmm):
        a, b = args[1], args[2]
    elif packet is aten.mv:
        a, b = args[0], args[1]
        return a.shape[0] * a.shape[1], [a, b]
    elif packet is aten.addmv:
        a, b = args[1], args[2]
        return a.shape[0] * a.shape[1], [a, b]
    elif packet in (aten.dot, aten.vdot):
        return args[0].numel(), [args[0], args[1]]
    elif packet is aten.convolution:
        x, w, transposed = args[0], args[1], args[6]
        spatial = x.shape[2:] if transposed else out.shape[2:]
        return w.numel() * x.shape[0] * math.prod(spatial), [w]  # unbatched inputs arrive unsqueezed
    else:
        return None
    if packet is aten.addbmm:
        return a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2], [a, b]
    batch = a.shape[0] if a.dim() == 3 else 1
    return batch * a.shape[-2] * a.shape[-1] * b.shape[-1], [a, b]


class WeightIndex:
    """Which prunable weight a tensor is, or is a view of (same storage, offset inside it)."""

    def __init__(self, weights: dict[str, Tensor]):
        self.weights = weights
        self._by_storage: dict[int, list[tuple[str, Tensor]]] = {}
        for name, w in weights.items():
            self._by_storage.setdefault(w.untyped_storage().data_ptr(), []).append((name, w))

    def owner(self, t: Any) -> Optional[str]:
        if not isinstance(t, Tensor) or t.is_meta or t.layout != torch.strided:
            return None
        for name, w in self._by_storage.get(t.untyped_storage().data_ptr(), ()):
            if 0 <= t.storage_offset() - w.storage_offset() < w.numel() and t.dtype == w.dtype:
                return name
        return None


@contextlib.contextmanager
def unfused(model: nn.Module, grad: bool = False) -> Iterator[None]:
    """Eval mode (and no grad unless ``grad``), with the fused kernels that hide matrix products
    switched off (PyTorch's fast attention path, oneDNN/cuDNN RNNs): every product shows at the
    ATen level."""
    import warnings

    switch = _fastpath_switch()
    fast = switch.get_fastpath_enabled() if switch is not None else None
    if switch is not None:
        switch.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.backends.mkldnn.flags(enabled=False), torch.backends.cudnn.flags(enabled=False), \
                    eval_mode(model), torch.set_grad_enabled(grad), _attention_slow_path(model, switch is None):
                yield
    finally:
        if switch is not None:
            switch.set_fastpath_enabled(fast)


def _fastpath_switch() -> Any:
    """``torch.backends.mha`` (torch >= 2.4), or None on older releases: see _attention_slow_path."""
    try:
        import torch.backends.mha as switch
    except ImportError:
        return None
    return switch if hasattr(switch, "set_fastpath_enabled") else None


@contextlib.contextmanager
def _attention_slow_path(model: nn.Module, needed: bool) -> Iterator[None]:
    """Before torch 2.4 there is no switch for the fused attention path; it is skipped for a
    module in training mode. So the attention modules alone (not their children: their Dropout
    modules stay in eval mode) are put in training mode, with the attention dropout set to 0:
    the same numbers as eval mode, through the path whose products show."""
    saved: list[tuple[nn.Module, bool, Optional[float]]] = []
    if needed:
        kinds = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)
        for m in model.modules():
            if isinstance(m, kinds):
                saved.append((m, m.training, getattr(m, "dropout", None) if isinstance(m, nn.MultiheadAttention) else None))
                m.training = True
                if isinstance(m, nn.MultiheadAttention):
                    m.dropout = 0.0
    try:
        yield
    finally:
        for m, training, dropout in saved:
            m.training = training
            if dropout is not None:
                m.dropout = dropout


def weight_uses(model: nn.Module, weights: dict[str, Tensor], sample: Tensor) -> tuple[dict[str, list[WeightUse]], Any]:
    """Every use of each weight in one forward pass of ``sample``, and the outputs.

    Uses are recorded at the ATen level (``TorchDispatchMode``), so weights used through
    functional calls, shared modules, tied parameters or slices (attention's packed q/k/v
    projection) are all counted (see :func:`unfused`).
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    index = WeightIndex(weights)
    uses: dict[str, list[WeightUse]] = {name: [] for name in weights}

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            found = _mm_macs(func, args, out)
            if found is not None:
                macs, operands = found
                for t in operands:
                    name = index.owner(t)
                    if name is None:
                        continue
                    size = tuple(1 if st == 0 else sz for sz, st in zip(t.shape, t.stride()))
                    uses[name].append(WeightUse(size, tuple(t.stride()), t.storage_offset(), int(macs)))
            return out

    with unfused(model), Recorder():
        out = model(sample)
    return uses, out


def forward_check(model: nn.Module, weights: dict[str, Tensor], sample: Tensor, first_layer: Any) -> tuple[dict[str, list[WeightUse]], Any]:
    """:func:`weight_uses` on one eval batch, refused with the input shape and the first
    prunable layer (``LayerInfo``) named when the model cannot run on the data."""
    try:
        return weight_uses(model, weights, sample)
    except Exception as e:
        raise ValueError(
            f"the model cannot run on the eval data: inputs of shape {tuple(sample.shape)} (batch of 1) failed with "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. First prunable layer {first_layer.name!r} "
            f"is {first_layer.kind} with weight shape {first_layer.shape}."
        ) from None


def count_macs(weight: Tensor, uses: list[WeightUse], nonzeros: Optional[int] = None) -> tuple[int, int]:
    """``(MACs, effective MACs)`` of one weight's uses; effective counts only nonzero entries.

    ``nonzeros`` of the whole tensor short-cuts uses that cover it entirely."""
    macs = effective = 0
    for u in uses:
        macs += u.macs
        per_entry = u.macs // u.entries if u.entries else 0
        whole = u.size == tuple(weight.shape) and u.stride == tuple(weight.stride()) and u.offset == weight.storage_offset()
        nnz = nonzeros if whole and nonzeros is not None else int(torch.count_nonzero(u.region(weight)))
        effective += per_entry * nnz
    return macs, effective


def model_macs(model: nn.Module, sample: Tensor) -> int:
    """Per-sample MACs of every matrix product and convolution that uses a prunable weight of
    ``model`` (counted in a forward pass of ``sample``, one sample), dense."""
    from .layers import find_prunable

    infos, _ = find_prunable(model, ())
    params = dict(model.named_parameters(remove_duplicate=False))
    weights = {i.name: params[i.param] for i in infos}
    with eval_mode(model), torch.no_grad():
        uses, _ = weight_uses(model, weights, sample[:1])
    return sum(count_macs(weights[n], u)[0] for n, u in uses.items())


OUTPUT_TOLERANCE = 1e-4  # a compact model matches the masked one within this fraction of the output scale


@torch.no_grad()
def output_difference(a: nn.Module, b: nn.Module, *inputs: Any) -> tuple[float, float]:
    """``(max |a(x) - b(x)|, max |a(x)|)`` of the two models' logits, both in eval mode for the
    call (their modes restored); the difference is infinite when the shapes differ."""
    modes = (a.training, b.training)
    a.eval(), b.eval()
    try:
        ya, yb = model_logits(a(*inputs)).double(), model_logits(b(*inputs)).double()
    finally:
        a.train(modes[0]), b.train(modes[1])
    if ya.shape != yb.shape:
        return float("inf"), float(ya.abs().max())
    return float((ya - yb).abs().max()), float(ya.abs().max())
