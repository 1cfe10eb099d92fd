"""Budgets in, per-layer plans out, and every budget figure measured on the planned model.

A budget is one of ``macs``, ``params``, ``file_bytes`` or ``latency_ms``. The plan is chosen
on the sensitivity curves (one layer or channel group pruned at a time, measured): a
multiple-choice knapsack, solved exactly by dynamic programming over ``BINS`` cost bins,
picks one measured level per layer to lose the least metric (per-layer drops added up)
while the *predicted* savings (also added up) reach the budget. Savings do not add up
exactly (a layer between two pruned channel groups loses both factors; a compressed file
codes gaps), so the plan is then applied, its cost **measured** (counted MACs and
parameters of the compact model, the written file's bytes, timed latency), and re-planned
until the measured cost meets the budget: the asked saving grows by the measured miss, and
then bisects back towards the least saving that met it. Among the plans that met it, the
one with the best *measured* metric is returned; a budget no measured level can reach is
refused with what the deepest plan measured. The state is left as it was.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
from torch import Tensor

from .evaluate import Evaluator
from .measure import count_macs, model_macs
from .patterns import Pattern, get_pattern
from .state import PruningState

if TYPE_CHECKING:
    from .stats import StatsTable
    from .workflows.sensitivity import SensitivityResult

BUDGET_KEYS = ("macs", "params", "file_bytes", "latency_ms")
BINS = 400  # cost resolution of the knapsack: 1/400 of the saving asked
MAX_ROUNDS = 8  # plans measured at most while meeting the budget
REFINE = 48  # plans measured at most in the local search after it


@dataclass
class Budget:
    """One budget: ``key``, the absolute ``limit`` (MACs per sample, parameters, bytes, ms),
    what was ``asked`` (a value <= 1 for macs/params/file_bytes is a fraction of ``dense``)
    and the ``dense`` model's measured figure."""

    key: str
    limit: float
    asked: float
    dense: float


