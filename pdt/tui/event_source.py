"""Event sources: where the run screen's events come from, and how it stops their job.

What it is: the small interface the run screen's reader thread polls (`EventSource`), the real
one (`FileEventSource`: follows `logs/<run>/events.jsonl` of a live or finished run, plus the
child process when the TUI launched it — exit code, stop, kill) and a scripted fake for tests
(`ListEventSource`). What it is not: a widget. Nothing here imports Textual; every method except
`can_stop`/`stop` runs on the reader thread, so they may block briefly on file I/O.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pdt.telemetry.events import Done, Error, Event, RunStarted
from pdt.telemetry.sinks import EventFollower

#: Called (on the reader thread) once a job process is launched, so the app can track it.
LaunchCallback = Callable[[Path, subprocess.Popen], None]


@dataclass(frozen=True)
class LaunchSpec:
    """A job to start: `preset_ref` (name or path, becomes PDT_PRESET) on `nproc` processes."""

    preset_ref: str
    preset_name: str
    nproc: int = 1
    on_launch: LaunchCallback | None = None


class EventSource(ABC):
    """What the run screen reads. Lifecycle: `start()` once, then `poll()` until `ended`."""

    #: Seconds between polls: 10 Hz keeps the UI live without spinning on the file.
    poll_interval_s: float = 0.1
    #: The run folder, once known (a launching source learns it in `start()`).
    run_dir: Path | None = None

    @property
    @abstractmethod
    def title(self) -> str:
        """A short name for the header: the run folder or the preset being launched."""

    def start(self) -> None:  # noqa: B027 - optional hook, most sources need nothing
        """Called once on the reader thread before the first poll (may launch a process)."""

    @abstractmethod
    def poll(self) -> list[Event]:
        """Events that arrived since the last call (possibly none). Never blocks for long."""

    @property
    @abstractmethod
    def ended(self) -> bool:
        """True once no more events can come (every event already returned by `poll`)."""

    def exit_code(self) -> int | None:
        """The job process's exit code when it is known and the process has exited."""
        return None

    def can_stop(self) -> bool:
        """Whether `stop` would reach a running job (cheap; called on the UI thread)."""
        return False

    def stop(self, force: bool = False) -> None:  # noqa: B027 - a replay has nothing to stop
        """Ask the job to checkpoint and exit; `force` kills it. Called on the UI thread."""

    def console_tail(self, max_lines: int = 20) -> list[str]:
        """The last lines of the job's console output (for a crash without an error event)."""
        return []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def tail_lines(path: Path, max_lines: int, max_bytes: int = 32768) -> list[str]:
    """The last `max_lines` lines of a text file (reads at most `max_bytes` from its end)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if size > max_bytes and lines:
        lines = lines[1:]  # the first line was cut by the seek
    return lines[-max_lines:]


class FileEventSource(EventSource):
    """Follows `run_dir/events.jsonl`; knows the job's process if the TUI launched it.

    Three cases: a job launched here (`launch(...)`: exit code and stop through the Popen), a
    live run started elsewhere (stop by signalling the pid of its `run_started` event), and a
    finished run (replay: every event at once, then `ended`).
    """

    def __init__(
        self,
        run_dir: Path | None = None,
        process: subprocess.Popen | None = None,
        *,
        launch: LaunchSpec | None = None,
    ) -> None:
        if (run_dir is None) == (launch is None):
            raise ValueError("give a run folder to follow or a job to launch, not both")
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.process = process
        self._launch = launch
        self._follower = EventFollower(self.run_dir / "events.jsonl") if self.run_dir else None
        self._pid = 0
        self._final_seen = False
        self._ended = False

    @classmethod
    def launch(
        cls, preset_ref: str, preset_name: str, nproc: int = 1, on_launch: LaunchCallback | None = None
    ) -> FileEventSource:
        """A source that starts `preset_ref` as a child job in `start()` (off the UI thread)."""
        return cls(launch=LaunchSpec(preset_ref, preset_name, nproc, on_launch))

    @property
    def title(self) -> str:
        if self.run_dir is not None:
            return self.run_dir.name
        return f"{self._launch.preset_name} (starting)" if self._launch else "run"

    def start(self) -> None:
        if self._launch is None or self.process is not None:
            return
        from pdt.runs import launch_job, new_run_dir

        spec = self._launch
        run_dir = new_run_dir(spec.preset_name)
        self.process = launch_job(spec.preset_ref, run_dir, nproc=spec.nproc)
        self._follower = EventFollower(run_dir / "events.jsonl")
        self.run_dir = run_dir  # set last: poll() and the UI take a set run_dir as "launched"
        if spec.on_launch is not None:
            spec.on_launch(run_dir, self.process)

    def poll(self) -> list[Event]:
        if self._follower is None or self.run_dir is None or self._ended:
            return []
        # Read the exit code *before* the file: whatever the job wrote before exiting is then
        # already in the file, so this very poll drains it and nothing is lost.
        code = self.process.poll() if self.process is not None else None
        events = self._follower.poll()
        for event in events:
            if isinstance(event, RunStarted):
                self._pid = event.pid
            elif isinstance(event, (Done, Error)):
                self._final_seen = True
        if self.process is not None:
            self._ended = code is not None
        elif self._final_seen or not self._pid or not _pid_alive(self._pid):
            # A run we did not launch: finished (final event), or its process is gone, or it never
            # wrote run_started (nothing to follow). One more read catches its last lines.
            events += self._follower.poll()
            self._ended = True
        return events

    @property
    def ended(self) -> bool:
        return self._ended

    def exit_code(self) -> int | None:
        return self.process.returncode if self.process is not None else None

    def can_stop(self) -> bool:
        if self._ended:
            return False
        if self.process is not None:
            return self.process.poll() is None
        return bool(self._pid) and not self._final_seen and _pid_alive(self._pid)

    def stop(self, force: bool = False) -> None:
        if self.process is not None:
            from pdt.runs import stop_job

            stop_job(self.process, force=force)
        elif self._pid and _pid_alive(self._pid):
            # Not our child: signal only the job's own process (rank 0 agrees the stop with its peers).
            try:
                os.kill(self._pid, signal.SIGKILL if force else signal.SIGINT)
            except ProcessLookupError:
                pass

    def console_tail(self, max_lines: int = 20) -> list[str]:
        if self.run_dir is None:
            return []
        return tail_lines(self.run_dir / "console.log", max_lines)


class ListEventSource(EventSource):
    """A scripted source for tests and demos: events released one per `delay` seconds.

    `keep_open=True` keeps it live after the last event (until a forced stop), like a running
    job. `stop_calls` records every `stop(force)` so a test can check the stop key; a forced stop
    ends the source with `exit_code` -9, as SIGKILL would. `exit_code` and `console` simulate a
    process that died without a final event.
    """

    def __init__(
        self,
        events: Sequence[Event],
        delay: float = 0.0,
        keep_open: bool = False,
        exit_code: int | None = None,
        console: Sequence[str] = (),
        title: str = "fake run",
        run_dir: Path | None = None,
    ) -> None:
        self.events = list(events)
        self.delay = delay
        self.keep_open = keep_open
        self._exit_code = exit_code
        self._console = list(console)
        self._title = title
        self.run_dir = run_dir
        self.stop_calls: list[bool] = []
        self.started = False
        self._next = 0
        self._t0 = 0.0
        self._lock = threading.Lock()

    @property
    def title(self) -> str:
        return self._title

    def start(self) -> None:
        self.started = True
        self._t0 = time.monotonic()

    def poll(self) -> list[Event]:
        with self._lock:
            if self.delay <= 0:
                due = len(self.events)
            else:
                due = min(len(self.events), int((time.monotonic() - self._t0) / self.delay) + 1)
            out, self._next = self.events[self._next : due], max(self._next, due)
            return out

    @property
    def ended(self) -> bool:
        with self._lock:
            return self._next >= len(self.events) and not self.keep_open

    def exit_code(self) -> int | None:
        return self._exit_code

    def can_stop(self) -> bool:
        return not self.ended

    def stop(self, force: bool = False) -> None:
        with self._lock:
            self.stop_calls.append(force)
            if force:
                self.keep_open = False
                self._next = len(self.events)
                self._exit_code = -signal.SIGKILL.value

    def console_tail(self, max_lines: int = 20) -> list[str]:
        return self._console[-max_lines:]


class ReplaySource(EventSource):
    """A recorded answer (e.g. a manifest's events) played back at its recorded pace.

    Events are released when the time since `start()` reaches their offset from the first event,
    divided by `speed`; gaps longer than `max_gap_s` (a model loading, a pause before asking
    again) are shortened to it. Nothing runs, so nothing can be stopped.
    """

    def __init__(
        self, events: Sequence[Event], title: str, speed: float = 1.0, max_gap_s: float = 1.0
    ) -> None:
        self.events = list(events)
        self._title = title
        self._due: list[float] = []
        offset, last = 0.0, None
        for e in self.events:
            if last is not None:
                offset += min(max(0.0, e.t - last), max_gap_s) / max(speed, 1e-6)
            self._due.append(offset)
            last = e.t
        self._next = 0
        self._t0 = 0.0

    @property
    def title(self) -> str:
        return self._title

    def start(self) -> None:
        self._t0 = time.monotonic()

    def poll(self) -> list[Event]:
        now = time.monotonic() - self._t0
        end = self._next
        while end < len(self.events) and self._due[end] <= now:
            end += 1
        out, self._next = self.events[self._next : end], end
        return out

    @property
    def ended(self) -> bool:
        return self._next >= len(self.events)
