"""Typed job events: the one stream every job emits and every view consumes.

A job (pretrain, dataset build, curriculum, inference) never prints or draws: it emits frozen
dataclass events. Sinks (a JSONL file under `logs/<run>/events.jsonl`, the console printer, the
TUI, the tests) consume the same objects. This module holds the event types and their JSON
round trip; it is not a sink and imports nothing heavy.

Every event serialises to one JSON object with at least `kind` and `t` (unix seconds).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar


def _now() -> float:
    return time.time()


@dataclass(frozen=True)
class Event:
    """Base class. `kind` is the JSON discriminator; `t` the wall-clock time it was made."""

    kind: ClassVar[str] = "event"
    t: float = field(default_factory=_now, kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        out.update(dataclasses.asdict(self))
        return out


@dataclass(frozen=True)
class Progress(Event):
    """Training progress: optimizer step `step` of `total`, `tokens` seen so far."""

    kind: ClassVar[str] = "progress"
    step: int
    total: int
    tokens: int = 0
    stage: str = ""


@dataclass(frozen=True)
class Metric(Event):
    """A scalar: e.g. `train/loss`, `eval/loss`, `eval/ppl`, `lr`, `throughput/tokens_per_s`."""

    kind: ClassVar[str] = "metric"
    name: str
    value: float
    step: int


@dataclass(frozen=True)
class Checkpoint(Event):
    """A checkpoint was committed: `slot` is the rotating name (`current`), `path` the folder."""

    kind: ClassVar[str] = "checkpoint"
    step: int
    slot: str
    path: str


@dataclass(frozen=True)
class Log(Event):
    """A human-readable line. `level` is one of debug, info, warning, error."""

    kind: ClassVar[str] = "log"
    level: str
    message: str


@dataclass(frozen=True)
class Sample(Event):
    """A text sample generated during training (top-p with n-gram repetition blocking)."""

    kind: ClassVar[str] = "sample"
    text: str
    step: int = 0
    prompt: str = ""


@dataclass(frozen=True)
class Memory(Event):
    """Host and GPU memory at one instant (bytes; GPU fields are 0 on a CPU run)."""

    kind: ClassVar[str] = "memory"
    rss_bytes: int
    available_bytes: int = 0
    gpu_allocated_bytes: int = 0
    gpu_reserved_bytes: int = 0
    gpu_peak_bytes: int = 0


@dataclass(frozen=True)
class RunStarted(Event):
    """First event of a run: what runs, where, and how it was launched."""

    kind: ClassVar[str] = "run_started"
    run: str
    preset: str
    preset_kind: str
    pid: int
    world_size: int = 1
    resumed_from_step: int = 0


@dataclass(frozen=True)
class Done(Event):
    """Last event of a successful or stopped run. `status` is `finished` or `stopped`."""

    kind: ClassVar[str] = "done"
    status: str


@dataclass(frozen=True)
class Error(Event):
    """Last event of a failed run: `message` says what went wrong and what to do."""

    kind: ClassVar[str] = "error"
    message: str


EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls for cls in (Progress, Metric, Checkpoint, Log, Sample, Memory, RunStarted, Done, Error)
}


def event_from_dict(data: dict[str, Any]) -> Event | None:
    """Rebuild an event from its JSON object; None for a kind this version does not know.

    Unknown kinds and extra fields are tolerated so a newer job can be replayed by an older view.
    """
    cls = EVENT_TYPES.get(str(data.get("kind", "")))
    if cls is None:
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in data.items() if k in names})
    except TypeError:
        return None
