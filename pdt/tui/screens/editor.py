"""The preset editor: view or edit a preset's JSON, validated before anything is written.

What it is: a `TextArea` with JSON highlighting (when tree-sitter-json is installed), `ctrl+s` to
save, and the validation error shown inline with its field path while the cursor jumps to the
offending key. Saving writes a temporary file beside the preset, validates *that file* with the
real loader (so `extends` resolves exactly as it will at run time) and only then replaces the
preset atomically: an invalid text is never written over a preset.
What it is not: the schema (see `pdt.presets`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, Static, TextArea

from pdt.presets.loader import PresetError, load_preset_file


@dataclass(frozen=True)
class Problem:
    """Why a text cannot be saved, and where (0-based row, column) when known."""

    message: str
    location: tuple[int, int] | None = None


def locate_key(text: str, field_path: str) -> tuple[int, int] | None:
    """Best-effort position of the last key of `a.b[0].c` in a JSON text (walking key by key)."""
    keys = [k for k in re.split(r"\.|\[\d+\]", field_path) if k]
    offset, found = 0, None
    for key in keys:
        match = re.compile(r'"' + re.escape(key) + r'"\s*:').search(text, offset)
        if match is None:
            break
        offset, found = match.end(), match.start()
    if found is None:
        return None
    row = text.count("\n", 0, found)
    return row, found - (text.rfind("\n", 0, found) + 1)


def check_and_save(path: Path, text: str) -> Problem | None:
    """Validate `text` as the preset at `path`; write it (atomically) only if valid."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return Problem(
            f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
            (exc.lineno - 1, exc.colno - 1),
        )
    if not isinstance(data, dict):
        return Problem('a preset must be a JSON object: { "name": …, "kind": …, … }', (0, 0))
    if data.get("name") != path.stem:
        return Problem(
            f'name: {json.dumps(data.get("name"))} must match the file name "{path.stem}" '
            "(checkpoints are stored by preset name)",
            locate_key(text, "name"),
        )
    tmp = path.with_name(f".{path.name}.pdt-edit.tmp")  # not *.json: never listed as a preset
    try:
        tmp.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
        try:
            load_preset_file(tmp)
        except PresetError as exc:
            message = str(exc).replace(str(tmp), path.name)
            return Problem(message, _error_location(text, message, path.name))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return None


def _error_location(text: str, message: str, source: str) -> tuple[int, int] | None:
    """The position of the first field path named in a loader error message."""
    for line in message.removeprefix(f"{source}: ").splitlines():
        field_path = line.strip().split(": ", 1)[0]
        if field_path and " " not in field_path and not field_path.startswith("("):
            return locate_key(text, field_path)
    return None


class EditorScreen(Screen):
    """A preset's JSON; `read_only=True` is the viewer (press e to edit)."""

    HELP = """\
## Preset editor

- **ctrl+s** — validate and save. Nothing is written unless the whole preset is valid;
  the error names the field path and the cursor jumps to it.
- **escape** — back (press twice to discard unsaved changes)
- **e** — (viewer) switch to editing
"""

    BINDINGS = [
        Binding("ctrl+s", "save", "Save", priority=True),
        Binding("escape", "back", "Back", priority=True),
        Binding("e", "edit", "Edit"),
    ]

    @dataclass
    class Loaded(Message):
        text: str
        error: str | None = None

    @dataclass
    class Saved(Message):
        text: str
        problem: Problem | None

    def __init__(self, path: Path, read_only: bool = False) -> None:
        super().__init__()
        self.path = Path(path)
        self.read_only = read_only
        self.saved_text: str | None = None
        self._discard_armed = False

    def compose(self) -> ComposeResult:
        yield Header()
        language = "json" if _has_json_grammar() else None
        yield TextArea.code_editor("", language=language, read_only=self.read_only, id="editor-text")
        yield Static("", id="editor-error", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self._set_subtitle()
        self.query_one("#editor-error").display = False
        self._load(self.path)

    def _set_subtitle(self) -> None:
        mode = "view" if self.read_only else "edit"
        self.sub_title = f"{mode} · {self.path.name}"

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "edit":
            return self.read_only
        if action == "save":
            return not self.read_only
        return True

    @work(thread=True, exclusive=True, exit_on_error=False, group="editor-io")
    def _load(self, path: Path) -> None:
        try:
            self.post_message(self.Loaded(path.read_text(encoding="utf-8")))
        except OSError as exc:
            self.post_message(self.Loaded("", error=f"cannot read {path}: {exc.strerror or exc}"))

    @on(Loaded)
    def _on_loaded(self, message: Loaded) -> None:
        area = self.query_one(TextArea)
        area.load_text(message.text)
        self.saved_text = message.text
        if message.error:
            self._show_problem(Problem(message.error))
        area.focus()

    @property
    def text(self) -> str:
        return self.query_one(TextArea).text

    def action_edit(self) -> None:
        self.read_only = False
        self.query_one(TextArea).read_only = False
        self._set_subtitle()
        self.refresh_bindings()

    def action_save(self) -> None:
        if self.read_only:
            return
        self._save(self.path, self.text)

    @work(thread=True, exclusive=True, exit_on_error=False, group="editor-io")
    def _save(self, path: Path, text: str) -> None:
        try:
            problem = check_and_save(path, text)
        except OSError as exc:
            problem = Problem(f"cannot write {path}: {exc.strerror or exc}")
        self.post_message(self.Saved(text, problem))

    @on(Saved)
    def _on_saved(self, message: Saved) -> None:
        if message.problem is None:
            self.saved_text = message.text
            self.query_one("#editor-error").display = False
            self.notify(f"saved {self.path.name}")
        else:
            self._show_problem(message.problem)

    def _show_problem(self, problem: Problem) -> None:
        error = self.query_one("#editor-error", Static)
        error.update(f"not saved — {problem.message}")
        error.display = True
        if problem.location is not None:
            area = self.query_one(TextArea)
            area.cursor_location = problem.location
            area.scroll_cursor_visible(center=True)
            area.focus()

    def action_back(self) -> None:
        if self.saved_text is not None and self.text != self.saved_text and not self._discard_armed:
            self._discard_armed = True
            self.notify("Unsaved changes: ctrl+s saves, escape again discards them.", severity="warning")
            return
        self.app.pop_screen()


def _has_json_grammar() -> bool:
    """Whether JSON highlighting can be switched on safely.

    TextArea lists every language Textual knows; highlighting needs `tree-sitter-json`, and
    Textual 8.2 segfaults in `TextArea` with tree-sitter 0.26 (measured: 0.25.2 works), so any
    other tree-sitter version falls back to plain text rather than crash the app.
    """
    from importlib import metadata

    try:
        import tree_sitter_json  # noqa: F401

        version = metadata.version("tree-sitter")
    except (ImportError, metadata.PackageNotFoundError):
        return False
    return version.split(".")[:2] == ["0", "25"]
