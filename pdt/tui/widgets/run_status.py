"""The run screen's status line: running / stopping / finished / stopped / failed / exited.

What it is: one coloured line (wrapped when an error message is long) whose CSS class follows
the state, so the final status is visible at a glance. What it is not: the log (details of a
failure, e.g. the console tail, go to the log pane).
"""

from __future__ import annotations

from textual.widgets import Static

#: status kind -> (symbol, CSS class)
KINDS = {
    "starting": ("…", "-running"),
    "running": ("●", "-running"),
    "stopping": ("■", "-stopping"),
    "finished": ("✔", "-finished"),
    "stopped": ("■", "-stopping"),
    "failed": ("✖", "-failed"),
    "exited": ("✖", "-failed"),
    "replay": ("↺", "-running"),
}


class RunStatus(Static):
    """`set_status(kind, text)`; `kind` is one of KINDS; `text` is kept for tests and copy."""

    DEFAULT_CSS = """
    RunStatus {
        height: auto;
        max-height: 4;
        padding: 0 1;
        text-style: bold;
    }
    RunStatus.-running { color: $accent; }
    RunStatus.-stopping { color: $warning; }
    RunStatus.-finished { color: $success; }
    RunStatus.-failed { color: $text-error; background: $error-muted; }
    """

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - Textual's name
        super().__init__("", id=id, markup=False)
        self.kind = "starting"
        self.text = "starting…"

    def set_status(self, kind: str, text: str) -> None:
        if (kind, text) == (self.kind, self.text) and self.content:
            return
        self.kind, self.text = kind, text
        symbol, css = KINDS.get(kind, ("•", "-running"))
        self.set_classes(css)
        self.update(f"{symbol} {text}")
