"""Argument types of the command line: a bad value is a one-line usage error (exit 2)
naming the flag's rule, never a value silently replaced or a traceback later."""
from __future__ import annotations

import argparse
import math
from typing import Callable


def number(kind: type = float, *, low: float | None = None, strict: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite ``kind`` (int or float) at least ``low`` (above it, with ``strict``)."""
    rule = "" if low is None else f" {'>' if strict else '>='} {low:g}"
    what = "an integer" if kind is int else "a finite number"

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}{rule}") from None
        if not math.isfinite(v) or (low is not None and (v <= low if strict else v < low)):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {what}{rule}")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its message
    return parse


POSITIVE_INT = number(int, low=1)
NONNEG_INT = number(int, low=0)
POSITIVE = number(float, low=0, strict=True)
NONNEG = number(float, low=0)
