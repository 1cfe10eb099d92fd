"""The headless Lab: what the dashboard does, without widgets, usable and testable from a script.

``LabModel`` holds the undo/redo history (snapshots), the measured points, the sweep job, the
preview policy and the choices the controls make (criterion, allocation, locks). It subscribes
to the session's events, so a change made anywhere (another cell, a script) reaches the view.
The ipywidgets view (``widgets/lab.py``) only forwards control changes here and draws what
``LabModel`` holds; it subscribes per :class:`LabEvent` kind through :meth:`LabModel.observe`,
so a slider move re-syncs that slider, not every control. Both use only public Session methods.
"""
from __future__ import annotations

import html
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .allocation import LayerCollapseWarning, get_allocation
from .patterns import PatternWarning, get_pattern
from .formats import fmt_bytes, fmt_metric
from .masks import check_count
from .session import Session
from .state import Event, Snapshot
from .workflows.sensitivity import DEFAULT_LEVELS


@dataclass
class PreviewPolicy:
    """When a slider move is measured on the first ``samples`` samples only (labelled preview).

    ``mode``: "never", "always" (while dragging) or "auto": while dragging, when the last full
    evaluation took longer than ``frame_budget_s``. The decision reads a recorded duration, so a
    test sets ``mode`` and never depends on the machine's speed.
    """

    mode: str = "auto"
    frame_budget_s: float = 0.05
    samples: int = 256
    last_full_s: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "never", "always"):
            raise ValueError(f"preview must be 'auto', 'never' or 'always', got {self.mode!r}")

    def use_preview(self, dragging: bool) -> bool:
        if not dragging or self.mode == "never":
            return False
        return self.mode == "always" or self.last_full_s > self.frame_budget_s


class History:
    """Undo/redo stacks of snapshots; consecutive equal states are stored once."""

    def __init__(self, limit: int = 200):
        self.undo_stack: list[Snapshot] = []
        self.redo_stack: list[Snapshot] = []
        self.limit = limit

    def push(self, snapshot: Snapshot) -> None:
        if not self.undo_stack or self.undo_stack[-1] != snapshot:
            self.undo_stack.append(snapshot)
            del self.undo_stack[: -self.limit]
        self.redo_stack.clear()

    def undo(self, current: Snapshot) -> Optional[Snapshot]:
        if not self.undo_stack:
            return None
        self.redo_stack.append(current)
        return self.undo_stack.pop()

    def redo(self, current: Snapshot) -> Optional[Snapshot]:
        if not self.redo_stack:
            return None
        self.undo_stack.append(current)
        return self.redo_stack.pop()


@dataclass
class SweepJob:
    """A long job (a sensitivity sweep, or fine-tuning: ``kind``): progress as points measured
    or steps taken over the total."""

    kind: str = "sensitivity"
    total: int = 0
    done: int = 0
    running: bool = False
    stop_requested: bool = False
    thread: Optional[threading.Thread] = field(default=None, repr=False)
    result: Any = None


LAB_EVENTS = ("sparsity", "bits", "device", "pattern", "criterion", "allocation", "locks", "job", "progress", "status")
SESSION_KINDS = ("sparsity", "bits", "device")  # the ones a session change causes (merged within one Lab action)


@dataclass(frozen=True)
class LabEvent:
    """What changed. ``kind``: 'sparsity' (masks or weights of ``layers``), 'bits' (quantization of
    ``layers``), 'device', 'pattern', 'criterion', 'allocation', 'locks' (the Lab's choices),
    'job' (a sweep or fine-tuning started or ended, or trial masks came or went), 'progress'
    (a point or step done), 'status' (the status line)."""

    kind: str
    layers: tuple[str, ...] = ()


Listener = Callable[[LabEvent], None]


