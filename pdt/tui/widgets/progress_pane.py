"""The run screen's progress pane: a bar for step/total with ETA, elapsed time and tokens seen.

What it is: a `ProgressBar` (its own ETA is off: it would time a replay by the wall clock) and a
line computed from event timestamps, so a replayed run shows the timings it really had. What it
is not: a metrics view (see `metrics_pane.py`).
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.content import Content
from textual.widgets import ProgressBar, Static

from pdt.tui.run_state import RunState
from pdt.tui.units import fmt_count, fmt_duration


class ProgressPane(Vertical):
    """Step bar plus 'step N/M · tokens · elapsed · ETA'."""

    DEFAULT_CSS = """
    ProgressPane {
        height: auto;
        padding: 0 1;
    }
    ProgressPane > #progress-line {
        height: 1;
    }
    ProgressPane > ProgressBar {
        width: 1fr;
    }
    ProgressPane > ProgressBar > Bar {
        width: 1fr;
    }
    """

    def compose(self) -> ComposeResult:
        yield Static("waiting for the first progress event…", id="progress-line")
        yield ProgressBar(total=None, show_eta=False, id="progress-bar")

    @property
    def bar(self) -> ProgressBar:
        return self.query_one("#progress-bar", ProgressBar)

    def show(self, state: RunState, now: float) -> None:
        if state.total:
            self.bar.update(total=state.total, progress=state.step)
        self.query_one("#progress-line", Static).update(self.describe(state, now))

    @staticmethod
    def describe(state: RunState, now: float) -> Content:
        if not state.total:
            elapsed = state.elapsed_s(now)
            return Content(
                f"starting… elapsed {fmt_duration(elapsed)}"
                if elapsed is not None
                else "waiting for the first progress event…"
            )
        parts: list[str | tuple[str, str]] = [
            ("step ", "dim"),
            (f"{state.step:,}/{state.total:,}", "bold"),
            ("  tokens ", "dim"),
            fmt_count(state.tokens),
            ("  elapsed ", "dim"),
            fmt_duration(state.elapsed_s(now)),
        ]
        final = state.final_status()
        if final is None:
            parts += [("  ETA ", "dim"), (fmt_duration(state.eta_s()), "bold")]
        if state.stage:
            parts += [("  stage ", "dim"), state.stage]
        return Content.assemble(*parts)
