"""Masked training: recover accuracy with the pruned weights held at exactly zero.

After every optimizer step the masks are re-applied, and pruned weights get zero gradient before
it, so optimizer state (momentum, Adam moments) for them stays zero too. Schedules: one-shot,
iterative magnitude pruning, AGP (Zhu & Gupta 2017) and lottery-ticket rewinding (Frankle &
Carbin 2019). Progress bar; Ctrl-C stops and keeps what was learned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..allocation import apply_global
from ..criteria import get_criterion
from ..evaluate import Evaluator
from ..measure import model_logits
from ..state import PruningState

SCHEDULES = ("oneshot", "iterative", "agp", "lottery")


@dataclass
class FinetuneResult:
    steps: int = 0
    losses: list[float] = field(default_factory=list, repr=False)
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # per epoch / round
    interrupted: bool = False
    restored: Optional[str] = None

    def __repr__(self) -> str:
        last = self.evaluations[-1] if self.evaluations else {}
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in last.items())
        loss = f", last loss {self.losses[-1]:.4f}" if self.losses else ""
        stop = ", interrupted" if self.interrupted else ""
        return f"FinetuneResult({self.steps} steps{loss}{stop}; after: {shown or 'not evaluated'})"


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
    state: PruningState,
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
    teacher: Optional[torch.nn.Module] = None,
    temperature: float = 4.0,
    alpha: float = 0.0,
) -> FinetuneResult:
    """``steps`` optimizer steps on the session's model with its current masks held; with a
    ``teacher`` and ``alpha > 0``, on the distillation loss (:func:`distillation_loss`)."""
    from tqdm.auto import tqdm

    result = result or FinetuneResult()
    model = state.model
    masks, weights = _held(state)
    opt = make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], lr, momentum, weight_decay)
    was_training = model.training
    device = next(iter(state.weights.values())).device
    batches = _batches(train_data, batch_size, seed, device)
    model.train()
    bar = tqdm(range(steps), desc="fine-tune", disable=not progress, leave=False)
    try:
        for step in bar:
            x, y = next(batches)
            opt.zero_grad(set_to_none=True)
            loss = _loss(model, x, y, loss_fn, teacher if alpha > 0 else None, temperature, alpha)
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
        state.rebase()
    return result


def _held(state: PruningState) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The masks training must hold and the tensors they hold: pruned layers' weights, and the
    biases and BatchNorm entries of removed channels."""
    masks = {name: state.mask(name) for name, k in state.counts.items() if k}
    weights = {name: state.weights[name] for name in masks}
    for key, (t, m) in state.member_masks().items():
        masks[key], weights[key] = m, t
    return masks, weights


def _loss(model: torch.nn.Module, x: Tensor, y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor],
          teacher: Optional[torch.nn.Module], temperature: float, alpha: float) -> Tensor:
    """One batch's training loss: plain, or against the frozen ``teacher`` (:func:`distillation_loss`)."""
    logits = model_logits(model(x))
    if teacher is None:
        return loss_fn(logits, y)
    with torch.no_grad():
        target_logits = model_logits(teacher(x))
    return distillation_loss(logits, target_logits, y, loss_fn, temperature, alpha)


def _class_last(logits: Tensor, targets: Tensor) -> Tensor:
    """Logits as (rows, classes): classes last for (batch, classes) and token logits."""
    if logits.dim() > 2 and tuple(logits.shape[:-1]) != tuple(targets.shape):
        logits = logits.movedim(1, -1)  # (batch, classes, ...) as for dense prediction
    return logits.reshape(-1, logits.shape[-1])


def distillation_loss(student: Tensor, teacher: Tensor, targets: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor],
                      temperature: float, alpha: float) -> Tensor:
    """Hinton et al. 2015: ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * loss``,
    the KL averaged over rows (samples, or tokens); ``T^2`` keeps the soft term's gradients on the
    scale of the hard one's."""
    s, t = _class_last(student, targets), _class_last(teacher, targets)
    soft = F.kl_div(F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1),
                    reduction="batchmean", log_target=True)
    return alpha * temperature ** 2 * soft + (1 - alpha) * loss_fn(student, targets)