class LabModel:
    """The Lab's state and actions. Every number it shows is a Session measurement."""

    def __init__(self, session: Session, sensitivity: Any = None, preview: str = "auto", frame_budget_s: float = 0.05,
                 preview_samples: int = 256, train_data: Any = None, calibration_samples: int = 512,
                 executor: Any = None):
        if not isinstance(session, Session):
            raise TypeError(f"Lab needs a prune_lab.Session, got {type(session).__name__}")
        self.session = session
        self.executor = executor  # where sweeps run: None (here) or a Ray executor (see Session.sensitivity)
        self.train_data = train_data
        self.calibration_samples = calibration_samples
        if sensitivity is not None:
            session.last_sensitivity = sensitivity
        self.policy = PreviewPolicy(preview, frame_budget_s, preview_samples)
        self.history = History()
        self.points: list[dict[str, Any]] = []
        self.job = SweepJob()
        self.criterion = "magnitude"
        self.allocation = "global"
        self.pattern = "unstructured"  # or "2:4": sliders then move between dense and 2:4
        self.locked: set[str] = set()
        self.status = ""
        self.last_error: Optional[BaseException] = None
        self.evaluation: dict[str, Any] = {}
        self.numbers: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self._listeners: list[tuple[Listener, frozenset[str]]] = []
        self._acting = 0
        self._pending: dict[str, set[str]] = {}  # session events held while the Lab acts, merged per kind
        self._last_push: tuple[Optional[str], float] = (None, 0.0)
        self.coalesce_s = 0.35  # moves of one control closer than this are one undo step
        self.unsubscribe = session.subscribe(self._on_session_event)

    # ------------------------------------------------------------------ observing
    def observe(self, listener: Listener, *kinds: str) -> Callable[[], None]:
        """Call ``listener(event)`` (a :class:`LabEvent`) after changes of the given kinds
        (default: all of ``LAB_EVENTS``); returns the unsubscribe function."""
        bad = [k for k in kinds if k not in LAB_EVENTS]
        if bad:
            raise ValueError(f"unknown Lab event {bad[0]!r}; the kinds are {', '.join(LAB_EVENTS)}")
        entry = (listener, frozenset(kinds or LAB_EVENTS))
        self._listeners.append(entry)
        return lambda: self._listeners.remove(entry) if entry in self._listeners else None

    def _emit(self, kind: str, layers: Sequence[str] = ()) -> None:
        """Deliver an event; a session-caused one during a Lab action waits for its end (merged)."""
        if self._acting and kind in SESSION_KINDS:
            self._pending.setdefault(kind, set()).update(layers)
            return
        event = LabEvent(kind, tuple(layers))
        for listener, kinds in list(self._listeners):
            if kind in kinds:
                listener(event)

    def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        order = {n: i for i, n in enumerate(i.name for i in self.session.layers)}
        for kind in SESSION_KINDS:
            if kind in pending:
                self._emit(kind, sorted(pending[kind], key=lambda n: order.get(n, len(order))))

    def _on_session_event(self, event: Event) -> None:
        """The session changed (here or anywhere else: another cell, a script): say what."""
        if event.kind in ("trial-start", "trial-end"):
            self._emit("job")
        elif event.kind == "masks":
            self._emit("sparsity", event.tensors)
        elif event.kind in ("quant", "device"):
            self._emit("bits" if event.kind == "quant" else "device", event.tensors)
        else:  # reset, restore, finetune, rewind: weights, masks and bits alike
            self._emit("sparsity", event.tensors)
            self._emit("bits", event.tensors)

    @property
    def busy(self) -> bool:
        """True while a sweep or fine-tuning runs, or another thread holds trial masks in the
        model: pruning, export and locks wait. A short trial of this thread (a dense baseline
        measured for a preview) does not count: nothing can interleave with it."""
        return self.job.running or self._foreign_trial(0.0)

    def _foreign_trial(self, timeout: float) -> bool:
        """Trial masks held by another thread (waiting up to ``timeout`` s for them to go)."""
        s = self.session
        if not s.in_trial:
            return False
        if not s.lock.acquire(timeout=timeout) if timeout > 0 else not s.lock.acquire(blocking=False):
            return True  # another thread is inside a trial (it holds the lock throughout)
        try:
            return False  # this thread holds it (re-entrant) or the trial ended: not another thread's
        finally:
            s.lock.release()

    def _act(self) -> "_Acting":
        return _Acting(self)

    def _check_idle(self, what: str) -> None:
        if self.job.running or self._foreign_trial(2.0):  # a short trial elsewhere is waited for
            job = "fine-tuning" if self.job.kind == "finetune" and self.job.running else "the sensitivity sweep"
            raise RuntimeError(f"cannot {what} while {job} runs; stop it first")

    # ------------------------------------------------------------------ history
    def push_undo(self, coalesce: Optional[str] = None, now: Optional[float] = None) -> None:
        """Record the current state for undo; moves of one control in quick succession
        (``coalesce`` key, within ``coalesce_s``) are one step."""
        now = time.monotonic() if now is None else now
        key, when = self._last_push
        self._last_push = (coalesce, now)
        if coalesce is not None and key == coalesce and now - when < self.coalesce_s:
            return
        self.history.push(self.session.snapshot())

    def undo(self) -> bool:
        return self._travel(self.history.undo, "undo")

    def redo(self) -> bool:
        return self._travel(self.history.redo, "redo")

    def _travel(self, step: Callable[[Snapshot], Optional[Snapshot]], what: str) -> bool:
        """Restore the snapshot ``step`` (History.undo or .redo) gives for the current state."""
        self._check_idle(what)
        snap = step(self.session.snapshot())
        if snap is None:
            return False
        with self._act():
            self.session.restore(snap)
        return True

    def reset(self) -> None:
        self._check_idle("reset")
        self.push_undo()
        with self._act():
            self.session.reset()

    # ------------------------------------------------------------------ pruning
    def set_layer(self, name: str, sparsity: float, coalesce: bool = False) -> None:
        """Prune one layer. Under an N:M pattern the slider snaps: below half the pattern's
        sparsity the layer is dense, from there on it takes the pattern."""
        self._check_idle("prune")
        self.session.check_sparsity(name, sparsity)
        pat = get_pattern(self.pattern)
        if pat.grouped:  # a layer without a channel (head) group says why, before anything changes
            self.session.groups.head(name) if pat.heads else self.session.groups.of(name)
        else:
            sparsity = pat.snap(float(sparsity), self.session.layer(name))
        self.push_undo(coalesce=f"layer:{name}" if coalesce else None)
        with self._act():
            self.session.set_sparsity({name: sparsity}, criterion=self.criterion, pattern=self.pattern)

    @property
    def grouped(self) -> bool:
        """Whether the sliders remove channel groups (a structured pattern) rather than weights."""
        return get_pattern(self.pattern).grouped

    @staticmethod
    def pattern_options() -> list[tuple[str, str]]:
        """(label, pattern name) for the Lab's pattern dropdown: the registry's."""
        from .patterns import lab_patterns

        return lab_patterns()

    def _unit(self, name: str) -> Optional[str]:
        """The group a slider on layer ``name`` moves: its channel group, or under the heads
        pattern the head group of the attention module it projects for (None: none)."""
        groups = self.session.groups
        return groups.head_of_layer(name) if get_pattern(self.pattern).heads else groups.by_layer.get(name)

    def _held(self) -> dict[str, tuple[int, int]]:
        return self.session.heads if get_pattern(self.pattern).heads else self.session.channels

    def channel_fraction(self, name: str) -> Optional[float]:
        """Under a grouped pattern: the fraction of ``name`` 's channel (head) group removed
        (None when the layer has no group)."""
        g = self._unit(name)
        if g is None:
            return None
        kept, total = self._held()[g]
        return (total - kept) / total

    def channel_text(self, name: str) -> str:
        """"45 of 64 channels" ("2 of 4 heads") for a layer of a group; why not, for the others."""
        g = self._unit(name)
        heads = get_pattern(self.pattern).heads
        if g is None:
            if heads:
                return "not an attention projection with prunable heads"
            return "no channel group: " + self.session.groups.excluded.get(name, "not a Conv/Linear output")
        kept, total = self._held()[g]
        if heads:
            return f"{kept} of {total} heads of {g}"
        shared = [p for p in self.session.groups.groups[g].producers if p != name]
        return f"{kept} of {total} channels" + (f" (with {', '.join(shared)})" if shared else "")

    def measure_speed(self) -> Any:
        """Compact the model (channels removed for real) and measure both: the session's
        ``last_compact`` report (MACs, params, file bytes, latency at batch 1 and 64)."""
        self._check_idle("measure the speed")
        with self._act():
            self.session.compact(measure=True)
        return self.session.last_compact

    def set_pattern(self, pattern: str) -> None:
        """Switch pattern: ``"2:4"`` (any N:M) prunes every unlocked layer it fits to it, and the
        layers it does not fit are named in ``status``; ``"unstructured"`` re-applies the current
        total with the allocation."""
        self._check_idle("change the pattern")
        pat = get_pattern(pattern)  # a bad pattern raises with what is valid
        if pat.removes_blocks:
            raise ValueError("the Lab's sliders prune layers or channel groups; remove blocks with "
                             "session.set_sparsity({block: 1}, pattern='blocks')")
        if pat.grouped:  # whole channels: the weight masks go, every group starts whole
            groups = self.session.groups
            if pat.heads and not groups.heads:
                raise ValueError("this model has no attention heads prune_lab can remove" + "".join(
                    f"; {n}: {why}" for n, why in list(groups.heads_excluded.items())[:3]))
            if not pat.heads and not groups.groups:
                raise ValueError("this model has no channel group to prune: " + "; ".join(
                    f"{n}: {why}" for n, why in list(groups.excluded.items())[:3]))
            self.push_undo()
            with self._act():
                self.session.set_sparsity({n: 0.0 for n, p in self.session.patterns.items() if not get_pattern(p).grouped})
            self.pattern = pat.name
            self._emit("pattern")
            return
        if get_pattern(self.pattern).grouped and self.channel_total() > 0:  # back to weights: channels restored first
            self.push_undo()
            with self._act():
                self.session.set_global_sparsity(0.0, allocation="uniform", pattern=self.pattern)
        self.pattern = pat.name
        self._emit("pattern")
        if pat.levels() is not None:  # a pattern with a fixed level (N:M): wherever it fits
            self.set_global(1.0)
        else:
            total = self.session.total_sparsity()
            self.set_global(total)

    @property
    def quant(self) -> Optional[tuple[int, str]]:
        """``(bits, method)`` when every layer is quantized alike, else None (float or mixed)."""
        held = set(self.session.quant.values())
        return held.pop() if len(held) == 1 else None

    def set_quant(self, quant: Optional[tuple[int, str]]) -> None:
        """Quantize every layer to ``(bits, method)`` (None: float weights), masks kept."""
        from .quantize import check_bits

        self._check_idle("quantize")
        if quant is not None:
            quant = check_bits(quant[0], quant[1])
        self.push_undo()
        with self._act():
            if quant is None:
                self.session.set_global_bits(None)
            else:
                self.session.set_global_bits(quant[0], method=quant[1])

    def set_global(self, sparsity: float, coalesce: bool = False) -> None:
        """Prune to a total sparsity with the current allocation, criterion and locks; an
        allocation that removes a whole layer is reported in ``status``."""
        pat = get_pattern(self.pattern)
        self._check_idle("prune")
        self.push_undo(coalesce="global" if coalesce else None)
        with warnings.catch_warnings(record=True) as caught, self._act():
            warnings.simplefilter("always", LayerCollapseWarning)
            warnings.simplefilter("always", PatternWarning)
            if pat.grouped:  # the fraction of every group's channels (locked groups kept)
                self.session.set_global_sparsity(float(sparsity), allocation="global" if self.allocation == "global" else "uniform",
                                                 criterion=self.criterion, locked=sorted(self.locked), pattern=pat.name)
            elif pat.levels() is not None:  # the global slider: dense, or the pattern wherever it fits
                on = float(sparsity) > 0
                level = max(pat.levels()) if on else 0.0
                if on:
                    self.session.set_global_sparsity(level, criterion=self.criterion, locked=sorted(self.locked),
                                                     pattern=self.pattern)
                else:
                    self.session.set_sparsity({i.name: 0.0 for i in self.session.layers if i.name not in self.locked})
            else:
                self.session.set_global_sparsity(float(sparsity), allocation=self.allocation, criterion=self.criterion,
                                                 locked=sorted(self.locked), pattern=pat.name)
        collapse = [w for w in caught if issubclass(w.category, (LayerCollapseWarning, PatternWarning))]
        for w in caught:
            if w not in collapse:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        self.set_status("".join(f"<span class='prune-lab-warning' style='color:#b36b00'>{html.escape(str(w.message))}</span>"
                                for w in collapse))

    def set_criterion(self, criterion: str) -> None:
        """Switch criterion: every pruned layer is re-masked by it at its current sparsity."""
        from .criteria import get_criterion

        self._check_idle("change the criterion")
        crit = get_criterion(criterion)  # an unknown name raises with the valid ones
        cal = self.session.calibration
        computing = bool(crit.needs) and (cal is None or not set(crit.needs) <= set(cal.needs))
        if crit.needs and cal is None:
            if self.train_data is None:
                raise ValueError(f"criterion {criterion!r} looks at data: open the Lab with train_data=... "
                                 "(or call session.calibrate(train_data) first)")
            self.session.calibrate(self.train_data, samples=self.calibration_samples, progress=False)
            cal = self.session.calibration
        pruned = {n: s for n, s in self.session.sparsity.items() if s > 0}
        computing = computing and bool(pruned)  # else computed at the first prune
        if computing:  # one criterion's statistics are held at a time: computed at its first use
            self.set_status(f"computing the {criterion} statistics on {cal.samples} training samples...")
        self.push_undo()
        self.criterion = criterion
        self._emit("criterion")
        by_pattern: dict[str, dict[str, float]] = {}
        patterns = self.session.patterns
        for n, sp in pruned.items():  # each layer keeps its pattern
            by_pattern.setdefault(patterns[n], {})[n] = sp
        with self._act():
            for pat, group in by_pattern.items():
                self.session.set_sparsity(group, criterion=criterion, pattern=pat)
        if computing:
            self.set_status(f"{criterion}: statistics from {cal.samples} training samples")

    def set_allocation(self, allocation: str) -> None:
        """Switch allocation: the current total sparsity is re-split by it."""
        get_allocation(allocation)  # an unknown name raises with the valid ones and the closest
        self._check_idle("change the allocation")
        self.allocation = allocation
        self._emit("allocation")
        total = self.channel_total() if get_pattern(self.pattern).grouped else self.session.total_sparsity()
        if total > 0:
            self.set_global(total)

    def channel_total(self) -> float:
        """The fraction of all channel groups' channels removed (what the global slider shows
        under the channels pattern)."""
        held = self._held().values()
        return sum(n - k for k, n in held) / max(sum(n for _, n in held), 1)

    def set_locked(self, name: str, locked: bool) -> None:
        self._check_idle("lock layers")
        self.session.layer(name)
        (self.locked.add if locked else self.locked.discard)(name)
        self._emit("locks", (name,))

    def apply_plan(self, target: Optional[float] = None) -> Any:
        """Apply the sensitivity plan for ``target`` total sparsity (default: the current
        total); ``status`` shows the curves' prediction next to the measured value."""
        self._check_idle("apply a plan")
        result = self.session.last_sensitivity
        if result is None:
            raise ValueError("no sensitivity result yet: click 'run sensitivity' first")
        target = self.session.total_sparsity() if target is None else target
        locked = {n: self.session.pruned_counts[n] for n in self.locked}
        plan = result.allocate(target_sparsity=target, locked=locked)
        self.push_undo()
        with self._act():
            self.session.set_sparsity(plan, criterion=self.criterion)
        measured = self.session.evaluate()[self.session.metric_name]
        self.set_status(
            f"plan for {plan.total_sparsity:.1%}: predicted {self.session.metric_name} "
            f"{fmt_metric(self.session.metric_name, plan.predicted)} "
            f"(a guess from the curves, relative to the state the sweep started from) &middot; <b>measured {fmt_metric(self.session.metric_name, measured)}</b>"
        )
        return plan

    def apply_budget(self, key: str, value: float) -> Any:
        """Plan for one budget (``{key: value}``, see ``Session.plan``) from the latest sweep, apply
        it (one undo step); ``status`` shows the measured cost and metric next to the prediction."""
        self._check_idle("plan to a budget")
        result = self.session.last_sensitivity
        if result is None:
            raise ValueError("no sensitivity result yet: click 'run sensitivity' first (the plan is chosen from its curves)")
        plan = self.session.plan({key: value}, sensitivity=result)  # checks everything; the session is unchanged
        self.push_undo()
        with self._act():
            self.session.set_sparsity(plan, criterion=plan.criterion, pattern=plan.pattern)
        b, metric = plan.budget, plan.metric
        self.set_status(
            f"budget {html.escape(key)} &le; {b.limit:,.4g} (dense {b.dense:,.4g}): <b>measured {plan.measured[key]:,.4g}</b>, "
            f"{metric} <b>{fmt_metric(metric, plan.measured[metric])}</b> (the curves predicted "
            f"{fmt_metric(metric, plan.predicted[metric])}); "
            f"{len(plan.rounds)} plans measured")
        return plan

    def export(self, path: str) -> dict:
        self._check_idle("export")
        target = Path(path).expanduser()
        if not target.parent.is_dir():
            raise ValueError(f"cannot export to {str(target)!r}: the folder {str(target.parent)!r} does not exist; create it or pick another path")
        paths = self.session.export(target.resolve(), sparse=True)
        sizes = ", ".join(f"{p} ({fmt_bytes(p.stat().st_size)})" for p in paths.values())
        self.set_status(f"exported {html.escape(sizes)}")
        return paths

    def move_to(self, device: str) -> None:
        self._check_idle("move the model")
        with self._act():
            self.session.to(device)

    # ------------------------------------------------------------------ sweeps
    def sweep_total(self, levels: Optional[Sequence[float]]) -> int:
        """Points the next sweep covers in all (a resumed one counts its finished points too)."""
        resume = self._resumable(levels)
        if resume is not None:
            return len(resume.layers) * len(resume.levels)
        return len(self.session.layers) * len(DEFAULT_LEVELS if levels is None else levels)

    def _resumable(self, levels: Optional[Sequence[float]]) -> Any:
        previous = self.session.last_sensitivity
        if previous is None or previous.complete or previous.criterion != self.criterion:
            return None
        if levels is not None and list(levels) != previous.levels:
            return None
        return previous

    def run_sweep(self, levels: Optional[Sequence[float]] = None, background: bool = False) -> None:
        """Sensitivity sweep with the current criterion; an interrupted one of the same
        criterion is resumed. ``background=True`` runs it in a thread (Stop stays usable)."""
        self._check_idle("start a sweep")
        resume = self._resumable(levels)
        job = SweepJob(total=self.sweep_total(levels), running=True)
        job.done = len(resume.records) if resume is not None else 0
        self.job = job

        def on_step(_record: dict) -> None:
            job.done += 1
            self._emit("progress")

        def work() -> None:
            try:
                job.result = self.session.sensitivity(
                    levels=levels, criterion=self.criterion, resume=resume, progress=False,
                    on_step=on_step, should_stop=lambda: job.stop_requested, executor=self.executor,
                )
                r = job.result
                total = len(r.layers) * len(r.levels)
                if r.missing:
                    self.set_status(f"sensitivity: {len(r.missing)} of {total} points could not be measured "
                                    f"({html.escape(r.missing[0]['error'])}); run again to retry them")
                else:
                    self.set_status("sensitivity: complete" if r.complete else
                                    f"sensitivity: stopped, {len(r.records)}/{total} points kept (run again to resume)")
            except Exception as e:
                self.show_error(e)

        self._start(job, work, background)

    def run_finetune(self, steps: int = 200, lr: float = 0.01, schedule: str = "oneshot", rounds: int = 3,
                     background: bool = False) -> None:
        """Fine-tune on the Lab's training data with the masks held (pruned weights stay 0).
        ``schedule``: "oneshot" (train at the current masks), "iterative" or "agp" (reach the
        current total sparsity in ``rounds`` pruning steps from the dense model, training
        between). A point is measured before and after; undo goes back to before. Stop keeps
        what was learned so far. ``background=True`` runs it in a thread."""
        if self.train_data is None:
            raise ValueError("fine-tuning in the Lab needs training data: open it with pl.Lab(session, train_data=...)")
        check_count(steps, "steps")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"learning rate must be positive, got {lr!r}")
        if schedule not in ("oneshot", "iterative", "agp"):
            raise ValueError(f"schedule must be 'oneshot', 'iterative' or 'agp', got {schedule!r}")
        self._check_idle("fine-tune")
        target = self.session.total_sparsity()
        if schedule != "oneshot" and target == 0:
            raise ValueError(f"schedule {schedule!r} prunes to the current total sparsity, which is 0: prune first")
        metric = self.session.metric_name
        before = self.measure()["evaluation"][metric]  # the point before
        self.push_undo()
        phases = 1 if schedule == "oneshot" else rounds
        job = SweepJob(kind="finetune", total=steps * phases, running=True)
        self.job = job

        def on_step(_step: int, _loss: float) -> None:
            job.done += 1
            self._emit("progress")
            if job.stop_requested:
                raise KeyboardInterrupt  # the trainer keeps what was learned and stops

        def work() -> None:
            try:
                if schedule == "oneshot":
                    with self._act():
                        result = self.session.finetune(self.train_data, steps=steps, lr=lr, progress=False,
                                                       on_step=on_step, criterion=self.criterion)
                else:
                    with self._act():
                        self.session.reset()
                        result = self.session.finetune(self.train_data, steps=steps, lr=lr, schedule=schedule,
                                                       target_sparsity=target, rounds=rounds, allocation=self.allocation,
                                                       progress=False, on_step=on_step, criterion=self.criterion)
                job.result = result
                after = self.measure()["evaluation"][metric]
                state = "stopped after" if result.interrupted else "done:"
                self.set_status(f"fine-tuning {state} {job.done} steps; {metric} {fmt_metric(metric, before)} -> {fmt_metric(metric, after)} "
                                "(undo goes back to before)")
            except Exception as e:
                self.show_error(e)

        self._start(job, work, background)

    def _start(self, job: SweepJob, work: Callable[[], None], background: bool) -> None:
        """Run a job's ``work`` here or in a thread; whatever happens, the job ends and a 'job'
        event says so."""
        def run() -> None:
            try:
                work()
            finally:
                job.running = False
                self._emit("job")

        self._emit("job")
        if background:
            job.thread = threading.Thread(target=run, daemon=True)
            job.thread.start()
        else:
            run()

    def stop(self) -> None:
        """Stop a running sweep after the current point, or fine-tuning after the current step;
        what was done is kept."""
        self.job.stop_requested = True

    # ------------------------------------------------------------------ measuring
    def measure(self, preview: bool = False) -> dict[str, Any]:
        """Evaluate (the preview subset or everything) and count; full measurements add a point."""
        s = self.session
        with s.lock:  # numbers of one state, even if another thread prunes meanwhile
            t0 = time.perf_counter()
            limit = min(self.policy.samples, len(s.data)) if preview else None
            result = s.evaluate(limit=limit)
            if not preview:
                self.policy.last_full_s = time.perf_counter() - t0
            stats = s.stats()
            dense = s.baseline(limit)
        self.evaluation = {**result, "preview": preview, "samples": limit or len(s.data)}
        self.numbers = {"evaluation": self.evaluation, "stats": stats, "dense": dense}
        if not preview:
            self.points.append({
                s.metric_name: result[s.metric_name], "loss": result["loss"],
                "sparse_bytes": stats.total["sparse_file_bytes"], "effective_macs": stats.total["effective_macs"] or 1,
                "sparsity": stats.total["sparsity"], "snapshot": s.snapshot(),
            })
        self.timings["numbers_ms"] = (time.perf_counter() - t0) * 1000
        return self.numbers

    def _measured_levels(self) -> dict[str, list[float]]:
        """Per layer the last sweep has points for, the levels it measured there (sorted)."""
        r = self.session.last_sensitivity
        levels: dict[str, list[float]] = {}
        for layer, level in sorted(r.done()) if r is not None else ():
            levels.setdefault(layer, []).append(level)
        return levels

    def unmeasured_layers(self) -> list[str]:
        """Layers the last sweep has no point for (a stopped sweep): shown as 'not measured'."""
        measured = self._measured_levels()
        return [i.name for i in self.session.layers if i.name not in measured]

    def partly_measured_layers(self) -> dict[str, list[float]]:
        """Layers a stopped sweep measured at some of its levels only, with those levels: their
        ranking would read as a verdict ('0% ok') where the sweep simply did not get there."""
        r = self.session.last_sensitivity
        return {} if r is None else {n: v for n, v in self._measured_levels().items() if len(v) < len(r.levels)}

    # ------------------------------------------------------------------ status
    def set_status(self, text: str) -> None:
        self.status = text
        self._emit("status")

    def show_error(self, e: BaseException) -> None:
        self.last_error = e
        self.set_status(f"<span class='prune-lab-error' style='color:#b00020'>{html.escape(type(e).__name__)}: {html.escape(str(e))}</span>")

    def __repr__(self) -> str:
        return (f"LabModel({type(self.session.model).__name__}, {self.session.total_sparsity():.1%} sparse, "
                f"{len(self.history.undo_stack)} undo steps, {len(self.points)} points, preview {self.policy.mode})")


class _Acting:
    """Marks the Lab's own changes, so its session listener does not treat them as external."""

    def __init__(self, model: LabModel):
        self.model = model

    def __enter__(self) -> None:
        self.model._acting += 1

    def __exit__(self, *exc: Any) -> None:
        self.model._acting -= 1
        if not self.model._acting:  # what the session reported meanwhile, once per kind
            self.model._flush()
