"""Checks for the lottery-ticket experiment (assignment 2, part 2): masks, rewind, masked training.

Each part is checked on inputs the library makes (so a mistake in one part does not fail the
next) against an independent computation: the masks against ``Session.set_global_sparsity(...,
allocation="global")``, the rewind exactly against ``theta0 * mask``, the training on what must
hold whatever optimizer details a student picks: every pruned weight still exactly 0, the kept
ones moved, and the network trained well past chance on validation digits.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from .checks import StudentError, _call


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def library_masks(model: nn.Module, sparsity: float, data: Any) -> dict[str, Tensor]:
    """Global magnitude keep-masks of ``model``'s Linear weights, as prune_lab makes them."""
    from .session import Session

    s = Session(copy.deepcopy(model), data)
    s.set_global_sparsity(sparsity, allocation="global")
    return {info.name: s.mask(info.name).clone() for info in s.layers}


def _check_mask_shapes(masks: Any, model: nn.Module, fn_name: str) -> None:
    layers = _linears(model)
    if not isinstance(masks, Mapping) or sorted(masks) != sorted(layers):
        got = sorted(masks) if isinstance(masks, Mapping) else type(masks).__name__
        raise StudentError(f"{fn_name}: return a dict with one mask per Linear layer {sorted(layers)}, got {got}")
    for name, m in layers.items():
        mask = masks[name]
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(m.weight.shape):
            what = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise StudentError(f"{fn_name}: masks[{name!r}] must be a bool tensor of shape {tuple(m.weight.shape)} "
                               f"(True = kept), got {what}")


def check_ticket_masks(fn: Callable[[nn.Module, float], Mapping[str, Tensor]], model: nn.Module, data: Any) -> str:
    """``fn(model, sparsity)``: one bool keep-mask per Linear weight, the ``round(sparsity * N)``
    smallest magnitudes of all N weights together pruned (one global threshold), the model untouched."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for sparsity in (0.9, 0.5):
        masks = _call(fn, "global_magnitude_masks", model, sparsity)
        if any(not torch.equal(v, before[k]) for k, v in model.state_dict().items()):
            raise StudentError("global_magnitude_masks changed the model's weights: only compute the masks")
        _check_mask_shapes(masks, model, "global_magnitude_masks")
        want = library_masks(model, sparsity, data.val)
        total = sum(m.numel() for m in want.values())
        pruned = sum(int((~m).sum()) for m in masks.values())
        k = int(round(sparsity * total))
        if pruned != k:
            raise StudentError(f"at sparsity {sparsity}: you pruned {pruned} weights; round({sparsity} * {total}) = {k} "
                               "must go, over all layers together")
        wrong = [n for n in want if not torch.equal(masks[n], want[n])]
        if wrong:
            per_layer = all(int((~masks[n]).sum()) == int(round(sparsity * masks[n].numel())) for n in masks)
            hint = ("you pruned each layer to the same share on its own; a ticket prunes the smallest weights of the "
                    "whole network, one threshold for all layers" if per_layer else
                    "the smallest |w| of all layers together go first")
            counts = {n: f"{int((~masks[n]).sum())} (expected {int((~want[n]).sum())})" for n in want}
            raise StudentError(f"at sparsity {sparsity}: the right count, but other weights: {hint}; pruned per layer: {counts}")
    return "global_magnitude_masks: the global threshold's masks at 90% and 50%, exactly"


def check_rewind(fn: Callable[[nn.Module, dict, Mapping[str, Tensor]], nn.Module], trained: nn.Module,
                 theta0: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> str:
    """``fn(model, theta0, masks)``: every parameter back to its value in ``theta0``, and the
    pruned weights (``~masks[name]``) exactly 0; the model returned."""
    model = _call(fn, "rewind", copy.deepcopy(trained), {k: v.clone() for k, v in theta0.items()},
                  {k: v.clone() for k, v in masks.items()})
    if not isinstance(model, nn.Module):
        raise StudentError(f"rewind: return the model, got {type(model).__name__}")
    state = model.state_dict()
    original = trained.state_dict()
    for key, init in theta0.items():
        layer = key.rsplit(".", 1)[0]
        want = init * masks[layer] if key.endswith("weight") and layer in masks else init
        got = state[key]
        if torch.equal(got, want):
            continue
        if key.endswith("weight") and layer in masks and torch.equal(got, original[key] * masks[layer]):
            raise StudentError(f"rewind: {key} holds the trained values, masked; a ticket rewinds the kept weights to "
                               "their initial values theta0")
        if key.endswith("weight") and layer in masks and torch.equal(got, init):
            raise StudentError(f"rewind: {key} is theta0, but its pruned weights are not 0: multiply by the mask")
        diff = int((got != want).sum())
        raise StudentError(f"rewind: {diff} of {want.numel()} entries of {key} differ from theta0"
                           + (" * mask" if key.endswith("weight") and layer in masks else "")
                           + " (biases rewind too, unmasked)")
    return "rewind: every kept weight is its initial value, every pruned weight 0, biases rewound"


def check_masked_training(fn: Callable[..., nn.Module], rewound: nn.Module, masks: Mapping[str, Tensor], data: Any,
                          steps: int = 300, lr: float = 0.05, min_accuracy: float = 0.9) -> str:
    """``fn(model, masks, data, steps, lr)`` trains and returns the model: the pruned weights still
    exactly 0, the kept ones moved, and validation accuracy at least ``min_accuracy``."""
    start = copy.deepcopy(rewound)
    model = _call(fn, "train_masked", copy.deepcopy(rewound), {k: v.clone() for k, v in masks.items()}, data, steps, lr)
    if not isinstance(model, nn.Module):
        raise StudentError(f"train_masked: return the model, got {type(model).__name__}")
    layers = _linears(model)
    for name, mask in masks.items():
        w = layers[name].weight.detach()
        alive = int((w[~mask] != 0).sum())
        if alive:
            raise StudentError(f"train_masked: {alive} pruned weights of {name} are nonzero after training: the gradient "
                               "moves them; put the mask back after every optimizer step")
    moved = any(not torch.equal(layers[n].weight.detach(), _linears(start)[n].weight.detach()) for n in masks)
    if not moved:
        raise StudentError("train_masked: the weights did not change: call loss.backward() and optimizer.step()")
    x, y = data.val.tensors
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    if accuracy < min_accuracy:
        raise StudentError(f"train_masked: {accuracy:.1%} on the {len(y)} validation digits after {steps} steps at lr {lr}; "
                           f"a working loop reaches {min_accuracy:.0%} (SGD with momentum 0.9, batches of 64, "
                           "cross-entropy, model.train() while training)")
    return f"train_masked: pruned weights stay 0, {accuracy:.1%} on the validation digits after {steps} steps"


__all__ = ["library_masks", "check_ticket_masks", "check_rewind", "check_masked_training"]
