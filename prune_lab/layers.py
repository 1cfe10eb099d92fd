"""Which tensors of a model can be pruned: discovery by parameter, ties counted once, coverage.

A *layer* is one prunable floating-point Parameter. Found by default: the ``weight`` of Linear,
Conv*/ConvTranspose* and GPT-2-style ``Conv1D`` modules, ``MultiheadAttention``'s input projection
(``in_proj_weight`` or ``q/k/v_proj_weight``) and RNN/LSTM/GRU ``weight_ih/hh/hr`` matrices.
``extra_layers`` adds any other floating-point parameter by its qualified parameter name (or a
module whose ``weight`` it is). A layer is named by its module when it is that module's
``weight`` (``"fc1"``), otherwise by its qualified parameter name (``"attn.in_proj_weight"``).
A Parameter shared by several modules (tied weights) is one layer; its other names are aliases.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from .registry import close_names

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_MHA_WEIGHTS = {"in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"}
_RNN_WEIGHT = re.compile(r"weight_(ih|hh|hr)_l\d+(_reverse)?$")


@dataclass(frozen=True)
class LayerInfo:
    """One prunable weight tensor.

    ``name``: the layer's name (see the module docstring); ``param``: its qualified parameter
    name in ``model.named_parameters()``; ``aliases``: other qualified parameter names of this
    very Parameter (tied weights, e.g. an embedding shared with the output head).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    n_params: int
    aliases: tuple[str, ...] = field(default=())
    param: str = ""

    def __repr__(self) -> str:
        tied = f", tied with {', '.join(self.aliases)}" if self.aliases else ""
        return f"LayerInfo({self.name!r}, {self.kind}, shape={self.shape}, n_params={self.n_params:,}{tied})"


@dataclass(frozen=True)
class Coverage:
    """How much of the model's parameters the prunable layers hold (unique tensors, ties once)."""

    prunable_params: int
    total_params: int
    not_covered: tuple[tuple[str, str, int, tuple[int, ...]], ...]  # (qualified name, kind, numel, shape), largest first

    @property
    def fraction(self) -> float:
        return self.prunable_params / self.total_params if self.total_params else 0.0

    def __repr__(self) -> str:
        big = [(n, k, c) for n, k, c, shape in self.not_covered if len(shape) >= 2]  # matrices, embeddings, kernels
        small = [c for n, k, c, shape in self.not_covered if len(shape) < 2]
        parts = [f"{n} ({k}, {c:,})" for n, k, c in big[:6]]
        if len(big) > 6:
            parts.append(f"{len(big) - 6} more ({sum(c for *_, c in big[6:]):,})")
        if small:
            parts.append(f"{len(small)} vectors: biases, norms, scales ({sum(small):,})")
        rest = f"; not covered: {', '.join(parts)}" if parts else ""
        return (f"prunable: {self.fraction:.0%} of the parameters ({self.prunable_params:,} of "
                f"{self.total_params:,}){rest}")


def _default_prunable(module: nn.Module, pname: str) -> bool:
    if pname == "weight" and (isinstance(module, PRUNABLE_TYPES) or type(module).__name__ == "Conv1D"):
        return True
    if isinstance(module, nn.MultiheadAttention) and pname in _MHA_WEIGHTS:
        return True
    return isinstance(module, nn.RNNBase) and bool(_RNN_WEIGHT.match(pname))


def _layer_name(module_name: str, pname: str) -> str:
    if pname == "weight":
        return module_name
    return f"{module_name}.{pname}" if module_name else pname


def find_prunable(model: nn.Module, extra_layers: Iterable[str] = ()) -> tuple[list[LayerInfo], Coverage]:
    """Prunable layers in module order, and the coverage of the model's parameters."""
    extra = list(extra_layers)
    if isinstance(extra_layers, str):
        raise TypeError(f"extra_layers must be a list of names, got the string {extra_layers!r}")
    uses: dict[int, list[tuple[str, str, nn.Module, str]]] = {}  # id -> [(qualified, module name, module, pname)]
    params: dict[int, nn.Parameter] = {}
    position: dict[str, int] = {}  # module order of every qualified name
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            q = f"{mname}.{pname}" if mname else pname
            position.setdefault(q, len(position))
            uses.setdefault(id(p), []).append((q, mname, module, pname))
            params[id(p)] = p
    by_qualified = {q: pid for pid, us in uses.items() for q, *_ in us}
    by_module_weight = {mname: pid for pid, us in uses.items() for q, mname, _, pname in us if pname == "weight"}
    chosen: dict[int, str] = {}  # param id -> the qualified name that makes it a layer
    for pid, us in uses.items():
        for q, mname, module, pname in us:
            if _default_prunable(module, pname):
                chosen.setdefault(pid, q)
    for name in extra:
        if not isinstance(name, str):
            raise TypeError(f"extra_layers: names must be strings, got {name!r}")
        pid = by_qualified.get(name, by_module_weight.get(name))
        if pid is None:
            valid = list(by_qualified) + list(by_module_weight)
            raise ValueError(
                f"extra_layers: {name!r} is neither a parameter nor a module with a 'weight' Parameter."
                f"{close_names(name, valid)} Name a parameter as in model.named_parameters(), e.g. "
                f"{', '.join(repr(v) for v in list(by_qualified)[:3])}"
            )
        if not params[pid].dtype.is_floating_point:
            raise TypeError(f"extra_layers: {name!r} has dtype {params[pid].dtype}; only floating-point tensors can be pruned")
        chosen[pid] = name if name in by_qualified else f"{name}.weight" if name else "weight"  # the user's name wins
    infos: list[LayerInfo] = []
    order = list(uses)  # module order of first use
    for pid in sorted(chosen, key=lambda pid: position[chosen[pid]]):
        p = params[pid]
        q = chosen[pid]
        _, mname, module, pname = next(u for u in uses[pid] if u[0] == q)
        if not p.dtype.is_floating_point:
            raise TypeError(f"layer {_layer_name(mname, pname)!r}: weight dtype {p.dtype} is not floating point")
        kind = type(module).__name__ if pname == "weight" or module is not model else "Parameter"
        aliases = tuple(u[0] for u in uses[pid] if u[0] != q)
        infos.append(LayerInfo(_layer_name(mname, pname), kind, tuple(p.shape), p.numel(), aliases, q))
    covered = {id(params[pid]) for pid in chosen}
    not_covered = sorted(
        ((uses[pid][0][0], type(uses[pid][0][2]).__name__, params[pid].numel(), tuple(params[pid].shape))
         for pid in order if pid not in covered),
        key=lambda t: -t[2],
    )
    total = sum(p.numel() for p in params.values())
    return infos, Coverage(sum(i.n_params for i in infos), total, tuple(not_covered))


def prunable_layers(model: nn.Module, extra_layers: Iterable[str] = ()) -> tuple[list[LayerInfo], Coverage]:
    """:func:`find_prunable`, refused with a clear error when the model has no prunable layer
    or a prunable weight holds NaN or inf (pruning by magnitude would be meaningless)."""
    infos, coverage = find_prunable(model, extra_layers)
    if not infos:
        raise ValueError(
            f"{type(model).__name__} has no prunable layers (Linear, Conv*, ConvTranspose*, Conv1D, attention "
            "and RNN weight matrices); name other parameters via extra_layers=['block.weight', ...]"
        )
    params = dict(model.named_parameters(remove_duplicate=False))
    for info in infos:
        bad = int((~torch.isfinite(params[info.param].detach())).sum())
        if bad:
            raise ValueError(f"layer {info.name!r}: weight has {bad} NaN/inf values; fix the model before pruning")
    return infos, coverage
