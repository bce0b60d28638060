"""SQL console: a query editor over the open recordings, results in a table, history."""
from __future__ import annotations

import duckdb
from textual import on, work
from textual.worker import get_current_worker
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import DataTable, Footer, Header, OptionList, Static, TextArea

from replay.errors import ReplayError

from tui import data
from tui.messages import QueryDone
from tui.widgets.cells import cell
from tui.screens.base import BaseScreen

MAX_ROWS = 1000  # rows fetched into the result table
DEFAULT_QUERY = "SELECT step, clip_rate, mean_abs_log_ratio, kl_new_old, reward\nFROM run.step_metrics ORDER BY step"


class SqlScreen(BaseScreen):
    BINDINGS = [
        Binding("ctrl+enter,f5,ctrl+r", "run_query", "run", priority=True),
        Binding("ctrl+up", "history(-1)", "older", priority=True),
        Binding("ctrl+down", "history(1)", "newer", priority=True),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.history: list[str] = []
        self.hist_pos = 0
        self.last: QueryDone | None = None
        self._cursor = None   # the cursor the running query uses (to interrupt it)
        self._owner = None    # the worker running it

    @property
    def ws(self) -> data.Workspace | None:
        return self.app.workspace

    def compose(self) -> ComposeResult:
        yield Header()
        schemas = "run, ref" if self.ws and self.ws.has_ref else "run"
        yield Static(f"SQL over schemas {schemas} · ctrl+enter / F5 / ctrl+r runs", classes="title-line")
        yield TextArea(DEFAULT_QUERY, id="sql-editor", soft_wrap=True, show_line_numbers=False)
        with Horizontal(id="sql-lower"):
            yield DataTable(id="sql-results", zebra_stripes=True)
            yield OptionList(id="sql-history")
        yield Static("", id="sql-status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#sql-history", OptionList).border_title = "history"
        self.query_one("#sql-editor", TextArea).focus()
        if self.ws is None:
            self._status("open a run first (runs screen: enter)", error=True)

    def _status(self, text: str, error: bool = False) -> None:
        st = self.query_one("#sql-status", Static)
        st.update(text)
        st.set_class(error, "error-text")

    def action_run_query(self) -> None:
        sql = self.query_one("#sql-editor", TextArea).text.strip()
        if not sql or self.ws is None:
            return
        if not self.history or self.history[-1] != sql:
            self.history.append(sql)
            self.query_one("#sql-history", OptionList).add_option(" ".join(sql.split())[:60])
        self.hist_pos = len(self.history)
        for w in self.running_workers():  # a query still running is replaced by this one:
            w.cancel()                    # cancelled first, so its interrupt error is not shown
        self._interrupt()
        self._status("running… (escape cancels)")
        self.run_query(sql)

    def _interrupt(self) -> None:
        cur = self._cursor
        if cur is not None:
            try:
                cur.interrupt()   # DuckDB stops the query: no core left spinning
            except duckdb.Error:
                pass

    @work(thread=True, exclusive=True, exit_on_error=False, name="SQL query")
    def run_query(self, sql: str) -> None:
        me = get_current_worker()

        def own(cur) -> None:  # the cursor of this worker's query; an older worker never clears it
            if cur is not None:
                self._cursor, self._owner = cur, me
            elif self._owner is me:
                self._cursor = self._owner = None
        try:
            cols, rows, truncated, secs, n = self.ws.run_sql(sql, MAX_ROWS, on_cursor=own)
        except (duckdb.Error, ReplayError) as e:
            if me.is_cancelled:
                return  # interrupted on purpose: on_cancelled said so
            self.post_message(QueryDone(sql, [], [], 0.0, error=" ".join(str(e).split())))
            return
        if me.is_cancelled:
            return
        self.post_message(QueryDone(sql, cols, rows, secs, truncated, statements=n))

    def on_cancelled(self) -> None:
        self._interrupt()
        self._status("query cancelled", error=True)

    def on_query_done(self, msg: QueryDone) -> None:
        self.last = msg
        dt = self.query_one("#sql-results", DataTable)
        dt.clear(columns=True)   # never leave an earlier query's rows under this one's answer
        if msg.error:
            self._status(f"error: {msg.error}", error=True)
            return
        dt.add_columns(*msg.columns)
        for row in msg.rows:
            dt.add_row(*(cell(v) for v in row))
        more = f" (first {MAX_ROWS} shown)" if msg.truncated else ""
        which = f"; ran {msg.statements} statements, the last one's result shown" if msg.statements > 1 else ""
        self._status((f"{len(msg.rows)} rows{more}" if msg.columns else "ok") + which)
        self.query_one("#sql-status", Static).tooltip = f"ran in {msg.elapsed * 1000:.0f} ms"

    def action_history(self, delta: int) -> None:
        if not self.history:
            return
        self.hist_pos = min(max(self.hist_pos + delta, 0), len(self.history) - 1)
        self.query_one("#sql-editor", TextArea).text = self.history[self.hist_pos]
        self.query_one("#sql-history", OptionList).highlighted = self.hist_pos

    @on(OptionList.OptionSelected, "#sql-history")
    def _pick(self, event: OptionList.OptionSelected) -> None:
        self.hist_pos = event.option_index
        editor = self.query_one("#sql-editor", TextArea)
        editor.text = self.history[event.option_index]
        editor.focus()