def parse_budget(budget: Any, pattern: Pattern) -> tuple[str, float]:
    """``(key, asked value)`` of a one-entry budget dict, checked (a clear error otherwise)."""
    if not isinstance(budget, Mapping) or len(budget) != 1:
        raise ValueError(f"budget must be one {{key: value}} with key one of {', '.join(BUDGET_KEYS)} "
                         f"(e.g. {{'macs': 0.5}}: half the dense MACs), got {budget!r}")
    (key, value), = budget.items()
    if key not in BUDGET_KEYS:
        raise ValueError(f"budget key {key!r} is not one of {', '.join(BUDGET_KEYS)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"budget {key}: {value!r} must be a positive number (<= 1: a fraction of the dense model's; "
                         "latency_ms: milliseconds)")
    if key == "latency_ms" and not pattern.structured:
        raise ValueError(f"budget latency_ms with pattern {pattern.name!r}: its zeros run on dense kernels here, so the "
                         "measured latency does not fall; plan latency with pattern='channels' (or 'blocks')")
    return key, float(value)


@dataclass
class BudgetPlan(dict):
    """``{layer or channel group: sparsity}``, ready for ``set_sparsity(plan, pattern=plan.pattern,
    criterion=plan.criterion)``. ``predicted``: the curves' additive guesses of the metric and
    the cost; ``measured``: the metric evaluated and the costs measured on the planned model
    (``costs``: every budget figure measured there); ``rounds``: each plan measured on the way."""

    sparsities: dict[str, float] = field(default_factory=dict)
    pattern: str = "unstructured"
    criterion: str = "magnitude"
    budget: Optional[Budget] = None
    metric: str = "accuracy"
    predicted: dict[str, float] = field(default_factory=dict)
    measured: dict[str, float] = field(default_factory=dict)
    costs: dict[str, float] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    search: str = f"multiple-choice knapsack over the sensitivity curves ({BINS} cost bins, exact DP), re-planned on measured cost"

    def __post_init__(self) -> None:
        self.update(self.sparsities)

    def __repr__(self) -> str:
        b = self.budget
        assert b is not None
        per = ", ".join(f"{k}: {v:.0%}" for k, v in self.items() if v)
        return (f"BudgetPlan({b.key} <= {b.limit:,.4g} (dense {b.dense:,.4g}); measured {b.key} {self.measured[b.key]:,.4g}, "
                f"{self.metric} {self.measured[self.metric]:.4f} (predicted {self.predicted[b.key]:,.4g} and "
                f"{self.predicted[self.metric]:.4f}); {self.pattern}, {len(self.rounds)} plans measured; {per or 'nothing pruned'})")


class CostMeter:
    """Measures the budget figures of the state's model as it is now: for a structured pattern
    on the compact model (its counted MACs, parameters, ``torch.save`` bytes, median latency),
    otherwise on the masked model (MACs of nonzero weights, nonzero parameters, the compressed
    export's exact bytes; dense kernels, so latency is not planned)."""

    def __init__(self, state: PruningState, sizes: "StatsTable", example: Tensor, batch_size: int, repeats: int = 20):
        self.state, self.sizes, self.example = state, sizes, example
        self.batch_size, self.repeats = batch_size, repeats

    def dense(self, key: str) -> float:
        """The unpruned model's figure (the model at full shape, masks lifted)."""
        state = self.state
        with state.trial({n: None for n, k in state.counts.items() if k}):
            if key == "macs":
                return float(model_macs(state.model, self.example[:1]))
            if key == "params":
                return float(sum(p.numel() for p in {id(p): p for p in state.model.parameters()}.values()))
            if key == "file_bytes":
                return float(self.sizes.dense_file_bytes())
            return self._latency(state.model)

    def measure(self, pattern: Pattern, keys: tuple[str, ...]) -> dict[str, float]:
        if pattern.structured and self.state.channels:
            from .export import serialize
            from .workflows.compact import compact_state

            small, _ = compact_state(self.state, self.example, measure=False)
            out = {"macs": float(model_macs(small, self.example[:1])),
                   "params": float(sum(p.numel() for p in small.parameters())),
                   "file_bytes": float(len(serialize({k: v.detach().cpu() for k, v in small.state_dict().items()})))}
            model = small
        elif pattern.structured:  # nothing removed: the model itself
            out = {k: self.dense(k) for k in ("macs", "params", "file_bytes")}
            model = self.state.model
        else:
            total = self.sizes.table().total
            out = {"macs": float(total["effective_macs"]), "params": float(total["model_nonzeros"]),
                   "file_bytes": float(total["sparse_file_bytes"])}  # the same compressed plan, computed once
            model = self.state.model
        if "latency_ms" in keys:
            out["latency_ms"] = self._latency(model)
        return out

    def _latency(self, model: torch.nn.Module) -> float:
        from .runtime import latency

        return latency(model, self.example, batch_sizes=(self.batch_size,), repeats=self.repeats).ms[self.batch_size]


def point_savings(state: PruningState, result: "SensitivityResult", pattern: Pattern, uses: Mapping[str, list],
                  key: str, dense: Mapping[str, float]) -> dict[str, list[float]]:
    """Per layer (or group), the predicted saving of ``key`` at each measured level relative to
    the state now: counted in a trial of that one point (nonzero parameters of the layers it
    touches, their nonzero MACs); bytes as the element size per parameter saved; latency in
    proportion to MACs. Predictions only: the plan's own figures are measured."""
    out: dict[str, list[float]] = {}
    for name in result.layers:
        row = []
        for level in result.levels:
            masks, members = _point_masks(state, result, pattern, name, level)
            before = _counted(state, uses, masks, members)
            with state.trial(masks, members):
                after = _counted(state, uses, masks, members)
            params, macs = before[0] - after[0], before[1] - after[1]
            row.append({"params": params, "macs": macs, "file_bytes": params * before[2],
                        "latency_ms": dense["latency_ms"] * macs / dense["macs"] if "latency_ms" in dense else 0.0}[key])
        out[name] = row
    return out


def _point_masks(state: PruningState, result: "SensitivityResult", pattern: Pattern, name: str,
                 level: float) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The masks a sweep point writes (as ``workflows.sensitivity`` measured it)."""
    from .criteria import get_criterion
    from .workflows.sensitivity import channel_point_masks, point_mask

    if pattern.grouped:
        from .channels import scores

        sc = torch.zeros(1, dtype=torch.float64) if pattern.removes_blocks else scores(state, name, result.criterion)
        return channel_point_masks(state, name, level, sc)
    return {name: point_mask(state, get_criterion(result.criterion), state.seed, pattern, name, level)}, {}


def _counted(state: PruningState, uses: Mapping[str, list], masks: Mapping[str, Any],
             members: Mapping[str, Tensor]) -> tuple[float, float, int]:
    """(nonzero parameters, nonzero MACs, bytes per element) of the layers and members touched."""
    params = dict(state.model.named_parameters(remove_duplicate=False))
    nnz = macs = 0.0
    size = 4
    for name in masks:
        w = state.weights[name]
        n = int(torch.count_nonzero(w.detach()))
        nnz += n
        macs += count_macs(w, uses.get(name, []), n)[1]
        size = w.element_size()
    for key in members:
        nnz += int(torch.count_nonzero(params[key].detach()))
    return nnz, macs, size


def knapsack(drops: Mapping[str, list[float]], savings: Mapping[str, list[float]], need: float,
             bins: int = BINS) -> Optional[dict[str, int]]:
    """One option index per layer minimising the summed drop while the summed saving reaches
    ``need`` (None when no choice reaches it). Savings are floored to units of ``need / bins``,
    so a choice found saves at least ``need`` by the additive model; the top bin holds every
    total at or above it. Exact for that model (dynamic programming over the units)."""
    names = list(drops)
    if need <= 0:
        return {n: min(range(len(drops[n])), key=lambda j: (drops[n][j], -savings[n][j])) for n in names}
    unit = need / bins
    best = torch.full((bins + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    index = torch.arange(bins + 1)
    trail = []  # per layer: (option picked, bin it came from) for every bin
    for n in names:
        new = torch.full_like(best, math.inf)
        pick = torch.full((bins + 1,), -1, dtype=torch.long)
        came = torch.zeros(bins + 1, dtype=torch.long)
        for j, (d, s) in enumerate(zip(drops[n], savings[n])):
            u = min(max(int(math.floor(s / unit + 1e-9)), 0), bins)
            src = (index - u).clamp(min=0)
            cand = torch.where(index - u >= 0, best[src], torch.full_like(best, math.inf))
            top = int(torch.argmin(best[bins - u:])) + bins - u  # every total from here on reaches the top
            cand[bins], src[bins] = best[top], top
            cand = cand + d
            better = cand < new
            new, pick, came = torch.where(better, cand, new), torch.where(better, j, pick), torch.where(better, src, came)
        best = new
        trail.append((pick, came))
    if not math.isfinite(float(best[bins])):
        return None
    choice, b = {}, bins
    for n, (pick, came) in zip(reversed(names), reversed(trail)):
        choice[n], b = int(pick[b]), int(came[b])
    return choice


@dataclass
class Options:
    """Per layer (or group), what the plan can choose: ``levels`` (None: the layer as it is),
    their measured ``drops`` of the metric and predicted ``savings`` of the budget figure.
    Levels that would un-prune a layer (a negative saving) are not offered."""

    levels: dict[str, list[Optional[float]]]
    drops: dict[str, list[float]]
    savings: dict[str, list[float]]

    def sparsities(self, choice: Mapping[str, int]) -> dict[str, float]:
        return {n: self.levels[n][j] for n, j in choice.items() if self.levels[n][j] is not None}  # type: ignore[misc]

    def deepest(self) -> dict[str, int]:
        return {n: max(range(len(s)), key=lambda j: s[j]) for n, s in self.savings.items()}

    def most(self) -> float:
        return sum(max(s) for s in self.savings.values())


def options(state: PruningState, result: "SensitivityResult", pattern: Pattern, uses: Mapping[str, list], key: str,
            dense: Mapping[str, float]) -> Options:
    """The knapsack's items from the sweep's curves and each point's predicted saving."""
    from .workflows.sensitivity import group_removal

    saved = point_savings(state, result, pattern, uses, key, dense)
    levels: dict[str, list[Optional[float]]] = {}
    drops: dict[str, list[float]] = {}
    savings: dict[str, list[float]] = {}
    for name in result.layers:
        measured = dict(result.curve(name))
        levels[name], drops[name], savings[name] = [None], [0.0], [0.0]
        for level, s in zip(result.levels, saved[name]):
            if level in measured and s > 0:
                value = group_removal(state, name, level) / state.groups.get(name).size if pattern.grouped else level
                levels[name].append(value)
                drops[name].append(result.lost(measured[level]))
                savings[name].append(float(s))
    return Options(levels, drops, savings)


def plan_budget(state: PruningState, evaluator: Evaluator, sizes: "StatsTable", uses: Mapping[str, list],
                result: "SensitivityResult", budget: Any, example: Tensor, batch_size: int = 1,
                max_rounds: int = MAX_ROUNDS, repeats: int = 20, refine: int = REFINE) -> BudgetPlan:
    """The most accurate plan found whose *measured* cost meets ``budget`` (see the module
    docstring), from ``result``'s curves (a sweep of the state as it is now, any pattern).
    ``example``: inputs for counting MACs and timing (``batch_size`` samples per timed call).
    ``refine``: at most this many more plans measured in a local search from the best (one
    layer a level lighter, or one lighter and another deeper), kept when they meet the budget
    with a better measured metric. Raises ValueError, with the deepest plan's measured cost,
    when no plan meets it. The state is restored exactly."""
    pat = get_pattern(result.pattern)
    key, asked = parse_budget(budget, pat)
    if not result.records:
        raise ValueError("the sensitivity result has no measured points; run the sweep first")
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds!r}")
    meter = CostMeter(state, sizes, example, batch_size, repeats)
    dense = {k: meter.dense(k) for k in dict.fromkeys((key, "macs"))}
    limit = asked * dense[key] if key != "latency_ms" and asked <= 1 else asked
    target = Budget(key, limit, asked, dense[key])
    opts = options(state, result, pat, uses, key, dense)
    now = meter.measure(pat, (key,))[key]
    search = _Search(state, evaluator, meter, pat, result, opts, target, now)
    need = now - limit
    for round_ in range(max_rounds):
        if round_ == max_rounds - 1 and not search.met:
            need = opts.most()  # the last try: the deepest plan
        need = search.step(need)
        if need is None:
            break
    if not search.met:
        deep = search.measure(opts.deepest(), math.inf)
        raise ValueError(
            f"budget {key} <= {limit:,.6g} ({asked:g} asked; dense {dense[key]:,.6g}) is out of reach with pattern "
            f"{pat.name!r} at the levels swept: pruning every {'group' if pat.grouped else 'layer'} to its deepest measured "
            f"level measures {key} {deep['cost'][key]:,.6g}; sweep higher levels or use a structured pattern")
    best = search.refine(max(search.met, key=lambda r: (result.goodness(r[result.metric]), -r["cost"][key])), refine)
    return BudgetPlan(opts.sparsities(best["choice"]), pat.name, result.criterion, target, result.metric,
                      {result.metric: best["predicted_metric"], key: best["predicted_cost"]},
                      {result.metric: best[result.metric], key: best["cost"][key]}, best["cost"],
                      [{k: v for k, v in r.items() if k != "choice"} for r in search.rounds])


