"""Which tensors of a model can be pruned: discovery in module order, tied weights once."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

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


@dataclass(frozen=True)
class LayerInfo:
    """One prunable weight tensor. ``aliases``: other modules sharing this very Parameter."""

    name: str
    kind: str
    shape: tuple[int, ...]
    n_params: int
    aliases: tuple[str, ...] = field(default=())

    def __repr__(self) -> str:
        tied = f", tied with {', '.join(self.aliases)}" if self.aliases else ""
        return f"LayerInfo({self.name!r}, {self.kind}, shape={self.shape}, n_params={self.n_params:,}{tied})"


def find_prunable(model: nn.Module, extra_layers: Iterable[str] = ()) -> tuple[list[LayerInfo], dict[str, list[nn.Module]]]:
    """Prunable layers in module order, and for each the modules that use its weight.

    A Parameter shared by several modules (tied weights) is one layer, owned by the first module
    that holds it; the others are listed as aliases.
    """
    extra = list(extra_layers)
    named = list(model.named_modules(remove_duplicate=False))
    names = [n for n, _ in named]
    for name in extra:
        if name not in names:
            raise ValueError(f"extra_layers: no module named {name!r} in the model.{close_names(name, names)}")
    infos: list[LayerInfo] = []
    users: dict[str, list[nn.Module]] = {}
    owner_of: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    for name, module in named:
        if not (isinstance(module, PRUNABLE_TYPES) or name in extra):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            if name in extra:
                raise ValueError(f"extra_layers: module {name!r} ({type(module).__name__}) has no weight Parameter")
            continue
        if not weight.dtype.is_floating_point:
            raise TypeError(f"layer {name!r}: weight dtype {weight.dtype} is not floating point")
        owner = owner_of.get(id(weight))
        if owner is not None:
            aliases[owner].append(name)
            if not any(m is module for m in users[owner]):
                users[owner].append(module)
            continue
        owner_of[id(weight)] = name
        aliases[name] = []
        users[name] = [module]
        infos.append(LayerInfo(name, type(module).__name__, tuple(weight.shape), weight.numel()))
    infos = [LayerInfo(i.name, i.kind, i.shape, i.n_params, tuple(aliases[i.name])) for i in infos]
    return infos, users
