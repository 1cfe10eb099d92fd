"""Channel groups: the output channels that must be removed together, found by Torch-Pruning.

A *channel group* is one set of channels and every tensor entry that belongs to them: the
producing layers' output rows and biases, the BatchNorm entries after them, and the input
columns of every layer that reads them, across residual adds (all members of an add share the
indices), concatenations (offsets), flattening (each channel's block of features) and depthwise
convolutions. Torch-Pruning's ``DependencyGraph`` traces the model and finds the coupling; this
module turns its groups into plain data: for each member tensor the dimension the channels index
and, per position along it, the group channel it belongs to.

Masking every member at a channel's positions makes the model compute what the physically
smaller model computes: a removed channel's readers see zero weights, whatever the channel
holds. That holds only for members prune_lab can mask exactly (Conv/Linear weights and biases,
BatchNorm, depthwise and grouped convolutions); a group that reaches anything else (LayerNorm,
attention, RNNs, raw parameters) or the model's output is not offered, and
:attr:`Groups.excluded` says why for each layer.

A grouped convolution (``groups=g``, not depthwise) stays a valid grouped convolution only if
every one of its g convolution groups loses the same channels. As Torch-Pruning does, the channels
of a group that reaches one are tied in classes of g, one channel at the same position in each
convolution group (``c, c + size/g, c + 2 size/g, ...``): :attr:`ChannelGroup.period` is g (the
least common multiple over the grouped convolutions it reaches), channels are removed a whole
class at a time, and a class's score is the sum of its channels' scores. The grouped
convolution's input columns (``size / g`` of them) each belong to one class.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .measure import OUTPUT_TOLERANCE, output_difference
from .registry import Registry, close_names

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True, eq=False)
class Member:
    """One tensor of a group: ``key`` its qualified parameter name, ``dim`` the dimension the
    channels index, ``root[j]`` the group channel that position ``j`` along ``dim`` belongs to
    (-1: none). ``role``: 'out' (a producer's rows or bias), 'in' (a reader's columns), 'bn'
    (a BatchNorm scale) or 'bn_bias'."""

    key: str
    dim: int
    root: Tensor = field(repr=False)
    role: str = "out"

    def mask(self, keep: Tensor, shape: Sequence[int]) -> Tensor:
        """Bool keep-mask of the member's full shape for the group's channel keep-mask."""
        root = self.root.to(keep.device)
        along = torch.where(root >= 0, keep[root.clamp(min=0)], torch.ones_like(root, dtype=torch.bool))
        view = [1] * len(shape)
        view[self.dim] = -1
        return along.view(view).expand(*shape)

    def per_channel(self, values: Tensor, size: int) -> Tensor:
        """``values`` (this member's tensor, already made elementwise scores) summed per group
        channel: a float64 vector of ``size``."""
        other = [d for d in range(values.dim()) if d != self.dim]
        along = values.double().sum(other) if other else values.double()
        root = self.root.to(along.device)
        out = torch.zeros(size, dtype=torch.float64, device=along.device)
        valid = root >= 0
        return out.index_add_(0, root[valid], along[valid])


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """``name``: the first producing layer in model order; ``size``: channels; ``producers``:
    prunable layers whose outputs these channels are; ``layers``: prunable layers with entries in
    the group (producers and readers); ``members``: every tensor masked with it."""

    name: str
    size: int
    producers: tuple[str, ...]
    layers: tuple[str, ...]
    members: tuple[Member, ...] = field(repr=False)
    root_module: str = ""
    period: int = 1  # channels c, c + size/period, ... are removed together (grouped convolutions)

    def removal(self, fraction: float, round_to: Optional[int] = None) -> int:
        """Channels removed for ``fraction``: ``round(fraction * size)`` (see
        :func:`channels_to_remove`); with a period, the nearest multiple of it (whole classes);
        with ``round_to``, a multiple of ``round_to`` and of the period is kept."""
        if round_to:
            return channels_to_remove(fraction, self.size, math.lcm(round_to, self.period))
        classes = channels_to_remove(fraction, self.size // self.period)
        return classes * self.period

    def keep(self, scores: Tensor, removed: int) -> Tensor:
        """Keep-mask removing ``removed`` channels, the lowest-scored first; with a period, the
        lowest-scored classes of tied channels (a class's score: the sum of its channels')."""
        from .masks import keep_mask

        if removed % self.period:
            raise ValueError(f"group {self.name!r}: {removed} channels cannot be removed; it reaches a grouped "
                             f"convolution, so channels go {self.period} at a time (one per convolution group)")
        if self.period == 1:
            return keep_mask(scores, removed)
        unit = keep_mask(self.class_scores(scores), removed // self.period)
        return unit.repeat(self.period)

    def class_scores(self, scores: Tensor) -> Tensor:
        """Per class of tied channels (``size / period`` of them), the sum of its channels' scores."""
        return scores.reshape(self.period, -1).sum(0)

    def __repr__(self) -> str:
        readers = [n for n in self.layers if n not in self.producers]
        tied = f", in classes of {self.period}" if self.period > 1 else ""
        return (f"ChannelGroup({self.name!r}, {self.size} channels{tied}, produced by {', '.join(self.producers)}; "
                f"read by {', '.join(readers) or 'nothing prunable'})")


@dataclass(eq=False)
class Groups:
    """The channel groups of a model: ``groups`` by name, ``by_layer`` (a producing layer's
    group), ``excluded`` (a prunable layer without a group: why)."""

    groups: dict[str, ChannelGroup]
    by_layer: dict[str, str]
    excluded: dict[str, str]
    example_shape: tuple[int, ...] = ()
    example_dtype: str = "float32"
    blocks: dict[str, ChannelGroup] = field(default_factory=dict)  # removable blocks by module name (size 1)
    heads: dict[str, ChannelGroup] = field(default_factory=dict)  # attention heads by module name (``heads.py``)
    heads_excluded: dict[str, str] = field(default_factory=dict)  # attention modules without head groups: why

    def get(self, name: str) -> ChannelGroup:
        """A channel group, a block or an attention module's head group by its name."""
        for units in (self.groups, self.blocks, self.heads):
            if name in units:
                return units[name]
        raise KeyError(name)

    def has(self, name: str) -> bool:
        return name in self.groups or name in self.blocks or name in self.heads

    def resolve(self, name: str) -> ChannelGroup:
        """A group, block or head group by its name, else the channel group layer ``name`` produces."""
        return self.get(name) if self.has(name) else self.of(name)

    def head_of_layer(self, layer: str) -> Optional[str]:
        """The attention module whose head group holds ``layer`` (a projection), or None."""
        return next((n for n, g in self.heads.items() if layer in g.layers), None)

    def head(self, name: str) -> ChannelGroup:
        """The head group of attention module ``name`` (or of one of its projection layers); a
        ValueError says why there is none and lists the ones there are."""
        if name in self.heads:
            return self.heads[name]
        owner = self.head_of_layer(name)
        if owner is not None:
            return self.heads[owner]
        if name in self.heads_excluded:
            raise ValueError(f"attention module {name!r} has no head group: {self.heads_excluded[name]}")
        raise ValueError(f"{name!r} is not an attention module with prunable heads.{close_names(name, list(self.heads))} "
                         f"Attention modules: {', '.join(self.heads) or 'none'}")

    def block(self, name: str) -> ChannelGroup:
        """The removable block ``name``; a ValueError lists the ones there are."""
        if name not in self.blocks:
            raise ValueError(f"{name!r} is not a removable block.{close_names(name, list(self.blocks))} Removable blocks "
                             f"(a module whose output is its input plus a branch): {', '.join(self.blocks) or 'none'}")
        return self.blocks[name]

    def of(self, layer: str) -> ChannelGroup:
        """The group whose channels ``layer`` produces; a ValueError says why there is none."""
        if layer in self.by_layer:
            return self.groups[self.by_layer[layer]]
        if layer in self.groups:
            return self.groups[layer]
        if layer in self.excluded:
            raise ValueError(f"layer {layer!r} has no channel group: {self.excluded[layer]}. Layers with one: "
                             f"{', '.join(self.by_layer) or 'none'}")
        raise ValueError(f"no layer {layer!r} produces channels here.{close_names(layer, list(self.by_layer))} "
                         f"Layers with a channel group: {', '.join(self.by_layer) or 'none'}")

    def member_keys(self) -> set[str]:
        return {m.key for g in self.groups.values() for m in g.members}

    def __repr__(self) -> str:
        return f"Groups({len(self.groups)} channel groups: {', '.join(self.groups)}; {len(self.excluded)} layers without one)"


def _tp():
    try:
        import torch_pruning as tp
    except ImportError as e:  # pragma: no cover - a dependency
        raise ImportError("channel pruning needs Torch-Pruning: pip install torch-pruning") from e
    return tp


def _example(example_input: Any) -> Any:
    return example_input[:2] if isinstance(example_input, Tensor) else example_input


def build_graph(model: nn.Module, example_input: Any) -> Any:
    """Torch-Pruning's dependency graph of ``model`` (traced once with autograd, eval mode, so
    BatchNorm statistics are not touched)."""
    tp = _tp()
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=_example(example_input), verbose=False)
    finally:
        model.train(was_training)


