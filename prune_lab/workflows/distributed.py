"""Sweeps over a Ray cluster: sensitivity and trade-off points measured by Ray workers.

Each point of a sweep is independent given the pruning state, so workers (Ray actors) each
rebuild the session once: the model (architecture and original weights, pickled), the current
base weights and masks (a :class:`~prune_lab.state.Snapshot`, re-tokened on arrival), the
calibration samples when a data-aware criterion needs them, and the eval data, which is put in
Ray's object store once (one copy per node, shared by its workers). A worker then measures
points with the same functions the in-process sweep runs (``measure_point``,
``tradeoff_point``), so on the CPU the merged result equals the in-process one bit for bit.

Scheduling is dynamic (at most two points in flight per worker). Stop (``should_stop``) and
Ctrl-C kill the workers and keep every finished point. A worker that dies has its points
retried on a fresh worker (``max_retries`` times per point); a point that raises, or fails on
every try, is reported in ``result.missing`` with the reason, never dropped or filled in.

Ray is optional: ``pip install "prune_lab[distributed]"``. Nothing here imports it until a
Ray executor is asked for.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import torch

from ..devices import resolve_device

if TYPE_CHECKING:
    from ..evaluate import Evaluator
    from ..state import PruningState
    from ..stats import StatsTable

RAY_HINT = 'Ray is not installed: pip install "prune_lab[distributed]" (or pip install ray)'


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError(RAY_HINT) from None
    return ray


def resolve_executor(executor: Any, settings: Optional[Mapping[str, Any]] = None) -> Optional["RayExecutor"]:
    """``None``/``"local"``: in-process. ``"ray"``: the Ray runtime already initialised in this
    process, else a local one. Any other string: a Ray address (``"auto"``,
    ``"ray://head:10001"``, ``"10.0.0.5:6379"``). The ``ray`` module itself: its initialised
    runtime. A :class:`RayExecutor`: as configured. Connects now, so an unreachable address fails
    before any work starts. ``settings``: the Session's constructor settings, for the workers."""
    if executor is None or executor == "local":
        return None
    if isinstance(executor, RayExecutor):
        ex = executor
    elif isinstance(executor, str):
        ex = RayExecutor(address=None if executor == "ray" else executor)
    elif getattr(executor, "__name__", None) == "ray" and hasattr(executor, "is_initialized"):
        if not executor.is_initialized():
            raise ValueError("executor=ray: the Ray runtime is not initialised; call ray.init(...) first or pass executor='ray'")
        ex = RayExecutor()
    else:
        raise ValueError(f"executor must be None, 'local', 'ray', a Ray address string, the ray module or a RayExecutor; "
                         f"got {executor!r}")
    ex.connect()
    if settings is not None:
        ex.session_settings = dict(settings)
    return ex


def _lost_worker_errors() -> tuple[type, ...]:
    """The Ray errors that mean a worker (not the point) failed: the point is retried elsewhere."""
    ray = _ray()
    from ray.exceptions import RayActorError

    names = ("WorkerCrashedError", "ActorDiedError", "ActorUnavailableError", "NodeDiedError", "OutOfMemoryError")
    return (RayActorError,) + tuple(getattr(ray.exceptions, n) for n in names if hasattr(ray.exceptions, n))


def _host_port(address: str) -> tuple[str, int]:
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not isinstance(address, str) or not sep or not host or not port.isdigit():
        raise ValueError(f"executor address {address!r} must be 'host:port', 'ray://host:port' or 'auto'")
    return host.strip("[]"), int(port)


def _probe(address: str, timeout_s: float) -> None:
    """Fail fast, with the address in the message, when nothing listens at ``address``."""
    import socket

    host, port = _host_port(address)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"cannot reach the Ray cluster at {address!r}: {e.strerror or e}. Check the address (ray "
                              "status on the head node prints it) or use executor=None to sweep in this process") from None


def _default_runtime_env() -> dict[str, Any]:
    """Workers of a local runtime import what this process imports: its ``sys.path``."""
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    if os.getcwd() not in paths:
        paths.insert(0, os.getcwd())
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}


