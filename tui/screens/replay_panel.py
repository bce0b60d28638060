"""Replay panel: toggle fixes, preset and engine; replay the step or bisect the fixes.

Replays go through :mod:`tui.engine_adapter`. When the replay engine is missing the
panel says "replay engine not available: <reason>" and shows no numbers.
"""
from __future__ import annotations

from typing import Callable

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import (Button, Checkbox, DataTable, Footer, Header, Label, ProgressBar,
                             RadioButton, RadioSet, Static)
from textual.worker import Worker, WorkerState, get_current_worker

from replay.diagnose.report import unneeded_lines
from replay.engines.base import ENGINES
from replay.fixes import FIX_DOC, FIX_IDS

from tui import data, engine_adapter
from tui.messages import BisectDone, Progress, ReplayDone, Unavailable
from tui.widgets.cells import cell
from tui.widgets.toggles import MarkedCheckbox, MarkedRadioButton
from tui.screens.base import BaseScreen

PRESETS = ("v1", "v0")


class Cancelled(Exception):
    """Raised inside a progress callback when the user cancelled the work."""


class ReplayScreen(BaseScreen):
    BINDINGS = [
        *[Binding(str(i + 1), f"toggle_fix({i})", f"fix {i + 1}", show=False) for i in range(len(FIX_IDS))],
        Binding("v", "cycle('preset')", "preset"),
        Binding("e", "cycle('engine')", "engine"),
        Binding("r", "run_replay", "replay"),
        Binding("b", "run_bisect", "bisect"),
    ]

    def __init__(self, step: int, on_done: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.step = step
        self.on_done = on_done
        self.outcome: engine_adapter.ReplayOutcome | None = None

    @property
    def ws(self) -> data.Workspace:
        return self.app.workspace

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"replay step {self.step} of {self.app.label(self.ws.run_path)}",
                     classes="title-line", id="replay-title")
        with Horizontal(id="replay-body"):
            with Vertical(id="replay-options"):
                yield Label("fixes (1-4)")
                for i, fix in enumerate(FIX_IDS):
                    cb = MarkedCheckbox(f"{i + 1} {fix}", id=f"fix-{fix}")
                    cb.tooltip = FIX_DOC[fix]
                    yield cb
                yield Label("preset (v)")
                with RadioSet(id="preset"):
                    for i, p in enumerate(PRESETS):
                        yield MarkedRadioButton(p, value=i == 0, id=f"preset-{p}")
                yield Label("engine (e)")
                with RadioSet(id="engine"):
                    for i, e in enumerate(ENGINES):
                        yield MarkedRadioButton(e, value=i == 0, id=f"engine-{e}")
                with Horizontal(id="replay-buttons"):
                    yield Button("replay", id="do-replay", variant="primary")
                    yield Button("bisect", id="do-bisect")
            with Vertical(id="replay-right"):
                yield Static("", id="replay-status")
                yield ProgressBar(id="replay-progress", show_eta=False)
                yield DataTable(id="replay-results", cursor_type="row")
                yield DataTable(id="ablation", cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        reason = engine_adapter.availability("replay")
        self.query_one("#replay-progress", ProgressBar).display = False
        self.query_one("#ablation", DataTable).display = False
        if reason:
            self._status(f"replay engine not available: {reason}", error=True)
        else:
            self._status(f"choose fixes, preset and engine, then r to replay step {self.step}")

    # ---------------------------------------------------------------- choices
    def fixes(self) -> tuple[str, ...]:
        return tuple(f for f in FIX_IDS if self.query_one(f"#fix-{f}", Checkbox).value)

    def choice(self, which: str) -> str:
        rs = self.query_one(f"#{which}", RadioSet)
        options = PRESETS if which == "preset" else ENGINES
        return options[rs.pressed_index if rs.pressed_index >= 0 else 0]

    def request(self) -> engine_adapter.ReplayRequest:
        return engine_adapter.ReplayRequest(self.ws.run_path, self.step, self.choice("preset"),
                                            self.fixes(), self.choice("engine"), self.ws.model_path)

    def action_toggle_fix(self, i: int) -> None:
        cb = self.query_one(f"#fix-{FIX_IDS[i]}", Checkbox)
        cb.value = not cb.value

    def action_cycle(self, which: str) -> None:
        options = PRESETS if which == "preset" else ENGINES
        nxt = options[(options.index(self.choice(which)) + 1) % len(options)]
        self.query_one(f"#{which}-{nxt}", RadioButton).value = True

    def _status(self, text: str, error: bool = False) -> None:
        st = self.query_one("#replay-status", Static)
        st.update(text)
        st.set_class(error, "error-text")

    # ---------------------------------------------------------------- running
    def _progress(self, task: str):
        worker = get_current_worker()

        def report(*args) -> None:
            """Takes ``(done, total, text)`` or just a text line (the replayer's form)."""
            if worker.is_cancelled:
                raise Cancelled()
            if args and isinstance(args[0], str):
                self.post_message(Progress(task, 0, None, args[0]))
            else:
                done, total, text = (list(args) + [0, None, ""])[:3]
                self.post_message(Progress(task, done, total, text))
        return report

    @on(Button.Pressed, "#do-replay")
    def action_run_replay(self) -> None:
        reason = engine_adapter.availability("replay")
        if reason:
            self._status(f"replay engine not available: {reason}", error=True)
            self.notify(f"replay engine not available: {reason}", severity="warning", timeout=5)
            return
        req = self.request()
        self._start(f"replaying step {req.step}: {req.preset}+{'+'.join(req.fixes) or 'no fixes'} "
                    f"on {req.engine}…")
        self.replay(req)

    @on(Button.Pressed, "#do-bisect")
    def action_run_bisect(self) -> None:
        reason = engine_adapter.availability("bisect")
        if reason:
            self._status(f"replay engine not available: {reason}", error=True)
            self.notify(f"fix bisection not available: {reason}", severity="warning", timeout=5)
            return
        req = self.request()
        self._start(f"bisecting the fixes at step {req.step} on {req.engine}…")
        self.bisect(req)

    def _start(self, text: str) -> None:
        self._status(text)
        bar = self.query_one("#replay-progress", ProgressBar)
        bar.display = True
        bar.update(total=None, progress=0)

    @work(thread=True, exclusive=True, exit_on_error=False, group="replay", name="replay")
    def replay(self, req: engine_adapter.ReplayRequest) -> None:
        try:
            outcome = engine_adapter.run_replay(req, self._progress("replay"))
        except Cancelled:
            return
        except engine_adapter.Unavailable as e:
            self.post_message(Unavailable("replay", e.msg))
            return
        if get_current_worker().is_cancelled:
            return
        self.ws.refresh()
        summary = self.ws.replay_summary(req.step, outcome.config_id, req.engine)
        self.post_message(ReplayDone((outcome, summary)))

    @work(thread=True, exclusive=True, exit_on_error=False, group="replay", name="bisect fixes")
    def bisect(self, req: engine_adapter.ReplayRequest) -> None:
        try:
            result = engine_adapter.run_bisect_fixes(req, self._progress("bisect"))
        except Cancelled:
            return
        except engine_adapter.Unavailable as e:
            self.post_message(Unavailable("bisect", e.msg))
            return
        self.post_message(BisectDone(result))

    def on_progress(self, msg: Progress) -> None:
        bar = self.query_one("#replay-progress", ProgressBar)
        bar.update(total=msg.total, progress=msg.done)
        if msg.text:
            self._status(msg.text)

    def on_unavailable(self, msg: Unavailable) -> None:
        self.on_cancelled()
        self._status(f"replay engine not available: {msg.reason}", error=True)

    def on_cancelled(self) -> None:
        self.query_one("#replay-progress", ProgressBar).display = False

    @on(Worker.StateChanged)
    def _replay_ended(self, event: Worker.StateChanged) -> None:
        """A replay or bisection that failed leaves the panel saying so, not "replaying…"."""
        if event.worker.group != "replay":
            return
        if event.state == WorkerState.ERROR:
            self.on_cancelled()
            err = event.worker.error
            self._status(f"{event.worker.name} failed: {' '.join(str(err).split())}", error=True)
        elif event.state == WorkerState.CANCELLED:
            self.on_cancelled()
            self._status(f"{event.worker.name} cancelled", error=True)

    def on_replay_done(self, msg: ReplayDone) -> None:
        outcome, summary = msg.result
        self.outcome = outcome
        self.query_one("#replay-progress", ProgressBar).display = False
        dt = self.query_one("#replay-results", DataTable)
        dt.clear(columns=True)
        dt.add_columns(*summary.columns)
        for row in summary.rows:
            dt.add_row(*(cell(v) for v in row))
        req = outcome.request
        i = summary.columns.index("outside support") if "outside support" in summary.columns else None
        outside = sum(int(r[i] or 0) for r in summary.rows) if i is not None else 0
        why = (f"; {outside} token(s) outside the replayed config's support (logprob -inf there: it "
               "could not have sampled them), left out of the replayed means" if outside else "")
        self._status(f"replayed step {req.step} as {req.preset}+{'+'.join(req.fixes) or 'no fixes'} "
                     f"({outcome.config_id}) on {req.engine}: {len(summary.rows)} sequences{why}")
        if self.on_done is not None:
            self.on_done()

    def on_bisect_done(self, msg: BisectDone) -> None:
        res: engine_adapter.FixBisection = msg.result
        self.query_one("#replay-progress", ProgressBar).display = False
        dt = self.query_one("#ablation", DataTable)
        dt.display = True
        dt.clear(columns=True)
        dt.add_columns(*res.columns)
        for row in res.rows:
            dt.add_row(*(cell(v) for v in row))
        had = f"has {', '.join(res.already_applied)}; " if res.already_applied else ""
        if res.explained is False:
            found = f"NOT EXPLAINED by the known fixes ({res.reason})"
        elif res.minimal is None:
            found = "no answer"
        else:
            found = f"needs {', '.join(res.minimal) or 'nothing: at the floor'}"
            notes = unneeded_lines(res.raw)
            if notes:
                found += " (" + "; ".join(notes) + ")"
        self._status(f"fix bisection at step {self.step}: the recording {had}{found} "
                     f"(ablation below, residual against the exact reference: proc, v0rt, paused, fp32 "
                     f"are the four fixes)")
