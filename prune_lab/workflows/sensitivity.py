"""Layer sensitivity: prune one layer at a time to each level, measure, restore exactly.

The sweep evaluates incrementally (only the part of the model downstream of the swept layer is
recomputed, fed from cached activations), shows a progress bar, and on Ctrl-C returns the partial
result with the model restored bit for bit; ``resume=`` continues it.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import torch

from ..criteria import Criterion, get_criterion
from ..evaluate import Evaluator
from ..channels import unit_of, units
from ..masks import check_fraction, count_to_prune
from ..metrics import goodness
from ..patterns import Pattern, get_pattern, same_pattern
from ..state import PruningState, check_reconstruct

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_LEVELS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(20))  # 0.0 .. 0.95


class Plan(dict):
    """``{layer: sparsity}`` chosen from measured curves; ``predicted`` is the curves' guess of
    the metric after applying it (an additive model of per-layer drops, clipped to the best value
    measured and to [0, 1] for accuracy), never a measurement. It is relative to ``reference``:
    the state the sweep started from."""

    def __init__(self, sparsities: dict[str, float], predicted: float, reference: float, total_sparsity: float):
        super().__init__(sparsities)
        self.predicted = predicted
        self.reference = reference
        self.total_sparsity = total_sparsity

    def __repr__(self) -> str:
        per = ", ".join(f"{k}: {v:.1%}" for k, v in self.items())
        return (f"Plan({self.total_sparsity:.1%} total, predicted (not measured) {self.predicted:.4f} vs the sweep's "
                f"reference {self.reference:.4f}; {per})")


@dataclass
class SensitivityResult:
    """A layers x levels table of the metric and loss, one layer pruned at a time.

    ``reference`` is the model as the sweep found it (other layers at their sparsities then);
    ``dense`` the unpruned model. ``complete`` is False for an interrupted sweep, or one with
    ``missing`` points (a point that failed on every try; never filled in).
    """

    layers: list[str]
    levels: list[float]
    n_params: dict[str, int]
    current: dict[str, float]
    criterion: str
    metric: str
    reference: dict[str, float]
    dense: dict[str, float]
    records: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = False
    missing: list[dict[str, Any]] = field(default_factory=list)  # points that could not be measured, and why
    pattern: str = "unstructured"  # or "N:M": each level > 0 is that pattern
    reconstruct: str = ""  # "exact"/"sparsegpt"/"auto": every point's kept weights were refitted
    lower_is_better: bool = False  # the metric is better smaller (perplexity): a drop is a rise

    # ------------------------------------------------------------------ tables
    def table(self, key: Optional[str] = None) -> "torch.Tensor":
        """layers x levels float64 tensor of ``key`` (default: the metric); NaN where unmeasured."""
        key = key or self.metric
        t = torch.full((len(self.layers), len(self.levels)), math.nan, dtype=torch.float64)
        li = {n: i for i, n in enumerate(self.layers)}
        vi = {v: j for j, v in enumerate(self.levels)}
        for r in self.records:
            t[li[r["layer"]], vi[r["level"]]] = r[key]
        return t

    def curve(self, layer: str, key: Optional[str] = None) -> list[tuple[float, float]]:
        key = key or self.metric
        return sorted((r["level"], r[key]) for r in self.records if r["layer"] == layer)

    def done(self) -> set[tuple[str, float]]:
        return {(r["layer"], r["level"]) for r in self.records}

    # ------------------------------------------------------------------ io
    def to_csv(self, path: Union[str, Path, None] = None) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["layer", "level", self.metric, "loss"])
        w.writeheader()
        for r in self.records:
            w.writerow({"layer": r["layer"], "level": r["level"], self.metric: r[self.metric], "loss": r["loss"]})
        text = buf.getvalue()
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_json(self, path: Union[str, Path, None] = None) -> str:
        text = json.dumps(asdict(self), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, source: Union[str, Path]) -> "SensitivityResult":
        text = Path(source).read_text() if isinstance(source, Path) or (isinstance(source, str) and not source.lstrip().startswith("{")) else source
        try:
            data = json.loads(text)
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"not a SensitivityResult JSON: {e}") from None

    # ------------------------------------------------------------------ reading the curves
    def plot(self, key: Optional[str] = None) -> "Figure":
        from ..plots import sensitivity

        return sensitivity(self, key)

    def heatmap(self, key: Optional[str] = None) -> "Figure":
        from ..plots import sensitivity_heatmap

        return sensitivity_heatmap(self, key)

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"INCOMPLETE ({len(self.records)}/{len(self.layers) * len(self.levels)})"
        return (
            f"SensitivityResult({len(self.layers)} layers x {len(self.levels)} levels, {self.criterion}, {state}; "
            f"reference {self.metric} {self.reference[self.metric]:.4f})"
        )

    def lost(self, value: float) -> float:
        """How much worse ``value`` is than the reference (positive = worse; for a metric that
        is better smaller, such as perplexity, the rise)."""
        return self.goodness(self.reference[self.metric]) - self.goodness(value)

    def predict(self, drop: float) -> float:
        """The metric the additive model predicts after losing ``drop`` (clipped: :meth:`clip`)."""
        ref = self.reference[self.metric]
        return self.clip(ref + drop if self.lower_is_better else ref - drop)

    def goodness(self, value: float) -> float:
        """``value`` turned so that larger is better."""
        return goodness(value, self.lower_is_better)

    def drop(self, layer: str, level: float) -> float:
        """Metric lost at ``level`` relative to the reference (positive = worse)."""
        for lv, v in self.curve(layer):
            if lv == level:
                return self.lost(v)
        raise KeyError((layer, level))

    def ranking(self, max_drop: float = 0.01) -> dict[str, float]:
        """Per layer, the largest level such that every measured level up to it loses at most
        ``max_drop`` of the metric; layers sorted most prunable first."""
        out = {}
        for layer in self.layers:
            best = 0.0
            for level, v in self.curve(layer):
                if self.lost(v) > max_drop + 1e-12:
                    break
                best = level
            out[layer] = best
        return dict(sorted(out.items(), key=lambda kv: (-kv[1], self.layers.index(kv[0]))))

    def allocate(
        self,
        target_sparsity: Optional[float] = None,
        max_drop: Optional[float] = None,
        locked: Optional[dict[str, int]] = None,
    ) -> Plan:
        """Per-layer sparsities from the measured curves, greedily by metric lost per weight pruned.

        ``target_sparsity``: the plan prunes exactly ``round(target * total)`` weights (the last
        step is a partial one, its cost interpolated). ``max_drop``: the largest plan whose
        predicted drop (sum of per-layer drops) stays within it. Exactly one must be given.
        ``locked``: layers held at a pruned count; they count toward the target and are not moved.
        """
        locked = dict(locked or {})
        if (target_sparsity is None) == (max_drop is None):
            raise ValueError("allocate needs exactly one of target_sparsity=... or max_drop=...")
        total = sum(self.n_params[n] for n in self.layers)
        free = [n for n in self.layers if n not in locked]
        curves = {n: [(0.0, 0.0)] + [(lv, self.lost(v)) for lv, v in self.curve(n) if lv > 0] for n in free}
        max_reach = sum(curves[n][-1][0] * self.n_params[n] for n in free) + sum(locked.values())
        if target_sparsity is not None:
            if not 0 <= target_sparsity <= 1 or math.isnan(target_sparsity):
                raise ValueError(f"target_sparsity {target_sparsity!r} is outside [0, 1]")
            goal = count_to_prune(target_sparsity, total)
            if goal > round(max_reach):
                raise ValueError(
                    f"target_sparsity {target_sparsity:.3f} needs {goal} pruned weights but the measured levels reach "
                    f"only {max_reach / total:.3f}; sweep higher levels"
                )
        pos = {n: 0 for n in free}  # index into the layer's curve
        pruned = {n: 0 for n in free}
        drop = 0.0
        if target_sparsity is not None and goal <= sum(locked.values()):
            goal = sum(locked.values())  # the locked layers alone reach it
            free, curves = [], {}
        while free:
            best = self._cheapest_step(free, curves, pos, pruned)
            if best is None:
                break
            n, j, add = best
            step_drop = curves[n][j][1] - curves[n][pos[n]][1]
            if target_sparsity is not None:
                have = sum(pruned.values()) + sum(locked.values())
                if have + add >= goal:  # partial last step
                    need = goal - have
                    drop += step_drop * need / add
                    pruned[n] += need
                    break
            elif drop + step_drop > max_drop + 1e-12:
                # this step is too costly; drop it from consideration and keep looking
                curves[n] = curves[n][: j]
                if len(curves[n]) <= pos[n] + 1:
                    curves[n] = curves[n][: pos[n] + 1]
                continue
            drop += step_drop
            pruned[n] += add
            pos[n] = j
        pruned.update(locked)
        sparsities = {n: pruned[n] / self.n_params[n] for n in self.layers}
        return Plan(sparsities, self.predict(drop), self.reference[self.metric],
                    sum(pruned.values()) / total)

    def _cheapest_step(self, free: Sequence[str], curves: dict[str, list[tuple[float, float]]], pos: dict[str, int],
                       pruned: dict[str, int]) -> Optional[tuple[str, int, int]]:
        """The next greedy step ``(layer, curve index, weights added)``: the least metric lost
        per weight pruned from any layer's current point to any later one (ties: the larger
        step); None when no layer can go further."""
        best = None
        for n in free:
            c, i = curves[n], pos[n]
            for j in range(i + 1, len(c)):
                add = round(c[j][0] * self.n_params[n]) - pruned[n]
                if add <= 0:
                    continue
                key = ((c[j][1] - c[i][1]) / add, -add)
                if best is None or key < best[0]:
                    best = (key, n, j, add)
        return None if best is None else best[1:]

    def clip(self, predicted: float) -> float:
        """A prediction kept within what is possible: never better than the best value measured
        (the per-layer drops add up without bound), never outside [0, 1] for accuracy."""
        measured = [r[self.metric] for r in self.records] + [self.reference[self.metric]]
        if self.lower_is_better:
            return max(predicted, min(measured))
        predicted = min(predicted, max(measured))
        if self.metric == "accuracy":
            predicted = min(max(predicted, 0.0), 1.0)
        return predicted


# ---------------------------------------------------------------------- the sweep
def sweep(
    state: PruningState,
    evaluator: Evaluator,
    levels: Optional[Sequence[float]] = None,
    criterion: Union[str, Callable, Criterion] = "magnitude",
    layers: Optional[Sequence[str]] = None,
    resume: Optional[SensitivityResult] = None,
    incremental: bool = True,
    progress: bool = True,
    on_step: Optional[Callable[[dict[str, Any]], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    seed: Optional[int] = None,
    executor: Any = None,
    pattern: str = "unstructured",
    reconstruct: Any = False,
) -> SensitivityResult:
    """Prune each layer alone to each level (the others as they are), evaluate, put it back.

    Every trial mask lives inside ``state.trial``, so the model is restored exactly whatever
    happens; Ctrl-C or ``should_stop()`` returns the partial result (``complete=False``).
    ``executor`` (a ``distributed.RayExecutor``) measures the points on its workers instead.

    ``pattern="channels"``: each *channel group* (named by its first producing layer) loses
    each level's fraction of its channels, lowest channel score first (``criterion``: a channel criterion; at least one
    channel stays); ``n_params`` then holds each group's channel count."""
    seed = state.seed if seed is None else int(seed)
    pat = get_pattern(pattern)
    if pat.grouped:
        return _group_sweep(state, evaluator, pat, levels, criterion, layers, resume, incremental, progress,
                            on_step, should_stop, executor)
    crit = get_criterion(criterion)
    method = "sparsegpt" if crit.reconstructs else check_reconstruct(reconstruct)
    if method and executor is not None:
        raise ValueError("a sweep with reconstruction (reconstruct=..., or criterion 'sparsegpt') runs in this process "
                         "only; pass executor=None")
    state.refresh_calibration(crit, bool(method))  # after fine-tuning: the statistics of the weights now
    pattern = pat.name
    levels, names = _points(state, pat, levels, layers)
    if resume is not None:
        levels, names = _resumed(resume, levels, crit.name, pattern)
    reference = evaluator.evaluate()
    result = resume or SensitivityResult(
        layers=names,
        levels=levels,
        n_params={n: state.layer(n).n_params for n in names},
        current=state.sparsity,
        criterion=crit.name,
        metric=evaluator.metric_name,
        reference=reference,
        dense=evaluator.baseline(),
        pattern=pattern, reconstruct=method, lower_is_better=evaluator.lower_is_better,
    )
    if executor is not None:
        result.complete = False
        done = result.done()
        todo = [(n, lv) for n in names for lv in levels if (n, lv) not in done]
        result.missing = []  # retried now
        return executor.sensitivity(state, evaluator, result, todo, crit, seed, incremental, progress, on_step, should_stop,
                                    pattern)
    return _run(state, evaluator, result, progress, on_step, should_stop,
                lambda n, lv: measure_point(state, evaluator, crit, seed, n, lv, incremental, pattern, method))


