"""Step screen: the step's sequences by mismatch, one sequence's tokens, one token's detail."""
from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Header, Static

from tui import data
from tui.messages import SequencesLoaded, TokenDetailLoaded, TokensLoaded
from tui.widgets.cells import cell, sort_key
from tui.widgets.plot import fmt_value
from tui.widgets.tokens import TokenLegend, TokenView
from tui.screens.base import BaseScreen


def detail_table(d: data.TokenDetail) -> Table:
    """The detail pane: recorded and replayed logprobs of the token, and its top-k."""
    t = Table.grid(padding=(0, 1))
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_row("pos", str(d.pos))
    t.add_row("token id", str(d.token_id) if d.text is None else f"{d.token_id} {d.text!r}")
    t.add_row("lp rollout", fmt_value(d.lp_rollout))
    t.add_row("lp trainer", fmt_value(d.lp_trainer))
    t.add_row("r", fmt_value(d.log_ratio))
    t.add_row("version", f"{d.weight_version} (trainer {d.trainer_version})")
    t.add_row("entropy", fmt_value(d.entropy))
    if d.components:
        t.add_row(Text("r = e_trainer + lag", style="underline"), "")
        t.add_row(Text("   + semantics - e_backend", style="underline"), "")
        for name in ("e_backend", "semantics", "lag", "e_trainer"):
            t.add_row(f"  {name}", fmt_value(d.components.get(name)))
    if d.replays:
        t.add_row(Text("replayed lp", style="underline"), "")
        for label, engine, lp in d.replays:   # the config (whole, folded if need be), then its engine
            t.add_row(Text(f" {label}", overflow="fold"), "")
            t.add_row(Text(f"   on {engine or '?'}", style="dim"), fmt_value(lp))
    else:
        t.add_row("replayed", Text("none yet (p)", style="dim"))
    for source, pairs in d.topk.items():
        t.add_row(Text(f"top-k {source}", style="underline"), "")
        for tid, lp in pairs:
            t.add_row(f"  {tid}", fmt_value(lp))
    return t