def _tensor_members(module: nn.Module, modname: str, out: bool, depthwise_fn: bool) -> tuple[list[tuple[str, int, str]], str]:
    """(key, dim, role) of the tensors of one group item, or a reason it cannot be masked exactly."""
    prefix = f"{modname}." if modname else ""
    if isinstance(module, _CONV):
        depthwise = module.groups == module.in_channels == module.out_channels and module.groups > 1
        if depthwise or out or depthwise_fn:
            rows = [(prefix + "weight", 0, "out")]
            return rows + ([(prefix + "bias", 0, "out")] if module.bias is not None else []), ""
        return [(prefix + "weight", 1, "in")], ""
    if isinstance(module, nn.Linear):
        if out:
            return [(prefix + "weight", 0, "out")] + ([(prefix + "bias", 0, "out")] if module.bias is not None else []), ""
        return [(prefix + "weight", 1, "in")], ""
    if isinstance(module, _BN):
        return ([(prefix + "weight", 0, "bn"), (prefix + "bias", 0, "bn_bias")] if module.affine else []), ""
    if isinstance(module, nn.Module) and not any(True for _ in module.parameters(recurse=False)) \
            and not any(True for _ in module.children()):
        return [], ""  # an operation without weights: an add, a concatenation, a reshape, an activation
    kind = "a parameter" if isinstance(module, nn.Parameter) else type(module).__name__
    return [], f"it reaches {modname or 'a tensor'!r} ({kind}), which channel masks cannot follow exactly"