def check_current(result: SensitivityResult, state: PruningState, pattern: Optional[str] = None,
                  criterion: Optional[str] = None) -> None:
    """A clear error unless ``result`` was swept on the state as it is now, with ``pattern`` and
    ``criterion`` (when given): curves of another state predict nothing about this one."""
    if pattern is not None and not same_pattern(result.pattern, pattern):
        raise ValueError(f"the sensitivity result was swept with pattern {result.pattern!r}, not {pattern!r}")
    if criterion is not None and criterion != result.criterion:
        raise ValueError(f"the sensitivity result was swept with criterion {result.criterion!r}, not {criterion!r}")
    if get_pattern(result.pattern).grouped:
        channels = state.channels
        now = {g: channels[g].count / result.n_params[g] if g in channels else 0.0 for g in result.layers}
    else:
        now = {n: state.sparsity[n] for n in result.layers}
    for name in result.layers:
        if abs(now[name] - result.current.get(name, 0.0)) > 1e-12:
            raise ValueError(f"the sensitivity result was swept with {name!r} at sparsity {result.current.get(name, 0.0):.1%}, "
                             f"but it is at {now[name]:.1%} now: sweep again (sensitivity(...)) on the state as it is")


def _points(state: PruningState, pat: Pattern, levels: Optional[Sequence[float]],
            layers: Optional[Sequence[str]]) -> tuple[list[float], list[str]]:
    """The sweep's checked levels (a pattern with fixed levels allows only those) and layers
    (by default every layer the pattern fits)."""
    fixed = pat.levels()
    levels = list((fixed or DEFAULT_LEVELS) if levels is None else levels)
    if not levels:
        raise ValueError("levels is empty; give sparsities in [0, 1], e.g. (0.0, 0.5, 0.9)")
    for lv in levels:
        check_fraction(lv, "sensitivity level")
        if fixed is not None and lv not in fixed:
            raise ValueError(f"pattern {pat.name}: levels can only be {' and '.join(f'{f:g}' for f in fixed)}, got {lv!r}")
    names = [i.name for i in state.layers if pat.fits(i)] if layers is None else list(layers)
    for n in names:
        pat.check(state.layer(n))
    return levels, names


