"""Sparsity patterns: what one pruning decision removes, as objects in a registry.

- ``unstructured``: any weights (``"weights"`` means it too);
- ``N:M`` (e.g. ``"2:4"``): N kept in every group of M consecutive weights along the input
  dimension, the pattern NVIDIA GPUs of compute capability 8.0 and later accelerate as 2:4;
- ``kernel`` (``kernel-l2``): whole k x k kernels of a convolution, one ``(out, in)`` slice,
  ranked by the L1 (L2) norm of the criterion's per-entry scores (magnitude: of the weights);
- ``channels``: whole output channels with everything coupled to them (``groups.py``);
- ``heads``: whole attention heads (``heads.py``);
- ``blocks``: whole residual blocks.

Each pattern knows how it parses (:func:`get_pattern`), which layers it fits, its weight count
for a sparsity, its mask, how a slider snaps, and whether it is structured (then it has a compact
form). Code outside this module asks the pattern and never compares pattern names. A new
granularity is one :class:`Pattern` subclass registered with :func:`register_pattern`.

The input dimension of a weight is its dimension 1 (Linear ``(out, in)``, convolutions
``(out, in/groups, *kernel)``, attention and RNN matrices), except GPT-2's ``Conv1D`` whose weight
is ``(in, out)``: dimension 0. Groups run along that dimension for every other index fixed.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable, Optional, Union

import torch
from torch import Tensor

from .registry import Registry, close_names

if TYPE_CHECKING:
    from .layers import LayerInfo

UNSTRUCTURED = "unstructured"
CHANNELS = "channels"  # whole output channels and everything coupled to them (``groups.py``)
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm(pattern: str) -> Optional[tuple[int, int]]:
    """``(N, M)`` for an ``"N:M"`` pattern, None for unstructured; anything else is an error
    naming what is valid."""
    if pattern in (None, UNSTRUCTURED, "weights"):
        return None
    m = _NM.match(str(pattern)) if isinstance(pattern, str) else None
    if m is None:
        raise ValueError(f"pattern {pattern!r}: use {', '.join(map(repr, PATTERNS.names()))} or 'N:M' with 0 < N < M "
                         "(e.g. '2:4')")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise ValueError(f"pattern {pattern!r}: N:M needs 0 < N < M (N kept of every M), got N={n}, M={mm}")
    return n, mm


def normalize(pattern: Optional[str]) -> str:
    """The canonical name of a pattern (``"weights"`` -> ``"unstructured"``, ``" 2 : 4"`` -> ``"2:4"``)."""
    return get_pattern(pattern).name


def nm_sparsity(pattern: str) -> float:
    n, m = parse_nm(pattern) or (1, 1)
    return (m - n) / m


def input_dim(kind: str) -> int:
    return 0 if kind == "Conv1D" else 1


class PatternWarning(UserWarning):
    """An N:M pattern applied to the whole model left the layers it does not fit as they were."""


def nm_fits(kind: str, shape: tuple[int, ...], m: int) -> bool:
    """Whether groups of ``m`` tile the weight's input dimension."""
    return len(shape) >= 2 and shape[input_dim(kind)] % m == 0


def check_nm(name: str, kind: str, shape: tuple[int, ...], pattern: str) -> tuple[int, int, int]:
    """``(N, M, input dim)`` when ``pattern`` fits the layer, else a clear error."""
    nm = parse_nm(pattern)
    assert nm is not None
    n, m = nm
    if nm_fits(kind, shape, m):
        return n, m, input_dim(kind)
    if len(shape) < 2:
        raise ValueError(f"layer {name!r}: an N:M pattern needs a matrix or convolution weight, not shape {shape}")
    dim = input_dim(kind)
    if shape[dim] % m:
        raise ValueError(f"layer {name!r}: pattern {pattern!r} groups its input dimension (size {shape[dim]}, dim {dim} "
                         f"of {shape}) by {m}, which does not divide it; choose an M that divides {shape[dim]}")
    return n, m, dim


def _grouped(t: Tensor, shape: tuple[int, ...], dim: int, m: int) -> Tensor:
    """``t`` (flat or shaped) as (groups, M): the input dimension last, split into groups of M."""
    t = t.reshape(shape).movedim(dim, -1)
    return t.reshape(-1, m)


