"""Checks for a hand-chosen per-layer plan (assignment 2, part 1), graded on what it measures.

A plan is not compared with ``allocate()`` or any reference dict: many plans are good. It is
applied to the student's own session and graded on two measured numbers, each its own graded
cell: the size of the sparse file it writes (``Session.stats()``, real bytes) against the dense
file, and the validation accuracy after a fixed fine-tuning run, counted in validation samples.
The session is reset afterwards (bit for bit), so the check changes nothing.
"""
from __future__ import annotations

from typing import Any, Mapping

from .checks import StudentError


def _apply(plan: Any, session: Any) -> None:
    """Apply ``plan`` to ``session`` or raise :class:`StudentError` saying what is wrong with it."""
    names = [info.name for info in session.layers]
    if not isinstance(plan, Mapping):
        raise StudentError(f"plan must be a dict {{layer name: sparsity}}, got {type(plan).__name__}")
    if not plan:
        raise StudentError(f"plan is empty (not written yet?): give each of {names} a sparsity (0.0 leaves a layer dense)")
    unknown = [k for k in plan if k not in names]
    if unknown:
        raise StudentError(f"plan names {unknown}, which this model does not have; its layers are {names}")
    missing = [k for k in names if k not in plan]
    if missing:
        raise StudentError(f"plan has no entry for {missing}: give every layer a sparsity (0.0 leaves it dense)")
    try:
        session.set_sparsity(dict(plan))
    except (TypeError, ValueError) as e:
        raise StudentError(f"the session refused the plan: {e}") from None


def plan_file_fraction(plan: Mapping[str, float], session: Any) -> tuple[int, int]:
    """(sparse file bytes, dense file bytes) of the model pruned to ``plan``; the session is reset."""
    _apply(plan, session)
    try:
        total = session.stats().total
        return int(total["sparse_file_bytes"]), int(total["dense_file_bytes"])
    finally:
        session.reset()


def check_plan_size(plan: Mapping[str, float], session: Any, limit: float = 0.25) -> str:
    """The sparse file of the model pruned to ``plan`` must be at most ``limit`` of the dense file."""
    if session.total_sparsity() != 0:
        raise StudentError("the session is already pruned: run session.reset() before the check")
    sparse, dense = plan_file_fraction(plan, session)
    if sparse > limit * dense:
        raise StudentError(f"your plan's file is {sparse:,} B = {sparse / dense:.1%} of the dense {dense:,} B; at most "
                           f"{limit:.0%} may be: prune more where the weights are (fc1 and fc2 hold most of them)")
    return f"size: {sparse:,} B = {sparse / dense:.1%} of the dense file (at most {limit:.0%})"


def check_plan_accuracy(plan: Mapping[str, float], session: Any, train_data: Any, max_more_wrong: int = 2,
                        steps: int = 300, lr: float = 0.01) -> str:
    """Pruned to ``plan`` and fine-tuned ``steps`` steps (SGD, ``lr``, seed 0) on ``train_data``, at most
    ``max_more_wrong`` more of the session's (validation) samples may be wrong than dense. A count of
    samples, not points: on a few hundred samples one point is a handful of them."""
    if session.total_sparsity() != 0:
        raise StudentError("the session is already pruned: run session.reset() before the check")
    n = len(session.data)
    dense = session.evaluate()["accuracy"]
    _apply(plan, session)
    try:
        one_shot = session.evaluate()["accuracy"]
        session.finetune(train_data, steps=steps, lr=lr, progress=False, seed=0)
        tuned = session.evaluate()["accuracy"]
    finally:
        session.reset()
    more_wrong = round((dense - tuned) * n)
    versus = (f"{more_wrong} more" if more_wrong > 0 else f"{-more_wrong} fewer" if more_wrong < 0 else "as many")
    said = (f"dense {dense:.2%}, your plan {one_shot:.2%} one-shot and {tuned:.2%} after {steps} fine-tuning steps: "
            f"{versus} of the {n} validation samples wrong than dense")
    if more_wrong > max_more_wrong:
        raise StudentError(f"{said}; at most {max_more_wrong} more may be: prune less in the layers whose curves fall "
                           "first (the small ones)")
    return f"accuracy: {said} (at most {max_more_wrong} more may be)"


__all__ = ["plan_file_fraction", "check_plan_size", "check_plan_accuracy"]
