"""The PDT Workbench app: screens, the job processes it launched, and `run_tui()`.

What it is: the Textual `App` (home screen first), the registry of jobs launched from this
session (so the home screen shows them as running and `r` reattaches with exit code and stop
still available), quitting with a second confirmation while jobs run, and `run_tui()` which
routes logging to a file (Textual owns the terminal) and returns an exit code.
What it is not: a job runner — jobs are child processes (`pdt.runs.launch_job`).
"""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from textual.app import App
from textual.binding import Binding
from textual.screen import Screen

from pdt.presets.loader import PresetInfo
from pdt.tui.event_source import EventSource, FileEventSource
from pdt.tui.screens.help import HelpScreen, help_markdown
from pdt.tui.screens.home import HomeScreen
from pdt.tui.screens.run import RunScreen

#: Makes the event source for a preset to run: (preset, nproc) -> source. Tests inject fakes.
Launcher = Callable[[PresetInfo, int], EventSource]
#: Seconds within which a second `q` quits while jobs are running.
QUIT_CONFIRM_S = 5.0


class PDTApp(App[int]):
    """`PDTApp().run()`; see `run_tui()`."""

    CSS_PATH = "app.tcss"
    TITLE = "PDT Workbench"
    SUB_TITLE = "presets"
    BINDINGS = [
        Binding("q", "quit_app", "Quit"),
        Binding("question_mark,f1", "help", "Help", key_display="?"),
    ]

    def __init__(self, presets_folder: Path | None = None, launcher: Launcher | None = None) -> None:
        super().__init__()
        self.presets_folder = presets_folder
        self.launcher: Launcher = launcher or self._launch_child
        self._jobs: dict[Path, tuple[str, subprocess.Popen]] = {}
        self._jobs_lock = threading.Lock()
        self._quit_armed = False

    def get_default_screen(self) -> Screen:
        return HomeScreen()

    def on_mount(self) -> None:
        self.set_interval(1.0, self._reap_jobs)

    # ---------------------------------------------------------------- jobs launched here

    def _launch_child(self, info: PresetInfo, nproc: int) -> EventSource:
        def register(run_dir: Path, process: subprocess.Popen) -> None:
            self.register_job(info.name, run_dir, process)

        return FileEventSource.launch(str(info.path), info.name, nproc, on_launch=register)

    def register_job(self, preset: str, run_dir: Path, process: subprocess.Popen) -> None:
        """Track a job process (called from a reader thread right after the launch)."""
        with self._jobs_lock:
            self._jobs[Path(run_dir)] = (preset, process)

    def _live_jobs(self) -> list[tuple[Path, str, subprocess.Popen]]:
        with self._jobs_lock:
            jobs = list(self._jobs.items())
        return [(d, name, p) for d, (name, p) in jobs if p.poll() is None]

    def _reap_jobs(self) -> None:
        """`poll()` collects exited children (no zombies) — a non-blocking waitpid each."""
        self._live_jobs()

    def running_presets(self) -> frozenset[str]:
        return frozenset(name for _, name, _ in self._live_jobs())

    def running_run_dir(self, preset: str) -> Path | None:
        return next((d for d, name, _ in self._live_jobs() if name == preset), None)

    def job_process(self, run_dir: Path) -> subprocess.Popen | None:
        with self._jobs_lock:
            entry = self._jobs.get(Path(run_dir))
        return entry[1] if entry else None

    # ---------------------------------------------------------------- navigation

    def launch(self, info: PresetInfo, nproc: int) -> None:
        """Run a preset: a new job, followed by a run screen."""
        self.push_screen(RunScreen(self.launcher(info, nproc)))

    def open_run_dir(self, run_dir: Path) -> None:
        """Attach to a run folder: live follow (with stop if launched here) or replay."""
        self.push_screen(RunScreen(FileEventSource(run_dir, process=self.job_process(run_dir))))

    def open_source(self, source: EventSource) -> None:
        self.push_screen(RunScreen(source))

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        self.push_screen(HelpScreen(help_markdown(self.screen)))

    def action_quit_app(self) -> None:
        running = self._live_jobs()
        if running and not self._quit_armed:
            self._quit_armed = True
            self.set_timer(QUIT_CONFIRM_S, self._disarm_quit)
            names = ", ".join(sorted({name for _, name, _ in running}))
            self.notify(
                f"{len(running)} job(s) still running ({names}). They keep running in the background "
                "(reattach with r next time). Press q again to quit.",
                title="Quit?",
                severity="warning",
            )
            return
        self.exit(0)

    def _disarm_quit(self) -> None:
        self._quit_armed = False


def _route_logging() -> Path | None:
    """Send Python logging to logs/tui.log: Textual owns stdout/stderr while the app runs."""
    from pdt.runs import logs_root

    path = logs_root() / "tui.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(path, encoding="utf-8")
    except OSError:
        return None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    return path


def run_tui() -> int:
    """Open the TUI; returns the process exit code (0 on a normal quit)."""
    _route_logging()
    app = PDTApp()
    result = app.run()
    if app.return_code not in (None, 0):
        return app.return_code
    return int(result or 0)
