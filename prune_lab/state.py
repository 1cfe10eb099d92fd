"""The pruning state: base weights, one record per prunable tensor, and exact writes.

Invariants:
- every live prunable weight equals ``base * mask`` of its record (the base itself when dense),
  unless someone wrote it behind the state's back, which :meth:`PruningState.token` detects;
- base tensors are never written in place (fine-tuning installs new ones), so a
  :class:`Snapshot` holds them by reference and restores them exactly;
- :meth:`PruningState.apply` computes everything before it writes anything (all or nothing);
- :meth:`PruningState.trial` writes masks that are not recorded and restores the recorded ones
  on exit, exceptions and Ctrl-C included;
- listeners receive an :class:`Event` naming the tensors changed after every recorded change.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .criteria import Criterion
from .layers import LayerInfo

if TYPE_CHECKING:
    from .calibration import Calibration, CalibrationRequest
    from .groups import Groups
from .patterns import CHANNELS, UNSTRUCTURED, get_pattern
from .registry import close_names

_serials = itertools.count(1)
RECONSTRUCT = ("exact", "sparsegpt", "auto")


def check_reconstructable(pattern: Any, method: str) -> None:
    """The refusal of reconstruction for a pattern that removes channels or blocks across layers."""
    if method and pattern.grouped:
        raise ValueError(f"reconstruct refits the kept weights of one layer; pattern {pattern.name!r} removes channels "
                         "or blocks across layers, which it cannot serve (use 'unstructured', 'N:M' or 'kernel')")


def check_reconstruct(value: Any) -> str:
    """``reconstruct=`` as a method name ("" for none): True means "auto" (exact up to
    ``reconstruct.EXACT_COLUMNS`` input columns, SparseGPT above)."""
    if value is None or value is False or value == "":
        return ""
    if value is True:
        return "auto"
    if value in RECONSTRUCT:
        return str(value)
    raise ValueError(f"reconstruct must be True, False or one of {', '.join(map(repr, RECONSTRUCT))}, got {value!r}")


@dataclass(frozen=True)
class Record:
    """How one tensor is pruned: ``count`` entries zeroed by ``criterion`` (seeded) in
    ``pattern``. ``mask`` is the keep-mask (True = kept; None = dense). ``token`` identifies the
    value ``base * mask`` this record writes; ``reproducible`` is False when the mask cannot be
    recomputed from the settings alone (a callable criterion, a mask given from outside)."""

    pattern: str = UNSTRUCTURED
    count: int = 0
    criterion: str = "magnitude"
    seed: int = 0
    mask: Optional[Tensor] = field(default=None, repr=False, compare=False)
    token: int = field(default=0, repr=False, compare=False)
    reproducible: bool = field(default=True, repr=False, compare=False)
    calibration: str = field(default="", repr=False, compare=False)  # fingerprint of the statistics used
    bits: Optional[int] = None  # quantized to this many bits (None: float) by ``qmethod``
    qmethod: str = ""
    reconstruct: str = ""  # "exact" or "sparsegpt": the kept weights were refitted to the layer's inputs
    values: Optional[Tensor] = field(default=None, repr=False, compare=False)  # those refitted weights (0 where pruned)

    @property
    def settings(self) -> tuple[str, int, str, int]:
        return (self.pattern, self.count, self.criterion, self.seed)

    @property
    def grouped(self) -> bool:
        """Whether the mask comes from channel groups or blocks (set through ``compute_channels``)."""
        return get_pattern(self.pattern).grouped

    @property
    def quant(self) -> Optional[tuple[int, str]]:
        return None if self.bits is None else (self.bits, self.qmethod)


@dataclass(frozen=True)
class ChannelRecord:
    """How one channel group is pruned: ``count`` of its ``size`` channels removed, chosen by
    the group ``criterion`` (seeded); ``keep`` the channel keep-mask (True = kept)."""

    count: int
    criterion: str = "l1"
    seed: int = 0
    size: int = 0
    keep: Optional[Tensor] = field(default=None, repr=False, compare=False)
    token: int = field(default=0, repr=False, compare=False)
    calibration: str = field(default="", repr=False, compare=False)

    @property
    def settings(self) -> tuple[int, str, int]:
        return (self.count, self.criterion, self.seed)


@dataclass(frozen=True)
class Event:
    """What changed: ``kind`` is one of 'masks', 'reset', 'restore', 'finetune', 'rewind',
    'device', 'trial-start', 'trial-end'; ``tensors`` names the layers whose weights changed."""

    kind: str
    tensors: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class Snapshot:
    """A pruning state that :meth:`PruningState.restore` brings back exactly: the records, the
    base weights (by reference) and, across fine-tuning, the other parameters and buffers."""

    records: Mapping[str, Record]
    bases: Mapping[str, Tensor] = field(repr=False)
    generation: int = 0
    others: Optional[Mapping[str, Tensor]] = field(default=None, repr=False)
    channels: Mapping[str, ChannelRecord] = field(default_factory=dict)
    member_bases: Mapping[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def settings(self) -> dict[str, tuple[str, int, str, int]]:
        return {n: r.settings for n, r in self.records.items()}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Snapshot):
            return NotImplemented
        return (self.generation == other.generation and
                {n: r.token for n, r in self.records.items()} == {n: r.token for n, r in other.records.items()} and
                {n: c.token for n, c in self.channels.items()} == {n: c.token for n, c in other.channels.items()})

    def __hash__(self) -> int:
        return hash((self.generation, tuple(sorted((n, r.token) for n, r in self.records.items())),
                     tuple(sorted((n, c.token) for n, c in self.channels.items()))))

    def to(self, device: Union[str, torch.device]) -> "Snapshot":
        """The same snapshot with every tensor on ``device``: records' masks, base weights, the
        other parameters and buffers (fine-tuned), channel and block keep-masks and the unmasked
        bases of their members. ``to("cpu")`` is the form another process adopts
        (:meth:`PruningState.adopt`); every field is carried by name, so a field added later
        travels too or fails here."""
        def mv(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.detach().to(device)

        moved = {
            "records": {n: replace(r, mask=mv(r.mask), values=mv(r.values)) for n, r in self.records.items()},
            "bases": {n: mv(b) for n, b in self.bases.items()},
            "generation": self.generation,
            "others": None if self.others is None else {k: mv(v) for k, v in self.others.items()},
            "channels": {g: replace(c, keep=mv(c.keep)) for g, c in self.channels.items()},
            "member_bases": {k: mv(v) for k, v in self.member_bases.items()},
        }
        missing = {f.name for f in fields(self)} - set(moved)
        if missing:  # a new field must say how it moves
            raise NotImplementedError(f"Snapshot.to does not move {sorted(missing)}")
        return replace(self, **moved)

    def __repr__(self) -> str:
        pruned = {n: r.count for n, r in self.records.items() if r.count}
        channels = f", channels removed: { {g: c.count for g, c in self.channels.items()} }" if self.channels else ""
        return f"Snapshot(generation {self.generation}, {len(pruned)} pruned layers: {pruned}{channels})"


Listener = Callable[[Event], None]


class PruningState:
    """Base weights and per-layer :class:`Record` s of a model's prunable tensors."""

    def __init__(self, model: nn.Module, layers: Sequence[LayerInfo], seed: int = 0):
        self.model = model
        self.layers = list(layers)
        self.seed = int(seed)
        self._info = {i.name: i for i in self.layers}
        self._original = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        self._bind()
        self._bases: dict[str, Tensor] = {i.name: self._original_of(i) for i in self.layers}
        self.generation = 0
        self._next_generation = 1
        self._others_copy: tuple[int, Optional[dict[str, Tensor]]] = (0, None)  # generation 0: the originals
        self._records: dict[str, Record] = {}
        self._written: dict[str, tuple[Any, int, int]] = {}
        self._trial_live: dict[str, tuple[Any, Any]] = {}  # (mask or (mask, values), token) written by open trials
        for i in self.layers:
            self._records[i.name] = Record(seed=self.seed, token=next(_serials))
            self._mark_written(i.name, self._records[i.name].token)
        self._listeners: list[Listener] = []
        self._trial_depth = 0
        self.lock = threading.RLock()
        self.calibration: Optional["Calibration"] = None  # statistics for data-aware criteria
        self.calibration_request: Optional["CalibrationRequest"] = None  # how to compute them again
        self.calibration_passes = 0  # how many times statistics were computed (not served from the cache)
        self.groups: Optional["Groups"] = None  # channel groups (``groups.Groups``), found when channel pruning is first asked for
        self._channels: dict[str, ChannelRecord] = {}
        self._member_bases: dict[str, Tensor] = {}  # group members that are not layers (biases, BatchNorm): unmasked values

    # ------------------------------------------------------------------ bookkeeping
    def _bind(self) -> None:
        params = dict(self.model.named_parameters(remove_duplicate=False))
        self._params = params  # every parameter by qualified name (channel-group members are looked up here)
        self._layer_of_param = {i.param: i.name for i in self.layers}
        self.weights: dict[str, Tensor] = {i.name: params[i.param] for i in self.layers}
        layer_ids = {id(w) for w in self.weights.values()}
        state = self.model.state_dict(keep_vars=True)
        self._other_keys = [k for k, t in state.items() if id(t) not in layer_ids]

    def _original_of(self, info: LayerInfo) -> Tensor:
        return self._original[info.param]

    def _mark_written(self, name: str, token: Any) -> None:
        w = self.weights[name]
        self._written[name] = (token, w._version, w.data_ptr())

    def token(self, name: str) -> Any:
        """Identifies the live value of a layer's weight: equal tokens mean bit-equal values.
        A write from outside the state (an optimizer, the user) gives a token never seen before."""
        token, version, ptr = self._written[name]
        w = self.weights[name]
        if w._version == version and w.data_ptr() == ptr:
            return token
        return ("external", name, w.data_ptr(), w._version)

    def tokens(self) -> dict[str, Any]:
        return {n: self.token(n) for n in self._info}

    def other_tensors(self) -> dict[str, Tensor]:
        """Parameters and buffers that are not prunable layers (biases, norms, embeddings...)."""
        state = self.model.state_dict(keep_vars=True)
        return {k: state[k] for k in self._other_keys}

    # ------------------------------------------------------------------ reading
    def info(self, name: str) -> LayerInfo:
        try:
            return self._info[name]
        except (KeyError, TypeError):
            names = list(self._info)
            raise ValueError(
                f"no prunable layer named {name!r}.{close_names(str(name), names)} Prunable layers: {', '.join(names)}"
            ) from None

    layer = info  # the name allocations and criteria use

    @property
    def records(self) -> dict[str, Record]:
        return dict(self._records)

    def record(self, name: str) -> Record:
        self.info(name)
        return self._records[name]

    def base(self, name: str) -> Tensor:
        """The weights masks are computed from: the original weights, or the trained ones after
        fine-tuning (pruned entries keep their previous base). Read-only."""
        self.info(name)
        return self._bases[name]

    original_weight = base

    def mask(self, name: str) -> Tensor:
        """Keep-mask of a layer (True = kept), on the weight's device."""
        r = self.record(name)
        w = self.weights[name]
        return torch.ones(w.shape, dtype=torch.bool, device=w.device) if r.mask is None else r.mask

    @property
    def counts(self) -> dict[str, int]:
        return {n: r.count for n, r in self._records.items()}

    @property
    def sparsity(self) -> dict[str, float]:
        return {n: r.count / self._info[n].n_params for n, r in self._records.items()}

    def total_sparsity(self) -> float:
        return sum(r.count for r in self._records.values()) / sum(i.n_params for i in self.layers)

    def original_state(self) -> dict[str, Tensor]:
        """A copy of the model's state_dict as it was when the state was made (CPU tensors)."""
        return {k: v.detach().cpu().clone() for k, v in self._original.items()}

    def original_model(self) -> nn.Module:
        """A separate copy of the model with every parameter and buffer as when the state was
        made (a distillation teacher, a distributed worker's starting point)."""
        import copy

        model = copy.deepcopy(self.model)
        with torch.no_grad():
            current = model.state_dict(keep_vars=True)
            for k, v in self._original.items():
                current[k].copy_(v)
        return model

    # ------------------------------------------------------------------ calibration
    def calibrate(self, request: "CalibrationRequest") -> "Calibration":
        """Statistics for data-aware criteria from ``request`` 's samples, on the dense base
        weights, computed when a criterion first needs them (``request.criteria``: now, and kept).
        Cached by base weights, device, data and settings: the same request again computes
        nothing; after fine-tuning it computes anew. Interrupted, it changes nothing."""
        from .calibration import Calibration, calibrate, data_fingerprint
        from .criteria import needs_of

        needs = needs_of(list(request.criteria)) if request.criteria is not None else ()
        fingerprint = data_fingerprint(request.x, request.y)
        key = (self.generation, tuple(id(self.base(i.name)) for i in self.layers), str(request.x.device), fingerprint,
               request.hessian, request.probes if request.hessian == "hutchinson" else 0, request.seed, request.batch_size)
        self.calibration_request = request
        current = self.calibration
        if current is not None and current.key == key:
            current.ensure(needs, keep=True)
            return current

        def compute(missing: tuple[str, ...]) -> dict:
            with self.trial({n: None for n, k in self.counts.items() if k}):  # the dense base weights
                out = calibrate(self.model, self.layers, self.weights, request.x, request.y, missing, request.loss_fn,
                                request.batch_size, request.hessian, request.probes, request.seed, request.progress)
            self.calibration_passes += 1
            return out

        result = Calibration([i.name for i in self.layers], (request.x, request.y), request.settings, fingerprint, compute,
                             key)
        result.ensure(needs, keep=True)
        self.calibration = result
        return result

    def refresh_calibration(self, criterion: Criterion, reconstruct: bool = False) -> None:
        """Compute the statistics again (the last request) when the base weights or the device
        changed since, before ``criterion`` (or a reconstruction) reads them; nothing without data."""
        cal, request = self.calibration, self.calibration_request
        if not (criterion.needs or reconstruct) or cal is None or request is None:
            return
        device = str(next(iter(self.weights.values())).device)
        if cal.key[0] != self.generation or cal.key[2] != device:
            if str(request.x.device) != device:
                request = replace(request, x=request.x.to(device), y=request.y.to(device))
            self.calibrate(request)

    def _calibration_id(self, criterion: Criterion, extra: tuple[str, ...] = (), drop: bool = True) -> str:
        needs = tuple(criterion.needs) + tuple(n for n in extra if n not in criterion.needs)
        if not needs:
            return ""
        if self.calibration is None:
            what = f"criterion {criterion.name!r} looks at data ({', '.join(criterion.needs)})" if criterion.needs else \
                "reconstruction refits the kept weights to each layer's inputs"
            raise ValueError(f"{what}: call calibrate(train_data) first, with training data (not the eval data)")
        self.calibration.ensure(needs, drop=drop)  # computed on first use; only this criterion's kept
        return self.calibration.fingerprint + f"/{self.calibration.key!r}"

    def original_digest(self) -> str:
        """sha256 of every original parameter and buffer (names, shapes and bits)."""
        from .export import weights_digest

        keys = sorted(self._original)
        return weights_digest([self._original[k] for k in keys]) + str([(k, tuple(self._original[k].shape)) for k in keys])

    @property
    def in_trial(self) -> bool:
        return self._trial_depth > 0

    def keys(self, names: Sequence[str], criterion: Criterion, seed: int) -> Sequence[Tensor]:
        """Criterion keys per layer on the base weights, computed on access (one at a time)."""
        return _LazyKeys(self, list(names), criterion, seed)

    lazy_keys = keys

    def scores(self, name: str, criterion: Criterion, seed: int) -> Tensor:
        """``criterion``'s float64 importance of every entry of ``name``'s base weight, shaped
        like it (what channel criteria sum per channel)."""
        stats = None
        if criterion.needs:
            self._calibration_id(criterion, drop=False)  # a clear error before any statistic is read
            stats = self.calibration.layer(name)
        return criterion.scores(self.base(name), layer=name, seed=seed, stats=stats)

    # ------------------------------------------------------------------ events
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(event)`` after every change; returns the unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _notify(self, kind: str, tensors: Sequence[str] = ()) -> None:
        event = Event(kind, tuple(tensors))
        for listener in list(self._listeners):
            listener(event)

    def _check_not_in_trial(self, action: str) -> None:
        if self._trial_depth:
            raise RuntimeError(f"cannot {action} while a sweep holds trial masks in the model; stop the sweep first")

    # ------------------------------------------------------------------ writing
    def _write(self, name: str, mask: Any, token: Any, quant: Optional[tuple[int, str]] = None,
               values: Optional[Tensor] = None) -> None:
        """The one place a layer's weight is written: ``base * mask`` (the base when dense), or the
        reconstructed ``values`` (a ``(mask, values)`` pair stands for both), quantized
        (deterministically, from those and the mask) when ``quant`` is given."""
        if isinstance(mask, tuple):
            mask, values = mask
        with torch.no_grad():
            w = self.weights[name]
            if quant is not None:
                from .quantize import quantize

                source = self._bases[name] if values is None else values
                w.copy_(quantize(source, mask, quant[0], quant[1], self._info[name].kind).values)
            elif values is not None:
                w.copy_(values)
            elif mask is None:
                w.copy_(self._bases[name])
            else:
                torch.mul(self._bases[name], mask, out=w)
        self._mark_written(name, token)

    def compute(self, counts: Mapping[str, int], criterion: Criterion, seed: int,
                masks: Optional[Mapping[str, Tensor]] = None, pattern: str = UNSTRUCTURED,
                over_channels: bool = False, reconstruct: str = "") -> dict[str, Record]:
        """New records for ``counts`` (exact k-smallest masks by ``criterion`` on the base
        weights, or the given ``masks``); layers whose settings are unchanged keep their record.
        ``reconstruct`` ("exact", "sparsegpt", "auto"): the kept weights are refitted to the
        layer's calibration inputs (``reconstruct.py``; a criterion that ``reconstructs`` always
        is). Writes nothing."""
        pat = get_pattern(pattern)
        reconstruct = "sparsegpt" if criterion.reconstructs else check_reconstruct(reconstruct)
        check_reconstructable(pat, reconstruct)
        if pat.grouped:
            raise ValueError(f"pattern {pat.name!r} prunes channel groups or blocks: use compute_channels")
        pattern = pat.name
        out: dict[str, Record] = {}
        for name, k in counts.items():
            info = self.info(name)
            pat.check_count(info, k)
            old = self._records[name]
            if old.grouped and not over_channels:
                raise ValueError(f"layer {name!r} has whole channels removed (pattern 'channels', {old.count} weights): change "
                                 f"them with set_sparsity({{...}}, pattern='channels') or reset() before pruning it {pattern}")
            new_settings = (pattern, k, criterion.name, seed)
            given = masks is not None and name in masks
            calib = self._calibration_id(criterion, ("xtx",) if reconstruct else ())
            if old.grouped:
                old = Record(seed=seed, bits=old.bits, qmethod=old.qmethod)  # replaced as a whole (a recipe)
            if old.settings == new_settings and criterion.reproducible and not given and old.calibration == calib \
                    and (k == 0 or old.mask is not None) and (k == 0 or old.reconstruct == reconstruct
                                                             or (reconstruct == "auto" and old.reconstruct)):
                out[name] = old
                continue
            if k == 0:
                out[name] = Record(UNSTRUCTURED, 0, criterion.name, seed, None, next(_serials), bits=old.bits,
                                   qmethod=old.qmethod)
                continue
            if given:
                mask = masks[name]  # type: ignore[index]
                if tuple(mask.shape) != info.shape or mask.dtype != torch.bool:
                    raise ValueError(f"layer {name!r}: a mask must be bool of shape {info.shape}, got {mask.dtype} {tuple(mask.shape)}")
                if int(mask.numel() - mask.sum()) != k:
                    raise ValueError(f"layer {name!r}: the mask zeroes {int(mask.numel() - mask.sum())} entries, not {k}")
            elif not criterion.reconstructs:
                mask = pat.mask(info, k, lambda: self.keys([name], criterion, seed)[0],
                                lambda: self.scores(name, criterion, seed))
            values, method = None, ""
            if reconstruct:
                mask, values, method = self._refit(info, pat, k, None if criterion.reconstructs and not given else mask,
                                                   reconstruct)
            mask = mask.to(self.weights[name].device)
            out[name] = Record(pattern, k, criterion.name, seed, mask, next(_serials),
                               criterion.reproducible and not given and not criterion.needs and not reconstruct, calib,
                               old.bits, old.qmethod, method, values)
        return out

    def refit_errors(self, name: str) -> Optional[tuple[float, float, float]]:
        """For a layer whose kept weights were refitted: ``(||W X - (W*M) X||^2, ||W X - W_hat X||^2,
        ||W X||^2)`` summed over the calibration inputs (``xtx``; None when not refitted or not held)."""
        from .reconstruct import error, to_matrix

        r = self.record(name)
        stats = self.calibration.layers.get(name) if self.calibration is not None else None
        if r.values is None or r.mask is None or stats is None or stats.xtx is None or not stats.xtx.numel():
            return None
        info, h = self.info(name), stats.xtx
        w = to_matrix(self.base(name), info.kind).to(h)
        masked = error(w, w * to_matrix(r.mask, info.kind).to(h), h).sum()
        refit = error(w, to_matrix(r.values, info.kind).to(h), h).sum()
        return float(masked), float(refit), float(error(w, torch.zeros_like(w), h).sum())

    def _refit(self, info: LayerInfo, pat: Any, k: int, mask: Optional[Tensor], method: str) -> tuple[Tensor, Tensor, str]:
        """(keep-mask, refitted weights, method) of one layer: SparseGPT's own mask selection when
        ``mask`` is None (unstructured or N:M), else the given mask refitted (``reconstruct.py``)."""
        from .criteria import layer_gram
        from .reconstruct import BLOCKSIZE, EXACT_COLUMNS, exact, from_matrix, no_worse, sparsegpt, to_matrix

        assert self.calibration is not None  # _calibration_id checked it
        h = layer_gram(self.calibration.layer(info.name), info.name).to(self.weights[info.name].device)
        base = self.base(info.name)
        w = to_matrix(base, info.kind)
        if mask is None:
            sel = pat.selection()
            if sel is None:
                raise ValueError(f"criterion 'sparsegpt' chooses unstructured or N:M masks itself, not pattern {pat.name!r}; "
                                 f"prune layer {info.name!r} with another criterion and reconstruct=True")
            n, m = sel
            w_hat, keep = sparsegpt(w, h, count=None if m else k, n=n, m=m, blocksize=BLOCKSIZE - BLOCKSIZE % max(m, 1))
            method = "sparsegpt"
        else:
            keep = to_matrix(mask.to(w.device), info.kind)
            if method == "auto":
                method = "exact" if w.shape[1] <= EXACT_COLUMNS else "sparsegpt"
            w_hat = exact(w, h, keep) if method == "exact" else sparsegpt(w, h, keep=keep)[0]
        w_hat = no_worse(w, w_hat, keep, h)
        return (from_matrix(keep, info.shape, info.kind), from_matrix(w_hat, info.shape, info.kind).to(base.dtype),
                method)

    def apply(self, records: Mapping[str, Record], kind: str = "masks") -> list[str]:
        """Install computed records and write their weights; returns the layers that changed."""
        with self.lock:
            self._check_not_in_trial("change the masks")
            for name in records:
                self.info(name)
            changed = [n for n, r in records.items() if r.token != self._records[n].token]
            for name in changed:
                self._write(name, records[name].mask, records[name].token, records[name].quant, records[name].values)
                self._records[name] = records[name]
            if changed:
                self._notify(kind, changed)
            return changed

    def set_counts(self, counts: Mapping[str, int], criterion: Criterion, seed: int,
                   masks: Optional[Mapping[str, Tensor]] = None, pattern: str = UNSTRUCTURED,
                   reconstruct: str = "") -> list[str]:
        return self.apply(self.compute(counts, criterion, seed, masks, pattern, reconstruct=reconstruct))

    # ------------------------------------------------------------------ channel groups
    @property
    def channels(self) -> dict[str, ChannelRecord]:
        """Per channel group with channels removed, its :class:`ChannelRecord`."""
        return dict(self._channels)

    def _structural(self, channels: Mapping[str, ChannelRecord]) -> dict[str, Tensor]:
        """Keep-masks per member tensor (qualified parameter name) for ``channels``: the AND of
        every group's mask over that tensor (a reader of a concatenation is in several groups)."""
        out: dict[str, Tensor] = {}
        for g, c in channels.items():
            if c.keep is None:
                continue
            for m in self.groups.get(g).members:
                t = self._params[m.key]
                mask = m.mask(c.keep.to(t.device), t.shape)
                out[m.key] = mask if m.key not in out else out[m.key] & mask
        return {k: v.contiguous() for k, v in out.items()}

    def channel_member_base(self, key: str) -> Tensor:
        """The unmasked value of a group member: a layer's base, else the member's own base."""
        layer = self._layer_of_param.get(key)
        if layer is not None:
            return self._bases[layer]
        return self._member_bases.get(key, self._params[key].detach())

    def channel_record(self, group: str, keep: Tensor, removed: int, criterion: str, seed: int,
                       calibration: str = "") -> ChannelRecord:
        """A checked :class:`ChannelRecord`: ``keep`` must be bool over the group's channels
        and remove exactly ``removed`` of them."""
        size = self.groups.get(group).size
        keep = keep.to(torch.bool).cpu()
        if tuple(keep.shape) != (size,) or int((~keep).sum()) != removed:
            raise ValueError(f"group {group!r}: a channel keep-mask must be bool of shape ({size},) removing {removed}")
        return ChannelRecord(removed, criterion, seed, size, keep, next(_serials), calibration)

    def compute_channels(self, counts: Mapping[str, int], scores: Callable[[str], Tensor], criterion: str, seed: int,
                         keeps: Optional[Mapping[str, Tensor]] = None, replace_unstructured: bool = False,
                         calibration: str = "", start: Optional[Mapping[str, ChannelRecord]] = None,
                         ) -> tuple[dict[str, ChannelRecord], dict[str, Record]]:
        """New channel records for ``counts`` (channels removed per group: the lowest
        ``scores(group)``, or the given ``keeps``) and the layer records they imply (pattern
        'channels', the structural masks). Writes nothing; checks everything."""
        if self.groups is None:
            raise RuntimeError("channel groups are not known yet (Session finds them on first use)")
        new = dict(self._channels if start is None else start)
        for g, k in counts.items():
            if not self.groups.has(g):
                raise ValueError(f"no channel group {g!r}; groups: {', '.join(self.groups.groups)}; attention modules: "
                                 f"{', '.join(self.groups.heads) or 'none'}")
            group = self.groups.get(g)
            block = g in self.groups.blocks  # a block is one "channel": removed whole
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= group.size - group.period + block \
                    or k % group.period:
                tied = f" in steps of {group.period}: it reaches a grouped convolution" if group.period > 1 else ""
                raise ValueError(f"group {g!r}: cannot remove {k} of its {group.size} channels (0 to "
                                 f"{group.size - group.period}{tied}; at least one channel must stay)")
            old = new.get(g)
            if k == 0:
                new.pop(g, None)
                continue
            given = keeps is not None and g in keeps
            if old is not None and old.settings == (k, criterion, seed) and not given and old.calibration == calibration:
                continue
            keep = keeps[g] if given else group.keep(scores(g), k)  # type: ignore[index]
            new[g] = self.channel_record(g, keep, k, criterion, seed, calibration)
        masks = self._structural(new)
        affected = {n for g in set(self._channels) | set(new) for n in self.groups.get(g).layers}
        records: dict[str, Record] = {}
        for name in sorted(affected):
            info = self._info[name]
            old_r = self._records[name]
            m = masks.get(info.param)
            if m is None or bool(m.all()):
                if old_r.grouped:  # whole again: an ordinary dense record
                    records[name] = Record(UNSTRUCTURED, 0, "magnitude", old_r.seed, None, next(_serials),
                                           bits=old_r.bits, qmethod=old_r.qmethod)
                continue
            if not old_r.grouped and old_r.count and not replace_unstructured:
                raise ValueError(f"layer {name!r} is pruned {old_r.pattern} ({old_r.count} weights); removing channels "
                                 f"would discard that mask: set it to 0 first (set_sparsity({{{name!r}: 0}}))")
            if old_r.grouped and old_r.mask is not None and torch.equal(old_r.mask, m):
                continue
            owner = next((g for g in new if name in self.groups.get(g).producers), None) or \
                next(g for g in new if name in self.groups.get(g).layers)
            records[name] = Record(CHANNELS, int(m.numel() - m.sum()), new[owner].criterion, new[owner].seed,
                                   m.to(self.weights[name].device), next(_serials), True, new[owner].calibration,
                                   old_r.bits, old_r.qmethod)
        return new, records

    def apply_channels(self, channels: Mapping[str, ChannelRecord], records: Mapping[str, Record],
                       kind: str = "masks") -> list[str]:
        """Install channel records and the layer records they imply; write the group members
        that are not layers (biases, BatchNorm) from their bases. Returns the layers changed."""
        with self.lock:
            self._check_not_in_trial("change the channels")
            for name in records:
                self.info(name)
            old_keys = set(self._structural(self._channels))
            self._channels = dict(channels)
            self._write_members(old_keys)
            return self.apply(records, kind)

    def _write_members(self, extra_keys: Any = ()) -> None:
        """Write every non-layer group member as base * (its structural mask), bases kept."""
        masks = self._structural(self._channels) if self._channels else {}
        with torch.no_grad():
            for key in set(masks) | set(extra_keys) | set(self._member_bases):
                if key in self._layer_of_param:
                    continue
                t = self._params[key]
                base = self._member_bases.setdefault(key, t.detach().clone())
                if key in masks:
                    torch.mul(base, masks[key], out=t.data)
                else:
                    t.data.copy_(base)

    def member_masks(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Non-layer group members with channels removed: ``{key: (tensor, keep-mask)}`` (what
        fine-tuning holds at zero besides the layers' masks)."""
        return {k: (self._params[k], m) for k, m in self._structural(self._channels).items() if k not in self._layer_of_param}

    def channel_trial_masks(self, group: str, keep: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(layer masks, member masks)`` for trying ``keep`` on ``group`` (other groups as
        they are): what a :meth:`trial` writes. The members (biases, BatchNorm) are masked too:
        a removed block computes the identity only with every parameter in it zero."""
        channels = dict(self._channels)
        size = self.groups.get(group).size
        channels[group] = ChannelRecord(int((~keep).sum()), "trial", 0, size, keep.to(torch.bool).cpu())
        masks = self._structural(channels)
        out: dict[str, Tensor] = {}
        for name in self.groups.get(group).layers:
            m = masks[self._info[name].param]
            own = self._records[name]
            if not own.grouped and own.mask is not None:
                m = m & own.mask
            out[name] = m
        members = {m.key: masks[m.key] for m in self.groups.get(group).members if m.key not in self._layer_of_param}
        return out, members

    @staticmethod
    def with_quant(record: Record, quant: Optional[tuple[int, str]]) -> Record:
        """``record`` quantized as ``quant`` (a new token when that changes it)."""
        if record.quant == quant:
            return record
        return replace(record, token=next(_serials), bits=None if quant is None else quant[0],
                       qmethod="" if quant is None else quant[1])

    def set_quant(self, settings: Mapping[str, Optional[tuple[int, str]]]) -> list[str]:
        """Quantize (``(bits, method)``) or un-quantize (None) layers, masks kept; all checked
        before anything is written. Returns the layers that changed."""
        from .quantize import check_bits

        with self.lock:
            self._check_not_in_trial("quantize")
            new: dict[str, Record] = {}
            for name, q in settings.items():
                self.info(name)
                q = None if q is None else check_bits(q[0], q[1], name)
                new[name] = self.with_quant(self._records[name], q)
            return self.apply(new, "quant")

    @contextlib.contextmanager
    def trial(self, masks: Mapping[str, Optional[Tensor]] = {},
              members: Mapping[str, Tensor] = {}) -> Iterator["PruningState"]:
        """Write ``masks`` (None: the dense base; a ``(mask, values)`` pair: reconstructed values)
        without recording them; on exit every layer written is put back exactly as it was before
        the block (recorded, or an enclosing trial's mask), whatever happened inside. ``members``:
        keep-masks for group members that are not layers (biases, BatchNorm), undone on exit."""
        with self.lock:
            params = self._params
            saved_members = {k: params[k].detach().clone() for k in members}
            for name, m in masks.items():
                info = self.info(name)
                if isinstance(m, tuple):
                    m = m[0]
                if m is not None and (tuple(m.shape) != info.shape or m.dtype != torch.bool):
                    raise ValueError(f"layer {name!r}: a trial mask must be bool of shape {info.shape}")
            self._trial_depth += 1
            touched: dict[str, tuple[Any, Any]] = {}  # what was live before: a nested trial restores its outer one's
            try:
                if self._trial_depth == 1:
                    self._notify("trial-start")
                for name, m in masks.items():
                    r = self._records[name]
                    live = r.mask if r.values is None else (r.mask, r.values)
                    touched.setdefault(name, self._trial_live.get(name, (live, r.token)))
                    token = ("trial", next(_serials))
                    self._write(name, m, token, r.quant)
                    self._trial_live[name] = (m, token)
                with torch.no_grad():
                    for key, m in members.items():
                        params[key].data.mul_(m)
                yield self
            finally:
                with torch.no_grad():
                    for key, value in saved_members.items():
                        params[key].data.copy_(value)
                for name, (mask, token) in touched.items():
                    self._write(name, mask, token, self._records[name].quant)
                    self._trial_live[name] = (mask, token)
                if self._trial_depth == 1:
                    self._trial_live.clear()
                self._trial_depth -= 1
                if self._trial_depth == 0:
                    self._notify("trial-end")

    @contextlib.contextmanager
    def original_weights(self) -> Iterator["PruningState"]:
        """Every parameter and buffer as it was when the state was made, for the block; the
        current values come back exactly afterwards (a trial of the original model)."""
        with self.lock:
            state = self.model.state_dict(keep_vars=True)
            saved = {k: t.detach().clone() for k, t in state.items()}
            self._trial_depth += 1
            try:
                with torch.no_grad():
                    for k, t in state.items():
                        t.copy_(self._original[k])
                for name in self._info:
                    self._mark_written(name, ("original", self._original_token))
                yield self
            finally:
                with torch.no_grad():
                    for k, t in state.items():
                        t.copy_(saved[k])
                for name, r in self._records.items():
                    self._mark_written(name, r.token)
                self._trial_depth -= 1

    _original_token = next(_serials)

    def snapshot(self) -> Snapshot:
        """The current state, restorable exactly (cheap: bases and masks are held by reference;
        the other parameters are copied once per fine-tuning generation)."""
        gen, others = self._others_copy
        if gen != self.generation:
            others = {k: t.detach().clone() for k, t in self.other_tensors().items()}
            self._others_copy = (self.generation, others)
        return Snapshot(dict(self._records), dict(self._bases), self.generation, others, dict(self._channels),
                        dict(self._member_bases))

    def _check_snapshot(self, snapshot: Any, action: str) -> None:
        if not isinstance(snapshot, Snapshot):
            raise TypeError(f"{action} takes a Snapshot from snapshot(), got {type(snapshot).__name__}")
        self._check_not_in_trial(f"{action} a snapshot")
        if set(snapshot.records) != set(self._info):
            raise ValueError("this snapshot belongs to another model (its layers differ)")

    def restore(self, snapshot: Snapshot) -> list[str]:
        """Bring back a :meth:`snapshot` exactly (all or nothing: it is validated first)."""
        with self.lock:
            self._check_snapshot(snapshot, "restore")
            same_weights = snapshot.generation == self.generation
            if not same_weights:
                others = snapshot.others if snapshot.others is not None else {k: self._original[k] for k in self._other_keys}
                current = self.other_tensors()
                with torch.no_grad():
                    for k, t in current.items():
                        t.copy_(others[k])
                self._bases = dict(snapshot.bases)
                self.generation = snapshot.generation
                changed = list(self._info)
            else:
                changed = [n for n, r in snapshot.records.items() if r.token != self._records[n].token]
            old_keys = set(self._structural(self._channels))
            self._channels = dict(snapshot.channels)
            # a member first masked after the snapshot keeps its unmasked base (same weights), else the
            # snapshot's own values (just copied into the model) are the base
            self._member_bases = {**(self._member_bases if same_weights else {}), **snapshot.member_bases}
            self._write_members(old_keys)
            for name in changed:
                r = snapshot.records[name]
                self._write(name, r.mask, r.token, r.quant, r.values)
                self._records[name] = r
            if changed:
                self._notify("restore", changed)
            return changed

    def adopt(self, snapshot: Snapshot) -> None:
        """Take a snapshot of *another* state of the same model (a distributed worker's copy):
        its bases, masks and other tensors, under fresh tokens (the other process's tokens mean
        nothing here) and a generation of this state's own."""
        with self.lock:
            self._check_snapshot(snapshot, "adopt")
            for name, b in snapshot.bases.items():
                if tuple(b.shape) != self._info[name].shape:
                    raise ValueError(f"layer {name!r}: the snapshot's weight has shape {tuple(b.shape)}, not {self._info[name].shape}")
            device = next(iter(self.weights.values())).device
            others = snapshot.others if snapshot.others is not None else {k: self._original[k] for k in self._other_keys}
            with torch.no_grad():
                for k, t in self.other_tensors().items():
                    t.copy_(others[k].to(t.device))
            self._bases = {n: b.to(device) for n, b in snapshot.bases.items()}
            if snapshot.generation:
                self.generation = self._next_generation
                self._next_generation += 1
            else:
                self.generation = 0
            self._channels = {g: replace(c, token=next(_serials)) for g, c in snapshot.channels.items()}
            self._member_bases = {k: b.to(device) for k, b in snapshot.member_bases.items()}
            if self._channels or self._member_bases:
                self._write_members()
            for name, r in snapshot.records.items():
                r = replace(r, mask=None if r.mask is None else r.mask.to(device),
                            values=None if r.values is None else r.values.to(device), token=next(_serials))
                self._records[name] = r
                self._write(name, r.mask, r.token, r.quant, r.values)
            self._notify("restore", list(self._info))

    def reset(self) -> None:
        """Every parameter and buffer back to construction time, bit for bit; no masks."""
        with self.lock:
            self._check_not_in_trial("reset")
            with torch.no_grad():
                for key, t in self.model.state_dict(keep_vars=True).items():
                    t.copy_(self._original[key])
            self._bases = {i.name: self._original_of(i) for i in self.layers}
            self.generation = 0
            self._channels, self._member_bases = {}, {}
            for i in self.layers:
                self._records[i.name] = Record(seed=self.seed, token=next(_serials))
                self._mark_written(i.name, self._records[i.name].token)
            self._notify("reset", list(self._info))

    def rebase(self, kind: str = "finetune") -> None:
        """After training changed the live weights: they become the new base (pruned entries
        keep their previous base value, which is what un-pruning brings back)."""
        with self.lock:
            self.generation = self._next_generation  # never reused: restore() may go back to any earlier one
            self._next_generation += 1
            masked = self.member_masks()
            for key, (t, m) in masked.items():
                self._member_bases[key] = torch.where(m, t.detach(), self._member_bases[key])
            for key in [k for k in self._member_bases if k not in masked]:
                self._member_bases[key] = self._params[key].detach().clone()
            self._write_members()  # removed channels' biases and BatchNorm entries zero again (a rewind wrote them)
            for name, w in self.weights.items():
                r = self._records[name]
                trained = w.detach().clone()
                self._bases[name] = trained if r.mask is None else torch.where(r.mask, trained, self._bases[name])
                self._records[name] = replace(r, token=next(_serials), values=None)  # trained: the refit is in the base now
                self._write(name, r.mask, self._records[name].token, r.quant)
            self._notify(kind, list(self._info))

    def rewind_to(self, state_dict: Mapping[str, Tensor]) -> None:
        """Every tensor back to ``state_dict`` (recorded earlier), the masks kept: surviving
        weights take the recorded values, pruned ones stay zero (lottery-ticket rewinding)."""
        with self.lock:
            self._check_not_in_trial("rewind")
            current = self.model.state_dict(keep_vars=True)
            missing = [k for k in current if k not in state_dict]
            if missing:
                raise ValueError(f"rewind_to: the state lacks {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}")
            for k, t in current.items():
                if tuple(state_dict[k].shape) != tuple(t.shape):
                    raise ValueError(f"rewind_to: {k!r} has shape {tuple(state_dict[k].shape)}, the model's is {tuple(t.shape)}")
            with torch.no_grad():
                for k, t in current.items():
                    t.copy_(state_dict[k].to(t.device))
            self.rebase("rewind")

    def to(self, device: torch.device) -> None:
        """Move the model, the originals, bases and masks to ``device``."""
        with self.lock:
            self._check_not_in_trial("move the model")
            moved: dict[int, Tensor] = {}

            def mv(t: Optional[Tensor]) -> Optional[Tensor]:
                if t is None:
                    return None
                if id(t) not in moved:
                    moved[id(t)] = t.to(device)
                return moved[id(t)]

            self.model.to(device)
            self._original = {k: mv(v) for k, v in self._original.items()}  # type: ignore[misc]
            self._bases = {n: mv(b) for n, b in self._bases.items()}  # type: ignore[misc]
            self._records = {n: replace(r, mask=mv(r.mask), values=mv(r.values)) for n, r in self._records.items()}
            self._member_bases = {k: mv(b) for k, b in self._member_bases.items()}  # type: ignore[misc]
            gen, others = self._others_copy
            if others is not None:
                self._others_copy = (gen, {k: mv(v) for k, v in others.items()})  # type: ignore[misc]
            self._bind()
            for name, r in self._records.items():
                self._mark_written(name, r.token)
            self._notify("device", list(self._info))


class _LazyKeys(Sequence):
    def __init__(self, state: PruningState, names: list[str], criterion: Criterion, seed: int):
        self._s, self._names, self._c, self._seed = state, names, criterion, seed

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, i):  # type: ignore[override]
        name = self._names[i]
        if self._c.needs:
            self._s._calibration_id(self._c, drop=False)  # a clear error before any statistic is read
            return self._c.keys(self._s.base(name), layer=name, seed=self._seed, stats=self._s.calibration.layer(name))
        return self._c.keys(self._s.base(name), layer=name, seed=self._seed)
