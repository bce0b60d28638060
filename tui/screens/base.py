"""What every screen of the app shares: the worker-failure handler and escape.

Worker.StateChanged does not bubble, so each screen inherits this one handler;
it turns any worker failure into the app's error modal. Escape cancels the
screen's running work first, and goes back only when nothing runs.
"""
from __future__ import annotations

from textual import on
from textual.binding import Binding
from textual.screen import Screen
from textual.worker import Worker, WorkerState

LIVE_GROUP = "live"    # the polling of a live recording
ONSET_GROUP = "onset"  # replay.diagnose.bisect refining the onset
BACKGROUND = {LIVE_GROUP, ONSET_GROUP}  # worker groups escape leaves running


class BaseScreen(Screen):
    BINDINGS = [Binding("escape", "back", "back")]  # cancels running work first (see action_back)

    def running_workers(self) -> list[Worker]:
        return [w for w in self.app.workers if w.node is self and w.is_running and w.group not in BACKGROUND]

    def action_back(self) -> None:
        running = self.running_workers()
        if running:
            for w in running:
                w.cancel()
            self.notify(f"cancelled: {', '.join(sorted({w.name for w in running}))}", timeout=3)
            self.on_cancelled()
            return
        if len(self.app.screen_stack) > 2:
            self.app.pop_screen()

    def on_cancelled(self) -> None:
        """Hook: a screen resets its progress display here."""

    @on(Worker.StateChanged)
    def _worker_failed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            self.app.show_error(event.worker.error, where=event.worker.name)
