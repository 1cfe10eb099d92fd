"""Session: a user's model, its original weights, masks applied in place, and measured numbers.

Invariants: the original state (every parameter and buffer) is kept, so ``reset()`` is exact;
masks are recomputed from the originals each time (a smaller sparsity un-prunes); pruning writes
only the masked weights; every public method validates all input before it mutates anything.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import export as _export
from ._version import __version__
from .allocation import as_allocation, get_allocation
from .criteria import Criterion, get_criterion
from .layers import LayerInfo, find_prunable
from .masks import count_to_prune, k_smallest_masks
from .incremental import IncrementalEvaluator, TraceError
from .measure import EvalData, Metric, accuracy, eval_mode, evaluate, mac_positions, score_outputs
from .registry import close_names, describe

DeviceLike = Union[str, torch.device, None]
Listener = Callable[[str], None]


def resolve_device(device: DeviceLike) -> torch.device:
    """``None`` picks CUDA when available, else CPU; a CUDA request without CUDA is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device; valid: 'cpu', 'cuda', 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


class _LazyKeys(Sequence):
    """Criterion keys per layer, computed on access so one layer's keys live at a time."""

    def __init__(self, session: "Session", names: list[str], criterion: Criterion, seed: int):
        self._s, self._names, self._c, self._seed = session, names, criterion, seed

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, i):  # type: ignore[override]
        name = self._names[i]
        return self._c.keys(self._s._orig[name], layer=name, seed=self._seed)


