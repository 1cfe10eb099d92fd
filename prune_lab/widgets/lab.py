"""The Lab view: ipywidgets wired to a headless ``LabModel``; it draws what the model holds.

Controls call ``LabModel`` actions; the view listens to the model (``observe``) and, on every
change, wherever it came from (a control, another cell, a script), moves the controls to the
session's true state and re-measures. Nothing here computes a number.
"""
from __future__ import annotations

import functools
import html
import io
import time
from typing import Any, Callable, Optional, Sequence

import ipywidgets as W
import torch

from .. import plots
from ..allocation import list_allocations
from ..criteria import list_criteria
from ..devices import device_name as _device_name
from ..formats import fmt_bytes, fmt_count, fmt_delta as _fmt_delta, fmt_metric as _fmt_metric
from ..lab_model import LabEvent, LabModel
from ..session import Session
from .percent_slider import STYLE as _PERCENT_STYLE, PercentSlider, to_percent

DRAG_END_S = 0.35  # no slider event for this long ends a drag


WIDE = {"description_width": "initial"}  # labels take the width they need: never cut
QUANT_OPTIONS = [("float32", "float32"), ("8-bit uniform", "8/uniform"), ("4-bit uniform", "4/uniform"),
                 ("6-bit k-means", "6/kmeans"), ("4-bit k-means", "4/kmeans"), ("2-bit k-means", "2/kmeans")]


def _quant_of(value: str) -> Optional[tuple[int, str]]:
    """The dropdown's value as ``(bits, method)``, None for float32."""
    if value == "float32":
        return None
    bits, method = value.split("/")
    return int(bits), method


def css_name(layer: str) -> str:
    return (layer or "model").replace(".", "-")


