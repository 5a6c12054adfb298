"""The manifest picker: choose which recorded answer of a run to replay.

What it is: a modal list of a run's answer manifests (`manifest-<n>.json`, a pipeline's in its
child folders), newest first, each with its prompt; enter returns the chosen path, escape None.
What it is not: a reader of manifests — the prompt is pulled from the file's head (the manifest
writes it near the top), so a long answer's events are never parsed just to list it.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

#: Bytes read from a manifest's head to find its prompt (format/created/…/prompt come first).
HEAD_BYTES = 8192
_PROMPT = re.compile(r'"prompt"\s*:\s*("(?:[^"\\]|\\.)*")')


def find_manifests(run_dir: Path) -> list[Path]:
    """The run's answer manifests (its pipeline children's too), newest first."""
    found = [p for p in run_dir.rglob("manifest-*.json") if p.is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def manifest_prompt(path: Path) -> str:
    """The prompt recorded in a manifest, from its head; "" when it cannot be found."""
    try:
        with path.open("rb") as f:
            head = f.read(HEAD_BYTES).decode("utf-8", errors="replace")
        match = _PROMPT.search(head)
        return json.loads(match.group(1)) if match else ""
    except (OSError, json.JSONDecodeError):
        return ""


def manifest_label(path: Path, run_dir: Path) -> Text:
    when = time.strftime("%H:%M:%S", time.localtime(path.stat().st_mtime))
    where = str(path.relative_to(run_dir).parent)
    out = Text.assemble((path.stem, "bold"), ("  " + when, "dim"))
    if where != ".":
        out.append("  " + where, style="dim")
    prompt = manifest_prompt(path)
    if prompt:
        out.append("\n  " + prompt.replace("\n", " ")[:120], style="italic")
    return out


class ManifestPicker(ModalScreen[Path | None]):
    """Pick one of `manifests` (paths); dismisses with it, or None on escape."""

    DEFAULT_CSS = """
    ManifestPicker {
        align: center middle;
    }
    ManifestPicker > Vertical {
        width: 90%;
        max-width: 100;
        height: auto;
        max-height: 80%;
        border: round $accent;
        background: $surface;
        padding: 0 1;
    }
    ManifestPicker #manifests-hint {
        color: $text-muted;
    }
    ManifestPicker OptionList {
        height: auto;
        max-height: 20;
    }
    """

    BINDINGS = [Binding("escape", "dismiss_none", "Cancel")]

    def __init__(self, run_dir: Path, manifests: list[Path]) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.manifests = manifests

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(
                f"{len(self.manifests)} answers of {self.run_dir.name} — enter: replay · escape: cancel",
                id="manifests-hint",
            )
            yield OptionList(
                *[Option(manifest_label(p, self.run_dir), id=str(p)) for p in self.manifests],
                id="manifests",
            )

    def on_mount(self) -> None:
        self.query_one(OptionList).focus()

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(Path(event.option.id) if event.option.id else None)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)
