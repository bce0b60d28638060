"""Diagnosis: where a run's mismatch begins and why (DESIGN §8).

``diagnose(path)`` is the whole method (:mod:`.core`); the parts are usable alone:
:mod:`.reference` (exact reference scoring, stored in the recording), :mod:`.components`
(the exact per-token decomposition), :mod:`.stats` (the floor test and the onset test),
:mod:`.backend` (the fix search), :mod:`.trainer` (the trainer's semantics and the
objective-side hypotheses). Importing this package loads numpy only.
"""
from __future__ import annotations

from typing import Any


def diagnose(path: Any, **kwargs: Any) -> dict:
    """See :func:`replay.diagnose.core.diagnose`."""
    from replay.diagnose.core import diagnose as run

    return run(path, **kwargs)


__all__ = ["diagnose"]
