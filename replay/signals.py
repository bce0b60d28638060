"""Ctrl-C on the command line, told apart from the errors it can turn into.

A SIGINT that lands inside a C extension (safetensors, zstd, DuckDB) can come back as
that extension's own exception instead of ``KeyboardInterrupt``. :func:`sigint` records
that the signal came, so the command line can still say "interrupted" (exit 130) rather
than show the odd error; it raises ``KeyboardInterrupt`` as Python's default handler does.
"""
from __future__ import annotations

import signal
import threading

_received = threading.Event()


def sigint(signum, frame) -> None:
    _received.set()
    raise KeyboardInterrupt


def received() -> bool:
    """Whether a SIGINT reached :func:`sigint` in this process."""
    return _received.is_set()


def holdable(handler) -> bool:
    """Whether ``handler`` is one a short critical section may replace and restore (Python's
    default or :func:`sigint`, not a handler of the program embedding the library)."""
    return handler is signal.default_int_handler or handler is sigint