class _Search:
    """The plans measured so far, and the next saving to ask for: more by the measured miss
    until one meets the budget, then bisecting between the largest that missed and the
    smallest that met (never a plan measured twice)."""

    def __init__(self, state: PruningState, evaluator: Evaluator, meter: CostMeter, pattern: Pattern,
                 result: "SensitivityResult", opts: Options, target: Budget, now: float):
        self.now = now  # the budget figure of the state as the plan found it
        self.state, self.evaluator, self.meter, self.pattern = state, evaluator, meter, pattern
        self.result, self.opts, self.target = result, opts, target
        self.rounds: list[dict[str, Any]] = []
        self.met: list[dict[str, Any]] = []
        self.lo, self.hi = -math.inf, math.inf  # largest need that missed, smallest that met
        self._missed: list[tuple[float, float]] = []  # (need, measured cost) of the plans that missed

    def step(self, need: float) -> Optional[float]:
        """Plan for ``need``, measure, and return the next need (None: done)."""
        need = min(need, self.opts.most())
        choice = knapsack(self.opts.drops, self.opts.savings, need) if need < self.opts.most() else None
        if choice is None:  # (floored units can miss the very top) the deepest plan
            choice, need = self.opts.deepest(), self.opts.most()
        seen = next((r for r in self.rounds if r["choice"] == choice), None)
        r = seen or self.measure(choice, need)
        key, limit = self.target.key, self.target.limit
        if r["cost"][key] <= limit:
            self.hi = min(self.hi, need)
        else:
            self.lo = max(self.lo, need)
        if self.hi == math.inf:  # nothing met yet: ask for more by the miss (secant once two missed)
            if need >= self.opts.most():
                return None
            miss, step = r["cost"][key] - limit, 1.0
            if self._missed:
                prev_need, prev_cost = self._missed[-1]
                if prev_cost > r["cost"][key] and need > prev_need:
                    step = 1.1 * (need - prev_need) / (prev_cost - r["cost"][key])
            self._missed.append((need, r["cost"][key]))
            return need + max(miss * step, self.opts.most() / BINS)
        if self.lo == -math.inf:  # met at once: is there room to prune less?
            slack = limit - r["cost"][key]
            return need - slack if slack > 0.01 * limit and not seen and need > 0 else None
        mid = (self.lo + self.hi) / 2
        return mid if self.hi - self.lo > max(abs(self.hi), 1e-12) / BINS and not seen else None

    def refine(self, start: dict[str, Any], evaluations: int) -> dict[str, Any]:
        """Hill-climb on the *measured* metric from ``start``: try the moves the curves rate best
        first (one layer a level lighter; one lighter and one deeper), skip those whose cost,
        predicted from the current plan's measured cost, is over the budget, and take the first
        that meets it measured and scores better. At most ``evaluations`` plans are measured."""
        best, metric, key = start, self.result.metric, self.target.key
        while evaluations > 0:
            moved = False
            for choice in self._moves(best):
                if any(r["choice"] == choice for r in self.rounds):
                    continue
                saving = sum(self.opts.savings[n][j] for n, j in choice.items())
                base = sum(self.opts.savings[n][j] for n, j in best["choice"].items())
                if best["cost"][key] + base - saving > self.target.limit * 1.02:
                    continue
                evaluations -= 1
                r = self.measure(choice, math.nan)
                if r["met"] and self.result.goodness(r[metric]) > self.result.goodness(best[metric]):
                    best, moved = r, True
                    break
                if evaluations <= 0:
                    break
            if not moved:
                break
        return best

    def _moves(self, plan: dict[str, Any]) -> list[dict[str, int]]:
        """Neighbour plans, the curves' predicted gain first: one layer a level lighter, alone or
        with another layer made just deep enough (by its predicted savings) to stay in budget."""
        choice, drops, savings = plan["choice"], self.opts.drops, self.opts.savings
        room = self.target.limit - plan["cost"][self.target.key]  # measured slack of the plan
        moves = []
        for a, i in choice.items():
            if i == 0:
                continue
            lighter = {**choice, a: i - 1}
            gain = drops[a][i] - drops[a][i - 1]
            moves.append((gain, lighter))
            short = savings[a][i] - savings[a][i - 1] - room  # what the others must save to stay in budget
            for b, k in choice.items():
                deeper = next((m for m in range(k + 1, len(drops[b])) if savings[b][m] - savings[b][k] >= short), None)
                if b != a and deeper is not None:
                    moves.append((gain - (drops[b][deeper] - drops[b][k]), {**lighter, b: deeper}))
        moves.sort(key=lambda m: -m[0])
        return [m for _, m in moves]

    def measure(self, choice: Mapping[str, int], need: float) -> dict[str, Any]:
        """Apply the plan, measure its cost (and its metric when it meets the budget), restore."""
        from .pruning import set_sparsity

        state, key, metric = self.state, self.target.key, self.result.metric
        sparsities = self.opts.sparsities(choice)
        drop = sum(self.opts.drops[n][j] for n, j in choice.items())
        saving = sum(self.opts.savings[n][j] for n, j in choice.items())
        snap = state.snapshot()
        try:
            if sparsities:
                set_sparsity(state, sparsities, self.result.criterion, pattern=self.pattern.name)
            cost = self.meter.measure(self.pattern, (key,))
            met = cost[key] <= self.target.limit
            value = self.evaluator.evaluate(commit=False)[metric] if met else math.nan
        finally:
            state.restore(snap)
        r = {"choice": dict(choice), "need": need, "predicted_cost": self.now - saving,
             "cost": cost, "met": met, metric: value, "predicted_metric": self.result.predict(drop),
             "sparsities": sparsities}
        self.rounds.append(r)
        if met:
            self.met.append(r)
        return r
