"""The help overlay: the current screen's help text and its key bindings.

What it is: a modal that renders the `HELP` markdown of the screen it was opened from, followed
by that screen's active bindings (so it never disagrees with the footer). What it is not: docs.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Markdown

GLOBAL_KEYS = """
### Everywhere

- **?** — this help · **q** — quit (asks again while jobs run) · **ctrl+p** — command palette
"""


def help_markdown(screen: Screen) -> str:
    """The screen's HELP text plus a table of its visible bindings."""
    text = screen.HELP or f"## {type(screen).__name__}\n"
    rows = []
    for binding in screen.BINDINGS:
        if isinstance(binding, Binding) and binding.show:
            rows.append(f"| `{binding.key}` | {binding.description} |")
    if rows:
        text += "\n| key | action |\n|---|---|\n" + "\n".join(rows) + "\n"
    return text + GLOBAL_KEYS


class HelpScreen(ModalScreen[None]):
    """Closes on escape, ? or q."""

    BINDINGS = [
        Binding("escape,question_mark,q", "dismiss", "Close"),
    ]

    DEFAULT_CSS = """
    HelpScreen {
        align: center middle;
    }
    HelpScreen > VerticalScroll {
        width: 80%;
        max-width: 90;
        height: 80%;
        border: round $accent;
        background: $surface;
        padding: 0 1;
    }
    """

    def __init__(self, markdown: str) -> None:
        super().__init__()
        self.markdown = markdown

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Markdown(self.markdown, id="help-text")

    def on_mount(self) -> None:
        self.query_one(VerticalScroll).border_title = "help"