def _resumed(resume: SensitivityResult, levels: list[float], criterion: str, pattern: str) -> tuple[list[float], list[str]]:
    """The interrupted sweep's levels and layers, once its criterion and pattern match."""
    if resume.levels != levels and levels != list(DEFAULT_LEVELS):
        raise ValueError("resume: levels differ from the interrupted sweep's")
    if resume.criterion != criterion:
        raise ValueError(f"resume: the interrupted sweep used criterion {resume.criterion!r}, not {criterion!r}")
    if not same_pattern(resume.pattern, pattern):
        raise ValueError(f"resume: the interrupted sweep used pattern {resume.pattern!r}, not {pattern!r}")
    return resume.levels, resume.layers


def _group_sweep(state: PruningState, evaluator: Evaluator, pat: Pattern, levels: Optional[Sequence[float]],
                 criterion: Any, layers: Optional[Sequence[str]], resume: Optional[SensitivityResult], incremental: bool,
                 progress: bool, on_step: Optional[Callable[[dict[str, Any]], None]],
                 should_stop: Optional[Callable[[], bool]], executor: Any) -> SensitivityResult:
    """The sweep over channel groups (each level a fraction of a group's channels, lowest
    channel score first) or removable blocks (levels 0 kept, 1 removed), in this process.
    ``n_params`` holds each group's channel count (1 for a block)."""
    groups = state.groups
    blocks = pat.removes_blocks
    pattern = pat.name
    if groups is None:
        raise RuntimeError(f"a {pattern} sweep needs the session's groups (use Session.sensitivity)")
    if blocks:
        criterion = "block"
        names = list(groups.blocks) if layers is None else [groups.block(n).name for n in layers]
        levels = [0.0, 1.0] if levels is None else list(levels)
        if any(lv not in (0.0, 1.0) for lv in levels):
            raise ValueError(f"pattern 'blocks': levels are 0 (kept) and 1 (removed), got {levels}")
        scores = {b: torch.zeros(1, dtype=torch.float64) for b in names}
    else:
        names = list(units(groups, pat.heads)) if layers is None else \
            list(dict.fromkeys(unit_of(groups, n, pat.heads).name for n in layers))
        levels = list(DEFAULT_LEVELS if levels is None else levels)
        for lv in levels:
            check_fraction(lv, "sensitivity level")
        from ..channels import criterion_of
        from ..channels import scores as channel_scores

        criterion = criterion_of(state, criterion)[0]  # checked, and its statistics fresh
        scores = {g: channel_scores(state, g, criterion) for g in names}
    if resume is not None and not same_pattern(resume.pattern, pattern):
        raise ValueError(f"resume: the interrupted sweep used pattern {resume.pattern!r}, not {pattern!r}")
    sizes = {g: groups.get(g).size for g in names}
    result = resume or SensitivityResult(
        layers=names, levels=levels, n_params=sizes,
        current={g: (state.channels[g].count / sizes[g] if g in state.channels else 0.0) for g in names},
        criterion=criterion, metric=evaluator.metric_name, reference=evaluator.evaluate(), dense=evaluator.baseline(),
        pattern=pattern, lower_is_better=evaluator.lower_is_better)
    if executor is not None:
        result.complete = False
        done = result.done()
        todo = [(g, lv) for g in result.layers for lv in result.levels if (g, lv) not in done]
        result.missing = []  # retried now
        return executor.sensitivity(state, evaluator, result, todo, result.criterion, 0, incremental, progress, on_step,
                                    should_stop, pattern, scores={g: sc.detach().cpu() for g, sc in scores.items()})
    return _run(state, evaluator, result, progress, on_step, should_stop,
                lambda g, lv: measure_channels(state, evaluator, g, lv, scores[g], incremental))


