"""Accuracy/size trade-offs: Pareto fronts over measured configurations, and strategy x
compression runs (``Session.tradeoff``)."""
from __future__ import annotations

import hashlib
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

from ..allocation import apply_global
from ..criteria import get_criterion
from ..evaluate import Evaluator
from ..export import weights_digest
from ..state import PruningState
from ..stats import StatsTable
from .finetune import finetune as run_finetune

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def pareto_front(costs: Sequence[float], scores: Sequence[float], lower_is_better: bool = False) -> list[int]:
    """Indices of the points no other point beats (lower or equal cost and higher or equal
    score, one strictly), ordered by cost. Lower cost is better, higher score is better
    (``lower_is_better``: a lower score, such as perplexity)."""
    if lower_is_better:
        scores = [-v for v in scores]
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -scores[i]))
    front: list[int] = []
    best = float("-inf")
    for i in order:
        if scores[i] > best:
            front.append(i)
            best = scores[i]
    return front


# ---------------------------------------------------------------------- strategy x compression runs
DEFAULT_STRATEGIES = ("uniform", "global", "erk", "lamp", "random")
DEFAULT_COMPRESSIONS = (1, 2, 4, 8, 16, 32, 64)
# channel strategies: every group loses the same fraction ("channels") or the globally least
# important channels go ("channels-global"); the fraction is searched for to reach the compression
CHANNEL_STRATEGIES = {"channels": "uniform", "channels-global": "global"}


@dataclass
class TradeoffResult:
    """One record per (strategy, compression, seed): measured accuracy, loss, compression
    (params / nonzeros), sparse file bytes, effective MACs, and accuracy after fine-tuning."""

    metric: str
    dense: dict[str, float]
    config: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    cached: bool = False
    missing: list[dict[str, Any]] = field(default_factory=list)  # points that could not be measured, and why
    lower_is_better: bool = False  # the metric is better smaller (perplexity)

    def summary(self) -> list[dict[str, Any]]:
        """Mean and spread (population std) over seeds per (strategy, compression)."""
        groups: dict[tuple, list[dict]] = {}
        for r in self.records:
            groups.setdefault((r["strategy"], r["target_compression"]), []).append(r)
        rows = []
        for (strategy, target), rs in groups.items():
            row: dict[str, Any] = {"strategy": strategy, "target_compression": target, "seeds": len(rs)}
            for key in ("compression", "sparse_bytes", "effective_macs", "speedup", self.metric, "loss", f"{self.metric}_finetuned"):
                vals = [r[key] for r in rs if r.get(key) is not None]
                if vals:
                    row[key] = statistics.fmean(vals)
                    row[f"{key}_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
            rows.append(row)
        return rows

    def table(self) -> str:
        m = self.metric
        ft = any(r.get(f"{m}_finetuned") is not None for r in self.records)
        head = f"{'strategy':<12}{'target':>8}{'compr.':>9}{'bytes':>11}{'speedup':>9}{m:>12}" + (f"{'fine-tuned':>12}" if ft else "")
        lines = [head]
        for r in self.summary():
            line = (f"{r['strategy']:<12}{r['target_compression']:>7}x{r['compression']:>8.1f}x{r['sparse_bytes']:>11,.0f}"
                    f"{r['speedup']:>8.2f}x{r[m]:>12.4f}")
            if ft:
                line += f"{r.get(f'{m}_finetuned', math.nan):>12.4f}"
            lines.append(line)
        lines.append(f"dense {m}: {self.dense[m]:.4f}" + (" (cached result)" if self.cached else ""))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.table()

    def to_json(self, path: Union[str, Path, None] = None) -> str:
        text = json.dumps({k: v for k, v in asdict(self).items() if k != "cached"}, indent=1, default=str)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, source: Union[str, Path]) -> "TradeoffResult":
        text = Path(source).read_text() if isinstance(source, Path) or not str(source).lstrip().startswith("{") else str(source)
        try:
            return cls(**json.loads(text))
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"not a TradeoffResult JSON: {e}") from None

    def to_csv(self, path: Union[str, Path, None] = None) -> str:
        import csv
        import io

        keys = sorted({k for r in self.records for k in r}, key=lambda k: (k != "strategy", k))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.records)
        if path is not None:
            Path(path).write_text(buf.getvalue())
        return buf.getvalue()

    def plot(self, x: str = "compression") -> "Figure":
        from ..plots import tradeoff

        return tradeoff(self, x)


