"""Checks for the assignments' student code (``assignments/``), with feedback that says what is wrong.

Each ``check_*`` runs a student's function on cases with a known answer from an independent
computation (the library, or a plain forward pass) and raises :class:`StudentError` (an
``AssertionError``, so nbgrader counts the test cell as failed) naming the case, what came back
and what was expected. A function still raising ``NotImplementedError`` (the blank assignment)
gets "not written yet", not a traceback. On success a check returns a short sentence.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .masks import count_to_prune, k_smallest_mask


class StudentError(AssertionError):
    """What a student's function got wrong, in words."""


def _call(fn: Callable[..., Any], name: str, *args: Any) -> Any:
    try:
        return fn(*args)
    except NotImplementedError:
        raise StudentError(f"{name} is not written yet: replace `raise NotImplementedError()` with your code") from None
    except StudentError:
        raise
    except Exception as e:
        raise StudentError(f"{name} raised {type(e).__name__}: {e}") from None


def _mask_cases() -> list[tuple[str, Tensor, float]]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, generator=g)
    ties = torch.tensor([[0.5, -0.5, 0.5, 0.1], [0.5, -0.2, 0.5, -0.5]])
    return [("a random 6x10 weight at sparsity 0.5", w, 0.5), ("the same weight at 0.37 (22.2 weights: rounds to 22)", w, 0.37),
            ("a conv weight (4, 3, 3, 3) at 0.9", torch.randn(4, 3, 3, 3, generator=g), 0.9),
            ("sparsity 0 (nothing pruned)", w, 0.0), ("sparsity 1 (everything pruned)", w, 1.0),
            ("ties: [[.5, -.5, .5, .1], [.5, -.2, .5, -.5]] at 0.5", ties, 0.5)]


