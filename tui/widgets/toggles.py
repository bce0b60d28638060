"""A checkbox and a radio button whose state reads without colour: a mark when on, none when off."""
from __future__ import annotations

from textual.widgets import Checkbox, RadioButton


class MarkedCheckbox(Checkbox):
    """``✓`` when checked, blank when not (the stock one shows ``X`` either way, coloured)."""

    @property
    def BUTTON_INNER(self) -> str:  # noqa: N802 - the name Textual's ToggleButton reads
        return "✓" if self.value else " "


class MarkedRadioButton(RadioButton):
    """``●`` when chosen, ``○`` when not."""

    @property
    def BUTTON_INNER(self) -> str:  # noqa: N802
        return "●" if self.value else "○"
