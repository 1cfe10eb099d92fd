"""Masked training: recover accuracy with the pruned weights held at exactly zero.

After every optimizer step the masks are re-applied, and pruned weights get zero gradient before
it, so optimizer state (momentum, Adam moments) for them stays zero too. Schedules: one-shot,
iterative magnitude pruning, AGP (Zhu & Gupta 2017) and lottery-ticket rewinding (Frankle &
Carbin 2019). Progress bar; Ctrl-C stops and keeps what was learned.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .session import Session


@dataclass
class FinetuneResult:
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # per epoch / round
    interrupted: bool = False
    restored: Optional[str] = None


def _batches(data: Any, batch_size: int, seed: int, device: torch.device):
    """Endless shuffled (inputs, targets) batches from a Dataset, DataLoader or tensor pair."""
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        data = TensorDataset(*data)
    if isinstance(data, TensorDataset):
        x, y = (t.to(device) for t in data.tensors[:2])
        g = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(x), generator=g).to(device)
            for start in range(0, len(x), batch_size):
                idx = order[start : start + batch_size]
                yield x[idx], y[idx]
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    if not isinstance(data, (DataLoader, Dataset)):
        raise TypeError(f"train_data must be a Dataset, DataLoader or (inputs, targets) tensors, got {type(data).__name__}")
    while True:
        for x, y, *_ in loader:
            yield x.to(device), y.to(device)


def make_optimizer(name: Union[str, Callable], params, lr: float, momentum: float, weight_decay: float):
    if callable(name):
        return name(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd', 'adam' or a callable(params) -> Optimizer, got {name!r}")


def masked_train(
    session: "Session",
    train_data: Any,
    steps: int,
    lr: float = 0.01,
    optimizer: Union[str, Callable] = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    on_step: Optional[Callable[[int, float], None]] = None,
    result: Optional[FinetuneResult] = None,
) -> FinetuneResult:
    """``steps`` optimizer steps on the session's model with its current masks held."""
    from tqdm.auto import tqdm

    result = result or FinetuneResult()
    model = session.model
    masks = {name: session.mask(name) for name in session._info if session.pruned_counts[name]}
    weights = {name: session._weights[name] for name in masks}
    opt = make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], lr, momentum, weight_decay)
    was_training = model.training
    model.train()
    batches = _batches(train_data, batch_size, seed, session.device)
    bar = tqdm(range(steps), desc="fine-tune", disable=not progress, leave=False)
    try:
        for step in bar:
            x, y = next(batches)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            with torch.no_grad():
                for name, m in masks.items():
                    if weights[name].grad is not None:
                        weights[name].grad.mul_(m)
            opt.step()
            with torch.no_grad():
                for name, m in masks.items():
                    weights[name].mul_(m)
            value = loss.item()
            result.losses.append(value)
            result.steps += 1
            if on_step is not None:
                on_step(step, value)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{value:.3f}")
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        bar.close()
        model.train(was_training)
        session._rebase()
    return result


def agp_sparsity(step: int, total_steps: int, final: float, initial: float = 0.0, start: int = 0, end: Optional[int] = None) -> float:
    """Zhu & Gupta's cubic schedule: s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3."""
    end = total_steps if end is None else end
    if step <= start:
        return initial
    if step >= end:
        return final
    frac = (step - start) / (end - start)
    return final + (initial - final) * (1 - frac) ** 3


def iterative_sparsities(final: float, rounds: int) -> list[float]:
    """Sparsity after each round of iterative pruning: the same fraction of the remaining
    weights each round (1 - (1 - s)^(r / R))."""
    return [1 - (1 - final) ** ((r + 1) / rounds) for r in range(rounds)]
