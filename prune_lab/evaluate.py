"""The evaluator: what the model scores on the eval data, exact, as fast as it can be exact.

It owns the eval data, the scorer (metric and loss), the incremental engine (traced partial
re-evaluation, see ``incremental.py``) and its fallback, the dense baseline and preview
subsets. The fallback is a plain full forward pass, used whenever the traced path fails for
any reason (the model cannot be traced, a traced program raises, its output differs from the
model's). In checking mode (``PRUNE_LAB_CHECK=1`` or ``check=True``) every evaluation is also
computed by a plain full forward pass and compared: the metric exactly, the loss to 1e-5.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from .incremental import IncrementalEngine, TraceError
from .measure import EvalData, Evaluation, Scorer, eval_mode, full_pass
from .metrics import goodness
from .state import PruningState

LOSS_TOLERANCE = 1e-5


class CheckError(AssertionError):
    """Checking mode: a fast evaluation differed from a plain full forward pass."""


def checking_enabled() -> bool:
    return os.environ.get("PRUNE_LAB_CHECK", "") not in ("", "0", "false", "False")


class Evaluator:
    """``evaluate()`` of the model in the state it is in; ``baseline()`` of the original model.

    ``incremental=False`` always runs full passes. ``check=None`` follows ``PRUNE_LAB_CHECK``.
    """

    def __init__(self, state: PruningState, data: EvalData, scorer: Scorer, metric_name: str = "accuracy",
                 incremental: bool = True, cache_budget_bytes: Optional[int] = None, check: Optional[bool] = None):
        self.state = state
        self.model = state.model
        self.data = data
        self.scorer = scorer
        self.metric_name = metric_name
        self.incremental = incremental
        self.cache_budget_bytes = cache_budget_bytes
        self.check = check
        self.fallback_reason: Optional[str] = None
        self._engine: Optional[IncrementalEngine] = None
        self._baselines: dict[Optional[int], dict[str, float]] = {}
        self.counts = {"full": 0, "incremental": 0}

    @property
    def lower_is_better(self) -> bool:
        """Whether a smaller metric is better (perplexity): which way a "drop" goes."""
        return self.scorer.lower_is_better

    def goodness(self, value: float) -> float:
        """``value`` turned so that larger is better (the metric, or minus it)."""
        return goodness(value, self.lower_is_better)

    def __repr__(self) -> str:
        mode = "incremental" if self.engine() is not None else f"full passes ({self.fallback_reason or 'incremental off'})"
        return f"Evaluator({self.metric_name}, {len(self.data)} samples, {mode})"

    # ------------------------------------------------------------------ the engine and its fallback
    def engine(self) -> Optional[IncrementalEngine]:
        """The traced incremental engine, or ``None`` (off, untraceable, failed once, streamed data)."""
        if self._engine is None and self.fallback_reason is None and self.incremental:
            try:
                self._engine = IncrementalEngine(self.model, self.data, self.state.weights,
                                                 self.cache_budget_bytes, self.data.batch_size)
            except TraceError as e:
                self._fall_back(str(e))
        return self._engine

    def _fall_back(self, reason: str) -> None:
        self._engine = None
        self.fallback_reason = reason
        print(f"prune_lab: {type(self.model).__name__}: incremental evaluation is off ({reason}); "
              "evaluating with full forward passes")

    def rebuild(self) -> None:
        self._engine = None
        self.fallback_reason = None
        self._baselines.clear()

    # ------------------------------------------------------------------ evaluating
    def evaluate(self, limit: Optional[int] = None, commit: bool = True, incremental: bool = True) -> dict[str, float]:
        """``{metric_name: value, "loss": value}`` of the model as it is now.

        ``limit``: only the first ``limit`` samples (full passes, a preview). ``commit=False``:
        the incremental cache keeps the committed state (for trials that will be undone).
        ``incremental=False``: a plain full forward pass.
        """
        with self.state.lock:  # no other thread writes weights while they are read
            ev = self._evaluate(limit, commit) if incremental else full_pass(self.model, self.data, self.scorer, limit)
            if self.check if self.check is not None else checking_enabled():
                oracle = full_pass(self.model, self.data, self.scorer, limit)
                self._compare(ev, oracle)
        return self._as_dict(ev)

    def _evaluate(self, limit: Optional[int], commit: bool) -> Evaluation:
        engine = self.engine() if limit is None or limit >= len(self.data) else None
        if engine is not None:
            try:
                with eval_mode(self.model):
                    pairs = engine.outputs(self.state.tokens(), commit=commit)
            except Exception as e:  # any failure of the traced path: fall back, never guess
                self._fall_back(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            else:
                self.counts["incremental"] += 1
                totals = self.scorer.totals()
                with torch.inference_mode():
                    for out, y in pairs:
                        totals.add(self.scorer.batch(out, y), len(y))
                return totals.result()
        self.counts["full"] += 1
        return full_pass(self.model, self.data, self.scorer, limit)

    def _compare(self, ev: Evaluation, oracle: Evaluation) -> None:
        same_metric = ev.metric == oracle.metric or (math.isnan(ev.metric) and math.isnan(oracle.metric))
        same_loss = (ev.loss is None) == (oracle.loss is None) and (
            ev.loss is None or abs(ev.loss - oracle.loss) <= LOSS_TOLERANCE * max(1.0, abs(oracle.loss)))  # type: ignore[operator]
        if not (same_metric and same_loss):
            raise CheckError(
                f"checking mode: evaluate() gave {self.metric_name} {ev.metric!r}, loss {ev.loss!r}; a plain full "
                f"forward pass gives {oracle.metric!r}, loss {oracle.loss!r}"
            )

    def _as_dict(self, ev: Evaluation) -> dict[str, float]:
        return {self.metric_name: ev.metric, "loss": ev.loss if ev.loss is not None else math.nan}

    def baseline(self, limit: Optional[int] = None) -> dict[str, float]:
        """``evaluate()`` of the original model (before any pruning or fine-tuning); cached.
        The model is put back exactly, and the incremental cache keeps the current state."""
        key = None if limit is None or limit >= len(self.data) else int(limit)
        with self.state.lock:
            return self._baseline(key)

    def _baseline(self, key: Optional[int]) -> dict[str, float]:
        if key not in self._baselines:
            if self.state.generation == 0:
                with self.state.trial({n: None for n, r in self.state.records.items() if r.count}):
                    self._baselines[key] = self.evaluate(key, commit=False)
            else:
                with self.state.original_weights():
                    self._baselines[key] = self._as_dict(full_pass(self.model, self.data, self.scorer, key))
        return dict(self._baselines[key])