def _conv_groups(module: nn.Module) -> int:
    """``groups`` of a grouped (not depthwise) convolution, else 1."""
    if isinstance(module, _CONV) and module.groups > 1 and not module.groups == module.in_channels == module.out_channels:
        return int(module.groups)
    return 1


def _grouped_reason(module: nn.Module, modname: str, is_out: bool, idxs: Tensor, roots: Tensor, size: int) -> str:
    """Why a group cannot tie its channels across the grouped convolution ``module`` ("" if it
    can): the group's channels must be the convolution's channels one for one, in order (no
    concatenation or slice in between), so that class ``c`` is the same position in every
    convolution group."""
    channels = module.out_channels if is_out else module.in_channels
    if size != channels or len(idxs) != channels or not torch.equal(idxs, roots) or \
            not torch.equal(idxs, torch.arange(channels)):
        return (f"it reaches the grouped convolution {modname!r} (groups={module.groups}) through a concatenation or "
                "a slice; its channels can only be removed one per convolution group when they are its own")
    return ""


def _read_group(g: Any, graph: Any, module_names: dict, params: dict, param_to_layer: dict[str, str]
                ) -> tuple[dict[tuple[str, int], tuple[Tensor, str]], list[str], list[str], str, int]:
    """One Torch-Pruning group read as prune_lab's: per (tensor, dim) the root channel of each
    index (-1 where not in the group) and its role, the producing and touched layers (unsorted),
    why it cannot be pruned faithfully ("" when it can) and the channel period (grouped convs)."""
    size = len(g[0].idxs)
    reason = ""
    period = 1
    members: dict[tuple[str, int], tuple[Tensor, str]] = {}
    producers: list[str] = []
    touched: list[str] = []
    for item in g:
        dep = item.dep
        node, module = dep.target, dep.target.module
        modname = module_names.get(module, getattr(node, "name", "?"))
        is_out = graph.is_out_channel_pruning_fn(dep.handler)
        if is_out and len(node.outputs) == 0:  # what this node outputs is the model's output
            reason = reason or f"its channels are the model's output (at {modname!r})"

        fn = getattr(dep.handler, "__name__", "")
        tensors, why = _tensor_members(module, modname, is_out, "depthwise" in fn)
        reason = reason or why
        conv_groups = _conv_groups(module)
        idxs = torch.as_tensor([int(i) for i in item.idxs], dtype=torch.long)
        roots = torch.as_tensor([int(i) for i in item.root_idxs], dtype=torch.long)
        if conv_groups > 1:
            why = _grouped_reason(module, modname, is_out, idxs, roots, size)
            reason = reason or why
            period = math.lcm(period, conv_groups)
            if not is_out:  # the input columns: channel c of convolution group 0 stands for its class
                width = module.in_channels // conv_groups
                idxs, roots = idxs[idxs < width], roots[idxs < width]
        for key, dim, role in tensors:
            t = params.get(key)
            if t is None:
                continue
            root = members.get((key, dim), (torch.full((t.shape[dim],), -1, dtype=torch.long), role))[0]
            if len(idxs) and int(idxs.max()) >= t.shape[dim]:
                reason = reason or f"Torch-Pruning's indices for {key!r} exceed its shape"
                continue
            root[idxs] = roots
            members[(key, dim)] = (root, role)
            if key in param_to_layer:
                touched.append(param_to_layer[key])
                if role == "out":
                    producers.append(param_to_layer[key])
    return members, producers, touched, reason, period


