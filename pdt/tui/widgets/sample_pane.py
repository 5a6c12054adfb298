"""The run screen's sample pane: the latest text the model generated during training.

What it is: the prompt (dim) followed by the model's continuation, with the step it came from.
What it is not: the inference demo (that has its own run screen).
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.content import Content
from textual.widgets import Static

from pdt.telemetry.events import Sample


class SamplePane(VerticalScroll):
    """`show(sample)`: the newest sample replaces the previous one."""

    DEFAULT_CSS = """
    SamplePane {
        height: 1fr;
        padding: 0 1;
    }
    """

    def compose(self) -> ComposeResult:
        yield Static(Content.styled("no sample yet", "dim"), id="sample-text")

    def show(self, sample: Sample | None) -> None:
        self.query_one("#sample-text", Static).update(self.describe(sample))
        if sample is not None:
            self.border_subtitle = f"step {sample.step}"

    @staticmethod
    def describe(sample: Sample | None) -> Content:
        if sample is None:
            return Content.styled("no sample yet", "dim")
        text = sample.text
        if sample.prompt and text.startswith(sample.prompt):
            text = text[len(sample.prompt) :]
        return Content.assemble((sample.prompt, "dim italic"), (text, "bold"))
