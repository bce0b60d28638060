"""The tokens of one sequence, each coloured by its |log ratio| (or a component of it), and a legend.

A token's cell shows its id (or its text when a tokenizer decoded it); its
background is the bucket of ``|r| = |lp_trainer - lp_rollout|``, or of the component
of the mismatch the step view colours by (grey: no value, or outside the support). A ``┃vN`` cell
marks where the weight version that produced the tokens changes; the first line
says how much of the prompt the prefix cache served. Cursor: arrows, home/end,
or a click; moving it posts :class:`TokenView.CursorMoved`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.binding import Binding
from textual.geometry import Region, Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widget import Widget

# upper bounds of the |r| buckets (nats); the last bucket is everything above 0.5
BUCKET_BOUNDS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.2, 0.5)
BUCKET_LABELS = ("<.01", "<.05", "<.1", "<.2", "<.5", "≥.5")
COMPONENTS = {f"tokens--r{i}" for i in range(len(BUCKET_LABELS))} | {
    "tokens--cursor", "tokens--boundary", "tokens--cached", "tokens--info", "tokens--nan"}


def bucket(abs_r: float | None) -> int | None:
    """Index of the colour bucket of ``|r|`` (None when the trainer has no logprob there)."""
    if abs_r is None or not math.isfinite(abs_r):
        return None
    for i, hi in enumerate(BUCKET_BOUNDS):
        if abs_r < hi:
            return i
    return len(BUCKET_BOUNDS)


@dataclass
class Cell:
    text: str
    style: str            # component class name
    token: int | None     # index of the token this cell shows, None for markers


def layout(token_labels: Sequence[str], buckets: Sequence[int | None], versions: Sequence,
           width: int) -> list[list[Cell]]:
    """Wrap the token cells (and version-boundary markers) into lines of at most ``width`` columns."""
    lines: list[list[Cell]] = [[]]
    used = 0

    def put(cell: Cell) -> None:
        nonlocal used
        w = len(cell.text) + 1
        if used and used + w > width:
            lines.append([])
            used = 0
        lines[-1].append(cell)
        used += w

    prev = None
    for i, label in enumerate(token_labels):
        v = versions[i] if i < len(versions) else None
        if i > 0 and v != prev:
            put(Cell(f"┃v{v}", "tokens--boundary", None))
        prev = v
        b = buckets[i]
        put(Cell(label, "tokens--nan" if b is None else f"tokens--r{b}", i))
    return lines


class TokenLegend(Widget):
    """The colour scale of :class:`TokenView`: of |r|, or of the component it colours by."""

    COMPONENT_CLASSES = COMPONENTS
    what: reactive[str] = reactive("r")   # r, or a component of the decomposition (e_backend, ...)

    def render(self) -> Text:
        t = Text(f"|{self.what}| ")
        for i, label in enumerate(BUCKET_LABELS):
            t.append(f" {label} ", style=self.get_component_rich_style(f"tokens--r{i}"))
        t.append(" ")
        t.append("┃vN", style=self.get_component_rich_style("tokens--boundary"))
        t.append(" version ")
        t.append("cache", style=self.get_component_rich_style("tokens--cached"))
        t.append("  c: colour by")
        return t


class TokenView(ScrollView, can_focus=True):
    """Tokens of one sequence, wrapped to the width, with a cursor."""

    COMPONENT_CLASSES = COMPONENTS
    BINDINGS = [
        Binding("left", "move(-1)", "prev token", show=False),
        Binding("right", "move(1)", "next token", show=False),
        Binding("up", "line(-1)", "line up", show=False),
        Binding("down", "line(1)", "line down", show=False),
        Binding("home", "jump(0)", "first", show=False),
        Binding("end", "jump(-1)", "last", show=False),
        Binding("w", "worst", "worst token"),
    ]

    cursor: reactive[int] = reactive(0)

    class CursorMoved(Message):
        def __init__(self, view: "TokenView", index: int) -> None:
            super().__init__()
            self.view = view
            self.index = index

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.labels: list[str] = []
        self.abs_r: list[float | None] = []
        self.buckets: list[int | None] = []
        self.versions: list = []
        self.info = Text("")
        self._lines: list[list[Cell]] = []
        self._info_lines: list = []
        self._width = -1

    # ---------------------------------------------------------------- data
    def set_tokens(self, labels: Sequence[str], log_ratio: Sequence[float | None],
                   versions: Sequence, info: Text | str = "") -> None:
        self.labels = list(labels)
        self.abs_r = [None if r is None or not math.isfinite(r) else abs(r) for r in log_ratio]
        self.buckets = [bucket(a) for a in self.abs_r]
        self.versions = list(versions)
        self.info = info if isinstance(info, Text) else Text(info)
        self._width = -1
        self.set_reactive(TokenView.cursor, 0)
        self._relayout()
        self.scroll_to(0, 0, animate=False)
        if self.labels:
            self.post_message(self.CursorMoved(self, 0))
        self.refresh()

    def _relayout(self) -> None:
        width = max(self.scrollable_content_region.width, 8)
        if width != self._width:
            self._width = width
            self._lines = layout(self.labels, self.buckets, self.versions, width)
            self._info_lines = list(self.info.wrap(self.app.console, width)) if self.info.plain else []
            self.virtual_size = Size(width, len(self._lines) + len(self._info_lines))

    def on_resize(self) -> None:
        self._relayout()
        self.refresh()

    def line_of(self, index: int) -> int:
        for n, line in enumerate(self._lines):
            if any(c.token == index for c in line):
                return n
        return 0

    # ---------------------------------------------------------------- cursor
    def watch_cursor(self, old: int, new: int) -> None:
        line = self.line_of(new) + len(self._info_lines)
        self.scroll_to_region(self._region_of_line(line), animate=False)
        self.post_message(self.CursorMoved(self, new))
        self.refresh()

    def _region_of_line(self, y: int) -> Region:
        return Region(0, y, 1, 1)

    def validate_cursor(self, value: int) -> int:
        return min(max(value, 0), max(len(self.labels) - 1, 0))

    def action_move(self, delta: int) -> None:
        self.cursor += delta

    def action_jump(self, index: int) -> None:
        self.cursor = index if index >= 0 else len(self.labels) - 1

    def action_worst(self) -> None:
        vals = [(a, i) for i, a in enumerate(self.abs_r) if a is not None]
        if vals:
            self.cursor = max(vals)[1]

    def _x_of(self, line: list[Cell], index: int) -> int:
        x = 0
        for c in line:
            if c.token == index:
                return x
            x += len(c.text) + 1
        return 0

    def action_line(self, delta: int) -> None:
        n = self.line_of(self.cursor)
        target = n + delta
        if not (0 <= target < len(self._lines)):
            return
        x = self._x_of(self._lines[n], self.cursor)
        best, pos = None, 0
        for c in self._lines[target]:
            if c.token is not None and (best is None or abs(pos - x) < abs(best[0] - x)):
                best = (pos, c.token)
            pos += len(c.text) + 1
        if best is not None:
            self.cursor = best[1]

    def on_click(self, event) -> None:
        offset = event.get_content_offset(self)
        if offset is None:
            return
        y = offset.y + int(self.scroll_offset.y) - len(self._info_lines)
        if not (0 <= y < len(self._lines)):
            return
        x = 0
        for c in self._lines[y]:
            if x <= offset.x < x + len(c.text) and c.token is not None:
                self.cursor = c.token
                return
            x += len(c.text) + 1

    # ---------------------------------------------------------------- drawing
    def style_of(self, index: int) -> Style:
        b = self.buckets[index]
        return self.get_component_rich_style("tokens--nan" if b is None else f"tokens--r{b}")

    def render_line(self, y: int) -> Strip:
        self._relayout()
        scroll_x, scroll_y = self.scroll_offset
        n = scroll_y + y
        width = self.scrollable_content_region.width
        base = self.rich_style
        if n < len(self._info_lines):
            segs = list(self._info_lines[n].render(self.app.console))
            return Strip(segs).crop_extend(scroll_x, scroll_x + width, base)
        n -= len(self._info_lines)
        if n >= len(self._lines):
            return Strip.blank(width, base)
        segs = []
        cursor_style = self.get_component_rich_style("tokens--cursor")
        for c in self._lines[n]:
            st = self.get_component_rich_style(c.style)
            if c.token is not None and c.token == self.cursor:
                st = st + cursor_style
            segs.append(Segment(c.text, base + st))
            segs.append(Segment(" ", base))
        return Strip(segs).crop_extend(scroll_x, scroll_x + width, base)