def nm_mask(keys: Tensor, shape: tuple[int, ...], kind: str, n: int, m: int) -> Tensor:
    """Keep-mask keeping the ``n`` largest keys of every group of ``m`` along the input dimension
    (ties by position: the earlier weight is pruned first, as ``k_smallest_masks`` does)."""
    dim = input_dim(kind)
    g = _grouped(keys, shape, dim, m)
    # stable ascending sort: the first m - n of each group are pruned
    order = torch.argsort(g, dim=1, stable=True)
    keep = torch.ones_like(g, dtype=torch.bool)
    keep.scatter_(1, order[:, : m - n], False)
    moved = list(shape)
    moved.append(moved.pop(dim))
    return keep.reshape(moved).movedim(-1, dim).contiguous()


def nm_groups(t: Tensor, kind: str, m: int) -> Tensor:
    """The (groups, M) view of a weight or mask along its input dimension (for checks)."""
    return _grouped(t, tuple(t.shape), input_dim(kind), m)


# ---------------------------------------------------------------------- the registry
Keys = Callable[[], Tensor]  # the criterion's flat ordered keys of the layer's base weight (computed on call)
Scores = Callable[[], Tensor]  # the criterion's float64 per-entry scores, shaped like the weight


class Pattern:
    """One granularity of pruning. Subclasses override what differs; the defaults are those of
    unstructured pruning (any weight of any layer, any count)."""

    name: str = ""
    label: str = ""  # the Lab's dropdown label ("" keeps it out of the dropdown)
    structured: bool = False  # removes whole channels or blocks: the model has a compact form
    grouped: bool = False  # values apply to channel groups or blocks (``groups.py``), not to one layer's weights
    removes_blocks: bool = False  # (grouped) a value removes a whole block (1) or keeps it (0)
    semi_structured: bool = False  # torch.sparse's semi-structured (2:4) kernels can run it (CUDA)
    allocated: bool = False  # an allocation's own masks (a global threshold...) are this pattern's masks
    heads: bool = False  # (grouped) values apply to the attention modules' head groups

    def fits(self, info: "LayerInfo") -> bool:
        """Whether the pattern can prune this layer at all."""
        return True

    def check(self, info: "LayerInfo") -> None:
        """A clear ValueError (layer, shape, what would fit) when it does not fit."""
        if not self.fits(info):
            raise ValueError(f"layer {info.name!r}: pattern {self.name!r} does not fit its weight of shape {info.shape}")

    def levels(self, info: Optional["LayerInfo"] = None) -> Optional[list[float]]:
        """The sparsities it can reach when they are few (a sweep's default levels), else None."""
        return None

    def snap(self, sparsity: float, info: Optional["LayerInfo"] = None) -> float:
        """The reachable sparsity a slider at ``sparsity`` stands for."""
        return sparsity

    def selection(self) -> Optional[tuple[int, int]]:
        """How SparseGPT chooses this pattern's mask itself: ``(0, 0)`` unstructured, ``(n, m)``
        N:M, None when it cannot (a mask from a criterion can still be refitted)."""
        return (0, 0)

    def count(self, info: "LayerInfo", sparsity: float) -> int:
        """Weights zeroed for a (validated) sparsity: ``round(sparsity * n)``, as ``torch.nn.utils.prune``."""
        self.check(info)
        return int(round(sparsity * info.n_params))

    def check_count(self, info: "LayerInfo", count: int) -> None:
        """A clear ValueError when no mask of this pattern zeroes ``count`` weights."""
        if not 0 <= count <= info.n_params:
            raise ValueError(f"layer {info.name!r}: cannot prune {count} of {info.n_params} weights")

    def mask(self, info: "LayerInfo", count: int, keys: Keys, scores: Scores) -> Tensor:
        """The keep-mask (bool, the weight's shape) zeroing ``count`` weights."""
        from .masks import k_smallest_masks

        return k_smallest_masks([keys()], count, [info.shape])[0]

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<pattern {self.name!r}>"


PATTERNS: Registry[Pattern] = Registry("pattern")


def register_pattern(pattern: Pattern) -> Pattern:
    """Add a pattern to the registry under ``pattern.name`` (it then works in ``set_sparsity``,
    ``set_global_sparsity``, sweeps, recipes, stats and, with a ``label``, the Lab's dropdown)."""
    if not isinstance(pattern, Pattern) or not pattern.name:
        raise TypeError(f"register_pattern takes a named Pattern instance, got {pattern!r}")
    return PATTERNS.register(pattern.name, pattern)