def needs_groups(strategies: Sequence[Any]) -> bool:
    """Whether any strategy removes whole channels (it then needs the model's channel groups)."""
    return any(parse_strategy(s)[0] in CHANNEL_STRATEGIES for s in strategies)


def parse_strategy(strategy: Any) -> tuple[str, str]:
    """A strategy is an allocation paired with a criterion: ``"lamp"`` (magnitude),
    ``"global/taylor"`` or ``("global", "taylor")``; both names are checked here."""
    from ..allocation import get_allocation
    from ..criteria import get_criterion
    from ..groups import GROUP_CRITERIA

    if isinstance(strategy, str):
        allocation, _, criterion = strategy.partition("/")
    elif isinstance(strategy, (tuple, list)) and len(strategy) == 2:
        allocation, criterion = strategy
    else:
        raise ValueError(f"strategy {strategy!r} must be 'allocation', 'allocation/criterion' or (allocation, criterion)")
    if allocation in CHANNEL_STRATEGIES:  # whole channels, by a group criterion
        criterion = criterion or "l1"
        if criterion not in GROUP_CRITERIA:
            raise ValueError(f"strategy {strategy!r}: channel strategies take a group criterion ({', '.join(GROUP_CRITERIA)})")
        return allocation, criterion
    criterion = criterion or "magnitude"
    get_allocation(allocation)
    get_criterion(criterion)
    return allocation, criterion


def run_tradeoff(
    state: PruningState,
    evaluator: Evaluator,
    stats: StatsTable,
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    compressions: Sequence[float] = DEFAULT_COMPRESSIONS,
    finetune: Optional[dict[str, Any]] = None,
    seeds: int = 1,
    cache: bool = True,
    progress: bool = True,
    cache_dir: Optional[Path] = None,
    loss_fn: Any = None,
    executor: Any = None,
) -> TradeoffResult:
    """See :meth:`prune_lab.Session.tradeoff`. ``stats``: the state's size table;
    ``executor`` (a ``distributed.RayExecutor``) measures the points on its workers instead.
    Channel strategies need the state's channel groups (``channels.ensure_groups``)."""
    finetune = dict(finetune or {})
    train_data = finetune.pop("train_data", None)
    pairs, config = _config(state, evaluator, strategies, compressions, finetune, seeds, train_data)
    strategies = config["strategies"]
    path = _cache_path(state, evaluator, config, train_data, cache_dir)
    if cache and path is not None and path.exists():
        try:
            result = TradeoffResult.from_json(path)
            result.cached = True
            return result
        except ValueError:
            pass  # a corrupt cache entry is recomputed
    metric = evaluator.metric_name
    points = [(seed, strategy, allocation, criterion, c) for seed in range(seeds)
              for strategy, (allocation, criterion) in zip(strategies, pairs) for c in compressions]
    result = TradeoffResult(metric, evaluator.baseline(), config, lower_is_better=evaluator.lower_is_better)
    if executor is not None:
        executor.tradeoff(state, evaluator, result, points, train_data, finetune, progress)
    else:
        _measure_here(state, evaluator, stats, result, points, train_data, finetune, loss_fn, progress)
    if cache and path is not None and not result.config.get("interrupted") and not result.missing:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(result.to_json())
        except OSError:
            pass
    return result


def _config(state: PruningState, evaluator: Evaluator, strategies: Sequence[str], compressions: Sequence[float],
            finetune: dict[str, Any], seeds: int, train_data: Any) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """``(allocation, criterion)`` per strategy and the run's config (the cache key's part that
    is not data), every input checked first."""
    from .._version import __version__

    pairs = [parse_strategy(st) for st in strategies]
    names = [a if c == ("l1" if a in CHANNEL_STRATEGIES else "magnitude") else f"{a}/{c}" for a, c in pairs]
    if finetune and train_data is None:
        raise ValueError("finetune={...} needs 'train_data': the data to fine-tune on")
    for c in compressions:
        if isinstance(c, bool) or not (isinstance(c, (int, float)) and c >= 1):
            raise ValueError(f"compression {c!r} must be a number >= 1 (dense size / nonzeros)")
    channel_pairs = [a for a, _ in pairs if a in CHANNEL_STRATEGIES]
    if channel_pairs and state.groups is None:
        raise ValueError(f"channel strategies ({', '.join(channel_pairs)}) need the channel groups: use Session.tradeoff")
    data_aware = sorted({c for a, c in pairs if a not in CHANNEL_STRATEGIES and get_criterion(c).needs})
    if data_aware and state.calibration is None:
        raise ValueError(f"strategies with {', '.join(data_aware)} need calibrate(train_data) first")
    calibration = state.calibration.fingerprint if data_aware else None
    return pairs, {"strategies": names, "compressions": list(compressions), "finetune": finetune, "seeds": seeds,
                   "version": __version__, "metric": evaluator.metric_name, "calibration": calibration}


