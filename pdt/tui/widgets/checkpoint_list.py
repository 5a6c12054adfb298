"""The run screen's checkpoint list: every committed checkpoint, newest first.

What it is: a static list of `Checkpoint` events (step, rotating slot, time, folder). What it
is not: a checkpoint browser; loading and rotation belong to the training core.
"""

from __future__ import annotations

import time

from textual.content import Content
from textual.widgets import Static

from pdt.telemetry.events import Checkpoint

#: Rows shown; older checkpoints are rotated away on disk anyway (current/prev/prev2).
MAX_ROWS = 50


class CheckpointList(Static):
    """`show(checkpoints)` with the state's list (oldest first, as they happened)."""

    DEFAULT_CSS = """
    CheckpointList {
        height: auto;
        padding: 0 1;
    }
    """

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - Textual's name
        super().__init__("no checkpoint yet", id=id)

    def show(self, checkpoints: list[Checkpoint]) -> None:
        self.update(self.describe(checkpoints))

    @staticmethod
    def describe(checkpoints: list[Checkpoint]) -> Content:
        if not checkpoints:
            return Content.styled("no checkpoint yet", "dim")
        rows = []
        for ckpt in reversed(checkpoints[-MAX_ROWS:]):
            stamp = time.strftime("%H:%M:%S", time.localtime(ckpt.t))
            rows.append(
                Content.assemble((f"step {ckpt.step}", "bold $success"), (f"  {stamp}  {ckpt.slot}", "dim"))
            )
        return Content("\n").join(rows)