class StepScreen(BaseScreen):
    BINDINGS = [
        Binding("enter", "into_tokens", "tokens"),
        Binding("left_square_bracket", "sort_column(-1)", "sort ←", show=False),
        Binding("right_square_bracket", "sort_column(1)", "sort →", show=False),
        Binding("f", "flip", "flip order", show=False),
        Binding("comma", "step(-1)", "prev step", show=False),
        Binding("full_stop", "step(1)", "next step", show=False),
        Binding("p", "replay", "replay"),
        Binding("c", "colour_by", "colour by"),
    ]

    def __init__(self, step: int, steps: list[int] | None = None) -> None:
        super().__init__()
        self.step = step
        self.steps = steps or [step]
        self.table: data.SequenceTable | None = None
        self.tokens: data.SequenceTokens | None = None
        self.detail: data.TokenDetail | None = None
        self.sort_col = 2          # index into the table's columns (mean |r|)
        self.sort_reverse = True
        self.colour_by = "r"       # what the tokens are coloured by: r or a component (data.COLOUR_BY)

    @property
    def ws(self) -> data.Workspace:
        return self.app.workspace

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="step-title", classes="title-line")
        with Horizontal(id="step-body"):
            with Vertical(id="step-left"):
                yield DataTable(id="seqs", cursor_type="row", zebra_stripes=True)
                yield TokenLegend()
                yield TokenView(id="tokens")
            yield Static("", id="detail")
        yield Footer()

    def on_mount(self) -> None:
        self.load_sequences()

    # ---------------------------------------------------------------- workers
    @work(thread=True, exclusive=True, exit_on_error=False, group="sequences", name="load sequences")
    def load_sequences(self) -> None:
        step = self.step
        self.post_message(SequencesLoaded(step, self.ws.sequences(step)))

    @work(thread=True, exclusive=True, exit_on_error=False, group="tokens", name="load tokens")
    def load_tokens(self, step: int, request_id: str) -> None:
        self.post_message(TokensLoaded(self.ws.tokens(step, request_id)))

    @work(thread=True, exclusive=True, exit_on_error=False, group="detail", name="load token detail")
    def load_detail(self, toks: data.SequenceTokens, pos: int) -> None:
        self.post_message(TokenDetailLoaded(self.ws.token_detail(toks, pos)))

    # ---------------------------------------------------------------- sequences
    def on_sequences_loaded(self, msg: SequencesLoaded) -> None:
        if msg.step != self.step:
            return
        self.table = msg.table
        dt = self.query_one("#seqs", DataTable)
        dt.clear(columns=True)
        for i, name in enumerate(msg.table.columns):
            dt.add_column(name, key=str(i))
        for row in msg.table.rows:
            dt.add_row(*(cell(v) for v in row), key=str(row[0]))
        self._sort()
        self._title()
        if msg.table.rows:
            dt.move_cursor(row=0)
            self._load_highlighted()
        else:
            self.query_one(TokenView).set_tokens([], [], [], "no sequences recorded at this step")
        dt.focus()

    def _title(self) -> None:
        n = len(self.table.rows) if self.table else 0
        col = self.table.columns[self.sort_col] if self.table else ""
        arrow = "↓" if self.sort_reverse else "↑"
        self.query_one("#step-title", Static).update(
            f"step {self.step}  ·  {n} sequences  ·  sorted by {col} {arrow}")

    def _sort(self) -> None:
        dt = self.query_one("#seqs", DataTable)
        if self.table and self.table.rows:
            dt.sort(str(self.sort_col), key=sort_key(self.sort_reverse), reverse=self.sort_reverse)

    def action_sort_column(self, delta: int) -> None:
        if self.table:
            self.sort_col = (self.sort_col + delta) % len(self.table.columns)
            self._sort()
            self._title()

    def action_flip(self) -> None:
        self.sort_reverse = not self.sort_reverse
        self._sort()
        self._title()

    @on(DataTable.HeaderSelected, "#seqs")
    def _header(self, event: DataTable.HeaderSelected) -> None:
        col = int(event.column_key.value)
        if col == self.sort_col:
            self.sort_reverse = not self.sort_reverse
        else:
            self.sort_col, self.sort_reverse = col, True
        self._sort()
        self._title()

    def selected_request(self) -> str | None:
        dt = self.query_one("#seqs", DataTable)
        if not dt.row_count:
            return None
        key = dt.coordinate_to_cell_key(dt.cursor_coordinate).row_key
        return key.value

    def _load_highlighted(self) -> None:
        rid = self.selected_request()
        if rid is not None:
            self.load_tokens(self.step, rid)

    @on(DataTable.RowHighlighted, "#seqs")
    def _highlighted(self) -> None:
        self._load_highlighted()

    @on(DataTable.RowSelected, "#seqs")
    def _selected(self) -> None:
        self.action_into_tokens()

    def action_into_tokens(self) -> None:
        self.query_one(TokenView).focus()

    # ---------------------------------------------------------------- tokens
    def on_tokens_loaded(self, msg: TokensLoaded) -> None:
        t = msg.tokens
        self.tokens = t
        info = Text(f"{t.request_id}: {len(t.token_id)} tokens, prompt {t.n_prompt}")
        if t.num_cached:
            info.append(" · ")
            info.append(f"{t.num_cached} prompt tokens from the prefix cache",
                        style=self.query_one(TokenView).get_component_rich_style("tokens--cached"))
        b = t.boundaries()
        if b:
            info.append(f" · weight version changes at pos {', '.join(map(str, b))}")
        if self.colour_by != "r" and not t.components:
            self.colour_by = "r"
        self.query_one(TokenLegend).what = self.colour_by
        self.query_one(TokenView).set_tokens(t.text or [str(x) for x in t.token_id], t.values(self.colour_by),
                                             t.weight_version, info)

    def action_colour_by(self) -> None:
        """Cycle the tokens' colour: |r|, then each component of the decomposition."""
        t = self.tokens
        if t is None:
            return
        if not t.components:
            self.notify("no reference stored for this run: press d on the timeline (or run replay diagnose) "
                        "to colour by backend error, trainer error, lag", timeout=5)
            return
        order = data.COLOUR_BY
        self.colour_by = order[(order.index(self.colour_by) + 1) % len(order)]
        view = self.query_one(TokenView)
        cursor = view.cursor
        self.on_tokens_loaded(TokensLoaded(t))
        view.cursor = cursor

    @on(TokenView.CursorMoved)
    def _token_moved(self, msg: TokenView.CursorMoved) -> None:
        if self.tokens is not None and 0 <= msg.index < len(self.tokens.token_id):
            self.load_detail(self.tokens, msg.index)

    def on_token_detail_loaded(self, msg: TokenDetailLoaded) -> None:
        self.detail = msg.detail
        self.query_one("#detail", Static).update(detail_table(msg.detail))

    # ---------------------------------------------------------------- navigation
    def action_step(self, delta: int) -> None:
        if self.step in self.steps:
            i = min(max(self.steps.index(self.step) + delta, 0), len(self.steps) - 1)
            if self.steps[i] != self.step:
                self.step = self.steps[i]
                self.tokens = None
                self.load_sequences()

    def action_replay(self) -> None:
        from tui.screens.replay_panel import ReplayScreen
        self.app.push_screen(ReplayScreen(self.step, on_done=self.refresh_detail))

    def refresh_detail(self) -> None:
        """After a replay: reload the token detail so the replayed logprobs appear."""
        if self.tokens is not None:
            self.load_detail(self.tokens, self.query_one(TokenView).cursor)