class RayExecutor:
    """Where and how Ray workers run.

    ``address``: ``None`` (the runtime already initialised in this process, else a local one
    with ``num_cpus``) or a Ray address. ``workers``: how many actors (default: one per CPU of
    the cluster, or per GPU when the session is on CUDA). ``gpus_per_worker``: default 1 for a
    CUDA session, else 0. ``threads_per_worker``: torch threads in each worker (default 1).
    ``max_retries``: how often a point whose worker died is tried again elsewhere.
    """

    def __init__(self, address: Optional[str] = None, workers: Optional[int] = None, num_cpus: Optional[int] = None,
                 gpus_per_worker: Optional[float] = None, threads_per_worker: int = 1, max_retries: int = 2,
                 runtime_env: Optional[dict[str, Any]] = None):
        from ..masks import check_count

        if workers is not None:
            check_count(workers, "workers")
        check_count(threads_per_worker, "threads_per_worker")
        check_count(max_retries, "max_retries", minimum=0)
        if address is not None and address != "auto":
            _host_port(address)
        self.address = address
        self.workers = workers
        self.num_cpus = num_cpus
        self.gpus_per_worker = gpus_per_worker
        self.threads_per_worker = threads_per_worker
        self.max_retries = max_retries
        self.runtime_env = runtime_env
        self.actors: list[Any] = []  # the live workers of the running sweep (tests kill one)
        self.started_runtime = False
        self.overhead_s = 0.0  # time to start the workers of the last sweep (Ray's fixed cost)
        self.session_settings: dict[str, Any] = {}  # the Session's constructor settings (set per sweep)

    def __repr__(self) -> str:
        return f"RayExecutor(address={self.address!r}, workers={self.workers}, threads_per_worker={self.threads_per_worker})"

    # ------------------------------------------------------------------ connecting
    def connect(self, probe_timeout_s: float = 5.0) -> None:
        ray = _ray()
        if ray.is_initialized():
            if self.address not in (None, "auto"):
                raise ValueError(f"this process is already connected to a Ray runtime; executor={self.address!r} would "
                                 "need another one: call ray.shutdown() first, or pass executor='ray' to use this one")
            return
        if self.address not in (None, "auto"):
            _probe(self.address, probe_timeout_s)  # Ray itself retries an unreachable address for minutes
        try:
            if self.address is None:
                ray.init(num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False,
                         runtime_env=self.runtime_env or _default_runtime_env(), configure_logging=False)
                self.started_runtime = True
            else:
                ray.init(address=self.address, log_to_driver=False, runtime_env=self.runtime_env,
                         configure_logging=False)
        except Exception as e:  # ConnectionError, TimeoutError, RuntimeError, ValueError...
            where = "a local Ray runtime" if self.address is None else f"the Ray cluster at {self.address!r}"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConnectionError(f"cannot reach {where}: {first}. Check the address (ray status on the head node "
                                  "prints it) or use executor=None to sweep in this process") from None

    def shutdown(self) -> None:
        """Stop the local runtime this executor started (a cluster it connected to is left alone)."""
        if self.started_runtime:
            _ray().shutdown()
            self.started_runtime = False

    # ------------------------------------------------------------------ the workers
    def _spawn(self, session_spec: dict[str, Any], n: int, cuda: bool) -> list[Any]:
        ray = _ray()
        gpus = self.gpus_per_worker if self.gpus_per_worker is not None else (1 if cuda else 0)
        actor = ray.remote(num_cpus=self.threads_per_worker, num_gpus=gpus, max_restarts=0)(_Worker)
        return [actor.remote(session_spec, self.threads_per_worker, "cuda" if gpus else "cpu") for _ in range(n)]

    def _worker_count(self, cuda: bool, points: int) -> int:
        if self.workers is not None:
            return max(1, min(self.workers, points))
        res = _ray().cluster_resources()
        if cuda:
            n = int(res.get("GPU", 0) // (self.gpus_per_worker or 1))
        else:
            n = int(res.get("CPU", 1) // self.threads_per_worker)
        return max(1, min(n, points))

    def _run(self, spec: dict[str, Any], points: Sequence[Any], call: Callable[[Any, Any], Any], cuda: bool,
             on_result: Callable[[Any, Any], None], should_stop: Optional[Callable[[], bool]], desc: str,
             progress: bool, initial: int, total: int) -> tuple[bool, list[dict[str, Any]]]:
        """Measure ``points`` on fresh workers; ``call(actor, point)`` submits one. Returns
        (stopped, missing)."""
        from tqdm.auto import tqdm

        ray = _ray()
        from ray.exceptions import RayTaskError

        lost_worker = _lost_worker_errors()
        missing: list[dict[str, Any]] = []
        if not points:
            return False, missing
        spec_ref = self._start(spec, cuda, len(points))
        pending = list(points)
        tries = {i: 0 for i in range(len(points))}
        queue = list(range(len(points)))
        inflight: dict[Any, tuple[int, int, Any]] = {}  # ref -> (actor slot, point index, actor)
        load = [0] * len(self.actors)
        stopped = False
        bar = tqdm(total=total, initial=initial, desc=desc, disable=not progress, leave=False)
        try:
            while queue or inflight:
                if should_stop is not None and should_stop():
                    raise KeyboardInterrupt
                for slot, actor in enumerate(self.actors):
                    while actor is not None and load[slot] < 2 and queue:
                        i = queue.pop(0)
                        tries[i] += 1
                        inflight[call(actor, pending[i])] = (slot, i, actor)
                        load[slot] += 1
                if not inflight:
                    break  # every worker is gone and could not be replaced: the rest is reported missing
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.1)
                for ref in ready:
                    slot, i, actor = inflight.pop(ref)
                    load[slot] -= 1
                    try:
                        value = ray.get(ref)
                    except lost_worker as e:
                        if tries[i] <= self.max_retries:
                            queue.insert(0, i)
                        else:
                            missing.append({"point": pending[i], "error": f"its worker died {tries[i]} times: {type(e).__name__}"})
                        if self.actors[slot] is actor:  # not yet replaced (its other points fail too)
                            self._replace(slot, spec_ref, cuda)
                    except RayTaskError as e:
                        cause = getattr(e, "cause", None) or e
                        missing.append({"point": pending[i], "error": f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"})
                    else:
                        on_result(pending[i], value)
                    bar.update(1)
            for i in queue:
                missing.append({"point": pending[i], "error": "no worker could be started for it"})
        except KeyboardInterrupt:
            stopped = True
        finally:
            bar.close()
            self._kill_all()
        return stopped, missing

    def _start(self, spec: dict[str, Any], cuda: bool, points: int) -> dict[str, Any]:
        """Put the data in the object store once (one copy per node, read by every worker there),
        start the workers and wait until each has rebuilt its measuring parts; the spec as sent."""
        ray = _ray()
        t0 = time.perf_counter()
        spec_ref = {k: (ray.put(v) if k in ("data", "train_data") and v is not None else v) for k, v in spec.items()}
        self.actors = self._spawn(spec_ref, self._worker_count(cuda, points), cuda)
        ray.get([a.ready.remote() for a in self.actors])  # a worker that cannot rebuild the session fails here
        self.overhead_s = time.perf_counter() - t0
        return spec_ref

    def _kill_all(self) -> None:
        ray = _ray()
        for a in self.actors:
            if a is not None:
                try:
                    ray.kill(a)
                except Exception:
                    pass
        self.actors = []

    def _replace(self, slot: int, spec_ref: dict[str, Any], cuda: bool) -> None:
        """A fresh worker in place of a dead one (None if none can be started)."""
        ray = _ray()
        old = self.actors[slot]
        try:
            ray.kill(old)
        except Exception:
            pass
        try:
            new = self._spawn(spec_ref, 1, cuda)[0]
            ray.get(new.ready.remote(), timeout=300)
            self.actors[slot] = new
        except Exception:
            self.actors[slot] = None

    # ------------------------------------------------------------------ sweeps
    def sensitivity(self, state: "PruningState", evaluator: "Evaluator", result: Any, todo: list[tuple[str, float]], crit: Any, seed: int,
                    incremental: bool, progress: bool, on_step: Optional[Callable[[dict], None]],
                    should_stop: Optional[Callable[[], bool]], pattern: str = "unstructured",
                    scores: Optional[dict[str, Any]] = None) -> Any:
        """Measure ``todo`` (layer, level) points of a sensitivity sweep on the workers and merge
        them into ``result`` in the in-process order. ``scores`` (per channel group or block, on
        the CPU) make it a channel/block sweep."""
        spec = session_spec(state, evaluator, self.session_settings, criterion=crit)
        found: dict[tuple[str, float], dict] = {}

        def on_result(point: Any, record: dict) -> None:
            found[tuple(point)] = record
            if on_step is not None:
                on_step(record)

        def call(actor: Any, point: Any) -> Any:
            return actor.sensitivity_point.remote(crit, seed, point[0], point[1], incremental, pattern,
                                                  None if scores is None else scores[point[0]])

        total = len(result.layers) * len(result.levels)
        stopped, missing = self._run(spec, todo, call, _is_cuda(state), on_result, should_stop, "sensitivity (ray)",
                                     progress, total - len(todo), total)
        result.records.extend(found[p] for p in todo if p in found)
        result.missing = [{"layer": m["point"][0], "level": m["point"][1], "error": m["error"]} for m in missing]
        result.complete = not stopped and not result.missing
        return result

    def tradeoff(self, state: "PruningState", evaluator: "Evaluator", result: Any, points: list[tuple], train_data: Any,
                 finetune: dict[str, Any], progress: bool) -> Any:
        """Measure trade-off ``points`` on the workers; records in the in-process order."""
        from ..criteria import get_criterion

        from .tradeoff import CHANNEL_STRATEGIES

        data_aware = any(p[3] in ("taylor", "obd") if p[2] in CHANNEL_STRATEGIES else get_criterion(p[3]).needs
                         for p in points)
        spec = session_spec(state, evaluator, self.session_settings, calibration=data_aware)
        if train_data is not None:
            spec["train_data"] = train_data
        found: dict[int, dict] = {}
        index = {p: i for i, p in enumerate(points)}

        def call(actor: Any, point: Any) -> Any:
            return actor.tradeoff_point.remote(point, train_data is not None, finetune)

        stopped, missing = self._run(spec, points, call, _is_cuda(state), lambda p, r: found.__setitem__(index[p], r),
                                     None, "trade-off (ray)", progress, 0, len(points))
        result.records.extend(found[i] for i in range(len(points)) if i in found)
        result.missing = [{"strategy": m["point"][1], "target_compression": m["point"][4], "seed": m["point"][0],
                           "error": m["error"]} for m in missing]
        if stopped:
            result.config["interrupted"] = True
        return result


def _is_cuda(state: "PruningState") -> bool:
    return next(iter(state.weights.values())).device.type == "cuda"


def session_spec(state: "PruningState", evaluator: "Evaluator", settings: Optional[dict[str, Any]] = None,
                 criterion: Any = None, calibration: bool = False) -> dict[str, Any]:
    """What a worker needs to rebuild the session: the model with its original weights (on the
    CPU), the session settings, the current state (snapshot), the eval data and, for data-aware
    criteria, the calibration samples and settings."""
    model = state.original_model().cpu()
    snap = state.snapshot().to("cpu")  # the whole state, every field by name (Snapshot.to)
    data = evaluator.data
    if data.inputs is not None:
        payload: Any = (data.inputs.detach().cpu().numpy(), data.targets.detach().cpu().numpy())
    else:
        payload = data.loader
    cal = state.calibration
    needs_cal = calibration or (criterion is not None and bool(getattr(criterion, "needs", ())))
    spec = {"model": model, "settings": dict(settings or {}), "snapshot": snap, "data": payload, "batch_size": data.batch_size,
            "calibration": None, "groups": state.groups is not None}
    if needs_cal and cal is not None:
        x, y = cal.data
        spec["calibration"] = {"x": x.detach().cpu(), "y": y.detach().cpu(), **cal.settings}
    return spec


@dataclass
class WorkerParts:
    """What a worker measures with: the pruning state, its evaluator and stats, the loss."""

    state: "PruningState"
    evaluator: "Evaluator"
    stats: "StatsTable"
    loss_fn: Optional[Callable[[Any, Any], Any]]


def build_worker(spec: dict[str, Any], device: torch.device) -> WorkerParts:
    """The one factory of a worker's measuring parts, from a :func:`session_spec` (plain,
    serialisable values): the model, the session's constructor settings, the eval data, the
    whole pruning state (adopted), the channel groups and the calibration when the sweep needs
    them. It builds what ``Session`` builds (state, evaluator, stats), from the modules below it."""
    from ..calibration import CalibrationRequest
    from ..channels import ensure_groups
    from ..evaluate import Evaluator
    from ..layers import find_prunable
    from ..measure import AUTO, EvalData, Scorer, weight_uses
    from ..registry import describe
    from ..state import PruningState
    from ..stats import StatsTable

    settings = dict(spec["settings"])
    model = spec["model"].to(device)
    metric, loss_fn = settings.get("metric"), settings.get("loss_fn", AUTO)
    infos, _ = find_prunable(model, settings.get("extra_layers", ()))
    data = EvalData(spec["data"], device, spec.get("batch_size", settings.get("batch_size", 1024)))
    state = PruningState(model, infos, seed=settings.get("seed", 0))
    x, y = data.sample(1)
    uses, out = weight_uses(model, state.weights, x)
    scorer = Scorer(metric, loss_fn).check(out, y)
    evaluator = Evaluator(state, data, scorer, "accuracy" if metric is None else describe(metric),
                          settings.get("incremental", True), settings.get("cache_budget_bytes"), settings.get("check"))
    if spec.get("groups") or spec["snapshot"].channels:
        ensure_groups(state, data.sample(2)[0])  # traced as the driver traced them: channel records name these groups
    state.adopt(spec["snapshot"])
    loss = loss_fn if callable(loss_fn) else None
    cal = spec.get("calibration")
    if cal is not None:
        state.calibrate(CalibrationRequest(cal["x"].to(device), cal["y"].to(device), cal["batch_size"], cal["hessian"],
                                           cal["probes"], cal["seed"], False, None, loss))
    return WorkerParts(state, evaluator, StatsTable(state, uses), loss)


class _Worker:
    """A Ray actor: the measuring parts built once from a :func:`session_spec` (:func:`build_worker`)."""

    def __init__(self, spec: dict[str, Any], threads: int, device: str):
        import ray

        torch.set_num_threads(threads)
        spec = {k: (ray.get(v) if isinstance(v, ray.ObjectRef) else v) for k, v in spec.items()}
        data = spec["data"]
        if isinstance(data, tuple):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the store's arrays are read-only; nothing writes them
                data = (torch.as_tensor(data[0]), torch.as_tensor(data[1]))
        self.parts = build_worker({**spec, "data": data}, resolve_device(device))
        self.train_data = spec.get("train_data")
        self._reference = False

    def ready(self) -> bool:
        return True

    def sensitivity_point(self, crit: Any, seed: int, layer: str, level: float, incremental: bool,
                          pattern: str = "unstructured", scores: Any = None) -> dict[str, Any]:
        """One sweep point; ``scores`` (a channel group's or block's importance, computed by the
        driver) make it a channel/block point."""
        from .sensitivity import measure_channels, measure_point

        s = self.parts
        if not self._reference:  # the same evaluation the in-process sweep starts with (fills the same cache)
            s.evaluator.evaluate()
            self._reference = True
        with s.state.trial():
            if scores is not None:
                return measure_channels(s.state, s.evaluator, layer, level, scores, incremental)
            return measure_point(s.state, s.evaluator, crit, seed, layer, level, incremental, pattern)

    def tradeoff_point(self, point: tuple, finetuned: bool, finetune: dict[str, Any]) -> dict[str, Any]:
        from .tradeoff import tradeoff_point

        s = self.parts
        return tradeoff_point(s.state, s.evaluator, s.stats, point, self.train_data if finetuned else None, finetune,
                              s.loss_fn)


__all__ = ["RayExecutor", "resolve_executor", "session_spec", "RAY_HINT"]
