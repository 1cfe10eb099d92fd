"""Calibration statistics for data-aware criteria, from *training* data.

- ``act_sq``: per weight entry, the sum over calibration samples (and tokens / positions) of
  the squared input feature that entry multiplies; ``act_norm = sqrt(act_sq)`` is Wanda's
  ``||X_j||_2``. Collected at the ATen level (like MACs), so functional uses, attention's packed
  projection, Conv1D and convolutions (input channels x kernel positions) are covered.
- ``grad``: the gradient of the mean loss over the calibration samples (Taylor).
- ``fisher``: the mean over samples of the squared per-sample gradient: the empirical Fisher,
  OBD's estimate of the Hessian diagonal. ``hessian="hutchinson"`` estimates the true diagonal
  instead: E[z * (H z)] over Rademacher probes z (Hutchinson 1990).

Only the statistics asked for are collected. Each weight-shaped statistic costs one copy of
the prunable weights (float32). The model is run in eval mode and nothing in it changes.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .measure import WeightIndex, eval_mode, model_logits, unfused

STATISTICS = ("act_norm", "grad", "fisher")


@dataclass
class LayerStats:
    """What a data-aware criterion reads for one layer (weight-shaped float32 tensors or None)."""

    act_norm: Optional[Tensor] = None
    grad: Optional[Tensor] = None
    fisher: Optional[Tensor] = None
    hessian: Optional[Tensor] = None  # the Hessian diagonal OBD uses: the Fisher or Hutchinson's


@dataclass
class Calibration:
    """Statistics per layer, and what they were computed from (``fingerprint``)."""

    layers: dict[str, LayerStats]
    samples: int
    needs: tuple[str, ...]
    hessian: str
    fingerprint: str
    key: tuple = field(default=(), repr=False)

    def layer(self, name: str) -> LayerStats:
        return self.layers[name]

    def __repr__(self) -> str:
        return (f"Calibration({self.samples} samples, {', '.join(self.needs)}, hessian={self.hessian}, "
                f"data {self.fingerprint[:12]})")


def data_fingerprint(x: Tensor, y: Tensor) -> str:
    h = hashlib.sha256()
    for t in (x, y):
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def as_tensors(data: Any, samples: int) -> tuple[Tensor, Tensor]:
    """The first ``samples`` (inputs, targets) of a tensor pair, Dataset or DataLoader."""
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return data[0][:samples], data[1][:samples]
    if isinstance(data, Dataset):
        data = DataLoader(data, batch_size=256)
    if not isinstance(data, DataLoader):
        raise TypeError(f"calibration data must be (inputs, targets) tensors, a Dataset or a DataLoader, got {type(data).__name__}")
    xs, ys, n = [], [], 0
    for x, y, *_ in data:
        xs.append(x)
        ys.append(y)
        n += len(x)
        if n >= samples:
            break
    if not xs:
        raise ValueError("calibration data is empty")
    return torch.cat(xs)[:samples], torch.cat(ys)[:samples]


# ---------------------------------------------------------------------- activations (Wanda)
def activation_sq(model: nn.Module, weights: Mapping[str, Tensor], batches: Iterable[Tensor]) -> dict[str, Tensor]:
    """Per weight entry, the sum of squares of the input feature it multiplies, over every
    sample and position of ``batches`` (each use of the weight counted)."""
    from torch.ops import aten
    from torch.utils._python_dispatch import TorchDispatchMode

    index = WeightIndex(dict(weights))
    owner = index.owner
    acc = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for name, w in weights.items()}

    def add(name: str, t: Tensor, s: Tensor) -> None:
        """Add ``s`` (shaped like ``t``, or broadcastable to it) to the entries ``t`` views; dims
        along which ``t`` repeats one entry (stride 0, a broadcast weight) are summed first."""
        w = weights[name]
        s = s.expand(t.shape)
        zero = tuple(i for i, st in enumerate(t.stride()) if st == 0)
        if zero:
            s = s.sum(dim=zero, keepdim=True)
        size = tuple(1 if st == 0 else n for n, st in zip(t.shape, t.stride()))
        acc[name].as_strided(size, t.stride(), t.storage_offset() - w.storage_offset()).add_(s)

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            packet = getattr(func, "overloadpacket", None)
            if packet in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm):
                a, b = (args[0], args[1]) if packet in (aten.mm, aten.bmm) else (args[1], args[2])
                if owner(b) is not None:  # x @ W, W (.., K, N): entry (k, n) multiplies feature k of every row of x
                    add(owner(b), b, (a.float() ** 2).sum(dim=-2).unsqueeze(-1))
                if owner(a) is not None:  # W @ x, W (.., M, K): entry (m, k) multiplies row k of x
                    add(owner(a), a, (b.float() ** 2).sum(dim=-1).unsqueeze(-2))
            elif packet is aten.convolution and owner(args[1]) is not None and not args[6]:
                x, w = args[0], args[1]
                stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
                if w.dim() == 4 or w.dim() == 3:
                    x4, k = (x, tuple(w.shape[2:])) if w.dim() == 4 else (x.unsqueeze(2), (1, w.shape[2]))
                    pad = tuple(padding) if w.dim() == 4 else (0, padding[0])
                    st = tuple(stride) if w.dim() == 4 else (1, stride[0])
                    dl = tuple(dilation) if w.dim() == 4 else (1, dilation[0])
                    cols = F.unfold(x4.float(), k, dilation=dl, padding=pad, stride=st)  # (N, C*kh*kw, L)
                    s = (cols ** 2).sum(dim=(0, 2)).reshape(groups, -1)  # per group: (C/g*kh*kw)
                    per_out = s.repeat_interleave(w.shape[0] // groups, dim=0)  # (Cout, C/g*kh*kw)
                    add(owner(w), w, per_out.reshape(w.shape))
            return out

    with unfused(model):
        for x in batches:
            with Recorder():
                model(x)
    return acc


# ---------------------------------------------------------------------- gradients
LossFn = Callable[[Tensor, Tensor], Tensor]


def default_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    if outputs.dim() == targets.dim() + 1 and tuple(outputs.shape[:-1]) == tuple(targets.shape):
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), ignore_index=-100)
    return F.cross_entropy(outputs, targets, ignore_index=-100)


def mean_gradient(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor, loss_fn: LossFn,
                  batch_size: int) -> dict[str, Tensor]:
    """Gradient of the mean loss over all samples: one backward pass per batch."""
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    names, tensors = list(params), list(params.values())
    with eval_mode(model), torch.enable_grad():
        for s in range(0, len(x), batch_size):
            xb, yb = x[s : s + batch_size], y[s : s + batch_size]
            loss = loss_fn(model_logits(model(xb)), yb) * (len(xb) / len(x))
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            for n, g in zip(names, grads):
                if g is not None:
                    total[n] += g.float()
    return total


def per_sample_sq_gradient(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor, loss_fn: LossFn,
                           batch_size: int) -> dict[str, Tensor]:
    """Mean over samples of the squared per-sample gradient (the empirical Fisher diagonal).
    Vectorised with ``torch.func`` where the model allows it, else one sample at a time."""
    from torch.func import functional_call, grad, vmap

    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    frozen = {k: v.detach() for k, v in model.named_parameters(remove_duplicate=False)}
    buffers = dict(model.named_buffers())
    qualified = list(params)

    def loss_one(p: dict, xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, ({**frozen, **p}, buffers), (xi.unsqueeze(0),))
        return loss_fn(model_logits(out), yi.unsqueeze(0))

    import warnings

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
    with eval_mode(model), torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")  # vmap's slow paths: same result
        for s in range(0, len(x), batch_size):
            xb, yb = x[s : s + batch_size], y[s : s + batch_size]
            p = {n: params[n].detach() for n in qualified}
            try:
                g = per_sample(p, xb, yb)
                for n in qualified:
                    total[n] += (g[n].float() ** 2).sum(0)
            except Exception:  # some models cannot be vmapped: the same sums, one sample at a time
                tensors = [params[n] for n in qualified]
                for i in range(len(xb)):
                    loss = loss_fn(model_logits(model(xb[i : i + 1])), yb[i : i + 1])
                    for n, gi in zip(qualified, torch.autograd.grad(loss, tensors, allow_unused=True)):
                        if gi is not None:
                            total[n] += gi.float() ** 2
    return {n: t / len(x) for n, t in total.items()}


def hutchinson_diagonal(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor, loss_fn: LossFn,
                        batch_size: int, probes: int, seed: int) -> dict[str, Tensor]:
    """Hutchinson's estimate of diag(H) of the mean loss: mean over Rademacher probes z of
    z * (H z), with Hessian-vector products by double backward."""
    names, tensors = list(params), list(params.values())
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    g = torch.Generator().manual_seed(seed)
    with eval_mode(model), torch.enable_grad():
        for s in range(0, len(x), batch_size):
            xb, yb = x[s : s + batch_size], y[s : s + batch_size]
            loss = loss_fn(model_logits(model(xb)), yb) * (len(xb) / len(x))
            grads = torch.autograd.grad(loss, tensors, create_graph=True)
            for _ in range(probes):
                zs = [(torch.randint(0, 2, p.shape, generator=g) * 2 - 1).to(p) for p in tensors]
                hz = torch.autograd.grad(grads, tensors, grad_outputs=zs, retain_graph=True)
                for n, z, h in zip(names, zs, hz):
                    total[n] += (z * h).float() / probes
    return total


def calibrate(model: nn.Module, layers: list, weights: Mapping[str, Tensor], x: Tensor, y: Tensor, needs: Iterable[str],
              loss_fn: Optional[LossFn] = None, batch_size: int = 64, hessian: str = "fisher", probes: int = 16,
              seed: int = 0, progress: bool = True) -> Calibration:
    """Compute the statistics in ``needs`` for every layer (see the module docstring)."""
    from tqdm.auto import tqdm

    needs = tuple(n for n in STATISTICS if n in set(needs))
    if hessian not in ("fisher", "hutchinson"):
        raise ValueError(f"hessian must be 'fisher' or 'hutchinson', got {hessian!r}")
    loss_fn = loss_fn or default_loss
    params = {i.name: weights[i.name] for i in layers}
    stats = {i.name: LayerStats() for i in layers}
    steps = [n for n in needs] + (["hutchinson"] if "fisher" in needs and hessian == "hutchinson" else [])
    bar = tqdm(total=len(steps), desc="calibrate", disable=not progress, leave=False)
    try:
        if "act_norm" in needs:
            sq = activation_sq(model, params, (x[s : s + batch_size] for s in range(0, len(x), batch_size)))
            for n, t in sq.items():
                stats[n].act_norm = t.sqrt()
            bar.update(1)
        if "grad" in needs:
            for n, t in mean_gradient(model, params, x, y, loss_fn, batch_size).items():
                stats[n].grad = t
            bar.update(1)
        if "fisher" in needs:
            by_param = {i.param: params[i.name] for i in layers}
            fisher = per_sample_sq_gradient(model, by_param, x, y, loss_fn, batch_size)
            for i in layers:
                stats[i.name].fisher = fisher[i.param]
                stats[i.name].hessian = fisher[i.param]
            bar.update(1)
            if hessian == "hutchinson":
                for n, t in hutchinson_diagonal(model, params, x, y, loss_fn, batch_size, probes, seed).items():
                    stats[n].hessian = t
                bar.update(1)
    finally:
        bar.close()
    return Calibration(stats, len(x), needs, hessian, data_fingerprint(x, y))


__all__ = ["Calibration", "LayerStats", "calibrate", "activation_sq", "mean_gradient", "per_sample_sq_gradient",
           "hutchinson_diagonal", "as_tensors", "data_fingerprint"]