class Session:
    """Prune a model layer by layer, exactly and reversibly, and measure what it costs.

    ``eval_data``: a DataLoader, a Dataset or an ``(inputs, targets)`` pair. ``metric``:
    ``(outputs, targets) -> batch mean`` replacing accuracy (its ``__name__`` is the key in
    ``evaluate()``); ``loss_fn`` likewise (default cross-entropy; ``None`` for no loss).
    ``extra_layers``: names of other modules whose ``weight`` should be prunable.
    """

    def __init__(
        self,
        model: nn.Module,
        eval_data: Any,
        device: DeviceLike = None,
        metric: Optional[Metric] = None,
        *,
        loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = F.cross_entropy,
        extra_layers: Sequence[str] = (),
        seed: int = 0,
        batch_size: int = 1024,
        incremental: bool = True,
        cache_budget_bytes: Optional[int] = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if metric is not None and not callable(metric):
            raise TypeError(f"metric must be a callable (outputs, targets) -> value, got {type(metric).__name__}")
        infos, users = find_prunable(model, extra_layers)
        if not infos:
            raise ValueError(
                f"{type(model).__name__} has no prunable layers (Linear, Conv1d/2d/3d, ConvTranspose*); "
                "name other modules with a 'weight' via extra_layers=[...]"
            )
        params = dict(model.named_parameters(remove_duplicate=False))
        for info in infos:
            w = params[_weight_key(info.name)]
            bad = int((~torch.isfinite(w.detach())).sum())
            if bad:
                raise ValueError(f"layer {info.name!r}: weight has {bad} NaN/inf values; fix the model before pruning")
        self.device = resolve_device(device)
        self.model = model
        self.layers: list[LayerInfo] = infos
        self._info = {i.name: i for i in infos}
        self._users = users
        self.metric: Metric = metric or accuracy
        self.metric_name: str = "accuracy" if metric is None else describe(metric)
        self.loss_fn = loss_fn
        self.seed = int(seed)
        old_device = _model_device(model)
        model.to(self.device)
        try:
            self.data = EvalData(eval_data, self.device, batch_size)
            self._positions = self._check_forward()
        except Exception:
            model.to(old_device)
            raise
        self._original: dict[str, Tensor] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._orig: dict[str, Tensor] = {i.name: self._original[_weight_key(i.name)] for i in infos}
        self._weights: dict[str, Tensor] = {i.name: params[_weight_key(i.name)] for i in infos}
        self._pruned: dict[str, int] = {i.name: 0 for i in infos}
        self._criterion: dict[str, str] = {i.name: "magnitude" for i in infos}
        self._layer_seed: dict[str, int] = {i.name: self.seed for i in infos}
        self._masks: dict[str, Optional[Tensor]] = {i.name: None for i in infos}
        self._listeners: list[Listener] = []
        self._baseline: Optional[dict[str, float]] = None
        self._dense_file_bytes: Optional[int] = None
        self._nnz_cache: dict[int, tuple[Tensor, int, int]] = {}
        self.version = 0  # bumped on every change of weights or device
        self.incremental = incremental
        self.cache_budget_bytes = cache_budget_bytes
        self._evaluator: Optional[IncrementalEvaluator] = None
        self.last_sensitivity: Any = None  # the latest SensitivityResult, for allocation="sensitivity"
        self._trace_failed: Optional[str] = None

    # ------------------------------------------------------------------ discovery / validation
    def _check_forward(self) -> dict[str, Optional[int]]:
        sample = self.data.sample(1)
        try:
            positions = mac_positions(self.model, self._users, sample)
        except RuntimeError as e:
            first = self.layers[0]
            raise ValueError(
                f"the model cannot run on the eval data: inputs of shape {tuple(sample.shape)} "
                f"(batch of 1) failed with: {str(e).splitlines()[0]}. First prunable layer "
                f"{first.name!r} is {first.kind} with weight shape {first.shape}."
            ) from None
        return positions

    def layer(self, name: str) -> LayerInfo:
        try:
            return self._info[name]
        except (KeyError, TypeError):
            names = list(self._info)
            raise ValueError(
                f"no prunable layer named {name!r}.{close_names(str(name), names)} Prunable layers: {', '.join(names)}"
            ) from None

    def check_sparsity(self, name: str, value: Any) -> float:
        self.layer(name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"layer {name!r}: sparsity must be a number in [0, 1], got {value!r}")
        v = float(value)
        if math.isnan(v) or not 0.0 <= v <= 1.0:
            raise ValueError(
                f"layer {name!r}: sparsity {value!r} is outside [0, 1] (a fraction: 0.9 zeroes 90% of the weights)"
            )
        return v

    # ------------------------------------------------------------------ state
    @property
    def sparsity(self) -> dict[str, float]:
        """Per layer, the fraction of weights the masks zero (pruned / params)."""
        return {n: self._pruned[n] / self._info[n].n_params for n in self._info}

    @property
    def pruned_counts(self) -> dict[str, int]:
        return dict(self._pruned)

    @property
    def criteria(self) -> dict[str, str]:
        return dict(self._criterion)

    def mask(self, name: str) -> Tensor:
        """Keep-mask of a layer (True = kept), on the session's device."""
        self.layer(name)
        m = self._masks[name]
        return torch.ones(self._info[name].shape, dtype=torch.bool, device=self.device) if m is None else m

    def original_weight(self, name: str) -> Tensor:
        """The layer's weight before any pruning (read-only view; do not modify)."""
        self.layer(name)
        return self._orig[name]

    def original_state(self) -> dict[str, Tensor]:
        """A copy of the model's state_dict as it was at construction (CPU tensors)."""
        return _cpu_state({k: v.clone() for k, v in self._original.items()})

    def total_sparsity(self) -> float:
        return sum(self._pruned.values()) / sum(i.n_params for i in self.layers)

    def lazy_keys(self, names: list[str], criterion: Criterion, seed: int) -> Sequence[Tensor]:
        return _LazyKeys(self, names, criterion, seed)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(event)`` after every change ('masks', 'reset', 'device'); returns an unsubscribe."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _notify(self, event: str) -> None:
        self.version += 1
        for listener in list(self._listeners):
            listener(event)

    # ------------------------------------------------------------------ pruning
    def set_sparsity(
        self,
        sparsities: Mapping[str, float],
        criterion: Union[str, Callable, Criterion] = "magnitude",
        seed: Optional[int] = None,
    ) -> "Session":
        """Prune each named layer to ``round(s * n)`` zeros by ``criterion``; other layers keep theirs."""
        if not isinstance(sparsities, Mapping):
            raise TypeError(
                "set_sparsity takes a {layer: sparsity} dict (use set_global_sparsity for one number), "
                f"got {type(sparsities).__name__}"
            )
        crit = get_criterion(criterion)
        seed = self.seed if seed is None else int(seed)
        counts = {}
        for name, value in sparsities.items():
            s = self.check_sparsity(name, value)
            counts[name] = count_to_prune(s, self._info[name].n_params)
        self._apply_counts(counts, crit, seed)
        return self

    def set_global_sparsity(
        self,
        sparsity: float,
        allocation: Union[str, Callable] = "global",
        criterion: Union[str, Callable, Criterion] = "magnitude",
        seed: Optional[int] = None,
        locked: Sequence[str] = (),
    ) -> "Session":
        """Prune the model to a total sparsity, split across unlocked layers by ``allocation``.

        Locked layers keep their current masks and count toward the total.
        """
        if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or math.isnan(sparsity) or not 0 <= sparsity <= 1:
            raise ValueError(f"global sparsity {sparsity!r} is outside [0, 1] (a fraction: 0.9 zeroes 90% of the weights)")
        for name in locked:
            self.layer(name)
        crit = get_criterion(criterion)
        seed = self.seed if seed is None else int(seed)
        fn = get_allocation(allocation)
        locked_counts = {name: self._pruned[name] for name in locked}
        result = as_allocation(fn(self, float(sparsity), criterion=crit, seed=seed, locked=locked_counts), self)
        self._apply_counts(result.counts, result.criterion or crit, seed, result.masks)
        emptied = [n for n, k in result.counts.items() if k == self._info[n].n_params]
        if emptied and sparsity < 1:
            import warnings

            warnings.warn(
                f"allocation {describe(allocation)!r} at {sparsity:.1%} pruned every weight of {', '.join(emptied)}: "
                "the network is cut there and fine-tuning cannot recover it (try 'lamp', 'erk' or a lock)",
                LayerCollapseWarning,
                stacklevel=2,
            )
        return self

    def _apply_counts(self, counts: Mapping[str, int], crit: Criterion, seed: int, masks: Optional[Mapping[str, Tensor]] = None) -> None:
        changed = {
            name: k
            for name, k in counts.items()
            if (k, crit.name, seed) != (self._pruned[name], self._criterion[name], self._layer_seed[name])
            or (k == 0) != (self._masks[name] is None)
        }
        new_masks: dict[str, Optional[Tensor]] = {}
        for name, k in changed.items():  # compute everything before touching the model
            if k == 0:
                new_masks[name] = None
            elif masks is not None and name in masks:
                new_masks[name] = masks[name]
            else:
                keys = self.lazy_keys([name], crit, seed)
                new_masks[name] = k_smallest_masks(keys, k, [self._info[name].shape])[0]
        if not changed:
            return
        for name, mask in new_masks.items():
            self._write_layer(name, mask)
            self._masks[name] = mask
            self._pruned[name] = changed[name]
            self._criterion[name] = crit.name
            self._layer_seed[name] = seed
        self._notify("masks")

    def reset(self) -> "Session":
        """Restore every parameter and buffer to the state at construction, bit for bit
        (fine-tuning included: masks are computed from the construction-time weights again)."""
        with torch.no_grad():
            for key, t in self.model.state_dict().items():
                t.copy_(self._original[key])
        self._orig = {i.name: self._original[_weight_key(i.name)] for i in self.layers}
        for name in self._info:
            self._pruned[name] = 0
            self._masks[name] = None
            self._criterion[name] = "magnitude"
            self._layer_seed[name] = self.seed
        self._notify("reset")
        return self

    @contextlib.contextmanager
    def dense(self) -> Iterator["Session"]:
        """Temporarily put the original weights back (for baselines); masks return on exit."""
        masked = [name for name, mask in self._masks.items() if mask is not None]
        for name in masked:
            self._write_layer(name, None)
        try:
            yield self
        finally:
            for name in masked:
                self._restore_layer(name)

    # ------------------------------------------------------------------ measuring
    def evaluate(self, limit: Optional[int] = None) -> dict[str, float]:
        """``{metric_name: value, "loss": value}`` on the eval data (first ``limit`` samples).

        Exact, but only the part of the model downstream of layers changed since the last
        evaluation is recomputed (see ``incremental.py``); ``limit`` runs full passes.
        """
        ev = self.evaluator() if limit is None else None
        with eval_mode(self.model):
            if ev is not None:
                r = score_outputs(ev.outputs(), self.metric, self.loss_fn)
            else:
                r = evaluate(self.model, self.data, self.metric, self.loss_fn, limit)
        return {self.metric_name: r.metric, "loss": r.loss if r.loss is not None else math.nan}

    def evaluator(self) -> Optional[IncrementalEvaluator]:
        """The traced incremental evaluator, or ``None`` (untraceable model, streamed data, or off)."""
        if self._evaluator is None and self._trace_failed is None and self.incremental:
            try:
                self._evaluator = IncrementalEvaluator(
                    self.model,
                    self.data,
                    {i.name: [i.name, *i.aliases] for i in self.layers},
                    self._weights,
                    budget_bytes=self.cache_budget_bytes,
                    chunk_size=self.data.batch_size,
                )
            except TraceError as e:
                self._trace_failed = str(e)
                print(f"prune_lab: {type(self.model).__name__} cannot be traced by torch.fx ({e}); evaluating with full forward passes")
        return self._evaluator

    def baseline(self) -> dict[str, float]:
        """``evaluate()`` of the unpruned model (cached; originals never change)."""
        if self._baseline is None:
            with self.dense():
                self._baseline = self.evaluate()
        return dict(self._baseline)

    def stats(self) -> "Stats":
        """Per layer and total: params, nonzeros, sparsity, dense/sparse bytes, dense/effective MACs.

        Nonzeros are counted in the live weights; MACs are weight entries times the positions each
        is applied at per input sample (measured by hooks on one sample); sparse bytes per layer are
        the encoded payload, and the totals' file bytes are the length of the actual serialised
        dense and sparse exports.
        """
        rows: dict[str, dict[str, Any]] = {}
        for info in self.layers:
            w = self._weights[info.name]
            nnz = self._nonzeros(w)
            pos = self._positions.get(info.name)
            rows[info.name] = {
                "params": info.n_params,
                "nonzeros": nnz,
                "sparsity": 1 - nnz / info.n_params,
                "dense_bytes": info.n_params * w.element_size(),
                "sparse_bytes": _export.sparse_payload_bytes(info.n_params, nnz, w.element_size()),
                "macs": None if pos is None else info.n_params * pos,
                "effective_macs": None if pos is None else nnz * pos,
            }
        total: dict[str, Any] = {
            key: sum(r[key] for r in rows.values() if r[key] is not None)
            for key in ("params", "nonzeros", "dense_bytes", "sparse_bytes", "macs", "effective_macs")
        }
        total["sparsity"] = 1 - total["nonzeros"] / total["params"]
        all_params = {id(p): p for p in self.model.parameters()}.values()
        total["model_params"] = sum(p.numel() for p in all_params)
        total["model_nonzeros"] = sum(self._nonzeros(p) for p in all_params)
        total["dense_file_bytes"] = self.dense_file_bytes()
        total["sparse_file_bytes"] = self.sparse_file_bytes()
        total["compression"] = total["params"] / max(total["nonzeros"], 1)
        total["file_compression"] = total["dense_file_bytes"] / total["sparse_file_bytes"]
        total["speedup"] = total["macs"] / max(total["effective_macs"], 1)
        return Stats(rows, total)

    def dense_file_bytes(self) -> int:
        """Length of ``torch.save(model.state_dict())`` of the dense model (cached)."""
        if self._dense_file_bytes is None:
            self._dense_file_bytes = len(_export.serialize(_cpu_state(self._original)))
        return self._dense_file_bytes

    def sparse_file_bytes(self) -> int:
        """Exact length of ``export(path, sparse=True)``'s file for the current weights."""
        sparse = {_weight_key(i.name) for i in self.layers}
        meta = [
            (key, tuple(t.shape), t.dtype, self._nonzeros(t) if key in sparse else t.numel(), key in sparse)
            for key, t in self.model.state_dict(keep_vars=True).items()
        ]
        return _export.sparse_file_size(meta)

    def _nonzeros(self, t: Tensor) -> int:
        """``count_nonzero``, cached per tensor until it is written (tensor version counter)."""
        key = id(t)
        hit = self._nnz_cache.get(key)
        if hit is not None and hit[0] is t and hit[1] == t._version:
            return hit[2]
        nnz = int(torch.count_nonzero(t.detach()))
        self._nnz_cache[key] = (t, t._version, nnz)
        return nnz

    # ------------------------------------------------------------------ devices
    def to(self, device: DeviceLike) -> "Session":
        """Move model, originals, masks and eval data to ``device`` in one call."""
        dev = resolve_device(device)
        if dev == self.device:
            return self
        self.model.to(dev)
        self.data.to(dev)
        self._original = {k: v.to(dev) for k, v in self._original.items()}
        self._orig = {i.name: self._original[_weight_key(i.name)] for i in self.layers}
        params = dict(self.model.named_parameters(remove_duplicate=False))
        self._weights = {i.name: params[_weight_key(i.name)] for i in self.layers}
        self._masks = {n: None if m is None else m.to(dev) for n, m in self._masks.items()}
        self.device = dev
        self._baseline = None
        self._evaluator = None
        self._notify("device")
        return self

    # ------------------------------------------------------------------ recipes and export
    def recipe(self) -> dict[str, Any]:
        """What was pruned, reproducibly: per layer count, sparsity, criterion and seed."""
        return {
            "prune_lab_recipe": _export.RECIPE_FORMAT,
            "prune_lab_version": __version__,
            "model": type(self.model).__name__,
            "seed": self.seed,
            "weights_sha256": _export.weights_digest([self._orig[i.name] for i in self.layers]),
            "layers": {
                i.name: {
                    "shape": list(i.shape),
                    "pruned": self._pruned[i.name],
                    "sparsity": self._pruned[i.name] / i.n_params,
                    "criterion": self._criterion[i.name],
                    "seed": self._layer_seed[i.name],
                }
                for i in self.layers
            },
        }

    @staticmethod
    def load_recipe(path: Union[str, Path, Mapping[str, Any]]) -> dict[str, Any]:
        """Read and validate a recipe file (or dict); raises ValueError on anything malformed."""
        return _export.load_recipe(path)

    def apply_recipe(self, recipe: Union[str, Path, Mapping[str, Any]]) -> "Session":
        """Reproduce a recipe's masks on this session's model (checked against its layers first)."""
        data = _export.load_recipe(recipe)
        layers = data["layers"]
        missing = [n for n in self._info if n not in layers]
        for name, entry in layers.items():
            if name not in self._info:
                raise ValueError(
                    f"recipe layer {name!r} is not in this model (another architecture?).{close_names(name, list(self._info))}"
                )
            if tuple(entry["shape"]) != self._info[name].shape:
                raise ValueError(
                    f"recipe layer {name!r} has shape {tuple(entry['shape'])} but the model's is "
                    f"{self._info[name].shape} (another architecture?)"
                )
        if missing:
            raise ValueError(f"recipe has no entry for layer(s) {', '.join(missing)} of this model (another architecture?)")
        state = {
            name: (entry["pruned"], entry["criterion"], int(entry.get("seed", data.get("seed", 0))))
            for name, entry in layers.items()
        }
        crits = [get_criterion(entry["criterion"]) for entry in layers.values()]  # unknown names fail here
        if any(c.weight_dependent for c in crits) and data.get("weights_sha256") not in (None, self.recipe()["weights_sha256"]):
            import warnings

            warnings.warn(
                "the recipe was made on different weights; magnitude masks depend on the weights, so they will differ",
                stacklevel=2,
            )
        return self.restore_state(state)

    # ------------------------------------------------------------------ states (undo/redo)
    def state(self) -> dict[str, tuple[int, str, int]]:
        """The pruning state as ``{layer: (pruned count, criterion, seed)}``: small, comparable,
        and exactly restorable with :meth:`restore_state` (masks are recomputed from originals)."""
        return {n: (self._pruned[n], self._criterion[n], self._layer_seed[n]) for n in self._info}

    def restore_state(self, state: Mapping[str, tuple[int, str, int]]) -> "Session":
        """Apply a :meth:`state` (or a recipe's per-layer settings); all or nothing."""
        for name in state:
            self.layer(name)
        groups: dict[tuple[str, int], dict[str, int]] = {}
        for name, (k, crit, seed) in state.items():
            groups.setdefault((crit, seed), {})[name] = k
        crits = {c: get_criterion(c) for c, _ in groups}
        snapshot = (dict(self._pruned), dict(self._criterion), dict(self._layer_seed), dict(self._masks))
        try:
            for (crit, seed), counts in groups.items():
                self._apply_counts(counts, crits[crit], seed)
        except Exception:
            self._restore(snapshot)
            raise
        return self

    # ------------------------------------------------------------------ fine-tuning
    def _rebase(self) -> None:
        """After training: masks are computed from the trained weights from now on; pruned
        entries keep their previous base value (what un-pruning brings back)."""
        for name, w in self._weights.items():
            m = self._masks[name]
            trained = w.detach().clone()
            self._orig[name] = trained if m is None else torch.where(m, trained, self._orig[name])
        self._notify("finetune")

    def rewind_to(self, state: Mapping[str, Tensor]) -> "Session":
        """Lottery-ticket rewinding: every tensor back to ``state`` (a state_dict recorded
        earlier), surviving weights included, pruned weights kept at zero; masks unchanged."""
        current = self.model.state_dict()
        missing = [k for k in current if k not in state]
        if missing:
            raise ValueError(f"rewind_to: the state lacks {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}")
        with torch.no_grad():
            for key, t in current.items():
                t.copy_(state[key].to(t.device))
        for name in self._weights:
            self._orig[name] = state[_weight_key(name)].to(self.device).detach().clone()
            self._restore_layer(name)
        self._notify("rewind")
        return self

    def finetune(
        self,
        train_data: Any,
        epochs: Optional[float] = None,
        steps: Optional[int] = None,
        lr: float = 0.01,
        schedule: str = "oneshot",
        target_sparsity: Optional[float] = None,
        allocation: Union[str, Callable] = "global",
        rounds: int = 3,
        rewind_step: int = 0,
        restore: str = "last",
        optimizer: Union[str, Callable] = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        batch_size: int = 64,
        seed: int = 0,
        progress: bool = True,
        on_step: Optional[Callable[[int, float], None]] = None,
    ) -> Any:
        """Train with the masks held (pruned weights stay exactly 0), optionally pruning on a schedule.

        ``schedule``: "oneshot" (prune to ``target_sparsity`` if given, then train), "iterative"
        (``rounds`` of prune-then-train, geometric sparsities), "agp" (cubic ramp to the target,
        ``rounds`` pruning steps), "lottery" (train, prune by magnitude, rewind the survivors to
        their values at ``rewind_step``, retrain). ``steps`` (or ``epochs``) is the training
        budget per phase. ``restore="best"`` keeps the state with the best eval metric seen.
        Ctrl-C stops early with what was learned. ``reset()`` still restores the original model.
        """
        from . import finetune as ft

        if schedule not in ("oneshot", "iterative", "agp", "lottery"):
            raise ValueError(f"schedule must be 'oneshot', 'iterative', 'agp' or 'lottery', got {schedule!r}")
        if restore not in ("last", "best"):
            raise ValueError(f"restore must be 'last' or 'best', got {restore!r}")
        if target_sparsity is not None and (isinstance(target_sparsity, bool) or not 0 <= target_sparsity <= 1):
            raise ValueError(f"target_sparsity {target_sparsity!r} is outside [0, 1]")
        if schedule != "oneshot" and target_sparsity is None:
            raise ValueError(f"schedule {schedule!r} needs target_sparsity=...")
        n_train = len(train_data[0]) if isinstance(train_data, (tuple, list)) else len(getattr(train_data, "dataset", train_data))
        if steps is None:
            if epochs is None:
                raise ValueError("finetune needs steps=... or epochs=...")
            steps = max(1, int(math.ceil(epochs * n_train / batch_size)))
        self.baseline()  # the dense reference is measured before any weight changes
        result = ft.FinetuneResult()
        best: tuple[float, Optional[dict]] = (-math.inf, None)

        def train(n: int, phase_seed: int) -> None:
            nonlocal best
            ft.masked_train(self, train_data, n, lr, optimizer, momentum, weight_decay, batch_size, phase_seed, progress,
                            self.loss_fn or F.cross_entropy, on_step, result)
            ev = {**self.evaluate(), "sparsity": self.total_sparsity(), "steps": result.steps}
            result.evaluations.append(ev)
            if restore == "best" and ev[self.metric_name] > best[0]:
                best = (ev[self.metric_name], {k: v.detach().clone() for k, v in self.model.state_dict().items()})

        if schedule == "oneshot":
            if target_sparsity is not None:
                self.set_global_sparsity(target_sparsity, allocation=allocation)
            train(steps, seed)
        elif schedule == "iterative":
            for r, s in enumerate(ft.iterative_sparsities(target_sparsity, rounds)):
                self.set_global_sparsity(s, allocation=allocation)
                train(steps, seed + r)
                if result.interrupted:
                    break
        elif schedule == "agp":
            per = max(1, steps // rounds)
            for r in range(rounds):
                self.set_global_sparsity(ft.agp_sparsity(r + 1, rounds, target_sparsity), allocation=allocation)
                train(per, seed + r)
                if result.interrupted:
                    break
        else:  # lottery
            recorded: dict[str, Tensor] = {}
            if rewind_step == 0:
                recorded = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

            def record(step: int, _loss: float) -> None:
                if step + 1 == rewind_step:
                    recorded.update({k: v.detach().clone() for k, v in self.model.state_dict().items()})

            saved_hook, on_step = on_step, record
            train(steps, seed)
            on_step = saved_hook
            if not result.interrupted:
                self.set_global_sparsity(target_sparsity, allocation=allocation)
                self.rewind_to(recorded)
                train(steps, seed + 1)
        if restore == "best" and best[1] is not None:
            with torch.no_grad():
                for k, t in self.model.state_dict().items():
                    t.copy_(best[1][k])
            self._rebase()
            result.restored = "best"
        else:
            result.restored = "last"
        return result

    def tradeoff(
        self,
        strategies: Sequence[str] = ("uniform", "global", "erk", "lamp", "random"),
        compressions: Sequence[float] = (1, 2, 4, 8, 16, 32, 64),
        finetune: Optional[dict] = None,
        seeds: int = 1,
        cache: bool = True,
        progress: bool = True,
    ) -> Any:
        """Every strategy (allocation) at every compression (params / nonzeros), measured; with
        ``finetune={"train_data": ..., "steps": ..., ...}`` also after masked fine-tuning. Returns
        a ``TradeoffResult``; cached on disk by (model, data, config). The session is left exactly
        as it was found."""
        from .tradeoff import run_tradeoff

        return run_tradeoff(self, strategies, compressions, finetune, seeds, cache, progress)

    # ------------------------------------------------------------------ silent writes (sweeps)
    def _write_layer(self, name: str, mask: Optional[Tensor]) -> None:
        """The one place a layer's weight is written: base weights times ``mask`` (None: the base
        itself). Records nothing, so a sweep's trial mask is undone by ``_restore_layer``."""
        with torch.no_grad():
            if mask is None:
                self._weights[name].copy_(self._orig[name])
            else:
                torch.mul(self._orig[name], mask, out=self._weights[name])

    def _restore_layer(self, name: str) -> None:
        self._write_layer(name, self._masks[name])

    def _restore_all_layers(self) -> None:
        for name in self._info:
            self._restore_layer(name)

    def sensitivity(
        self,
        levels: Optional[Sequence[float]] = None,
        criterion: Union[str, Callable, Criterion] = "magnitude",
        metric: Optional[str] = None,
        layers: Optional[Sequence[str]] = None,
        resume: Any = None,
        incremental: bool = True,
        progress: bool = True,
        on_step: Optional[Callable[[dict], None]] = None,
        should_stop: Optional[Callable[[], bool]] = None,
    ) -> Any:
        """Prune each layer alone to each level (others at their current sparsity), evaluate,
        restore exactly. Returns a ``SensitivityResult``; Ctrl-C returns the partial one.

        ``levels`` default to 0.0-0.95 in 0.05 steps. ``metric`` must be the session's metric
        name (set the metric on the Session). ``resume`` continues an interrupted result.
        """
        from .sensitivity import sweep

        if metric is not None and metric != self.metric_name:
            raise ValueError(f"metric {metric!r}: this session measures {self.metric_name!r}; pass metric= to the Session")
        return sweep(self, levels, criterion, layers, resume, incremental, progress, on_step, should_stop)

    def _restore(self, snapshot: tuple) -> None:
        pruned, criterion, seeds, masks = snapshot
        for name, mask in masks.items():
            self._write_layer(name, mask)
        self._pruned, self._criterion, self._layer_seed, self._masks = pruned, criterion, seeds, masks
        self._notify("masks")

    def export(self, path: Union[str, Path], sparse: bool = False) -> dict[str, Path]:
        """Write the pruned state_dict (dense, or the compact sparse encoding) and its recipe.

        Returns ``{"model": path, "recipe": <stem>.recipe.json}``. Load either form with
        ``prune_lab.load_state_dict(path)`` (a dense export also loads with ``torch.load``).
        """
        path = Path(path)
        if sparse:
            data = _export.sparse_bytes(self.model.state_dict(), [_weight_key(i.name) for i in self.layers])
        else:
            data = _export.serialize(_cpu_state(self.model.state_dict()))
        model_path = _export.write_bytes(path, data)
        recipe_path = path.with_name(path.stem + ".recipe.json")
        import json

        _export.write_bytes(recipe_path, json.dumps(self.recipe(), indent=1).encode())
        return {"model": model_path, "recipe": recipe_path}

    def to_torch_prune(self, model: nn.Module) -> nn.Module:
        """Hand this session's masks to ``model`` as ``torch.nn.utils.prune`` reparametrisation."""
        masks = {i.name: self.mask(i.name) for i in self.layers}
        return _export.to_torch_prune(model, masks)

    # ------------------------------------------------------------------ display
    def __repr__(self) -> str:
        lines = [
            f"Session({type(self.model).__name__}, device={self.device}, {len(self.layers)} prunable layers, "
            f"{self.total_sparsity():.1%} sparse, eval on {len(self.data)} samples)"
        ]
        width = max(len(i.name) for i in self.layers)
        for i in self.layers:
            shape = "x".join(map(str, i.shape))
            lines.append(
                f"  {i.name:<{width}}  {i.kind:<15} {shape:>14} {i.n_params:>10,}  "
                f"{self.sparsity[i.name]:6.1%} {self._criterion[i.name] if self._pruned[i.name] else ''}"
            )
        return "\n".join(lines)


class LayerCollapseWarning(UserWarning):
    """A global allocation pruned a whole layer."""


class Stats:
    """``stats.layers[name][key]`` and ``stats.total[key]``; prints as a table."""

    def __init__(self, layers: dict[str, dict[str, Any]], total: dict[str, Any]):
        self.layers = layers
        self.total = total

    def __getitem__(self, key: str) -> Any:
        return self.total if key == "total" else self.layers[key]

    def as_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "total": self.total}

    def __repr__(self) -> str:
        head = f"{'layer':<20}{'params':>10}{'nonzeros':>10}{'sparsity':>9}{'bytes':>10}{'sparse B':>10}{'MACs':>12}{'eff. MACs':>12}"
        lines = [head]
        for name, r in list(self.layers.items()) + [("total", self.total)]:
            macs = "n/a" if r["macs"] is None else f"{r['macs']:,}"
            eff = "n/a" if r["effective_macs"] is None else f"{r['effective_macs']:,}"
            lines.append(
                f"{name:<20}{r['params']:>10,}{r['nonzeros']:>10,}{r['sparsity']:>9.1%}"
                f"{r['dense_bytes']:>10,}{r['sparse_bytes']:>10,}{macs:>12}{eff:>12}"
            )
        t = self.total
        lines.append(
            f"files: dense {t['dense_file_bytes']:,} B, sparse {t['sparse_file_bytes']:,} B "
            f"({t['file_compression']:.2f}x); compression {t['compression']:.2f}x; speedup {t['speedup']:.2f}x"
        )
        return "\n".join(lines)


def _weight_key(name: str) -> str:
    return f"{name}.weight" if name else "weight"


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _cpu_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}