def _run(state: PruningState, evaluator: Evaluator, result: SensitivityResult, progress: bool,
         on_step: Optional[Callable[[dict[str, Any]], None]], should_stop: Optional[Callable[[], bool]],
         measure: Callable[[str, float], dict[str, Any]]) -> SensitivityResult:
    """The points ``result`` lacks, measured in this process; Ctrl-C or ``should_stop()``
    returns it partial."""
    from tqdm.auto import tqdm

    result.complete = False
    done = result.done()
    todo = [(n, lv) for n in result.layers for lv in result.levels if (n, lv) not in done]
    result.missing = []
    total = len(result.layers) * len(result.levels)
    bar = tqdm(total=total, initial=total - len(todo), desc="sensitivity", disable=not progress, leave=False)
    try:
        with state.trial():  # listeners see one sweep, not every point
            for name, level in todo:
                if should_stop is not None and should_stop():
                    raise KeyboardInterrupt
                record = measure(name, level)
                result.records.append(record)
                bar.update(1)
                if on_step is not None:
                    on_step(record)
        result.complete = True
    except KeyboardInterrupt:
        pass  # the partial result is returned, marked incomplete
    finally:
        bar.close()
    return result


def measure_channels(state: PruningState, evaluator: Evaluator, group: str, level: float, scores: "torch.Tensor",
                     incremental: bool = True) -> dict[str, Any]:
    """One channel sweep point: ``group`` losing ``level`` of its channels (at most all but
    one), the lowest ``scores`` first; the readers' columns are zeroed, which computes exactly
    what removing the channels computes."""
    masks, members = channel_point_masks(state, group, level, scores)
    with state.trial(masks, members):
        r = evaluator.evaluate(commit=False, incremental=incremental)
    return {"layer": group, "level": level, evaluator.metric_name: r[evaluator.metric_name], "loss": r["loss"]}


