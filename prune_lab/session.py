"""Session: the public facade over a pruning state, an evaluator and the workflows.

It holds no pruning logic of its own: masks and snapshots live in ``state.py``, measuring in
``evaluate.py``/``stats.py``, sweeps, fine-tuning and trade-offs in ``workflows/``. Every
public method validates all input before anything changes.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

from torch import Tensor, nn

from . import channels as _channels
from . import pruning as _pruning
from . import export as _export
from . import recipes as _recipes
from .allocation import LayerCollapseWarning
from .cache import cache_dir
from .criteria import Criterion, get_criterion
from .devices import DeviceLike, model_device, resolve_device
from .evaluate import Evaluator
from .layers import Coverage, LayerInfo, prunable_layers
from .measure import AUTO, EvalData, Metric, Scorer, forward_check
from .registry import describe
from .patterns import get_pattern
from .state import Event, PruningState, Snapshot
from .stats import Stats, StatsTable, describe_layers
from .workflows import finetune as _finetune
from .workflows import sensitivity as _sensitivity
from .workflows import tradeoff as _tradeoff

__all__ = ["Session", "LayerCollapseWarning", "Stats", "resolve_device"]


class Session:
    """Prune a model layer by layer, exactly and reversibly, and measure what it costs.

    ``eval_data``: a DataLoader, Dataset or ``(inputs, targets)``. ``metric``: ``(outputs, targets) -> batch mean``
    replacing accuracy; ``loss_fn``: a batch-mean loss, ``"auto"`` (cross-entropy) or None; ``.logits`` outputs are
    read through. ``extra_layers``: further parameters to prune. ``check=True`` compares every evaluation with a
    plain forward pass.
    """

    def __init__(self, model: nn.Module, eval_data: Any, device: DeviceLike = None, metric: Optional[Metric] = None, *,
                 loss_fn: Any = AUTO, extra_layers: Sequence[str] = (), seed: int = 0, batch_size: int = 1024,
                 incremental: bool = True, cache_budget_bytes: Optional[int] = None, check: Optional[bool] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        scorer = Scorer(metric, loss_fn)  # checks both
        infos, coverage = prunable_layers(model, extra_layers)
        self.device = resolve_device(device)
        self.model = model
        self.layers: list[LayerInfo] = infos
        self.coverage: Coverage = coverage
        self.metric_name: str = "accuracy" if metric is None else describe(metric)
        self.loss_fn = loss_fn
        self.seed = int(seed)
        old_device = model_device(model)
        model.to(self.device)
        try:
            self.data = EvalData(eval_data, self.device, batch_size)
            self.state = PruningState(model, infos, seed=self.seed)
            x, y = self.data.sample(1)
            self._uses, out = forward_check(model, self.state.weights, x, infos[0])  # a clear error if it cannot run
            scorer = scorer.check(out, y)
        except Exception:
            model.to(old_device)
            raise
        self.evaluator = Evaluator(self.state, self.data, scorer, self.metric_name, incremental, cache_budget_bytes, check)
        # what it takes to make the same session elsewhere (a distributed worker)
        self.settings = dict(metric=metric, loss_fn=loss_fn, extra_layers=list(extra_layers), seed=self.seed,
                             batch_size=batch_size, incremental=incremental, cache_budget_bytes=cache_budget_bytes,
                             check=check)
        self.sizes = StatsTable(self.state, self._uses)  # stats(): counts, bytes, MACs, cached per layer value
        self.version = 0  # bumped on every recorded change of weights or device
        self.last_sensitivity: Any = None  # the latest SensitivityResult, for allocation="sensitivity"
        self.last_compact: Any = None  # the CompactReport of the latest compact(measure=True)
        self._compact_version = -1  # stats() shows it while the weights are those it measured
        self.state.subscribe(self._on_event)

    def _on_event(self, event: Event) -> None:
        if event.kind not in ("trial-start", "trial-end"):
            self.version += 1
        if event.kind == "device":
            self.evaluator.rebuild()

    def layer(self, name: str) -> LayerInfo:
        return self.state.info(name)

    def check_sparsity(self, name: str, value: Any) -> float:
        """``value`` as a sparsity of layer ``name`` (a clear error otherwise)."""
        return _pruning.check_layer_sparsity(self.state, name, value)

    @property
    def sparsity(self) -> dict[str, float]:
        """Per layer, the fraction of weights the masks zero (pruned / params)."""
        return self.state.sparsity

    @property
    def pruned_counts(self) -> dict[str, int]:
        return self.state.counts

    @property
    def criteria(self) -> dict[str, str]:
        return {n: r.criterion for n, r in self.state.records.items()}

    @property
    def metric(self) -> Any:
        return self.evaluator.scorer.metric

    def mask(self, name: str) -> Tensor:
        """Keep-mask of a layer (True = kept), on the session's device."""
        return self.state.mask(name)

    def original_weight(self, name: str) -> Tensor:
        """The weights the layer's masks are computed from (read-only; do not modify)."""
        return self.state.base(name)

    def original_state(self) -> dict[str, Tensor]:
        """A copy of the model's state_dict as it was at construction (CPU tensors)."""
        return self.state.original_state()

    def total_sparsity(self) -> float:
        return self.state.total_sparsity()

    def importance(self, name: str, criterion: Union[str, Callable, Criterion] = "magnitude",
                   seed: Optional[int] = None) -> Tensor:
        """Per weight of layer ``name``, the key ``criterion`` ranks it by (lowest pruned first), from the base weights."""
        crit = get_criterion(criterion)
        self.state.refresh_calibration(crit)
        return self.state.keys([self.layer(name).name], crit, self.seed if seed is None else int(seed))[0]

    @property
    def patterns(self) -> dict[str, str]:
        """Per layer, the pattern its mask was set with."""
        return {n: r.pattern for n, r in self.state.records.items()}

    def mask_token(self, name: str) -> int:
        """Equal tokens mean the layer's mask is unchanged (for a view's caches)."""
        return self.state.record(name).token

    @property
    def lock(self) -> Any:
        """The state's re-entrant lock (hold it to read one state's numbers while other threads prune)."""
        return self.state.lock

    @property
    def in_trial(self) -> bool:
        """Whether a sweep holds trial masks in the model now (pruning and export wait)."""
        return self.state.in_trial

    def subscribe(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``listener(event)`` after every change (an ``Event`` naming the layers changed)."""
        return self.state.subscribe(listener)

    def set_sparsity(self, sparsities: Mapping[str, float], criterion: Union[str, Callable, Criterion] = "magnitude",
                     seed: Optional[int] = None, pattern: str = "unstructured", round_to: Optional[int] = None,
                     reconstruct: Union[bool, str] = False) -> "Session":
        """Prune each named layer to its pattern's count for ``s`` by ``criterion``; other layers keep theirs.
        ``pattern``: ``"unstructured"`` (``round(s * n)`` weights), ``"2:4"`` (N:M along the inputs), ``"kernel"``,
        ``"channels"`` (the fraction of the layer's channel group, coupled members zeroed as :meth:`compact` removes
        them; ``round_to=8`` keeps a multiple of 8) or ``"blocks"`` (1 removes a block). ``reconstruct=True``
        (``"exact"``, ``"sparsegpt"``): refit the kept weights to the calibration inputs (after :meth:`calibrate`)."""
        if isinstance(sparsities, Mapping):
            self._groups_for(pattern)
        _pruning.set_sparsity(self.state, sparsities, criterion, seed, pattern, round_to, reconstruct)
        return self

    def set_global_sparsity(self, sparsity: float, allocation: Union[str, Callable] = "global",
                            criterion: Union[str, Callable, Criterion] = "magnitude", seed: Optional[int] = None,
                            locked: Sequence[str] = (), pattern: str = "unstructured",
                            reconstruct: Union[bool, str] = False) -> "Session":
        """Prune to a total sparsity split across unlocked layers by ``allocation`` (locked layers count toward it);
        ``pattern="2:4"``: every layer it fits (the others named in a ``PatternWarning``)."""
        self._groups_for(pattern)
        _pruning.set_global_sparsity(self.state, sparsity, allocation, criterion, seed, locked, pattern,
                                     self.last_sensitivity, reconstruct)
        return self

    def _groups_for(self, pattern: Any) -> None:
        """Trace the channel groups first when ``pattern`` prunes them (validated by name)."""
        if get_pattern(pattern).grouped:
            self.groups

    @property
    def groups(self) -> Any:
        """The channel groups (``groups.Groups``: ``.groups``, ``.by_layer``, ``.excluded``), traced on first use."""
        if self.state.groups is None:  # traced once; the sample is drawn only then (a DataLoader starts an epoch)
            _channels.ensure_groups(self.state, self.data.sample(2)[0])
        return self.state.groups

    @property
    def channels(self) -> dict[str, tuple[int, int]]:
        """Per channel group: ``(kept, total)`` channels (every group, pruned or not)."""
        self.groups
        return _channels.kept(self.state)

    @property
    def heads(self) -> dict[str, tuple[int, int]]:
        """Per attention module with prunable heads: ``(kept, total)`` heads (``heads.py``; why a module has none:
        ``groups.heads_excluded``)."""
        self.groups
        return _channels.kept(self.state, heads=True)

    @property
    def blocks(self) -> dict[str, bool]:
        """Per removable block (residual or transformer block: the identity once zeroed), whether it is removed."""
        return {b: b in self.state.channels for b in self.groups.blocks}

    def channel_keep(self, group: str) -> Tensor:
        """The keep-mask over a group's channels (True = kept)."""
        self.groups
        return _channels.keep_of(self.state, group)

    def channel_scores(self, group: str, criterion: str = "l1", seed: Optional[int] = None) -> Tensor:
        """Importance of each channel of ``group`` (float64, lowest removed first; formulas in ``groups.py``)."""
        self.groups
        name, _ = _channels.criterion_of(self.state, criterion)
        return _channels.scores(self.state, group, name, seed)

    def reset(self) -> "Session":
        """Every parameter and buffer back to its construction-time bits (fine-tuning included)."""
        self.state.reset()
        return self

    def snapshot(self) -> Snapshot:
        """The pruning state now, for :meth:`restore` (undo/redo, before/after fine-tuning)."""
        return self.state.snapshot()

    def restore(self, snapshot: Snapshot) -> "Session":
        """Bring back a :meth:`snapshot` exactly."""
        self.state.restore(snapshot)
        return self

    @contextlib.contextmanager
    def dense(self) -> Iterator["Session"]:
        """Temporarily remove every mask (for baselines); the masks return on exit."""
        with self.state.trial({n: None for n, k in self.state.counts.items() if k}):
            yield self

    def calibrate(self, train_data: Any, samples: int = 512, batch_size: int = 64, criteria: Optional[Sequence[str]] = None,
                  hessian: str = "fisher", probes: int = 16, seed: int = 0, progress: bool = True) -> Any:
        """Prepare the data-aware criteria (``taylor``, ``obd``, ``wanda``) from the first ``samples`` of *training*
        data on the dense base weights; computed when first needed (or all ``criteria`` now), cached by weights, data
        and settings; Ctrl-C changes nothing. ``hessian="hutchinson"``: ``obd`` uses Hutchinson's diagonal. Also what
        ``reconstruct=`` and ``sparsegpt`` refit with: each layer's input Gram matrix (``calibration.input_grams``)."""
        from .calibration import make_request

        request = make_request(train_data, samples, batch_size, criteria, hessian, probes, seed, progress, self.device,
                               self.loss_fn if callable(self.loss_fn) else None, (self.data.inputs, self.data.targets))
        return self.state.calibrate(request)

    @property
    def calibration(self) -> Any:
        """The statistics of the last :meth:`calibrate` (``calibration.Calibration``), or None."""
        return self.state.calibration

    @property
    def calibration_passes(self) -> int:
        """How many times :meth:`calibrate` computed statistics (not served from its cache)."""
        return self.state.calibration_passes

    def evaluate(self, limit: Optional[int] = None) -> dict[str, float]:
        """``{metric_name: value, "loss": value}`` on the eval data (first ``limit`` samples), exact (``incremental.py``)."""
        return self.evaluator.evaluate(limit)

    def baseline(self, limit: Optional[int] = None) -> dict[str, float]:
        """``evaluate()`` of the original, unpruned model (cached)."""
        return self.evaluator.baseline(limit)

    def stats(self) -> Stats:
        """Per layer and total: params, nonzeros, sparsity, bytes, MACs, refit errors, all counted (``stats.py``)."""
        stats = self.sizes.table()
        if self.last_compact is not None and self._compact_version == self.version:
            stats.compact = self.last_compact
        return stats

    def dense_file_bytes(self) -> int:
        """Length of ``torch.save(model.state_dict())`` of the dense model (cached)."""
        return self.sizes.dense_file_bytes()

    def sparse_file_bytes(self) -> int:
        """Exact length of ``export(path, sparse=True)``'s file for the current weights."""
        return self.sizes.sparse_file_bytes()

    def to(self, device: DeviceLike) -> "Session":
        """Move model, original weights, masks and eval data to ``device`` in one call."""
        dev = resolve_device(device)
        if dev == self.device:
            return self
        self.data.to(dev)
        self.device = dev
        self.state.to(dev)  # its event rebuilds the evaluator
        return self

    def recipe(self, masks: Optional[bool] = None) -> dict[str, Any]:
        """What was pruned, reproducibly: per layer pattern, count, sparsity, criterion and seed; the mask bits
        (packed, base64) where a callable criterion cannot be recomputed, or for every layer with ``masks=True``."""
        return _recipes.build_recipe(self.state, type(self.model).__name__, masks)

    @staticmethod
    def load_recipe(path: Union[str, Path, Mapping[str, Any]]) -> dict[str, Any]:
        """Read and validate a recipe file (or dict); raises ValueError on anything malformed."""
        return _export.load_recipe(path)

    def apply_recipe(self, recipe: Union[str, Path, Mapping[str, Any]]) -> "Session":
        """Reproduce a recipe's masks on this model (checked against its layers first; all or nothing)."""
        data = _export.load_recipe(recipe)
        if data.get("channels") or self.state.channels:
            self.groups  # the recipe names channel groups: found before anything is checked
        _recipes.apply_recipe(self.state, data)
        return self

    def set_bits(self, bits: Mapping[str, Optional[int]], method: str = "uniform") -> "Session":
        """Quantize layers after pruning (``{layer: bits}``, None: float): ``"uniform"`` (per output channel; 2, 4, 8)
        or ``"kmeans"`` (Deep Compression's shared centroids; 1-8). Reversible like the masks."""
        if not isinstance(bits, Mapping):
            raise TypeError(f"set_bits takes a {{layer: bits}} dict (set_global_bits for every layer), got {type(bits).__name__}")
        self.state.set_quant({name: None if b is None else (b, method) for name, b in bits.items()})
        return self

    def set_global_bits(self, bits: Optional[int], method: str = "uniform") -> "Session":
        """:meth:`set_bits` for every prunable layer."""
        return self.set_bits({i.name: bits for i in self.layers}, method)

    @property
    def quant(self) -> dict[str, Optional[tuple[int, str]]]:
        """Per layer, ``(bits, method)`` of its quantization (None: float)."""
        return {n: r.quant for n, r in self.state.records.items()}

    @property
    def bits(self) -> dict[str, Optional[int]]:
        """Per layer, the bits its weights are quantized to (None: float)."""
        return {n: r.bits for n, r in self.state.records.items()}

    def export(self, path: Union[str, Path], sparse: bool = False) -> dict[str, Path]:
        """Write the pruned state_dict and its recipe (``{"model": path, "recipe": <stem>.recipe.json}``); ``sparse=True``:
        Deep Compression's Huffman-coded storage, ``stats().total["sparse_file_bytes"]`` long. Load: ``pl.load_state_dict``."""
        if self.state.in_trial:
            raise RuntimeError("cannot export while a sweep holds trial masks in the model; stop the sweep first")
        return _export.write_export(path, self.sizes.export_bytes(sparse), self.recipe())

    def export_onnx(self, path: Union[str, Path], check_samples: int = 256) -> Any:
        """The live model (masked, quantized values) as ONNX with a dynamic batch, checked in ONNX Runtime on
        ``check_samples`` eval samples (``onnx_export.export_onnx``; for a smaller file, export ``compact()``'s)."""
        from .onnx_export import export_onnx

        if self.state.in_trial:
            raise RuntimeError("cannot export while a sweep holds trial masks in the model; stop the sweep first")
        x = self.data.sample(min(check_samples, len(self.data)))[0]
        return export_onnx(self.model, x[:2], path, check_inputs=x)

    def compact(self, semi_structured: bool = False, measure: bool = True, check_samples: int = 256) -> nn.Module:
        """A new, physically smaller model (Torch-Pruning): removed channels taken out, other masks kept as zeros,
        checked against the masked model on ``check_samples`` samples (<= 1e-4 of the output scale); ``measure=True``
        measures both (``last_compact``, :meth:`stats`). ``semi_structured=True``: 2:4 CUDA weights instead."""
        from .workflows import compact as _compact

        if semi_structured:
            return _compact.semi_structured(self.state)
        self.groups
        example = self.data.sample(min(check_samples, len(self.data)))[0]
        small, report = _compact.compact_state(self.state, example, measure, str(self.device))
        if report is not None:
            self.last_compact, self._compact_version = report, self.version
        return small

    def to_torch_prune(self, model: nn.Module) -> nn.Module:
        """Hand this session's masks to ``model`` as ``torch.nn.utils.prune`` reparametrisation."""
        masks = {i.name: self.mask(i.name) for i in self.layers}
        return _export.to_torch_prune(model, masks, {i.name: i.param for i in self.layers})

    def rewind_to(self, state_dict: Mapping[str, Tensor]) -> "Session":
        """Lottery-ticket rewinding: every tensor back to ``state_dict``, pruned weights kept 0."""
        self.state.rewind_to(state_dict)
        return self

    def finetune(self, train_data: Any, epochs: Optional[float] = None, steps: Optional[int] = None, lr: float = 0.01,
                 schedule: str = "oneshot", target_sparsity: Optional[float] = None, allocation: Union[str, Callable] = "global",
                 rounds: int = 3, rewind_step: int = 0, restore: str = "last", optimizer: Union[str, Callable] = "sgd",
                 momentum: float = 0.9, weight_decay: float = 0.0, batch_size: int = 64, seed: int = 0,
                 progress: bool = True, on_step: Optional[Callable[[int, float], None]] = None,
                 criterion: Union[str, Callable, Criterion] = "magnitude", distill: Optional[dict] = None) -> Any:
        """Train with the masks held (pruned weights stay 0), on a ``schedule``: ``"oneshot"``, ``"iterative"``,
        ``"agp"`` (Zhu & Gupta) or ``"lottery"`` (rewind to ``rewind_step``); ``steps``/``epochs`` per phase;
        ``distill={"temperature": T, "alpha": a}`` (Hinton 2015). Ctrl-C keeps what was learned (``workflows/finetune``)."""
        settings = {k: v for k, v in locals().items() if k not in ("self", "train_data")}  # every argument, by name
        config = _finetune.FinetuneConfig(**settings, loss_fn=self.loss_fn if callable(self.loss_fn) else None)
        return _finetune.finetune(self.state, self.evaluator, train_data, config)

    def sensitivity(self, levels: Optional[Sequence[float]] = None, criterion: Union[str, Callable, Criterion] = "magnitude",
                    metric: Optional[str] = None, layers: Optional[Sequence[str]] = None, resume: Any = None,
                    incremental: bool = True, progress: bool = True, on_step: Optional[Callable[[dict], None]] = None,
                    should_stop: Optional[Callable[[], bool]] = None, executor: Any = None,
                    pattern: str = "unstructured", reconstruct: Union[bool, str] = False) -> Any:
        """Prune each layer alone to each level (default 0-0.95 by 0.05), evaluate, restore exactly: a
        ``SensitivityResult`` (Ctrl-C returns the partial one; ``resume=`` continues it). ``executor``: None,
        ``"ray"``, an address or a ``RayExecutor`` (bit for bit the same on CPU); ``pattern``, ``reconstruct`` as for set_sparsity."""
        if metric is not None and metric != self.metric_name:
            raise ValueError(f"metric {metric!r}: this session measures {self.metric_name!r}; pass metric= to the Session")
        from .workflows.distributed import resolve_executor

        self._groups_for(pattern)
        ex = resolve_executor(executor, self.settings)  # an unreachable cluster fails here, before any work
        self.last_sensitivity = _sensitivity.sweep(self.state, self.evaluator, levels, criterion, layers, resume,
                                                   incremental, progress, on_step, should_stop, executor=ex,
                                                   pattern=pattern, reconstruct=reconstruct)
        return self.last_sensitivity

    def plan(self, budget: Mapping[str, float], pattern: Optional[str] = None, criterion: Optional[str] = None,
             sensitivity: Any = None, levels: Optional[Sequence[float]] = None, batch_size: int = 1,
             apply: bool = False, max_rounds: int = 8, progress: bool = True) -> Any:
        """The most accurate plan found whose *measured* cost meets ``budget`` (``{"macs": 0.5}``: half the dense
        MACs; ``params``, ``file_bytes`` alike, or absolute; ``{"latency_ms": 10}`` at ``batch_size`` on this device)
        from a sensitivity sweep (``sensitivity=``, or one run now); a ``BudgetPlan`` (``planner.py``). The session is
        unchanged unless ``apply=True``."""
        from .planner import plan_budget

        if sensitivity is None:
            pat = get_pattern(pattern)
            crit = criterion or ("l1" if pat.grouped and not pat.removes_blocks else "magnitude")
            sensitivity = self.sensitivity(levels, crit, pattern=pat.name, progress=progress)
        else:
            self._groups_for(sensitivity.pattern)
            _sensitivity.check_current(sensitivity, self.state, pattern, criterion)
        example = self.data.sample(min(256, len(self.data)))[0]
        result = plan_budget(self.state, self.evaluator, self.sizes, self._uses, sensitivity, budget, example,
                             batch_size, max_rounds)
        if apply:
            self.set_sparsity(dict(result), criterion=result.criterion, pattern=result.pattern)
        return result

    def tradeoff(self, strategies: Sequence[str] = _tradeoff.DEFAULT_STRATEGIES,
                 compressions: Sequence[float] = _tradeoff.DEFAULT_COMPRESSIONS, finetune: Optional[dict] = None,
                 seeds: int = 1, cache: bool = True, progress: bool = True, executor: Any = None) -> Any:
        """Every strategy (``"lamp"``, ``"global/taylor"``, ``"channels/bn_scale"``...) at every compression (params /
        nonzeros), measured and cached on disk: a ``TradeoffResult``; ``finetune={"train_data", "steps"}`` also after."""
        from .workflows.distributed import resolve_executor

        ex = resolve_executor(executor, self.settings)
        loss = self.loss_fn if callable(self.loss_fn) else None
        if _tradeoff.needs_groups(strategies):
            self.groups  # found before any point
        return _tradeoff.run_tradeoff(self.state, self.evaluator, self.sizes, strategies, compressions, finetune, seeds,
                                      cache, progress, cache_dir(), loss, executor=ex)

    def __repr__(self) -> str:
        header = (f"Session({type(self.model).__name__}, device={self.device}, {len(self.layers)} prunable layers, "
                  f"{self.total_sparsity():.1%} sparse, eval on {len(self.data)} samples)")
        return describe_layers(self.state, header, self.coverage)