def check_magnitude_mask(fn: Callable[[Tensor, float], Tensor]) -> str:
    """``fn(weight, sparsity)`` must return a bool keep-mask of the weight's shape that prunes
    exactly ``round(sparsity * n)`` entries, the smallest ``|w|`` first and, among equal
    magnitudes, the lower flat index first (as ``pl.masks`` does)."""
    for case, w, s in _mask_cases():
        mask = _call(fn, "magnitude_mask", w.clone(), s)
        if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(w.shape):
            raise StudentError(f"{case}: return a tensor of shape {tuple(w.shape)}, got "
                               f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise StudentError(f"{case}: return a bool mask (True = kept), got dtype {mask.dtype}")
        k = count_to_prune(s, w.numel())
        pruned = int((~mask).sum())
        if pruned != k:
            raise StudentError(f"{case}: you pruned {pruned} weights; round({s} * {w.numel()}) = {k} must go")
        a = w.abs()
        if pruned and int(mask.sum()) and float(a[~mask].max()) > float(a[mask].min()):
            raise StudentError(f"{case}: you pruned a weight of magnitude {float(a[~mask].max()):.3g} but kept one of "
                               f"{float(a[mask].min()):.3g}: the smallest magnitudes go first")
        want = k_smallest_mask(a.flatten(), k).reshape(w.shape)
        if not torch.equal(mask, want):
            raise StudentError(f"{case}: the right count and magnitudes, but equal magnitudes are pruned in another "
                               f"order: prune the lower flat index first (you kept {(mask & ~want).nonzero().tolist()}, "
                               f"which should go)")
    return "magnitude_mask: exact counts, smallest first, ties by index: all 6 cases pass"


def check_sensitivity_loop(fn: Callable[[Any, str, Sequence[float]], Sequence[float]], session: Any, layer: str,
                           levels: Sequence[float]) -> str:
    """``fn(session, layer, levels)`` must return the metric with ``layer`` alone pruned to
    each level (magnitude, unstructured) and leave the session exactly as it found it."""
    before = dict(session.sparsity)
    snapshot = {k: v.clone() for k, v in session.model.state_dict().items()}
    got = _call(fn, "sensitivity_loop", session, layer, list(levels))
    after = session.model.state_dict()
    if session.sparsity != before or any(not torch.equal(after[k], v) for k, v in snapshot.items()):
        raise StudentError("sensitivity_loop changed the session: put the layer back (set it to its sparsity before, "
                           "or session.reset()) when the loop is done")
    want = [v for _, v in session.sensitivity(levels=list(levels), layers=[layer], progress=False).curve(layer)]
    got = [float(v) for v in got]
    if len(got) != len(want):
        raise StudentError(f"sensitivity_loop returned {len(got)} values for {len(want)} levels")
    for level, g, w in zip(sorted(levels), got, want):
        if g != w:
            raise StudentError(f"at level {level}: you measured {g:.4f}, pruning {layer!r} alone to {level} gives {w:.4f} "
                               "(is the layer set to exactly that level, the others as they were?)")
    return f"sensitivity_loop: {len(want)} levels of {layer!r} match the library's sweep exactly"


def check_channel_ranking(rank: Callable[[Tensor], Tensor], remove: Callable[[nn.Module, int], nn.Module],
                          model: nn.Module, x: Tensor) -> str:
    """``rank(next_weight)``: conv1's output channels, least important first, by the L2 norm of
    the columns of conv2 that read them (``next_weight[:, c]``). ``remove(model, n)``: a smaller
    copy without the ``n`` least important channels (conv1's rows and biases, conv2's input
    columns), computing what the original computes with those channels zeroed."""
    w2 = model.conv2.weight.detach()
    order = _call(rank, "rank_channels", w2.clone())
    norms = w2.pow(2).sum((0, 2, 3)).sqrt()
    want = torch.argsort(norms, stable=True)
    if not isinstance(order, Tensor) or order.tolist() != want.tolist():
        got = order.tolist() if isinstance(order, Tensor) else order
        raise StudentError(f"rank_channels: got {got}, expected {want.tolist()} (input channels of conv2 by the L2 norm "
                           f"of next_weight[:, c], smallest first; norms {[round(float(v), 3) for v in norms]})")
    for n in (1, 3):
        small = _call(remove, "remove_channels", copy.deepcopy(model), n)
        c1, c2 = small.conv1, small.conv2
        if c1.out_channels != 8 - n or c1.weight.shape[0] != 8 - n or c2.weight.shape[1] != 8 - n or c2.in_channels != 8 - n:
            raise StudentError(f"remove_channels(model, {n}): conv1 should have {8 - n} output channels and conv2 {8 - n} "
                               f"inputs; got weights {tuple(c1.weight.shape)} and {tuple(c2.weight.shape)} (set "
                               "out_channels/in_channels too)")
        zeroed = copy.deepcopy(model)
        with torch.no_grad():
            zeroed.conv1.weight[want[:n]] = 0
            zeroed.conv1.bias[want[:n]] = 0
            want_out, got_out = zeroed.eval()(x), small.eval()(x)
        if not torch.allclose(got_out, want_out, rtol=0, atol=1e-5):
            raise StudentError(f"remove_channels(model, {n}): the smaller model's outputs differ from the original with those "
                               f"channels zeroed by {float((got_out - want_out).abs().max()):.3g}: keep the right rows of "
                               "conv1 (weight and bias) and the same columns of conv2, in order")
        params = sum(p.numel() for p in small.parameters())
        compact = _compact_params(model, x, n)
        if params != compact:
            raise StudentError(f"remove_channels(model, {n}): {params} parameters; Session.compact() removing {n} of conv1's "
                               f"channels leaves {compact}")
    return "rank_channels and remove_channels: the ranking, the outputs and the size (as compact()'s) are right"


def _compact_params(model: nn.Module, x: Tensor, n: int) -> int:
    """Parameters of ``Session.compact()`` after removing ``n`` of conv1's 8 channels."""
    from .session import Session

    s = Session(copy.deepcopy(model), (x, torch.zeros(len(x), dtype=torch.long)))
    s.set_sparsity({"conv1": n / 8}, pattern="channels")
    return sum(p.numel() for p in s.compact(measure=False).parameters())


__all__ = ["StudentError", "check_magnitude_mask", "check_sensitivity_loop", "check_channel_ranking"]
