"""The replay TUI: runs → timeline → step → replay, plus a SQL console.

``make_app(path=None, against=None, root="recordings")`` builds the app (the CLI and
the tests use it). With ``path`` the app opens that run (against ``against``) at
once; without, it lists the recordings under ``root``.
"""
from __future__ import annotations

from pathlib import Path

from textual import work
from textual.app import App
from textual.binding import Binding

from replay.errors import ReplayError

from tui import data
from tui.screens.modals import ErrorScreen, HelpScreen
from tui.screens.runs import RunsScreen


class ReplayApp(App):
    ENABLE_COMMAND_PALETTE = False  # every action has a key (F1 lists them): the key bar gets the width
    """Browse recordings, compare a run with its reference, replay and query."""

    CSS_PATH = "app.tcss"
    TITLE = "replay"
    BINDINGS = [
        Binding("f1,question_mark", "help", "help"),
        Binding("f2,s", "sql", "SQL"),
        Binding("q", "quit", "quit"),
    ]

    def __init__(self, path: Path | None = None, against: Path | None = None,
                 root: Path = Path("recordings"), live_interval: float = 1.0, model: Path | None = None) -> None:
        super().__init__()
        self.root = Path(root)
        self.model = Path(model) if model is not None else None   # --model: replays and diagnoses use it
        self.start_path = Path(path) if path is not None else None
        self.start_against = Path(against) if against is not None else None
        self.live_interval = live_interval   # seconds between refreshes of a live run
        self.workspace: data.Workspace | None = None

    def on_mount(self) -> None:
        self.push_screen(RunsScreen(self.root, scan_now=self.start_path is None))
        if self.start_path is not None:
            self.open_runs(self.start_path, self.start_against)

    def label(self, path: Path | None) -> str:
        """A path as the screens show it: relative to the root when under it."""
        if path is None:
            return "-"
        try:
            return str(Path(path).resolve().relative_to(self.root.resolve()))
        except ValueError:
            return Path(path).name

    # ---------------------------------------------------------------- opening runs
    def open_runs(self, run: Path, against: Path | None) -> None:
        self.sub_title = f"{self.label(run)}" + (f" vs {self.label(against)}" if against else "")
        self._open(Path(run), Path(against) if against else None)

    @work(thread=True, exclusive=True, exit_on_error=False, group="open", name="open recordings")
    def _open(self, run: Path, against: Path | None) -> None:
        ws = data.Workspace(run, against, model=self.model)
        self.call_from_thread(self._opened, ws)

    def _opened(self, ws: data.Workspace) -> None:
        from tui.screens.timeline import TimelineScreen
        old, self.workspace = self.workspace, ws
        while len(self.screen_stack) > 2:
            self.pop_screen()
        if old is not None:
            old.close()
        self.push_screen(TimelineScreen())

    def on_worker_state_changed(self, event) -> None:
        # the app's own workers (opening recordings); screens have BaseScreen's handler
        from textual.worker import WorkerState
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            self.show_error(event.worker.error, where=event.worker.name)
            runs = next((s for s in self.screen_stack if isinstance(s, RunsScreen)), None)
            if runs is not None and not runs.scanned:
                runs.scan()   # the run did not open: list what there is instead

    # ---------------------------------------------------------------- errors
    def show_error(self, error: BaseException, where: str = "") -> None:
        """The one place failures are shown: ReplayError's title and message, else the exception."""
        if isinstance(error, ReplayError):
            title, msg = error.title, str(error)
        else:
            title, msg = f"{type(error).__name__}" + (f" in {where}" if where else ""), str(error)
        self.show_error_text(title, msg)

    def show_error_text(self, title: str, msg: str) -> None:
        self.push_screen(ErrorScreen(title, msg))

    # ---------------------------------------------------------------- actions
    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_sql(self) -> None:
        from tui.screens.sql import SqlScreen
        if not isinstance(self.screen, SqlScreen):
            self.push_screen(SqlScreen())

    def on_unmount(self) -> None:
        if self.workspace is not None:
            self.workspace.close()


def make_app(path: str | Path | None = None, against: str | Path | None = None,
             root: str | Path = "recordings", live_interval: float = 1.0,
             model: str | Path | None = None) -> ReplayApp:
    """The app, opening ``path`` against ``against`` when given, listing ``root`` otherwise;
    ``model``: the model folder replays and diagnoses use (default: the one the run recorded)."""
    return ReplayApp(Path(path) if path else None, Path(against) if against else None,
                     Path(root), live_interval=live_interval, model=Path(model) if model else None)