def find_groups(model: nn.Module, layers: Sequence[Any], example_input: Any) -> Groups:
    """The channel groups of ``model`` (not modified: a copy is traced), for the prunable
    ``layers`` (``LayerInfo``: name and qualified parameter name). Never raises for a model
    Torch-Pruning cannot trace: every layer is then excluded, with the reason."""
    param_to_layer = {i.param: i.name for i in layers}
    names = [i.name for i in layers]
    shape = tuple(example_input.shape) if isinstance(example_input, Tensor) else ()
    dtype = str(example_input.dtype).replace("torch.", "") if isinstance(example_input, Tensor) else "float32"
    twin = copy.deepcopy(model)
    try:
        graph = build_graph(twin, example_input)
        raw = list(graph.get_all_groups(root_module_types=(*_CONV, nn.Linear)))
    except Exception as e:  # untraceable: no groups, each layer says why
        reason = f"Torch-Pruning could not trace the model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        return Groups({}, {}, {n: reason for n in names}, shape, dtype)
    module_names = {m: n for n, m in twin.named_modules()}
    params = dict(twin.named_parameters(remove_duplicate=False))
    order = {n: i for i, (n, _) in enumerate(twin.named_modules())}
    groups: dict[str, ChannelGroup] = {}
    by_layer: dict[str, str] = {}
    excluded: dict[str, str] = {}
    for g in raw:
        size = len(g[0].idxs)
        members, producers, touched, reason, period = _read_group(g, graph, module_names, params, param_to_layer)
        producers = sorted(dict.fromkeys(producers), key=lambda n: order.get(n, 1 << 30))
        if not producers:
            continue
        if reason:
            for p in producers:
                excluded.setdefault(p, reason)
            continue
        name = producers[0]
        root_module = module_names.get(g[0].dep.target.module, "")
        groups[name] = ChannelGroup(name, size, tuple(producers), tuple(dict.fromkeys(producers + touched)),
                                    tuple(Member(k, d, r, role) for (k, d), (r, role) in members.items()), root_module,
                                    period)
        for p in producers:
            by_layer[p] = name
    for name in _unfaithful(model, groups, example_input):
        for p in groups[name].producers:
            excluded[p] = ("Torch-Pruning's removal of these channels does not compute what the masks compute "
                           "(checked on the example input)")
            by_layer.pop(p, None)
        del groups[name]
    for n in names:
        if n not in by_layer and n not in excluded:
            excluded[n] = "Torch-Pruning found no output channels to remove here (not a Conv/Linear output)"
    return Groups(groups, by_layer, excluded, shape, dtype, _find_blocks(twin, layers, example_input))