def measure_point(state: PruningState, evaluator: Evaluator, crit: Criterion, seed: int, name: str, level: float,
                  incremental: bool = True, pattern: str = "unstructured", reconstruct: str = "") -> dict[str, Any]:
    """One sweep point: ``name`` pruned to ``level`` by ``crit`` (the others as they are),
    evaluated, put back. The same code runs in-process and on a distributed worker.
    ``reconstruct``: the point's kept weights refitted (``state.compute`` gives mask and values)."""
    with state.trial({name: point_mask(state, crit, seed, get_pattern(pattern), name, level, reconstruct)}):
        r = evaluator.evaluate(commit=False, incremental=incremental)
    return {"layer": name, "level": level, evaluator.metric_name: r[evaluator.metric_name], "loss": r["loss"]}


def point_mask(state: PruningState, crit: Criterion, seed: int, pat: Pattern, name: str, level: float,
               reconstruct: str = "") -> Any:
    """What a sweep point writes for layer ``name`` at ``level``: None (dense), its mask, or a
    ``(mask, values)`` pair when its kept weights are refitted."""
    info = state.layer(name)
    k = pat.count(info, pat.snap(level, info))
    if not k:
        return None
    if reconstruct:
        r = state.compute({name: k}, crit, seed, pattern=pat.name, reconstruct=reconstruct)[name]
        return (r.mask, r.values)
    mask = pat.mask(info, k, lambda: state.keys([name], crit, seed)[0], lambda: state.scores(name, crit, seed))
    return mask.to(state.weights[name].device)


def group_removal(state: PruningState, group: str, level: float) -> int:
    """Channels a sweep point removes from ``group``: ``level`` of them, at most all but one
    class (a block is one channel, removed whole)."""
    grp = state.groups.get(group)
    block = group in state.groups.blocks
    return min(grp.removal(level), grp.size - (0 if block else grp.period))


def channel_point_masks(state: PruningState, group: str, level: float,
                        scores: "torch.Tensor") -> tuple[dict[str, Any], dict[str, "torch.Tensor"]]:
    """``(layer masks, member masks)`` a channel sweep point writes: ``group`` losing
    :func:`group_removal` channels, the lowest ``scores`` first."""
    k = group_removal(state, group, level)
    return state.channel_trial_masks(group, state.groups.get(group).keep(scores, k)) if k else ({}, {})