def make_teacher(state: PruningState) -> torch.nn.Module:
    """The dense original model as a frozen copy (the session's model is never the teacher)."""
    teacher = state.original_model()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def check_distill(distill: Any) -> Optional[tuple[float, float]]:
    """``(temperature, alpha)`` from ``{"temperature": T, "alpha": a}``, checked."""
    if distill is None:
        return None
    if not isinstance(distill, dict) or set(distill) - {"temperature", "alpha"}:
        raise ValueError(f"distill must be a dict with 'temperature' and/or 'alpha', got {distill!r}")
    t, a = distill.get("temperature", 4.0), distill.get("alpha", 0.9)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 or math.isinf(t):
        raise ValueError(f"distill temperature must be a positive number, got {t!r}")
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1:
        raise ValueError(f"distill alpha must be in [0, 1] (0: plain fine-tuning), got {a!r}")
    return float(t), float(a)


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


def token_cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy over the class dimension for (B, C) or (B, T, V) logits, -100 ignored."""
    if outputs.dim() == targets.dim() + 1 and tuple(outputs.shape[:-1]) == tuple(targets.shape):
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), ignore_index=-100)
    return F.cross_entropy(outputs, targets, ignore_index=-100)


@dataclass
class FinetuneConfig:
    """How :func:`finetune` trains and prunes (see :meth:`prune_lab.Session.finetune` for each
    field). Checked by :meth:`check` before anything changes."""

    epochs: Optional[float] = None
    steps: Optional[int] = None
    lr: float = 0.01
    schedule: str = "oneshot"
    target_sparsity: Optional[float] = None
    allocation: Any = "global"
    rounds: int = 3
    rewind_step: int = 0
    restore: str = "last"
    optimizer: Union[str, Callable] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    seed: int = 0
    progress: bool = True
    on_step: Optional[Callable[[int, float], None]] = None
    loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None
    criterion: Any = "magnitude"
    distill: Optional[dict] = None

    def check(self, train_data: Any) -> int:
        """Validate every field; returns the steps per phase (from ``epochs`` if needed)."""
        check_distill(self.distill)
        get_criterion(self.criterion)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {self.schedule!r}")
        if self.restore not in ("last", "best"):
            raise ValueError(f"restore must be 'last' or 'best', got {self.restore!r}")
        t = self.target_sparsity
        if t is not None and (isinstance(t, bool) or not 0 <= t <= 1):
            raise ValueError(f"target_sparsity {t!r} is outside [0, 1]")
        if self.schedule != "oneshot" and t is None:
            raise ValueError(f"schedule {self.schedule!r} needs target_sparsity=...")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be a positive integer, got {self.rounds!r}")
        if self.steps is not None:
            return self.steps
        if self.epochs is None:
            raise ValueError("finetune needs steps=... or epochs=...")
        n_train = len(train_data[0]) if isinstance(train_data, (tuple, list)) else len(getattr(train_data, "dataset", train_data))
        return max(1, int(math.ceil(self.epochs * n_train / self.batch_size)))


def finetune(state: PruningState, evaluator: Evaluator, train_data: Any, config: Optional[FinetuneConfig] = None,
             **settings: Any) -> FinetuneResult:
    """See :meth:`prune_lab.Session.finetune` (``settings``: the fields of :class:`FinetuneConfig`).
    A data-aware criterion is re-calibrated by the state before every pruning step, so it
    scores the weights as they are after the previous round."""
    config = config if config is not None else FinetuneConfig(**settings)
    steps = config.check(train_data)
    kd = check_distill(config.distill)
    teacher = make_teacher(state) if kd is not None and kd[1] > 0 else None
    evaluator.baseline()  # the dense reference is measured before any weight changes
    run = _Run(state, evaluator, train_data, config, teacher, kd or (4.0, 0.0))
    SCHEDULE_RUNS[config.schedule](run, steps)
    return run.finish()


class _Run:
    """One fine-tuning run: pruning steps, training phases, the best state seen."""

    def __init__(self, state: PruningState, evaluator: Evaluator, train_data: Any, config: FinetuneConfig,
                 teacher: Optional[torch.nn.Module], kd: tuple[float, float]):
        self.state, self.evaluator, self.train_data, self.config = state, evaluator, train_data, config
        self.teacher, self.kd = teacher, kd
        self.criterion = get_criterion(config.criterion)
        self.loss_fn = config.loss_fn or token_cross_entropy
        self.result = FinetuneResult()
        self.best: tuple[float, Any] = (-math.inf, None)

    def prune(self, sparsity: float) -> None:
        self.state.refresh_calibration(self.criterion)
        apply_global(self.state, sparsity, self.config.allocation, self.config.criterion)

    def train(self, n: int, phase_seed: int, hook: Any = "default") -> None:
        c = self.config
        masked_train(self.state, self.train_data, n, c.lr, c.optimizer, c.momentum, c.weight_decay, c.batch_size, phase_seed,
                     c.progress, self.loss_fn, c.on_step if hook == "default" else hook, self.result, self.teacher, *self.kd)
        metric = self.evaluator.metric_name
        ev = {**self.evaluator.evaluate(), "sparsity": self.state.total_sparsity(), "steps": self.result.steps}
        self.result.evaluations.append(ev)
        if c.restore == "best" and self.evaluator.goodness(ev[metric]) > self.best[0]:
            self.best = (self.evaluator.goodness(ev[metric]), self.state.snapshot())

    def finish(self) -> FinetuneResult:
        if self.config.restore == "best" and self.best[1] is not None:
            self.state.restore(self.best[1])
            self.result.restored = "best"
        else:
            self.result.restored = "last"
        return self.result


def _oneshot(run: _Run, steps: int) -> None:
    if run.config.target_sparsity is not None:
        run.prune(run.config.target_sparsity)
    run.train(steps, run.config.seed)


def _iterative(run: _Run, steps: int) -> None:
    for r, s in enumerate(iterative_sparsities(run.config.target_sparsity, run.config.rounds)):  # type: ignore[arg-type]
        run.prune(s)
        run.train(steps, run.config.seed + r)
        if run.result.interrupted:
            break


def _agp(run: _Run, steps: int) -> None:
    rounds = run.config.rounds
    per = max(1, steps // rounds)
    for r in range(rounds):
        run.prune(agp_sparsity(r + 1, rounds, run.config.target_sparsity))  # type: ignore[arg-type]
        run.train(per, run.config.seed + r)
        if run.result.interrupted:
            break


def _lottery(run: _Run, steps: int) -> None:
    """Train, prune by the criterion, rewind the survivors to their values at ``rewind_step``, retrain."""
    state, rewind_step = run.state, run.config.rewind_step
    recorded: dict[str, Tensor] = {}
    if rewind_step == 0:
        recorded = {k: v.detach().clone() for k, v in state.model.state_dict().items()}

    def record(step: int, _loss: float) -> None:
        if step + 1 == rewind_step:
            recorded.update({k: v.detach().clone() for k, v in state.model.state_dict().items()})

    run.train(steps, run.config.seed, record)
    if not run.result.interrupted:
        run.prune(run.config.target_sparsity)  # type: ignore[arg-type]
        state.rewind_to(recorded)
        run.train(steps, run.config.seed + 1)


SCHEDULE_RUNS: dict[str, Callable[[_Run, int], None]] = {"oneshot": _oneshot, "iterative": _iterative, "agp": _agp,
                                                         "lottery": _lottery}
