"""Runs screen: the recordings under the root folder; choose a run and a reference."""
from __future__ import annotations

from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Header, Static

from tui import catalog
from tui.messages import RunsFound
from tui.screens.base import BaseScreen

COLUMNS = ("", "recording", "status", "steps", "rollouts", "tokens", "size")


class RunsScreen(BaseScreen):
    BINDINGS = [
        Binding("enter", "open", "open run"),
        Binding("r", "reference", "mark reference"),
        Binding("x", "clear_reference", "clear ref"),
        Binding("g", "rescan", "rescan"),
    ]

    def __init__(self, root: Path, scan_now: bool = True) -> None:
        super().__init__()
        self.root = Path(root)
        self.scan_now = scan_now     # False: wait until the screen is shown (a run opens first)
        self.scanned = False
        self.runs: list[catalog.RunEntry] = []
        self.reference: Path | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"recordings under {self.root.name}/", classes="title-line", id="runs-title")
        yield DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        yield Static("enter (or a second click) opens the highlighted run; r marks a reference to compare it with",
                     id="runs-hint")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#runs", DataTable)
        table.add_columns(*COLUMNS)
        if self.scan_now:
            self.scan()

    def on_screen_resume(self) -> None:
        if not self.scanned and (self.scan_now or self.app.workspace is not None):
            self.scan()

    @work(thread=True, exclusive=True, exit_on_error=False, name="scan recordings")
    def scan(self) -> None:
        self.scanned = True
        paths = catalog.find_recordings(self.root)
        self.post_message(RunsFound([catalog.describe(p, self.root) for p in paths]))

    def on_runs_found(self, msg: RunsFound) -> None:
        self.runs = msg.runs
        self._fill()
        n = len(self.runs)
        self.query_one("#runs-title", Static).update(
            f"{n} recording{'s' if n != 1 else ''} under {self.root.name}/" if n else
            f"no recordings under {self.root.name}/ (run `replay demo`, or give a path)")

    def _fill(self) -> None:
        table = self.query_one("#runs", DataTable)
        row = table.cursor_row
        table.clear()
        for e in self.runs:
            mark = "ref" if self.reference == e.path else ""
            status = e.status if e.status != "error" else f"error: {e.error}"
            table.add_row(mark, e.name, status, e.steps, e.rollouts, f"{e.tokens:,}",
                          catalog.human_bytes(e.nbytes), key=str(e.path))
        if self.runs:
            table.move_cursor(row=min(row, len(self.runs) - 1))

    def highlighted(self) -> catalog.RunEntry | None:
        table = self.query_one("#runs", DataTable)
        if not self.runs or table.cursor_row is None or table.cursor_row >= len(self.runs):
            return None
        return self.runs[table.cursor_row]

    def action_reference(self) -> None:
        e = self.highlighted()
        if e is not None:
            self.reference = None if self.reference == e.path else e.path
            self._fill()

    def action_clear_reference(self) -> None:
        self.reference = None
        self._fill()

    def action_rescan(self) -> None:
        self.scan()

    def action_open(self) -> None:
        e = self.highlighted()
        if e is None:
            return
        if e.status == "error":
            self.app.show_error_text("cannot open recording", f"{e.name}: {e.error}")
            return
        ref = self.reference if self.reference != e.path else None
        self.app.open_runs(e.path, ref)

    @on(DataTable.RowSelected, "#runs")
    def _selected(self) -> None:
        self.action_open()
