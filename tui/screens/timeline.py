"""Timeline screen: per-step curves of the run and its reference, the onset marked."""
from __future__ import annotations

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Footer, Header, Static

from tui import data
from tui.messages import ComponentsLoaded, DiagnosisDone, DiagnosisProgress, OnsetFound, TimelineLoaded
from tui.widgets.plot import MetricPlot
from tui.screens.base import LIVE_GROUP, ONSET_GROUP, BaseScreen

DIAGNOSE_HINT = "diagnosis: none yet (d: backend, trainer, lag; which fixes)"


class TimelineScreen(BaseScreen):
    BINDINGS = [
        Binding("left", "move(-1)", "step ←", show=False),
        Binding("right", "move(1)", "step →", show=False),
        Binding("home", "jump(0)", "first", show=False),
        Binding("end", "jump(-1)", "last", show=False),
        Binding("o", "onset", "onset"),
        Binding("enter", "open_step", "open step"),
        Binding("p", "replay", "replay"),
        Binding("d", "diagnose", "diagnose"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.timeline: data.Timeline | None = None
        self.index = 0            # position of the cursor in the run's steps
        self.bisected = None      # the onset replay.diagnose.bisect found (it wins over the rule's)
        self._onset_stale = False # steps arrived since replay.diagnose.bisect last looked
        self._live_timer = None
        self.diagnosis: dict | None = None   # replay.diagnose's result, once run

    @property
    def ws(self) -> data.Workspace:
        return self.app.workspace

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("opening…", id="tl-title", classes="title-line")
        yield Static(DIAGNOSE_HINT, id="tl-diagnosis", classes="status-line")
        with Vertical(id="plots"):
            for metric, label in data.PLOTTED:
                yield MetricPlot(metric, label, id=f"plot-{metric}")
            yield MetricPlot("components", "|backend| and |trainer| error", names=("backend", "trainer"),
                             id="plot-components")
        yield Static("", id="tl-status", classes="status-line")
        yield Footer()

    def on_mount(self) -> None:
        self.load()
        self.load_components()

    @work(thread=True, exclusive=True, exit_on_error=False, group="components", name="load components")
    def load_components(self) -> None:
        self.post_message(ComponentsLoaded(self.ws.components()))

    def on_components_loaded(self, msg: ComponentsLoaded) -> None:
        c = msg.components
        plot = self.query_one("#plot-components", MetricPlot)
        plot.display = c is not None          # shown once the run's reference is stored
        if c is None:
            plot.set_data([])
            return
        plot.set_data(list(zip(c.step, c.e_backend)), list(zip(c.step, c.e_trainer)))

    # ---------------------------------------------------------------- diagnosis
    def action_diagnose(self) -> None:
        if any(w.group == "diagnose" and w.node is self and w.is_running for w in self.app.workers):
            self.notify("a diagnosis is running", timeout=3)
            return
        self.query_one("#tl-diagnosis", Static).update("diagnosis: running…")
        self.diagnose()

    @work(thread=True, exclusive=True, exit_on_error=False, group="diagnose", name="diagnose")
    def diagnose(self) -> None:
        res = self.ws.diagnose(progress=lambda text: self.post_message(DiagnosisProgress(text)))
        self.post_message(DiagnosisDone(res))

    def on_worker_state_changed(self, event) -> None:
        """A diagnosis that failed or was cancelled leaves the line as it was before it ran (the
        failure itself shows in the error modal of BaseScreen)."""
        from textual.worker import WorkerState

        if event.worker.group == "diagnose" and event.state in (WorkerState.ERROR, WorkerState.CANCELLED):
            self.query_one("#tl-diagnosis", Static).update(DIAGNOSE_HINT if self.diagnosis is None else
                                                           self._diagnosis_line(self.diagnosis))

    def on_diagnosis_progress(self, msg: DiagnosisProgress) -> None:
        if self.diagnosis is None:
            self.query_one("#tl-diagnosis", Static).update(f"diagnosis: running… {msg.text}")

    @staticmethod
    def _diagnosis_line(res: dict) -> Text:
        line = Text("diagnosis: ")
        style = "bold green" if res["verdict"] == "clean" else "bold red" if res["verdict"] == "unexplained" \
            else "bold yellow"
        line.append(res["verdict"], style=style)
        line.append(f" — {res['summary']}")
        if res.get("onset_step") is not None:
            line.append(f" · from step {res['onset_step']}")
        return line

    def on_diagnosis_done(self, msg: DiagnosisDone) -> None:
        self.diagnosis = res = msg.result
        self.query_one("#tl-diagnosis", Static).update(self._diagnosis_line(res))
        if res.get("onset_step") is not None:
            for plot in self.query(MetricPlot):
                if plot.id == "plot-components":
                    plot.onset = res["onset_step"]
        self.load_components()

    # ---------------------------------------------------------------- loading
    @work(thread=True, exclusive=True, exit_on_error=False, name="load timeline")
    def load(self) -> None:
        self.post_message(TimelineLoaded(self.ws.timeline(), live=False))

    def _tick(self) -> None:
        """Timer of a live run: one refresh at a time, never a queue of them."""
        if not any(w.group == LIVE_GROUP and w.node is self and w.is_running for w in self.app.workers):
            self.poll()

    @work(thread=True, exit_on_error=False, group=LIVE_GROUP, name="refresh live run")
    def poll(self) -> None:
        self.ws.refresh()
        self.post_message(TimelineLoaded(self.ws.timeline(), live=True))

    @work(thread=True, exclusive=True, exit_on_error=False, group=ONSET_GROUP, name="bisect steps")
    def find_onset(self) -> None:
        onset = self.ws.bisect_onset()
        if onset is not None:
            self.post_message(OnsetFound(onset))

    def on_onset_found(self, msg: OnsetFound) -> None:
        onset = msg.onset
        if "failed" in onset.method:   # the rule's onset stays; say why
            self.notify(f"onset by the rule: {onset.method}: {onset.evidence.get('reason')}",
                        severity="warning", timeout=5)
            return
        self.bisected = onset
        tl = self.timeline
        if tl is None:
            return
        steps = tl.steps
        at_old = tl.onset.step in steps and self.index == steps.index(tl.onset.step)
        tl.onset = onset
        for plot in self.query(MetricPlot):
            if plot.id != "plot-components":
                plot.onset = onset.step
        if at_old and onset.step in steps:   # the cursor sat on the rule's onset: follow
            self.index = steps.index(onset.step)
        self._show_cursor()

    def on_timeline_loaded(self, msg: TimelineLoaded) -> None:
        tl = msg.timeline
        if self.bisected is not None:
            tl.onset = self.bisected
        old_steps = self.timeline.steps if self.timeline else []
        if tl.ref is not None and tl.steps != old_steps:
            self._onset_stale = True      # new steps: ask replay.diagnose.bisect again (one at a time)
        if self._onset_stale and not any(w.group == ONSET_GROUP and w.node is self and w.is_running
                                         for w in self.app.workers):
            self._onset_stale = False
            self.find_onset()
        at_end = not old_steps or self.index >= len(old_steps) - 1
        self.timeline = tl
        steps = tl.steps
        if not old_steps and tl.onset.step is not None and tl.onset.step in steps:
            self.index = steps.index(tl.onset.step)
        elif msg.live and at_end and self.index != 0:
            self.index = len(steps) - 1
        self.index = min(self.index, max(len(steps) - 1, 0))
        ref = tl.ref or {}
        for metric, _ in data.PLOTTED:
            plot = self.query_one(f"#plot-{metric}", MetricPlot)
            plot.set_data(list(zip(tl.run["step"], tl.run[metric])),
                          list(zip(ref.get("step", []), ref.get(metric, []))))
            plot.onset = tl.onset.step
        if msg.live:
            self.load_components()
        self._show_cursor()
        self._title()
        live = tl.status == "recording"
        if live and self._live_timer is None:
            self._live_timer = self.set_interval(self.app.live_interval, self._tick)
        elif not live and self._live_timer is not None:
            self._live_timer.stop()
            self._live_timer = None

    def _title(self) -> None:
        tl, app = self.timeline, self.app
        vs = f" vs reference {app.label(self.ws.ref_path)}" if self.ws.has_ref else " (no reference)"
        live = "  ● live" if tl.status == "recording" else f"  [{tl.status}]"
        self.query_one("#tl-title", Static).update(f"run {app.label(self.ws.run_path)}{vs}{live}")

    def _show_cursor(self) -> None:
        tl = self.timeline
        if tl is None or not tl.steps:
            self.query_one("#tl-status", Static).update("no steps recorded yet")
            return
        step = tl.steps[self.index]
        for plot in self.query(MetricPlot):
            plot.cursor = step
        o = tl.onset
        if o.step is None:
            why = o.evidence.get("reason", "no divergence found")
            onset = f"no onset ({why})"
        else:
            onset = f"onset: step {o.step} ({o.method})"
        n = len(tl.steps)
        plot = self.query_one(MetricPlot)
        status = Text(f"step {step} ({self.index + 1}/{n})  ·  {onset}  ·  ")
        status.append("⣿ run", style=plot.get_component_rich_style("metricplot--run"))
        if tl.ref is not None:
            status.append("  ")
            status.append("⣿ reference", style=plot.get_component_rich_style("metricplot--ref"))
        self.query_one("#tl-status", Static).update(status)

    # ---------------------------------------------------------------- actions
    @property
    def step(self) -> int | None:
        if self.timeline is None or not self.timeline.steps:
            return None
        return self.timeline.steps[self.index]

    def action_move(self, delta: int) -> None:
        if self.timeline and self.timeline.steps:
            self.index = min(max(self.index + delta, 0), len(self.timeline.steps) - 1)
            self._show_cursor()

    def action_jump(self, where: int) -> None:
        if self.timeline and self.timeline.steps:
            self.index = 0 if where == 0 else len(self.timeline.steps) - 1
            self._show_cursor()

    def action_onset(self) -> None:
        tl = self.timeline
        if tl and tl.onset.step is not None and tl.onset.step in tl.steps:
            self.index = tl.steps.index(tl.onset.step)
            self._show_cursor()
        else:
            self.notify("no divergence onset to jump to", timeout=3)

    def action_open_step(self) -> None:
        if self.step is not None:
            from tui.screens.step import StepScreen
            self.app.push_screen(StepScreen(self.step, self.timeline.steps))

    def action_replay(self) -> None:
        if self.step is not None:
            from tui.screens.replay_panel import ReplayScreen
            self.app.push_screen(ReplayScreen(self.step))