def _guard(fn: Callable) -> Callable:
    """Run a callback; show any error in the Lab's status line instead of losing it."""

    @functools.wraps(fn)
    def wrapper(self: "Lab", *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except Exception as e:  # shown to the user, kept for tests
            self.model.show_error(e)
            self._sync_controls()

    return wrapper


class Lab:
    """An ipywidgets dashboard over a :class:`~prune_lab.Session` (through a ``LabModel``).

    ``lab.sliders[name]`` (sparsity in whole percent, 0-99), ``lab.global_slider`` (shows the
    total sparsity, in percent), ``lab.allocation``, ``lab.criterion``, ``lab.locks[name]``, buttons
    ``lab.reset_button`` ... ``lab.labels[key]`` show exactly ``Session.evaluate()``/``stats()``.
    ``train_data`` lets the criterion dropdown calibrate data-aware criteria (taylor, obd, wanda)
    the first time one is chosen.

    In a running kernel, slider events are coalesced: only the newest value is evaluated; while
    dragging, ``preview`` ("auto", "never", "always") decides whether the first
    ``preview_samples`` samples stand in (labelled "preview") until the drag ends. Outside a
    kernel (scripts, tests) every change is evaluated in full at once. ``executor`` runs the
    sensitivity sweep elsewhere (``"ray"``, a Ray address: see ``Session.sensitivity``).
    Plots are shown at ``dpi`` CSS pixels per inch (96: text at its point size at 100% zoom) and
    rendered at ``scale`` times that: 1.5 is sharp on HiDPI screens; 2 is sharper and costs about
    40 ms more per slider move on a 2-core CPU; 1 is the fastest.
    """

    def __init__(
        self,
        session: Session,
        sensitivity: Any = None,
        preview_samples: int = 256,
        frame_budget_s: float = 0.05,
        dpi: int = 96,
        defer: Optional[bool] = None,
        preview: str = "auto",
        train_data: Any = None,
        executor: Any = None,
        scale: float = 1.5,
    ):
        if not isinstance(session, Session):
            raise TypeError(f"Lab needs a prune_lab.Session, got {type(session).__name__}")
        self.model = LabModel(session, sensitivity, preview, frame_budget_s, preview_samples, train_data,
                              executor=executor)
        self.session = session
        self.dpi = dpi
        if not 0.5 <= scale <= 4:
            raise ValueError(f"scale must be between 0.5 and 4 (pixels rendered per CSS pixel), got {scale!r}")
        self.scale = scale
        self._syncing = False
        self._drawn_hist: Any = None
        self._histogram: Optional[plots.LayerHistogram] = None  # the histogram panel's artists
        self._loop = _kernel_loop() if defer is None or defer else None
        self._pending = False
        self._dragging = False
        self._last_event = 0.0
        self._build()
        self._subscribe()
        self.refresh()

    # the model's state, read through the view for convenience
    @property
    def points(self) -> list:
        return self.model.points

    @property
    def evaluation(self) -> dict:
        return self.model.evaluation

    @property
    def last_error(self) -> Optional[BaseException]:
        return self.model.last_error

    @property
    def timings(self) -> dict:
        return self.model.timings

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        """The controls, the numbers, the plots and the tabs that hold them."""
        rows = self._build_layer_rows()
        self._build_choices()
        self._build_buttons()
        self._build_numbers_and_plots()
        self._build_finetune()
        self._build_layout(rows)

    def _button(self, label: str, role: str, handler: Callable, icon: str = "") -> W.Button:
        b = W.Button(description=label, icon=icon, layout=W.Layout(width="auto"))
        b.add_class(f"prune-lab-{role}")
        b.on_click(lambda _b: handler())
        return b

    def _build_layer_rows(self) -> list:
        """Per layer: lock, sparsity slider, kind/shape/params, sensitivity bar."""
        s = self.session
        self.sliders: dict[str, PercentSlider] = {}
        self.locks: dict[str, W.ToggleButton] = {}
        self.sensitivity_bars: dict[str, W.HTML] = {}
        self.meta: dict[str, W.HTML] = {}  # per layer: kind, shape and params; under channels, "45 of 64 channels"
        self._meta_text: dict[str, str] = {}
        rows = []
        for info in s.layers:
            name = info.name
            slider = PercentSlider(
                value=to_percent(s.sparsity[name]), description=name or "(model)", continuous_update=True,
                style={"description_width": "120px"}, layout=W.Layout(width="380px"),
            )
            slider.add_class("prune-lab-slider")
            slider.add_class(f"prune-lab-slider-{css_name(name)}")
            slider.observe(functools.partial(self._on_layer_slider, name), names="value")
            lock = W.ToggleButton(value=False, icon="lock", tooltip=f"keep {name} fixed while the global slider moves", layout=W.Layout(width="40px"))
            lock.add_class("prune-lab-lock")
            lock.observe(functools.partial(self._on_lock, name), names="value")
            shape = "x".join(map(str, info.shape))
            self._meta_text[name] = f"<span style='font-size:11px;color:#555'>{info.kind} {shape} &middot; {info.n_params:,} params</span>"
            meta = W.HTML(self._meta_text[name], layout=W.Layout(width="210px"))
            meta.add_class("prune-lab-layer-meta")
            self.meta[name] = meta
            bar = W.HTML("", layout=W.Layout(width="120px"))
            bar.add_class("prune-lab-sensbar")
            self.sliders[name], self.locks[name], self.sensitivity_bars[name] = slider, lock, bar
            rows.append(W.HBox([lock, slider, meta, bar]))
        return rows

    def _build_choices(self) -> None:
        """The global slider and the dropdowns: allocation, criterion, pattern, quantization."""
        self.global_slider = PercentSlider(value=0, description="all layers", continuous_update=True,
                                           style={"description_width": "120px"}, layout=W.Layout(width="380px"))
        self.global_slider.add_class("prune-lab-global")
        self.global_slider.observe(self._on_global, names="value")
        self.allocation = W.Dropdown(options=list_allocations(), value="global", description="allocation", style=WIDE, layout=W.Layout(width="250px"))
        self.allocation.add_class("prune-lab-allocation")
        self.allocation.observe(self._on_allocation, names="value")
        self.criterion = W.Dropdown(options=list_criteria(), value="magnitude", description="criterion", style=WIDE, layout=W.Layout(width="250px"))
        self.criterion.add_class("prune-lab-criterion")
        self.criterion.observe(self._on_criterion, names="value")
        self.pattern = W.Dropdown(options=self.model.pattern_options(), value=self.model.pattern,
                                  description="pattern", style=WIDE, layout=W.Layout(width="250px"))
        self.pattern.add_class("prune-lab-pattern")
        self.pattern.observe(self._on_pattern, names="value")
        self.quant = W.Dropdown(options=QUANT_OPTIONS, value="float32", description="weights", style=WIDE, layout=W.Layout(width="250px"))
        self.quant.add_class("prune-lab-quant")
        self.quant.observe(self._on_quant, names="value")

    def _build_buttons(self) -> None:
        """History, sweep, plan, speed and export buttons; the device dropdown; the sweep bar."""
        button = self._button
        self.reset_button = button("reset", "reset", self.reset, "undo-alt")
        self.undo_button = button("undo", "undo", self.undo, "arrow-left")
        self.redo_button = button("redo", "redo", self.redo, "arrow-right")
        self.sensitivity_button = button("run sensitivity", "run-sensitivity", self.run_sensitivity, "chart-line")
        self.stop_button = button("stop", "stop", self.stop, "stop")
        self.stop_button.disabled = True
        self.plan_button = button("apply plan", "apply-plan", self.apply_plan, "magic")
        self.budget_key = W.Dropdown(options=[("MACs", "macs"), ("params", "params"), ("file bytes", "file_bytes"),
                                              ("latency ms", "latency_ms")], value="macs", description="budget",
                                     layout=W.Layout(width="190px"))
        self.budget_key.add_class("prune-lab-budget-key")
        self.budget_value = W.BoundedFloatText(value=0.5, min=1e-9, max=1e15, step=0.05, layout=W.Layout(width="110px"),
                                               tooltip="up to 1: a fraction of the dense model's; above: absolute (ms for latency)")
        self.budget_value.add_class("prune-lab-budget-value")
        self.budget_button = button("plan to budget", "plan-budget", self.apply_budget, "bullseye")
        self.budget_button.tooltip = "the most accurate plan from the curves whose measured cost meets the budget"
        self.speed_button = button("measure speed", "measure-speed", self.measure_speed, "stopwatch")
        self.speed_button.tooltip = "remove the channels for real (compact) and time both models"
        self.speed_button.layout.display = "none"  # shown under the channels pattern
        self.export_path = W.Text(value="pruned_model.pt", description="export to", style=WIDE, layout=W.Layout(width="420px"))
        self.export_button = button("export", "export", self.export, "save")
        devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        self.device = W.Dropdown(options=devices, value=_device_name(self.session.device), description="device", style=WIDE, layout=W.Layout(width="200px"))
        self.device.add_class("prune-lab-device")
        self.device.observe(self._on_device, names="value")
        self.progress = W.IntProgress(value=0, min=0, max=1, description="sweep", style=WIDE, layout=W.Layout(width="300px", visibility="hidden"))
        self.progress.add_class("prune-lab-progress")

    def _build_numbers_and_plots(self) -> None:
        """The measured numbers, the status line and the three plot panels."""
        self.labels: dict[str, W.HTML] = {}
        for key in ("mode", "accuracy", "delta", "loss", "sparsity", "nonzeros", "bytes", "compression", "macs", "speedup", "measured"):
            self.labels[key] = W.HTML()
            self.labels[key].add_class(f"prune-lab-metric-{key}")
        self.status = W.HTML()
        self.status.add_class("prune-lab-status")

        self.layer_select = W.Dropdown(options=[i.name for i in self.session.layers], description="histogram", style=WIDE, layout=W.Layout(width="300px"))
        self.layer_select.observe(lambda _c: self._guarded_plots(), names="value")
        self.log_counts = W.Checkbox(value=False, description="log counts", indent=False)
        self.log_counts.observe(lambda _c: self._guarded_plots(), names="value")  # the log flag is part of the figure key
        # displayed at their rendered size (figure inches x dpi), never stretched
        sizes = {"histogram": (4.6, 3.0), "sensitivity": (7.0, 4.2), "tradeoff": (7.0, 3.0)}
        self.images = {k: W.Image(format="png", layout=W.Layout(width=f"{w * self.dpi:.0f}px", height=f"{h * self.dpi:.0f}px")) for k, (w, h) in sizes.items()}
        for k, img in self.images.items():
            img.add_class(f"prune-lab-plot-{k}")
        self._figures: dict[str, Any] = {}
        # rendered at scale x the CSS size (HiDPI), text at its point size at 100% zoom
        self.panels = {k: _BlitPanel(img, round(self.scale * self.dpi)) for k, img in self.images.items()}

    def _build_finetune(self) -> None:
        """Fine-tuning controls (they need training data: ``pl.Lab(session, train_data=...)``)."""
        button = self._button
        self.ft_steps = W.BoundedIntText(value=200, min=1, max=1_000_000, description="steps", style=WIDE,
                                         layout=W.Layout(width="160px"))
        self.ft_lr = W.BoundedFloatText(value=0.01, min=1e-6, max=10.0, step=0.001, description="learning rate", style=WIDE,
                                        layout=W.Layout(width="210px"))
        self.ft_schedule = W.Dropdown(options=[("train at these masks", "oneshot"), ("iterative to this sparsity", "iterative"),
                                               ("AGP to this sparsity", "agp")], value="oneshot", description="schedule",
                                      style=WIDE, layout=W.Layout(width="300px"))
        for w_, role in ((self.ft_steps, "ft-steps"), (self.ft_lr, "ft-lr"), (self.ft_schedule, "ft-schedule")):
            w_.add_class(f"prune-lab-{role}")
        self.finetune_button = button("fine-tune", "finetune", self.run_finetune, "graduation-cap")
        self.ft_stop_button = button("stop", "ft-stop", self.stop, "stop")
        self.ft_stop_button.disabled = True
        self.ft_progress = W.IntProgress(value=0, min=0, max=1, description="steps", style=WIDE,
                                         layout=W.Layout(width="300px", visibility="hidden"))
        self.ft_progress.add_class("prune-lab-ft-progress")
        if self.model.train_data is None:
            self.finetune_button.disabled = True
            self.finetune_button.tooltip = "open the Lab with pl.Lab(session, train_data=...) to fine-tune"

    def _build_layout(self, rows: list) -> None:
        """The numbers above four tabs: prune, sensitivity, fine-tune, export (max 820 px wide)."""
        metrics = W.HBox([self.labels[k] for k in self.labels], layout=W.Layout(flex_flow="row wrap", grid_gap="2px 18px"))
        metrics.add_class("prune-lab-metrics")
        for label in self.labels.values():
            label.layout = W.Layout(width="auto")
        wrap = W.Layout(flex_flow="row wrap", align_items="center")
        prune_tab = W.VBox([
            W.HBox([self.global_slider], layout=wrap),
            W.HBox([self.allocation, self.criterion], layout=wrap),
            W.HBox([self.pattern, self.quant, self.speed_button], layout=wrap),
            W.VBox(rows),
            W.HBox([self.reset_button, self.undo_button, self.redo_button], layout=wrap),
            W.HBox([self.layer_select, self.log_counts], layout=wrap),
            self.images["histogram"],
        ])
        sensitivity_tab = W.VBox([
            W.HBox([self.sensitivity_button, self.stop_button, self.plan_button], layout=wrap),
            W.HBox([self.budget_key, self.budget_value, self.budget_button], layout=wrap),
            self.progress,
            self.images["sensitivity"],
        ])
        finetune_tab = W.VBox([
            W.HBox([self.ft_steps, self.ft_lr], layout=wrap),
            W.HBox([self.ft_schedule], layout=wrap),
            W.HBox([self.finetune_button, self.ft_stop_button], layout=wrap),
            self.ft_progress,
            self.images["tradeoff"],
        ])
        export_tab = W.VBox([
            W.HBox([self.export_path, self.export_button], layout=wrap),
            W.HBox([self.device], layout=wrap),
        ])
        self.tabs = W.Tab(children=[prune_tab, sensitivity_tab, finetune_tab, export_tab])
        for i, title in enumerate(("prune", "sensitivity", "fine-tune", "export")):
            self.tabs.set_title(i, title)
        self.tabs.add_class("prune-lab-tabs")
        self.widget = W.VBox([W.HTML(_PERCENT_STYLE), metrics, self.status, self.tabs], layout=W.Layout(max_width="820px"))
        self.widget.add_class("prune-lab")

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    # ------------------------------------------------------------------ the model speaks
    def _subscribe(self) -> None:
        """One handler per kind of Lab event: each touches only the controls that show it."""
        observe = self.model.observe
        observe(self._on_sparsity, "sparsity")
        observe(self._on_bits, "bits")
        observe(self._on_choice, "pattern", "criterion", "allocation", "locks", "device")
        observe(self._on_job, "job")
        observe(lambda _e: self._job_bar(), "progress")
        observe(self._on_status, "status")

    def _on_sparsity(self, event: LabEvent) -> None:
        """Masks or weights changed: those layers' sliders (all, under channels: groups couple
        them) and the global slider follow, then the numbers."""
        self._sync_sliders(None if self.model.grouped or not event.layers else event.layers)
        self._changed()

    def _on_bits(self, _event: LabEvent) -> None:
        self._sync_choices()
        self._changed()

    def _on_choice(self, event: LabEvent) -> None:
        """A Lab choice changed: its control follows; a pattern or device also changes what the
        sliders and numbers show."""
        if event.kind in ("pattern", "device"):
            self._sync_controls()
            self._changed()
        else:
            self._sync_choices()

    def _on_job(self, _event: LabEvent) -> None:
        busy = self.model.busy
        self._set_controls_disabled(busy)
        job = self.model.job
        self.stop_button.disabled = not (busy and job.kind != "finetune")
        self.ft_stop_button.disabled = not (busy and job.kind == "finetune")
        self._job_bar().layout.visibility = "visible" if busy or job.total else "hidden"
        if not busy:  # a job ended (or trial masks went): its results are drawn
            self._sync_controls()
            self._changed()

    def _on_status(self, _event: LabEvent) -> None:
        self.status.value = self.model.status

    def _job_bar(self) -> Any:
        """The running job's progress bar (sweep or fine-tune), moved to where the job is."""
        job = self.model.job
        bar = self.ft_progress if job.kind == "finetune" else self.progress
        bar.max = max(job.total, 1)
        bar.value = job.done
        return bar

    # ------------------------------------------------------------------ control callbacks
    def _set_slider(self, widget: PercentSlider, fraction: float) -> None:
        widget.value = to_percent(fraction)

    @_guard
    def _on_layer_slider(self, name: str, change: dict) -> None:
        if self._syncing:
            return
        self._syncing = True
        try:
            self.layer_select.value = name
        finally:
            self._syncing = False
        self.model.set_layer(name, change["new"] / 100, coalesce=self._loop is not None)

    @_guard
    def _on_global(self, change: dict) -> None:
        if self._syncing:
            return
        self.model.set_global(change["new"] / 100, coalesce=self._loop is not None)

    @_guard
    def _on_allocation(self, change: dict) -> None:
        if not self._syncing:
            self.model.set_allocation(change["new"])

    @_guard
    def _on_criterion(self, change: dict) -> None:
        if not self._syncing:
            self.model.set_criterion(change["new"])

    @_guard
    def _on_pattern(self, change: dict) -> None:
        if not self._syncing:
            self.model.set_pattern(change["new"])

    @_guard
    def _on_quant(self, change: dict) -> None:
        if not self._syncing:
            self.model.set_quant(_quant_of(change["new"]))

    @_guard
    def _on_lock(self, name: str, change: dict) -> None:
        if not self._syncing:
            self.model.set_locked(name, bool(change["new"]))

    @_guard
    def _on_device(self, change: dict) -> None:
        if not self._syncing:
            self.model.move_to(change["new"])

    # ------------------------------------------------------------------ actions (buttons call these)
    @_guard
    def reset(self) -> None:
        self.model.reset()

    @_guard
    def undo(self) -> None:
        self.model.undo()

    @_guard
    def redo(self) -> None:
        self.model.redo()

    @_guard
    def run_sensitivity(self, levels: Any = None) -> None:
        """Sweep with a progress bar; in a kernel it runs in a thread so Stop stays clickable."""
        self.model.run_sweep(levels, background=self._loop is not None)

    def stop(self) -> None:
        """Stop a running sweep after the current point (or fine-tuning after the current
        step); what was done is kept."""
        self.model.stop()

    @_guard
    def run_finetune(self, steps: Optional[int] = None, lr: Optional[float] = None, schedule: Optional[str] = None) -> None:
        """Fine-tune with the panel's settings (or these); in a kernel it runs in a thread so Stop
        stays clickable. Undo goes back to before it."""
        self.model.run_finetune(steps if steps is not None else int(self.ft_steps.value),
                                lr if lr is not None else float(self.ft_lr.value),
                                schedule if schedule is not None else self.ft_schedule.value,
                                background=self._loop is not None)

    @_guard
    def measure_speed(self) -> None:
        """Compact and time both models (the channels pattern): fills the 'measured' label."""
        self.model.measure_speed()
        self.refresh()

    @_guard
    def apply_plan(self, target: Optional[float] = None) -> None:
        """Apply the sensitivity plan for the current total sparsity (or ``target``)."""
        self.model.apply_plan(self.global_slider.value / 100 if target is None else target)

    @_guard
    def apply_budget(self, key: Optional[str] = None, value: Optional[float] = None) -> None:
        """Plan to the budget in the box (or ``key``/``value``) from the latest sweep, measured, and apply it."""
        self.model.apply_budget(key or self.budget_key.value, self.budget_value.value if value is None else value)

    @_guard
    def export(self, path: Optional[str] = None) -> dict:
        return self.model.export(path or self.export_path.value)

    def _sync_controls(self) -> None:
        """Move every control to what the session holds, without firing callbacks."""
        self._sync_sliders(None)
        self._sync_choices()

    def _sync_sliders(self, layers: Optional[Sequence[str]]) -> None:
        """The sliders of ``layers`` (None: all), their labels and the global slider."""
        self._syncing = True
        try:
            channels = self.model.grouped
            for name in self.sliders if layers is None else [n for n in layers if n in self.sliders]:
                slider = self.sliders[name]
                fraction = self.model.channel_fraction(name) if channels else None
                self._set_slider(slider, fraction if fraction is not None else self.session.sparsity[name])
                text = self.model.channel_text(name) if channels else ""
                self.meta[name].value = (f"<span style='font-size:11px;color:#555'>{html.escape(text)}</span>" if channels
                                         else self._meta_text[name])
                if not self.model.busy:
                    slider.disabled = not self._slider_usable(name)
            if channels:
                self._set_slider(self.global_slider, self.model.channel_total())
            else:
                self._set_slider(self.global_slider, self.session.total_sparsity())
            self.speed_button.layout.display = "" if channels else "none"
        finally:
            self._syncing = False

    def _sync_choices(self) -> None:
        """The dropdowns and locks: device, criterion, allocation, pattern, quantization."""
        self._syncing = True
        try:
            self.device.value = _device_name(self.session.device)
            self.criterion.value = self.model.criterion
            self.allocation.value = self.model.allocation
            self.pattern.value = self.model.pattern
            held = self.model.quant
            value = "float32" if held is None else f"{held[0]}/{held[1]}"
            self.quant.value = value if value in dict((v, k) for k, v in QUANT_OPTIONS) else "float32"
            for name, lock in self.locks.items():
                lock.value = name in self.model.locked
        finally:
            self._syncing = False

    def _set_controls_disabled(self, disabled: bool) -> None:
        for w in [*self.sliders.values(), *self.locks.values(), self.global_slider, self.allocation, self.criterion,
                  self.pattern, self.quant, self.finetune_button, self.ft_steps, self.ft_lr, self.ft_schedule,
                  self.reset_button, self.undo_button, self.redo_button, self.sensitivity_button, self.plan_button, self.speed_button,
                  self.budget_key, self.budget_value, self.budget_button,
                  self.device, self.export_button, self.export_path, self.layer_select]:
            w.disabled = disabled
        if self.model.train_data is None:
            self.finetune_button.disabled = True
        if not disabled:
            for name, slider in self.sliders.items():
                slider.disabled = not self._slider_usable(name)

    def _slider_usable(self, name: str) -> bool:
        """Under the channels pattern only layers that produce a channel group have a slider."""
        return not self.model.grouped or self.model.channel_fraction(name) is not None

    # ------------------------------------------------------------------ refreshing
    def _changed(self) -> None:
        """The session changed: refresh now (scripts) or coalesced on the kernel loop."""
        if self._loop is None:
            self.refresh()
            return
        self._last_event = time.monotonic()
        self._dragging = True
        if not self._pending:
            self._pending = True
            self._loop.add_callback(self._flush)
        self._loop.call_later(DRAG_END_S, self._drag_end)

    def _flush(self) -> None:
        self._pending = False
        self.refresh(preview=self.model.policy.use_preview(self._dragging))

    def _drag_end(self) -> None:
        if time.monotonic() - self._last_event >= DRAG_END_S - 1e-3 and self._dragging:
            self._dragging = False
            if self.evaluation.get("preview"):
                self.refresh()

    @_guard
    def refresh(self, preview: bool = False) -> None:
        """Measure the session and update every label and plot (``preview``: a subset only)."""
        if self.model.busy:
            return  # trial masks are in the model; the sweep's end refreshes
        t0 = time.perf_counter()
        numbers = self.model.measure(preview)
        ev, stats, dense = numbers["evaluation"], numbers["stats"], numbers["dense"]
        self._update_labels(ev, dense, stats, preview, ev["samples"])
        t1 = time.perf_counter()
        self._update_plots()
        t2 = time.perf_counter()
        self.model.timings.update({"numbers_ms": (t1 - t0) * 1000, "plots_ms": (t2 - t1) * 1000, "all_ms": (t2 - t0) * 1000})

    def _update_labels(self, result: dict, dense: dict, stats: Any, preview: bool, samples: int) -> None:
        key = self.session.metric_name
        t = stats.total
        mode = f"preview: first {samples} samples (dragging)" if preview else f"full eval set: {samples} samples"
        L = self.labels
        L["mode"].value = f"<i style='color:{'#b36b00' if preview else '#2a7'}'>{mode}</i>"
        L["accuracy"].value = f"<b>{key}</b>: <span class='prune-lab-value'>{_fmt_metric(key, result[key])}</span>"
        delta = result[key] - dense[key]
        L["delta"].value = f"&Delta; vs dense: <span class='prune-lab-value'>{_fmt_delta(key, delta)}</span>"
        refit = "" if t.get("refit_error") is None else (
            f" &middot; refit error <span class='prune-lab-value'>{t['refit_error']:.1%}</span> "
            f"(mask alone {t['mask_error']:.1%} of ||WX||&sup2;, calibration inputs)")
        L["loss"].value = f"loss: <span class='prune-lab-value'>{result['loss']:.4f}</span>{refit}"
        L["sparsity"].value = f"sparsity: <span class='prune-lab-value'>{t['sparsity']:.2%}</span>"
        L["nonzeros"].value = f"nonzero weights: <span class='prune-lab-value'>{fmt_count(t['nonzeros'])}</span> / {fmt_count(t['params'])}"
        L["bytes"].value = f"file: {fmt_bytes(t['dense_file_bytes'])} dense &rarr; <span class='prune-lab-value'>{fmt_bytes(t['sparse_file_bytes'])}</span> sparse"
        L["compression"].value = f"compression: <span class='prune-lab-value'>{t['compression']:.2f}x</span> (params/nonzeros), file {t['file_compression']:.2f}x"
        L["macs"].value = f"MACs: {fmt_count(t['macs'])} dense &rarr; <span class='prune-lab-value'>{fmt_count(t['effective_macs'])}</span> effective"
        why = "".join(f"<br><i class='prune-lab-speed-note'>{html.escape(n)}</i>" for n in stats.speed[1:])
        L["speedup"].value = f"theoretical speedup: <span class='prune-lab-value'>{t['speedup']:.2f}x</span> (MACs){why}"
        report = stats.compact
        if not self.model.grouped:
            L["measured"].value = ""
        elif report is None:
            L["measured"].value = (f"MACs <span class='prune-lab-value'>{t['speedup']:.2f}x</span> fewer (counted); "
                                   "<i>measure speed</i> times the compact model")
        else:
            r = report.ratios()
            L["measured"].value = (f"MACs <span class='prune-lab-value'>{r['macs']:.2f}x</span> fewer, measured "
                                   f"<span class='prune-lab-value'>{r['latency_ms_b64']:.2f}x</span> faster "
                                   f"(batch 64; {r['latency_ms_b1']:.2f}x at batch 1; {report.device}, {report.threads} threads)")

    def _guarded_plots(self) -> None:
        if self._syncing:
            return
        try:
            self._update_plots()
        except Exception as e:
            self.model.show_error(e)

    def _update_plots(self) -> None:
        """Each panel redraws only what changed: static parts are drawn once and cached, the
        artists that follow the sliders are re-drawn on that background (blitting)."""
        s = self.session
        name = self.layer_select.value
        info = s.layer(name)
        title = f"{name} ({'x'.join(map(str, info.shape))}) - {s.sparsity[name]:.1%} pruned"
        keep = s.mask(name).cpu().numpy()
        hist = self.panels["histogram"]
        base = s.original_weight(name)
        figure_key = (name, self.log_counts.value, s.device, id(base))
        mask_key = (figure_key, s.mask_token(name))
        if figure_key != getattr(hist, "key", None):
            fig = hist.fig
            if fig is None:
                fig = plots.new_figure((4.6, 3.0))
                fig.subplots()
            ax = fig.axes[0]  # another layer: same figure, new contents, laid out again (tick widths change)
            fig.set_layout_engine("constrained")
            self._histogram = plots.draw_layer_histogram(ax, base.detach().float().cpu().numpy(), keep, title,
                                                         log=self.log_counts.value)
            hist.show(fig, self._histogram.update(keep, title))
            hist.key = figure_key
        elif mask_key != self._drawn_hist:
            self._histogram.update(keep, title)
            hist.blit()
        self._drawn_hist = mask_key
        self._figures["histogram"] = hist.fig

        result = s.last_sensitivity
        if result is None and getattr(self.panels["sensitivity"], "key", None) != "placeholder":
            panel = self.panels["sensitivity"]
            panel.show(plots.placeholder((7.0, 4.2), "No sensitivity sweep yet.\nClick 'run sensitivity' to measure\nhow each layer's accuracy falls as it is pruned."), [])
            panel.key = "placeholder"
            self._figures["sensitivity"] = panel.fig
        if result is not None:
            panel = self.panels["sensitivity"]
            if getattr(panel, "key", None) is not result:
                fig = plots.sensitivity(result, current=s.sparsity)
                panel.show(fig, [l for l in fig.axes[0].lines if str(l.get_gid()).startswith("current:")])
                panel.key = result
            else:
                plots.move_sensitivity_markers(panel.fig, result, s.sparsity)
                panel.blit()
            self._figures["sensitivity"] = panel.fig
        self._update_sensitivity_bars(result)

        if self.points:
            panel = self.panels["tradeoff"]
            metric = s.metric_name
            current = len(self.points) - 1
            if panel.fig is None:
                fig = plots.tradeoff_points(self.points, current, metric)
                panel.show(fig, [l for ax in fig.axes for l in ax.lines])
            elif plots.update_tradeoff_points(panel.fig, self.points, current, metric, grow_only=True):
                panel.show(panel.fig, panel.animated)  # limits moved: redraw the static parts once
            else:
                panel.blit()
            self._figures["tradeoff"] = panel.fig

    def _update_sensitivity_bars(self, result: Any) -> None:
        if result is None:
            for bar in self.sensitivity_bars.values():
                bar.value = ""
            return
        ranking = result.ranking(max_drop=0.01)
        unmeasured = set(self.model.unmeasured_layers())
        partly = self.model.partly_measured_layers()
        for name, bar in self.sensitivity_bars.items():
            if name in unmeasured:
                bar.value = "<div style='font-size:10px;color:#999' title='the sweep has no point for this layer'>not measured</div>"
                continue
            if name in partly:
                at = ", ".join(f"{v:.0%}" for v in partly[name])
                bar.value = (f"<div style='font-size:10px;color:#999' title='the sweep was stopped: measured at {at} only'>"
                             "partly measured</div>")
                continue
            if name not in ranking:
                bar.value = ""
                continue
            level = ranking[name]
            bar.value = (
                f"<div title='prunable to {level:.0%} within 1 point' style='font-size:10px;color:#555'>"
                f"<div style='display:inline-block;width:60px;height:8px;background:#eee;vertical-align:middle'>"
                f"<div style='width:{level * 100:.0f}%;height:8px;background:#2a7'></div></div> {level:.0%} ok</div>"
            )

    def __repr__(self) -> str:
        return f"Lab({self.session!r})"


class _BlitPanel:
    """A Figure shown in an Image widget. ``show`` draws the static parts once (layout included)
    and caches them; ``blit`` re-draws only the animated artists on that cache and re-encodes."""

    def __init__(self, image: W.Image, dpi: int):
        self.image, self.dpi = image, dpi
        self.fig: Any = None
        self.animated: list = []
        self.background: Any = None

    def show(self, fig: Any, animated: list) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        if fig is not self.fig:
            FigureCanvasAgg(fig)
            fig.set_dpi(self.dpi)
        for artist in animated:
            artist.set_animated(True)
        self.fig, self.animated = fig, list(animated)
        fig.canvas.draw()  # static parts (animated artists are skipped)
        if fig.get_layout_engine() is not None:
            fig.set_layout_engine("none")  # laid out once; positions stay
        self.background = fig.canvas.copy_from_bbox(fig.bbox)
        self.blit()

    def blit(self) -> None:
        canvas = self.fig.canvas
        canvas.restore_region(self.background)
        renderer = canvas.get_renderer()
        for artist in self.animated:
            if artist.get_visible():
                artist.draw(renderer)
        self.image.value = _encode_png(canvas)


def _encode_png(canvas: Any) -> bytes:
    from PIL import Image

    w, h = canvas.get_width_height(physical=True)
    buf = io.BytesIO()
    Image.frombuffer("RGBA", (w, h), canvas.buffer_rgba(), "raw", "RGBA", 0, 1).save(buf, format="png", compress_level=1)
    return buf.getvalue()


def _kernel_loop() -> Any:
    """The running kernel's IO loop (tornado), where deferred refreshes run; None outside one."""
    try:
        from IPython import get_ipython

        ip = get_ipython()
        kernel = getattr(ip, "kernel", None)
        loop = getattr(kernel, "io_loop", None)
        return loop if loop is not None and hasattr(loop, "add_callback") else None
    except Exception:
        return None