def _find_blocks(twin: nn.Module, layers: Sequence[Any], example_input: Any) -> dict[str, ChannelGroup]:
    """Modules that compute their input when every parameter in them is zero (a residual block
    whose output is its input plus a branch, e.g. ``relu(x + f(x))`` after a ReLU, or a
    transformer block): removing one is replacing it by the identity. Checked on the example
    input, each block on the very tensor it receives there."""
    param_to_layer = {i.param: i.name for i in layers}
    layer_modules = {p.rsplit(".", 1)[0] for p in param_to_layer if "." in p}
    seen: dict[str, tuple[tuple, dict]] = {}
    hooks = []

    def hook(name: str):
        def record(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            if name not in seen and args and isinstance(args[0], Tensor) and isinstance(out, Tensor) \
                    and args[0].shape == out.shape and args[0].is_floating_point():
                seen[name] = (tuple(a.detach().clone() if isinstance(a, Tensor) else a for a in args), dict(kwargs))
        return record

    twin.eval()  # a copy of the user's model (find_groups' traced one): hooks and eval mode touch nothing of theirs
    owners: dict[int, int] = {}
    for _, mod in twin.named_modules():
        for p in mod.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    for name, mod in twin.named_modules():
        if name and name not in layer_modules and any(k.startswith(name + ".") for k in param_to_layer):
            hooks.append(mod.register_forward_hook(hook(name), with_kwargs=True))
    try:
        with torch.no_grad():
            twin(_example(example_input))
    except Exception:
        return {}
    finally:
        for h in hooks:
            h.remove()
    blocks: dict[str, ChannelGroup] = {}
    all_params = dict(twin.named_parameters(remove_duplicate=False))
    for name, (args, kwargs) in seen.items():
        x = args[0]
        mod = twin.get_submodule(name)
        params = dict(mod.named_parameters(prefix=name, remove_duplicate=False))
        outside = [k for k, p in all_params.items() if not k.startswith(name + ".") and any(p is q for q in params.values())]
        if outside or any(p.dim() == 0 for p in params.values()):
            continue  # a weight shared with the rest of the model, or a scalar: not a block of its own
        zeroed = copy.deepcopy(mod)
        with torch.no_grad():
            for p in zeroed.parameters():
                p.zero_()
            out = zeroed(*args, **kwargs)
        if not torch.allclose(out, x, rtol=0, atol=1e-6 * max(float(x.abs().max()), 1.0)):
            continue
        inside = tuple(param_to_layer[k] for k in params if k in param_to_layer)
        members = tuple(Member(k, 0, torch.zeros(p.shape[0], dtype=torch.long), "block") for k, p in params.items())
        blocks[name] = ChannelGroup(name, 1, (), inside, members, name)
    # a block inside a removable block is still offered; one containing another is kept too
    return blocks


def masked_first_class(model: nn.Module, groups: Sequence[ChannelGroup]) -> tuple[nn.Module, list[Tensor]]:
    """A copy of ``model`` with channel 0 (and the channels tied to it) of each group masked in
    every member, and each group's keep-mask: what a removal of them must compute."""
    masked = copy.deepcopy(model)
    params = dict(masked.named_parameters(remove_duplicate=False))
    keeps = [g.keep(torch.arange(g.size, dtype=torch.float64), g.period) for g in groups]  # the lowest: channel 0's class
    with torch.no_grad():
        for g, keep in zip(groups, keeps):
            for m in g.members:
                params[m.key].mul_(m.mask(keep, params[m.key].shape))
    return masked, keeps


def _masked_minus_removed(model: nn.Module, groups: Sequence[ChannelGroup], example_input: Any) -> bool:
    """Whether removing channel 0 (and the channels tied to it) of each group physically
    computes what masking it computes."""
    masked, keeps = masked_first_class(model, groups)
    small = copy.deepcopy(model)
    try:
        remove_channels(small, example_input, {g.root_module: (~keep).nonzero().flatten().tolist()
                                               for g, keep in zip(groups, keeps)})
        diff, scale = output_difference(masked, small, _example(example_input))
    except Exception:
        return False
    return diff <= OUTPUT_TOLERANCE * max(scale, 1e-12)


def _unfaithful(model: nn.Module, groups: Mapping[str, ChannelGroup], example_input: Any) -> list[str]:
    """Groups whose physical removal (Torch-Pruning) does not match their masks: all checked at
    once (the usual case: none), one by one only when that fails."""
    if not groups or _masked_minus_removed(model, list(groups.values()), example_input):
        return []
    return [n for n, g in groups.items() if not _masked_minus_removed(model, [g], example_input)]


# ---------------------------------------------------------------------- importance
@dataclass(frozen=True)
class ChannelCriterion:
    """A channel importance: ``score(group, tensors, seed, element_scores) -> float64 (size,)``,
    higher = keep. ``needs`` names the element criterion whose per-entry scores it sums (those
    need calibration), or is empty."""

    name: str
    score: Any = field(repr=False)
    needs: str = ""


CHANNEL_CRITERIA: Registry[ChannelCriterion] = Registry("channel criterion")


def register_channel_criterion(name: str, needs: str = ""):
    """Decorator registering ``fn(group, tensors, seed, element_scores) -> scores`` (float64,
    one per channel of the group; the lowest are removed first)."""
    def wrap(fn):
        CHANNEL_CRITERIA.register(name, ChannelCriterion(name, fn, needs))
        return fn
    return wrap


def get_channel_criterion(criterion: Any) -> ChannelCriterion:
    """The channel criterion for a name (``"magnitude"`` means ``"l1"``); an unknown name lists
    the valid ones and the closest."""
    if not isinstance(criterion, str):
        raise TypeError(f"pattern 'channels' takes a group criterion name ({', '.join(CHANNEL_CRITERIA.names())}), "
                        f"got {type(criterion).__name__}")
    name = "l1" if criterion == "magnitude" else criterion
    if name not in CHANNEL_CRITERIA:
        raise ValueError(f"unknown channel criterion {criterion!r}.{close_names(name, CHANNEL_CRITERIA.names())} Valid: "
                         f"{', '.join(CHANNEL_CRITERIA.names())} ('magnitude' means 'l1')")
    return CHANNEL_CRITERIA.get(name)


def _sum_members(group: ChannelGroup, tensors: Mapping[str, Tensor], fn: Any, roles: Optional[set[str]] = None) -> Tensor:
    out = torch.zeros(group.size, dtype=torch.float64)
    for m in group.members:
        if roles is None or m.role in roles:
            out += m.per_channel(fn(tensors[m.key].detach()), group.size).cpu()
    return out


@register_channel_criterion("l1")
def _l1(group: ChannelGroup, tensors: Mapping[str, Tensor], seed: int, element: Any = None) -> Tensor:
    """Sum of ``|w|`` over every member entry of the channel (weights, biases, BatchNorm scale
    and shift; the readers' columns included, as Torch-Pruning's group norm)."""
    return _sum_members(group, tensors, torch.abs)


@register_channel_criterion("l2")
def _l2(group: ChannelGroup, tensors: Mapping[str, Tensor], seed: int, element: Any = None) -> Tensor:
    """The square root of the sum of ``w**2`` over the same entries."""
    return _sum_members(group, tensors, lambda t: t.double() ** 2).sqrt()


@register_channel_criterion("bn_scale")
def _bn_scale(group: ChannelGroup, tensors: Mapping[str, Tensor], seed: int, element: Any = None) -> Tensor:
    """``|gamma|`` of the group's BatchNorm(s), summed (network slimming, Liu et al. 2017)."""
    if not any(m.role == "bn" for m in group.members):
        raise ValueError(f"criterion 'bn_scale': group {group.name!r} has no BatchNorm; use 'l1' or 'l2'")
    return _sum_members(group, tensors, torch.abs, {"bn"})


@register_channel_criterion("random")
def _random(group: ChannelGroup, tensors: Mapping[str, Tensor], seed: int, element: Any = None) -> Tensor:
    """Uniform, seeded by ``seed`` and the group's name."""
    g = torch.Generator().manual_seed(int(seed) + sum(map(ord, group.name)))
    return torch.rand(group.size, generator=g, dtype=torch.float64)


def _element_sum(group: ChannelGroup, tensors: Mapping[str, Tensor], seed: int, element: Any = None) -> Tensor:
    """The element criterion's per-entry scores (by parameter name) summed over the channel's
    entries in prunable layers."""
    assert element is not None
    out = torch.zeros(group.size, dtype=torch.float64)
    for m in group.members:
        if m.key in element:
            out += m.per_channel(element[m.key], group.size).cpu()
    return out


register_channel_criterion("taylor", needs="taylor")(_element_sum)
register_channel_criterion("obd", needs="obd")(_element_sum)
GROUP_CRITERIA = tuple(CHANNEL_CRITERIA.names())  # the names, in registry order (kept for readers of the tuple)


def channel_scores(group: ChannelGroup, tensors: Mapping[str, Tensor], criterion: str, seed: int,
                   element_scores: Optional[Mapping[str, Tensor]] = None) -> Tensor:
    """Importance of each channel of ``group`` (float64, ``size``), higher = keep, by the
    registered channel criterion ``criterion`` (see each one's docstring)."""
    return get_channel_criterion(criterion).score(group, tensors, seed, element_scores)


def channels_to_remove(fraction: float, size: int, round_to: Optional[int] = None) -> int:
    """``round(fraction * size)`` channels, or with ``round_to`` the count that leaves a
    multiple of ``round_to`` kept channels nearest to that (at least ``round_to``)."""
    removed = int(round(fraction * size))
    if round_to and fraction > 0:
        kept = max(round_to, int(round((size - removed) / round_to)) * round_to)
        removed = max(0, size - kept)
    return removed


# ---------------------------------------------------------------------- physical removal
def remove_channels(model: nn.Module, example_input: Any, removed: Mapping[str, Sequence[int]]) -> nn.Module:
    """Physically remove channels from ``model`` (in place) with Torch-Pruning: for each group
    root module name, the group channel indices to drop. Channel indices of different groups
    never shift each other (each dimension belongs to one group), so the order does not matter."""
    graph = build_graph(model, example_input)
    modules = dict(model.named_modules())
    for root, idxs in removed.items():
        if not idxs:
            continue
        if root not in modules:
            raise ValueError(f"no module {root!r} in {type(model).__name__} (another architecture?)")
        module = modules[root]
        pruner = graph.get_pruner_of_module(module)
        group = graph.get_pruning_group(module, pruner.prune_out_channels, [int(i) for i in idxs])
        group.prune()
    return model
