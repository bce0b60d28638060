"""Modal screens: the error box (one for every failure) and the help screen."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Markdown, Static

HELP = """\
# replay — keys

| where | key | does |
|---|---|---|
| everywhere | `F1` `?` | this help |
| | `F2` `s` | SQL console over the open recordings |
| | `escape` | cancel running work, else go back |
| | `q` `ctrl+q` | quit |
| runs | `↑` `↓` / click | choose a recording |
| | `enter` | open it (against the reference, if one is marked) |
| | `r` | mark the highlighted recording as the reference (`x` clears) |
| | `g` | rescan the folder |
| timeline | `←` `→` `home` `end` | move the step cursor |
| | `o` | jump to the divergence onset |
| | `enter` | open the step |
| | `p` | replay panel for the step |
| | `d` | diagnose: the verdict, and the backend / trainer error per step |
| step | `↑` `↓` | choose a sequence (its tokens show below) |
| | `enter` / `tab` | into the tokens; `←` `→` `↑` `↓` move the token cursor |
| | `w` | the token with the largest \\|r\\| |
| | `[` `]` / click a header | sort by another column; `f` flips the order |
| | `,` `.` | previous / next step |
| | `p` | replay panel |
| | `c` | colour the tokens by \\|r\\|, e_backend, e_trainer, lag or semantics |
| replay | `1`–`4` | toggle a fix (`✓` on; the chosen preset and engine read `●`) |
| | `v` `e` | preset v0/v1, engine reference/vllm |
| | `r` / `b` | replay the step / bisect the fixes |
| SQL | `ctrl+enter` `F5` `ctrl+r` | run the query (several statements: the last result shows) |
| | `escape` | cancel the running query (DuckDB stops it) |
| | `ctrl+↑` `ctrl+↓` / click | query history |

Tokens are coloured by \\|r\\| = \\|lp_trainer − lp_rollout\\| (or, with `c`, by a part of it:
r = e_trainer + lag + semantics − e_backend, against an exact reference); `┃vN` marks a new
weight version inside a sequence; the first line tells how many prompt tokens the
prefix cache served. Schemas in SQL: `run` (and `ref` when a reference is open);
views `tokens`, `sequences`, `step_metrics`; tables `rollouts`, `trainer`,
`topk`, `metrics`, `events`, `replays`, `reference`.
"""


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,f1,question_mark,q", "dismiss", "close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box"):
            yield Markdown(HELP)


class ErrorScreen(ModalScreen):
    """Shows a ReplayError's title and message (or any exception's type and text)."""

    BINDINGS = [Binding("escape,enter,q", "dismiss", "close")]

    def __init__(self, title: str, msg: str) -> None:
        super().__init__()
        self.err_title = title
        self.err_msg = msg

    def compose(self) -> ComposeResult:
        with Vertical(id="error-box"):
            yield Static(self.err_title, id="error-title", markup=False)
            yield Static(self.err_msg, id="error-msg", markup=False)
            yield Button("close", id="error-close")

    def on_button_pressed(self) -> None:
        self.dismiss()
