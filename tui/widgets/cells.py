"""Table cells that sort by value and print compactly (DataTable shows floats as .2f)."""
from __future__ import annotations

import functools
import math

from rich.text import Text

from tui.widgets.plot import fmt_value


@functools.total_ordering
class Num:
    """A number (or None) for a DataTable cell: right-aligned, 4 significant places, sortable."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = None if value is None or (isinstance(value, float) and math.isnan(value)) else value

    def _key(self):
        return (self.value is None, self.value if self.value is not None else 0)

    def __lt__(self, other: "Num") -> bool:
        return self._key() < other._key()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Num) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        if isinstance(self.value, bool) or isinstance(self.value, int):
            return str(self.value)
        return fmt_value(self.value)

    def __rich__(self) -> Text:
        return Text(str(self), justify="right")


def cell(value):
    """``value`` as a DataTable cell: numbers become :class:`Num`, the rest text."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return Num(value)
    if isinstance(value, (list, tuple)):
        s = ", ".join(fmt_value(v) if isinstance(v, float) else str(v) for v in value[:8])
        return Text("[" + s + (", …]" if len(value) > 8 else "]"))
    return Text(str(value))


def sort_key(reverse: bool):
    """Key for DataTable.sort that keeps missing values last in both orders."""
    def key(v):
        missing = isinstance(v, Num) and v.value is None
        if isinstance(v, Num):
            inner = v.value if v.value is not None else 0
        else:
            inner = str(v)
        return (missing != reverse, inner)
    return key
