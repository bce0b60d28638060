"""Messages that background workers post to the screens.

Workers never touch widgets: they query, then post one of these. Progress
messages replace an unhandled predecessor in the queue (``can_replace``), so a
long replay or scan cannot flood the UI.
"""
from __future__ import annotations

from typing import Any

from textual.message import Message


class RunsFound(Message):
    """The recordings found under the root folder (a list of ``data.RunEntry``)."""

    def __init__(self, runs: list) -> None:
        super().__init__()
        self.runs = runs


class TimelineLoaded(Message):
    """Per-step metrics of the run and its reference, and the divergence onset."""

    def __init__(self, timeline: Any, live: bool) -> None:
        super().__init__()
        self.timeline = timeline
        self.live = live


class SequencesLoaded(Message):
    """The sequences of one step (``data.SequenceTable``)."""

    def __init__(self, step: int, table: Any) -> None:
        super().__init__()
        self.step = step
        self.table = table


class TokensLoaded(Message):
    """The tokens of one sequence (``data.SequenceTokens``)."""

    def __init__(self, tokens: Any) -> None:
        super().__init__()
        self.tokens = tokens


class TokenDetailLoaded(Message):
    """Everything known about one token (``data.TokenDetail``)."""

    def __init__(self, detail: Any) -> None:
        super().__init__()
        self.detail = detail


class QueryDone(Message):
    """A SQL console query finished: columns and (at most ``limit``) rows, or an error text."""

    def __init__(self, sql: str, columns: list[str], rows: list[tuple], elapsed: float,
                 truncated: bool = False, error: str | None = None, statements: int = 1) -> None:
        super().__init__()
        self.sql = sql
        self.statements = statements  # statements the query held (the last result is shown)
        self.columns = columns
        self.rows = rows
        self.elapsed = elapsed
        self.truncated = truncated
        self.error = error


class Progress(Message):
    """Progress of a long task; a newer one replaces an unhandled older one."""

    def __init__(self, task: str, done: float, total: float | None, text: str = "") -> None:
        super().__init__()
        self.task = task
        self.done = done
        self.total = total
        self.text = text

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, Progress) and message.task == self.task


class ReplayDone(Message):
    """A replay of a step finished (``data.ReplayResult``)."""

    def __init__(self, result: Any) -> None:
        super().__init__()
        self.result = result


class BisectDone(Message):
    """The fix bisection finished (``data.FixBisection``)."""

    def __init__(self, result: Any) -> None:
        super().__init__()
        self.result = result


class Unavailable(Message):
    """A feature cannot run here; ``reason`` says why (shown as is, never replaced by fake results)."""

    def __init__(self, feature: str, reason: str) -> None:
        super().__init__()
        self.feature = feature
        self.reason = reason


class OnsetFound(Message):
    """replay.diagnose.bisect answered: the divergence onset (``onset.Onset``) replaces the rule's."""

    def __init__(self, onset: Any) -> None:
        super().__init__()
        self.onset = onset


class ComponentsLoaded(Message):
    """Per-step components of the run's mismatch (``data.Components``, or None: no reference stored)."""

    def __init__(self, components: Any) -> None:
        super().__init__()
        self.components = components


class DiagnosisProgress(Message):
    """A line of progress of a running diagnosis."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, DiagnosisProgress)


class DiagnosisDone(Message):
    """``replay.diagnose.diagnose``'s result for the run."""

    def __init__(self, result: dict) -> None:
        super().__init__()
        self.result = result
