"""Event sinks and readers: the JSONL log, the console printer, a fan-out emitter, a follower.

What it is: the plumbing between a job's events and whoever watches them. The JSONL file
(`logs/<run>/events.jsonl`) is the contract between a job process and the TUI, which follows
the file of a live run or replays a finished one. What it is not: a renderer (the TUI is one).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from pdt.telemetry.events import (
    Answer,
    Checkpoint,
    DecodeStarted,
    Done,
    Error,
    Event,
    Log,
    Memory,
    Metric,
    Progress,
    Readiness,
    RunStarted,
    Sample,
    StreamRollback,
    Timing,
    event_from_dict,
)
from pdt.telemetry.memory import fmt_bytes

Sink = Callable[[Event], None]


class JsonlSink:
    """Appends one JSON object per event; each line is flushed so a follower sees it at once."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[str] | None = open(self.path, "a", encoding="utf-8")

    def __call__(self, event: Event) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps(event.to_dict(), ensure_ascii=False, default=_json_default) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    return str(obj)


class ConsolePrinter:
    """Readable progress lines for unattended runs. Metrics are batched onto the progress line.
    An inference run prints each answer's start (mode and knobs), its rollbacks and forced commits,
    every mode's timing and, at the end, the sections and the manifest's path; its tokens, notes,
    coverage and gates stay in the run's events and manifest."""

    def __init__(self, stream: IO[str] | None = None, min_interval_s: float = 2.0) -> None:
        self.stream = stream or sys.stdout
        self.min_interval_s = min_interval_s
        self._last_progress = 0.0
        self._metrics: dict[str, float] = {}

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def __call__(self, event: Event) -> None:
        if isinstance(event, Metric):
            self._metrics[event.name] = event.value
            if event.name.startswith("eval/"):
                self._print(f"[eval] step {event.step}  {event.name} = {event.value:.4f}")
        elif isinstance(event, Progress):
            now = time.monotonic()
            if now - self._last_progress < self.min_interval_s and event.step < event.total:
                return
            self._last_progress = now
            pct = 100.0 * event.step / max(1, event.total)
            bits = [f"step {event.step}/{event.total} ({pct:.1f}%)", f"tokens {event.tokens:,}"]
            for key, label, fmt in (
                ("train/loss", "loss", "{:.4f}"),
                ("lr", "lr", "{:.2e}"),
                ("throughput/tokens_per_s", "tok/s", "{:,.0f}"),
            ):
                if key in self._metrics:
                    bits.append(f"{label} {fmt.format(self._metrics[key])}")
            self._print("  ".join(bits))
        elif isinstance(event, Log):
            self._print(f"[{event.level}] {event.message}")
        elif isinstance(event, Checkpoint):
            self._print(f"[checkpoint] step {event.step} -> {event.path}")
        elif isinstance(event, Sample):
            self._print(f"[sample @ {event.step}] {event.text!r}")
        elif isinstance(event, Memory):
            gpu = ""
            if event.gpu_reserved_bytes:
                gpu = (
                    f"  gpu alloc {fmt_bytes(event.gpu_allocated_bytes)} reserved "
                    f"{fmt_bytes(event.gpu_reserved_bytes)} peak {fmt_bytes(event.gpu_peak_bytes)}"
                )
            self._print(f"[memory] rss {fmt_bytes(event.rss_bytes)}{gpu}")
        elif isinstance(event, RunStarted):
            resumed = f", resuming from step {event.resumed_from_step}" if event.resumed_from_step else ""
            self._print(
                f"[run] {event.run}: preset {event.preset} ({event.preset_kind}), "
                f"{event.world_size} process(es){resumed}"
            )
        elif isinstance(event, DecodeStarted):
            prompt = _short(event.prompt, 80)
            self._print(
                f"[decode] answer {event.answer}: {event.mode}, K = {event.k}, τ = {event.tau}, "
                f"Δ = {event.lag}, γ = {event.gamma:.3f}, g = {event.g:g}, {event.max_new_tokens} tokens "
                f"a stream; prompt {prompt!r}"
            )
        elif isinstance(event, StreamRollback):
            self._print(
                f"[rollback] stream {event.stream} round {event.round} try {event.attempt + 1}: readiness "
                f"{event.readiness:.3f}, {event.removed} tokens withdrawn {_short(event.text)!r}"
            )
        elif isinstance(event, Readiness) and event.decision == "forced":
            self._print(
                f"[forced] stream {event.stream} round {event.round}: committed at readiness "
                f"{event.score:.3f} < γ {event.gamma:.3f} after the last retry"
            )
        elif isinstance(event, Timing):
            speedup = (
                f", {event.speedup:.2f}× as fast as sequential"
                if event.speedup > 0 and event.mode != "sequential"
                else ""
            )
            self._print(
                f"[timing] {event.mode}: {event.tokens} tokens in {event.seconds:.2f} s "
                f"({event.tokens_per_s:,.0f} tokens/s, {event.steps} steps of {event.step_ms:.2f} ms, "
                f"{event.engine}){speedup}"
            )
        elif isinstance(event, Answer):
            where = f" (manifest {event.manifest})" if event.manifest else ""
            self._print(f"[answer {event.answer}] {len(event.sections)} sections{where}")
            for i, text in enumerate(event.sections):
                self._print(f"--- stream {i} ---\n{text.strip() or '(empty)'}")
        elif isinstance(event, Done):
            self._print(f"[done] {event.status}")
        elif isinstance(event, Error):
            self._print(f"[error] {event.message}")


def _short(text: str, limit: int = 60) -> str:
    """One line of at most `limit` characters (a prompt or a rolled-back block's text in a log line)."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class Emitter:
    """Fans one event out to several sinks. A failing sink is dropped, never the job."""

    def __init__(self, sinks: list[Sink] | None = None) -> None:
        self.sinks: list[Sink] = list(sinks or [])

    def add(self, sink: Sink) -> None:
        self.sinks.append(sink)

    def __call__(self, event: Event) -> None:
        for sink in list(self.sinks):
            try:
                sink(event)
            except Exception as exc:  # noqa: BLE001 - a broken view must not kill training
                self.sinks.remove(sink)
                print(f"[warning] event sink {sink!r} failed and was detached: {exc}", file=sys.stderr)

    def log(self, message: str, level: str = "info") -> None:
        self(Log(level=level, message=message))


def read_events(path: str | os.PathLike[str]) -> list[Event]:
    """All events of a (finished or live) run file; torn last lines are skipped."""
    events: list[Event] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            event = _parse_line(line)
            if event is not None:
                events.append(event)
    return events


def _parse_line(line: str) -> Event | None:
    line = line.strip()
    if not line:
        return None
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event_from_dict(data) if isinstance(data, dict) else None


class EventFollower:
    """Incrementally reads a growing events.jsonl; `poll()` returns the events appended since.

    Partial lines (a job mid-write) are kept until their newline arrives.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._offset = 0
        self._pending = ""

    def poll(self) -> list[Event]:
        try:
            with open(self.path, encoding="utf-8") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
                self._offset = fh.tell()
        except FileNotFoundError:
            return []
        data = self._pending + chunk
        lines = data.split("\n")
        self._pending = lines.pop()  # text after the last newline is incomplete
        return [e for e in (_parse_line(line) for line in lines) if e is not None]

    def follow(self, stop: Callable[[], bool], interval_s: float = 0.1) -> Iterator[Event]:
        while True:
            yield from self.poll()
            if stop():
                yield from self.poll()
                return
            time.sleep(interval_s)
