"""The run screen's log tail: the job's log lines, checkpoints and final events, newest last.

What it is: a bounded `RichLog` (older lines scroll away) coloured by level; when a job dies
without an error event the tail of its `console.log` is appended here. What it is not: the
console printer of unattended runs.
"""

from __future__ import annotations

from collections.abc import Iterable

from rich.text import Text
from textual.widgets import RichLog

#: level -> Rich style; unknown levels are plain.
LEVEL_STYLE = {
    "debug": "dim",
    "warning": "yellow",
    "error": "bold red",
    "checkpoint": "green",
    "done": "bold green",
    "run": "cyan",
    "console": "dim",
}


class LogTail(RichLog):
    """Append-only log; `add(lines)` with (level, message) pairs."""

    DEFAULT_CSS = """
    LogTail {
        height: 1fr;
        background: $surface;
    }
    """

    def __init__(self, *, id: str | None = None, max_lines: int = 2000) -> None:  # noqa: A002
        super().__init__(id=id, max_lines=max_lines, wrap=True, markup=False, highlight=False)
        self.line_count = 0

    def add(self, lines: Iterable[tuple[str, str]]) -> None:
        for level, message in lines:
            prefix = "" if level in ("info", "console") else f"[{level}] "
            self.write(Text(prefix + message, style=LEVEL_STYLE.get(level, "")))
            self.line_count += 1

    def add_console_tail(self, lines: list[str]) -> None:
        if not lines:
            return
        self.add([("run", "── console.log (last lines) ──")])
        self.add(("console", line) for line in lines)