def get_pattern(pattern: Union[str, Pattern, None]) -> Pattern:
    """The pattern object for a name (``None`` and ``"weights"``: unstructured; ``"N:M"``: that
    N:M pattern); an unknown name lists the valid ones and the closest."""
    if isinstance(pattern, Pattern):
        return pattern
    if pattern is None or pattern == "weights":
        return PATTERNS.get(UNSTRUCTURED)
    if isinstance(pattern, str) and pattern in PATTERNS:
        return PATTERNS.get(pattern)
    if isinstance(pattern, str) and _NM.match(pattern):
        n, m = parse_nm(pattern)  # type: ignore[misc]
        return NM(n, m)
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a name such as 'unstructured' or '2:4', got {type(pattern).__name__}")
    if ":" in pattern:
        parse_nm(pattern)  # says what is wrong with the N:M
    raise ValueError(f"pattern {pattern!r}: use {', '.join(map(repr, PATTERNS.names()))} or 'N:M' with 0 < N < M "
                     f"(e.g. '2:4').{close_names(pattern, PATTERNS.names())}")


def same_pattern(a: Union[str, Pattern, None], b: Union[str, Pattern, None]) -> bool:
    """Whether two spellings name one pattern (``"weights"`` and ``"unstructured"`` do)."""
    return get_pattern(a).name == get_pattern(b).name


def list_patterns() -> list[str]:
    return PATTERNS.names() + ["N:M"]


def lab_patterns() -> list[tuple[str, str]]:
    """(label, name) of the patterns the Lab's dropdown offers, in registry order."""
    return [(p.label, p.name) for p in map(PATTERNS.get, PATTERNS.names()) if p.label]


class Unstructured(Pattern):
    name, label, allocated = UNSTRUCTURED, "weights", True


class NM(Pattern):
    """N kept of every M consecutive weights along the input dimension."""

    def __init__(self, n: int, m: int, label: str = ""):
        if not 0 < n < m:
            raise ValueError(f"pattern '{n}:{m}': N:M needs 0 < N < M (N kept of every M), got N={n}, M={m}")
        self.n, self.m = n, m
        self.name, self.label = f"{n}:{m}", label
        self.semi_structured = (n, m) == (2, 4)

    @property
    def sparsity(self) -> float:
        return (self.m - self.n) / self.m

    def fits(self, info: "LayerInfo") -> bool:
        return nm_fits(info.kind, info.shape, self.m)

    def check(self, info: "LayerInfo") -> None:
        check_nm(info.name, info.kind, info.shape, self.name)

    def levels(self, info: Optional["LayerInfo"] = None) -> list[float]:
        return [0.0, self.sparsity]

    def snap(self, sparsity: float, info: Optional["LayerInfo"] = None) -> float:
        """Dense below half the pattern's sparsity, the pattern from there on."""
        return self.sparsity if sparsity >= self.sparsity / 2 else 0.0

    def count(self, info: "LayerInfo", sparsity: float) -> int:
        self.check(info)
        if sparsity == 0:
            return 0
        if abs(sparsity - self.sparsity) > 1e-9:
            raise ValueError(f"layer {info.name!r}: pattern {self.name} means sparsity {self.sparsity:g} (or 0 to un-prune), "
                             f"not {sparsity:g}")
        return info.n_params // self.m * (self.m - self.n)

    def check_count(self, info: "LayerInfo", count: int) -> None:
        self.check(info)
        full = info.n_params // self.m * (self.m - self.n)
        if count not in (0, full):
            raise ValueError(f"layer {info.name!r}: pattern {self.name} prunes exactly {full} of {info.n_params} weights "
                             f"(sparsity {self.sparsity:g}) or none, not {count}")

    def mask(self, info: "LayerInfo", count: int, keys: Keys, scores: Scores) -> Tensor:
        return nm_mask(keys(), info.shape, info.kind, self.n, self.m)

    def selection(self) -> Optional[tuple[int, int]]:
        return (self.n, self.m)


