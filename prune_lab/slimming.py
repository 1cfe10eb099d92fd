"""Network slimming (Liu et al. 2017): train with an L1 penalty on the BatchNorm scales, so that
whole channels' scales go to (nearly) zero, then remove the channels with the smallest ``|gamma|``
under one threshold over all layers, and fine-tune.

A BatchNorm channel computes ``gamma * x_hat + beta``: with ``gamma`` near 0 it passes on almost
only the constant ``beta``, so its removal changes little that fine-tuning cannot absorb. The
penalty is what makes many scales small; without it ``|gamma|`` stays near its initial 1 and the
same removal costs far more (``notebooks/10_granularity_kernels_slimming.ipynb`` measures both).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

from torch import Tensor, nn

if TYPE_CHECKING:
    from .session import Session

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def bn_scales(model: nn.Module) -> dict[str, Tensor]:
    """``{module name: gamma}`` of every affine BatchNorm, in module order (the live parameters)."""
    return {name: m.weight for name, m in model.named_modules()
            if isinstance(m, _BATCHNORMS) and m.affine and m.weight is not None}


def l1_on_bn_scales(strength: float) -> Callable[[nn.Module], Tensor]:
    """The sparsity term ``strength * sum |gamma|`` over every BatchNorm scale, as a
    ``penalty(model)`` for ``prune_lab.train`` (added to each batch's mean loss, so ``strength`` is
    per batch; its subgradient ``strength * sign(gamma)`` is the paper's update)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or strength < 0:
        raise ValueError(f"l1_on_bn_scales: strength is a finite number >= 0 (1e-2 is a start on the digits), "
                         f"got {strength!r}")

    def penalty(model: nn.Module) -> Tensor:
        scales = bn_scales(model)
        if not scales:
            raise ValueError(f"l1_on_bn_scales: {type(model).__name__} has no affine BatchNorm; network slimming "
                             f"needs one after each conv whose channels it prunes")
        return strength * sum(g.abs().sum() for g in scales.values())

    return penalty


def threshold_plan(session: "Session", fraction: float) -> dict[str, float]:
    """Per channel group with a BatchNorm: the fraction of its channels to remove so that the
    ``round(fraction * total)`` channels with the smallest summed ``|gamma|`` (criterion
    ``"bn_scale"``) over all those groups go, one global threshold as in the paper (no per-group
    normalisation); every group keeps at least one channel, the next smallest going instead. Ties
    go in group order. Pass it to ``session.set_sparsity(plan, pattern="channels",
    criterion="bn_scale")``."""
    from .masks import check_fraction

    fraction = check_fraction(fraction, "slimming fraction")
    # groups with a BatchNorm scale; the others (a Linear's neurons) are not slimming's to prune
    scores = {g: session.channel_scores(g, "bn_scale") for g in session.channels
              if any(m.role == "bn" for m in session.groups.get(g).members)}
    if not scores:
        raise ValueError("threshold_plan: no channel group of this model has a BatchNorm; "
                         f"groups: {', '.join(session.channels) or 'none'}")
    target = int(round(fraction * sum(len(s) for s in scores.values())))
    pool = sorted((float(v), i, g) for i, g in enumerate(scores) for v in scores[g])
    removed = {g: 0 for g in scores}
    left = target
    for _, _, g in pool:
        if left == 0:
            break
        if removed[g] < len(scores[g]) - 1:
            removed[g] += 1
            left -= 1
    return {g: removed[g] / len(scores[g]) for g in scores}


__all__ = ["bn_scales", "l1_on_bn_scales", "threshold_plan"]