def _cache_path(state: PruningState, evaluator: Evaluator, config: dict[str, Any], train_data: Any,
                cache_dir: Optional[Path]) -> Optional[Path]:
    """Where this run's result is cached: keyed by the original weights, the data and the config."""
    if cache_dir is None:
        return None
    data_digest = evaluator.data.fingerprint()
    if train_data is not None:
        data_digest += weights_digest(list(getattr(train_data, "tensors", train_data if isinstance(train_data, (tuple, list)) else [])))
    key = hashlib.sha256(json.dumps([state.original_digest(), data_digest, config], sort_keys=True, default=str).encode()).hexdigest()[:24]
    return cache_dir / "tradeoff" / f"{key}.json"


def _measure_here(state: PruningState, evaluator: Evaluator, stats: StatsTable, result: "TradeoffResult", points: list,
                  train_data: Any, finetune: dict[str, Any], loss_fn: Any, progress: bool) -> None:
    """Every point in this process, the state restored exactly afterwards; Ctrl-C keeps the
    points measured (``config["interrupted"]``)."""
    from tqdm.auto import tqdm

    saved = state.snapshot()  # the session is left exactly as it was found
    bar = tqdm(total=len(points), desc="trade-off", disable=not progress, leave=False)
    try:
        for point in points:
            result.records.append(tradeoff_point(state, evaluator, stats, point, train_data, finetune, loss_fn))
            bar.update(1)
    except KeyboardInterrupt:
        result.config["interrupted"] = True
    finally:
        bar.close()
        state.restore(saved)


def tradeoff_point(state: PruningState, evaluator: Evaluator, stats: StatsTable, point: tuple,
                   train_data: Any = None, finetune: Optional[dict[str, Any]] = None, loss_fn: Any = None) -> dict[str, Any]:
    """One trade-off point ``(seed, strategy, allocation, criterion, compression)``: from the
    original model, pruned by the strategy, measured, and fine-tuned when ``train_data`` is
    given. The same code runs in-process and on a distributed worker; it leaves the state pruned."""
    seed, strategy, allocation, criterion, c = point
    metric = evaluator.metric_name
    state.reset()
    channels = allocation in CHANNEL_STRATEGIES
    if channels:
        from ..channels import set_global_channels

        channel_fraction(state, stats, c, lambda f: set_global_channels(state, f, CHANNEL_STRATEGIES[allocation], criterion, seed))
    else:
        state.refresh_calibration(get_criterion(criterion))  # the statistics of the weights as they are
        apply_global(state, 1 - 1 / c, allocation=allocation, criterion=criterion, seed=seed)
    ev, st = evaluator.evaluate(), stats.table().total
    record = {
        "strategy": strategy, "target_compression": c, "seed": seed,
        "sparsity": st["sparsity"], "compression": st["params"] / max(st["nonzeros"], 1),
        "sparse_bytes": st["sparse_file_bytes"], "effective_macs": st["effective_macs"],
        "speedup": st["speedup"], metric: ev[metric], "loss": ev["loss"],
    }
    if train_data is not None:
        ft = run_finetune(state, evaluator, train_data, seed=seed, progress=False, loss_fn=loss_fn,
                          criterion="magnitude" if channels else criterion, **(finetune or {}))
        record[f"{metric}_finetuned"] = ft.evaluations[-1][metric] if ft.evaluations else None
        record["compression_finetuned"] = sum(i.n_params for i in state.layers) / max(stats.table().total["nonzeros"], 1)
    return record


def channel_fraction(state: PruningState, stats: StatsTable, compression: float,
                     prune: Callable[[float], None], steps: int = 12) -> float:
    """Prune whole channels to the largest fraction whose compression (prunable params /
    nonzeros) does not exceed ``compression`` (bisection; compression grows with the fraction).
    Leaves the state pruned at that fraction and returns it; 0 for compression 1."""
    if compression <= 1:
        return 0.0
    lo, hi = 0.0, 0.99
    prune(hi)
    if stats.table().total["compression"] <= compression:
        return hi  # the most channel pruning can do (each group keeps a channel)
    for _ in range(steps):
        mid = (lo + hi) / 2
        prune(mid)
        if stats.table().total["compression"] <= compression:
            lo = mid
        else:
            hi = mid
    prune(lo)
    return lo
