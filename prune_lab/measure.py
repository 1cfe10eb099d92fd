"""Measured numbers: accuracy/loss, nonzeros, MACs (forward hooks). Nothing here is estimated."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

Metric = Callable[[Tensor, Tensor], Tensor]

#: materialise eval data into device tensors up to this many bytes; larger data streams
MATERIALISE_LIMIT_BYTES = 1 << 30


def accuracy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Top-1 accuracy of a batch, a fraction in [0, 1]."""
    return (outputs.argmax(dim=-1) == targets).sum(dtype=torch.float64) / len(targets)


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

    def sample(self, n: int = 1) -> Tensor:
        """The first ``n`` inputs, on the device (for shape checks and MAC counting)."""
        if self.inputs is not None:
            return self.inputs[:n]
        return next(iter(self.loader))[0][:n].to(self.device)  # type: ignore[arg-type]

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


@dataclass
class Evaluation:
    metric: float
    loss: Optional[float]
    n: int


def score_outputs(
    pairs: Iterable[tuple[Tensor, Tensor]],
    metric: Metric = accuracy,
    loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = F.cross_entropy,
) -> Evaluation:
    """Sample-weighted mean metric and loss over ``(outputs, targets)`` batches, one host sync."""
    metric_sum = loss_sum = None
    n = 0
    with torch.inference_mode():
        for out, y in pairs:
            b = len(y)
            m = metric(out, y).double() * b
            metric_sum = m if metric_sum is None else metric_sum + m
            if loss_fn is not None:
                l = loss_fn(out, y).double() * b
                loss_sum = l if loss_sum is None else loss_sum + l
            n += b
    total_metric = float(metric_sum) if metric_sum is not None else math.nan
    total_loss = float(loss_sum) if loss_sum is not None else math.nan
    return Evaluation(total_metric / max(n, 1), total_loss / max(n, 1) if loss_fn is not None else None, n)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the block, the previous train/eval mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def forward_batches(model: nn.Module, data: EvalData, limit: Optional[int] = None) -> Iterator[tuple[Tensor, Tensor]]:
    with torch.inference_mode():
        for x, y in data.batches(limit):
            yield model(x), y


def evaluate(
    model: nn.Module,
    data: EvalData,
    metric: Metric = accuracy,
    loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = F.cross_entropy,
    limit: Optional[int] = None,
) -> Evaluation:
    """Full forward passes under ``inference_mode``, train/eval mode kept."""
    with eval_mode(model):
        return score_outputs(forward_batches(model, data, limit), metric, loss_fn)


def mac_positions(model: nn.Module, users: dict[str, list[nn.Module]], sample: Tensor) -> dict[str, Optional[int]]:
    """Per layer, how many times each weight entry is multiplied per input sample.

    MACs of a layer = weight.numel() * positions; effective MACs = nonzeros * positions. Linear:
    output rows (tokens); Conv: output positions; ConvTranspose: input positions. Summed over
    every call and every module sharing the weight. ``None`` for modules of other kinds.
    """
    counts: dict[str, Optional[int]] = {}
    handles = []

    def hook_for(layer: str):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            pos = _positions(module, inputs, output)
            if pos is None or counts.get(layer, 0) is None:
                counts[layer] = None
            else:
                counts[layer] = (counts.get(layer) or 0) + pos

        return hook

    for layer, modules in users.items():
        counts[layer] = 0
        for m in modules:
            handles.append(m.register_forward_hook(hook_for(layer)))
    try:
        with eval_mode(model), torch.inference_mode():
            model(sample)
    finally:
        for h in handles:
            h.remove()
    return counts


def _positions(module: nn.Module, inputs: tuple, output: Any) -> Optional[int]:
    if not isinstance(output, Tensor):
        return None
    if isinstance(module, nn.Linear):
        if output.dim() == 1:
            return 1
        return output.numel() // (output.shape[0] * module.out_features)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return output.numel() // (output.shape[0] * module.out_channels)
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        x = inputs[0]
        return x.numel() // (x.shape[0] * module.in_channels)
    return None
