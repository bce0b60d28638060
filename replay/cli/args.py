"""Argument types of the command line, and the flags several commands share, declared once.

A bad value is a one-line usage error (exit 2) naming the flag's rule, never a value
silently replaced or a traceback later."""
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


# ---------------------------------------------------------------- flags several commands share

def config_args(p: argparse.ArgumentParser) -> None:
    """``--preset`` / ``--fix``: the engine semantics to replay under."""
    from replay.fixes import FIX_IDS, PRESETS

    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="engine semantics to replay under (default: the recorded config)")
    p.add_argument("--fix", action="append", default=[], choices=FIX_IDS, metavar="ID",
                   help=f"apply a fix (repeatable): {', '.join(FIX_IDS)}")


def engine_args(p: argparse.ArgumentParser, *, engine_help: str | None = None,
                device_help: str | None = None, python: bool = True) -> None:
    """``--engine`` / ``--python`` / ``--device``: what replays run on."""
    from replay.engines.base import ENGINES

    p.add_argument("--engine", choices=ENGINES, default="reference", help=engine_help or "engine replays run on")
    if python:
        p.add_argument("--python", default=None, metavar="PATH",
                       help="run the engine in a worker under this interpreter (e.g. a venv with another vLLM)")
    p.add_argument("--device", default="cpu", help=device_help or "cpu or cuda")


MODEL_HELP = ("model folder (default: the model the recording carries, else the one its run config names; "
              "give it when neither is there)")


def model_arg(p: argparse.ArgumentParser, **kw) -> None:
    """``--model``: the checkpoint replays load."""
    p.add_argument("--model", default=None, metavar="PATH", help=MODEL_HELP, **kw)


def weights_arg(p: argparse.ArgumentParser) -> None:
    """``--weights-from``: where the checkpoints of versions recorded by hash only are."""
    p.add_argument("--weights-from", default=None, metavar="DIR",
                   help="folder holding the checkpoints of weight versions recorded by hash only (each "
                        "found by the last part of its recorded path, or its version number, and checked "
                        "against the recorded hash)")


def format_arg(p: argparse.ArgumentParser, choices: tuple[str, ...] = ("table", "json"), help: str | None = None) -> None:
    """``--format``: how the result is printed."""
    p.add_argument("--format", choices=choices, default="table", help=help or "output format (default: table)")
