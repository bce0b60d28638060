"""A small line plot drawn with Unicode braille characters (2×4 dots per cell).

:func:`braille_rows` is pure: it turns series of (x, y) points into rows of
braille cells, one bit mask per series, so the widget only colours them.
:class:`MetricPlot` shows one metric of the run and of its reference, the step
under the cursor and the divergence onset.
"""
from __future__ import annotations

import math
from typing import Sequence

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

# bit of the braille dot at (column 0..1, row 0..3) inside one cell
_DOT = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))
BRAILLE_BASE = 0x2800
GUTTER = 9  # columns of the y-axis labels on the left

Points = Sequence[tuple[float, float]]


def _finite(points: Points) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in points
            if y is not None and x is not None and math.isfinite(y) and math.isfinite(x)]


def data_range(series: Sequence[Points]) -> tuple[float, float, float, float]:
    """(x_min, x_max, y_min, y_max) over all finite points, never a zero-width range."""
    pts = [p for s in series for p in _finite(s)]
    if not pts:
        return 0.0, 1.0, 0.0, 1.0
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1.0
    if y1 == y0:
        pad = abs(y0) * 0.1 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    return x0, x1, y0, y1


def x_to_cell(x: float, x0: float, x1: float, width: int) -> int:
    """The cell column of abscissa ``x`` on a plot ``width`` cells wide."""
    dots = max(width * 2 - 1, 1)
    return int(round((x - x0) / (x1 - x0) * dots)) // 2


def braille_rows(series: Sequence[Points], width: int, height: int,
                 rng: tuple[float, float, float, float] | None = None) -> list[list[list[int]]]:
    """Bit masks ``[series][row][col]`` of each series drawn as a polyline on a width×height grid."""
    x0, x1, y0, y1 = rng or data_range(series)
    wd, hd = max(width * 2, 1), max(height * 4, 1)
    out = []
    for s in series:
        grid = [[0] * width for _ in range(height)]
        pts = [(int(round((x - x0) / (x1 - x0) * (wd - 1))),
                int(round((y1 - y) / (y1 - y0) * (hd - 1)))) for x, y in _finite(s)]
        pts.sort()
        if len(pts) == 1:
            pts = pts * 2
        for (ax, ay), (bx, by) in zip(pts, pts[1:]):
            n = max(abs(bx - ax), abs(by - ay), 1)
            for i in range(n + 1):
                dx = ax + (bx - ax) * i // n
                dy = ay + (by - ay) * i // n
                dx, dy = min(max(dx, 0), wd - 1), min(max(dy, 0), hd - 1)
                grid[dy // 4][dx // 2] |= _DOT[dx % 2][dy % 4]
        out.append(grid)
    return out


def fmt_value(v: float | None) -> str:
    """A metric value in at most 8 characters."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4 or a < 1e-3:
        return f"{v:.2e}"
    if a >= 100:
        return f"{v:.1f}"
    return f"{v:.4f}"


class MetricPlot(Widget):
    """One metric per step: the run, its reference, the cursor step and the onset."""

    COMPONENT_CLASSES = {"metricplot--run", "metricplot--ref", "metricplot--both",
                         "metricplot--cursor", "metricplot--onset", "metricplot--title",
                         "metricplot--axis"}

    cursor: reactive[float | None] = reactive(None)
    onset: reactive[float | None] = reactive(None)

    def __init__(self, metric: str, label: str | None = None, names: tuple[str, str] = ("run", "ref"),
                 **kw) -> None:
        super().__init__(**kw)
        self.metric = metric
        self.label = label or metric
        self.names = names        # what the two series are called in the title
        self.run: list[tuple[float, float]] = []
        self.ref: list[tuple[float, float]] = []

    def set_data(self, run: Points, ref: Points = ()) -> None:
        self.run, self.ref = _finite(run), _finite(ref)
        self.refresh()

    def value_at(self, series: Points, step: float | None) -> float | None:
        for x, y in series:
            if x == step:
                return y
        return None

    def _title(self) -> Text:
        t = Text(self.label, style=self.get_component_rich_style("metricplot--title"))
        if self.cursor is not None:
            t.append(f"  step {int(self.cursor)}: ")
            t.append(f"{self.names[0]} {fmt_value(self.value_at(self.run, self.cursor))}",
                     style=self.get_component_rich_style("metricplot--run"))
            if self.ref:
                t.append("  ")
                t.append(f"{self.names[1]} {fmt_value(self.value_at(self.ref, self.cursor))}",
                         style=self.get_component_rich_style("metricplot--ref"))
        return t

    def render(self) -> Text:
        width = max(self.size.width - GUTTER, 1)
        height = max(self.size.height - 2, 1)   # a title row above, the step axis below
        series = [self.run, self.ref]
        x0, x1, y0, y1 = data_range(series)
        grids = braille_rows(series, width, height, (x0, x1, y0, y1))
        style = {k: self.get_component_rich_style(f"metricplot--{k}")
                 for k in ("run", "ref", "both", "cursor", "onset", "axis")}
        cur_col = None if self.cursor is None else x_to_cell(self.cursor, x0, x1, width)
        onset_col = None if self.onset is None else x_to_cell(self.onset, x0, x1, width)
        out = self._title()
        for r in range(height):
            out.append("\n")
            label = fmt_value(y1) if r == 0 else fmt_value(y0) if r == height - 1 else ""
            out.append(f"{label:>{GUTTER - 1}} ", style=style["axis"])
            for c in range(width):
                a, b = grids[0][r][c], grids[1][r][c]
                ch = chr(BRAILLE_BASE + (a | b)) if (a | b) else " "
                st = style["both"] if a and b else style["run"] if a else style["ref"]
                if c == onset_col:
                    st = st + style["onset"]
                if c == cur_col:
                    st = st + style["cursor"]
                out.append(ch, style=st)
        out.append("\n")
        out.append(" " * GUTTER)
        out.append_text(step_axis(x0, x1, width, onset_col, style["axis"], style["onset"]))
        return out


def step_axis(x0: float, x1: float, width: int, onset_col: int | None, axis_style, onset_style) -> Text:
    """The x axis: the first, middle and last step under their columns, and ``▲`` under the onset
    (visible whatever the cursor covers)."""
    cells = [" "] * width
    mid = float(round((x0 + x1) / 2))  # steps are integers: label a real one, under its column
    marks = [(0, x0), (x_to_cell(mid, x0, x1, width), mid), (width - 1, x1)] if width >= 12 else \
        [(0, x0), (width - 1, x1)]
    for col, x in marks:
        label = f"{x:.0f}" if abs(x - round(x)) < 1e-9 else f"{x:.1f}"
        start = min(max(col - len(label) // 2, 0), width - len(label)) if col else 0
        if col == width - 1:
            start = max(width - len(label), 0)
        if all(c == " " for c in cells[max(start - 1, 0):start + len(label) + 1]):
            cells[start:start + len(label)] = label
    out = Text("".join(cells[:width]), style=axis_style)
    if onset_col is not None and 0 <= onset_col < width:
        out = out[:onset_col] + Text("▲", style=onset_style) + out[onset_col + 1:]
    return out