class Kernel(Pattern):
    """Whole k x k kernels of a convolution: one ``(out, in)`` slice of its weight, the
    granularity between single weights and whole channels (Mao et al. 2017, "Exploring the
    granularity of sparsity"). A kernel's importance is the L1 (``norm=1``) or L2 norm of the
    criterion's per-entry scores over it: with ``magnitude``, the norm of its weights. The
    sparsity counts weights, so it moves in steps of one kernel (k*k weights); the kernels with
    the lowest norm go first, ties by position."""

    def __init__(self, name: str = "kernel", norm: int = 1, label: str = ""):
        if norm not in (1, 2):
            raise ValueError(f"kernel pattern: norm must be 1 or 2, got {norm!r}")
        self.name, self.norm, self.label = name, norm, label

    @staticmethod
    def _sizes(info: "LayerInfo") -> tuple[int, int]:
        """(kernels, weights per kernel) of a convolution weight ``(out, in, *kernel)``."""
        size = 1
        for d in info.shape[2:]:
            size *= d
        return info.shape[0] * info.shape[1], size

    def fits(self, info: "LayerInfo") -> bool:
        return info.kind.startswith(("Conv", "ConvTranspose")) and info.kind != "Conv1D" and len(info.shape) >= 3 \
            and self._sizes(info)[1] > 1

    def check(self, info: "LayerInfo") -> None:
        if not self.fits(info):
            raise ValueError(f"layer {info.name!r}: pattern {self.name!r} removes whole k x k kernels of a convolution; "
                             f"{info.kind} with weight shape {info.shape} has none (use 'unstructured' or 'channels')")

    def snap(self, sparsity: float, info: Optional["LayerInfo"] = None) -> float:
        if info is None or not self.fits(info):
            return sparsity
        kernels, _ = self._sizes(info)
        return round(sparsity * kernels) / kernels

    def count(self, info: "LayerInfo", sparsity: float) -> int:
        self.check(info)
        kernels, size = self._sizes(info)
        return int(round(sparsity * kernels)) * size

    def check_count(self, info: "LayerInfo", count: int) -> None:
        self.check(info)
        kernels, size = self._sizes(info)
        if not 0 <= count <= info.n_params or count % size:
            raise ValueError(f"layer {info.name!r}: pattern {self.name!r} prunes whole kernels of {size} weights (0 to "
                             f"{kernels} of them), not {count} weights")

    def mask(self, info: "LayerInfo", count: int, keys: Keys, scores: Scores) -> Tensor:
        from .masks import keep_mask

        kernels, size = self._sizes(info)
        per_kernel = scores().reshape(kernels, size).abs()
        importance = per_kernel.sum(1) if self.norm == 1 else per_kernel.pow(2).sum(1).sqrt()
        keep = keep_mask(importance.cpu(), count // size).to(per_kernel.device)
        view = (info.shape[0], info.shape[1]) + (1,) * (len(info.shape) - 2)
        return keep.reshape(view).expand(info.shape).contiguous()

    def selection(self) -> Optional[tuple[int, int]]:
        return None  # SparseGPT picks single weights; a kernel mask from a criterion can be refitted


class Channels(Pattern):
    """Whole output channels of a layer's channel group (``groups.py``, ``channels.py``)."""

    name, label, structured, grouped = CHANNELS, "channels", True, True

    def selection(self) -> Optional[tuple[int, int]]:
        return None


class Blocks(Pattern):
    """Whole removable blocks (a residual block computes its input without its branch)."""

    name, structured, grouped, removes_blocks = "blocks", True, True, True

    def selection(self) -> Optional[tuple[int, int]]:
        return None


class Heads(Pattern):
    """Whole attention heads of a module (``heads.py``): a value is the fraction of its heads
    removed, the lowest-scored first (at least one stays); named by the attention module (or
    any of its projection layers)."""

    name, label, structured, grouped, heads = "heads", "heads", True, True, True

    def selection(self) -> Optional[tuple[int, int]]:
        return None


register_pattern(Unstructured())
register_pattern(NM(2, 4, label="2:4"))  # the one the Lab offers; any other N:M parses on demand
register_pattern(Kernel("kernel", 1, label="kernels"))
register_pattern(Kernel("kernel-l2", 2))
register_pattern(Channels())
register_pattern(Blocks())
register_pattern(Heads())


__all__ = ["Pattern", "register_pattern", "get_pattern", "list_patterns", "lab_patterns", "PATTERNS","UNSTRUCTURED", "PatternWarning", "nm_fits", "parse_nm", "normalize", "nm_sparsity", "check_nm", "nm_mask", "nm_groups", "input_dim"]
