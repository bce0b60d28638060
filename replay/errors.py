"""One error root for the whole project.

Every error a user can meet is a :class:`ReplayError` with a short ``title`` and an
actionable message. Errors about recorded data name the field, the step and the
request they concern, so a bad row in a long run can be found at once.
"""
from __future__ import annotations


class ReplayError(Exception):
    """Base of every error this project raises on purpose."""

    title = "replay error"

    def __init__(self, msg: str, title: str | None = None, *, field: str | None = None,
                 step: int | None = None, request_id: str | None = None):
        self.msg = msg
        if title is not None:
            self.title = title
        self.field = field
        self.step = step
        self.request_id = request_id
        where = []
        if field is not None:
            where.append(f"field={field}")
        if step is not None:
            where.append(f"step={step}")
        if request_id is not None:
            where.append(f"request_id={request_id!r}")
        super().__init__(f"{msg} ({', '.join(where)})" if where else msg)


class BadInput(ReplayError):
    """A value handed to the recorder (or a CLI flag) is not what the schema expects."""

    title = "bad input"


class RecordingError(ReplayError):
    """A recording on disk cannot be opened, read or trusted."""

    title = "recording error"


class EngineError(ReplayError):
    """An engine or its worker process failed (start-up, crash, timeout, bad reply)."""

    title = "engine error"


def one_line(e: BaseException) -> str:
    """An exception's message on one line (its type when it has none)."""
    return " ".join(str(e).split()) or type(e).__name__
