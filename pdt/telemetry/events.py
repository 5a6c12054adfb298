"""Typed job events: the one stream every job emits and every view consumes.

A job (pretrain, dataset build, curriculum, inference) never prints or draws: it emits frozen
dataclass events. Sinks (a JSONL file under `logs/<run>/events.jsonl`, the console printer, the
TUI, the tests) consume the same objects. This module holds the event types and their JSON
round trip; it is not a sink and imports nothing heavy.

Every event serialises to one JSON object with at least `kind` and `t` (unix seconds).
"""

from __future__ import annotations

import dataclasses
import functools
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
        """The fields by name, after `kind`. Events hold only JSON values (numbers, strings, lists and
        dicts of them): a list or dict field is copied one level deep (a caller that later changes
        the list it passed does not change a dict kept for a manifest), not recursively as
        `dataclasses.asdict` does (~10x the time: an answer emits a `stream_token` per token)."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in _fields(type(self)):
            v = getattr(self, f)
            out[f] = list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v
        return out


@functools.cache
def _fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


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
    kv_cache_bytes: int = 0
    """Bytes the decoder's KV cache really holds (inference; 0 for training)."""


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


# --------------------------------------------------------------------------- inference
#
# One answer of an inference run is: `decode_started` (what runs, with which knobs), then per
# round the streams' `stream_token`s (provisional), at each block end `note_snapshot`,
# `coverage` and `readiness` (decision commit | rollback | forced), a `stream_rollback` when a
# block is withdrawn (its tokens are gone from text and cache), `stream_done` per stream, `gate`,
# `memory`, one `timing` per mode that ran (pdt and its baselines) and finally `answer`.
# Streams are 0-based; rounds are 0-based blocks of τ tokens of a stream's own section.


@dataclass(frozen=True)
class DecodeStarted(Event):
    """An answer begins: the prompt, the mode and every knob a view needs to lay itself out."""

    kind: ClassVar[str] = "decode_started"
    answer: int
    """0-based index of this answer within the run (a prompt asked again is the next answer)."""
    prompt: str
    mode: str
    """pdt | sequential | independent."""
    k: int
    tau: int
    lag: int
    gamma: float
    g: float
    alpha: float
    max_new_tokens: int
    layers: list[int] = field(default_factory=list)
    plan_items: list[list[str]] = field(default_factory=list)
    """Coverage items per stream (labels as shown)."""
    stream_prefixes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StreamToken(Event):
    """One sampled token of a stream. `committed` is False while its block awaits readiness."""

    kind: ClassVar[str] = "stream_token"
    stream: int
    round: int
    token: int
    text: str
    committed: bool = False
    attempt: int = 0
    """0 for the first try of this block, n for the n-th retry after a rollback."""


@dataclass(frozen=True)
class StreamRollback(Event):
    """A block was withdrawn: its `removed` tokens (`text`) left the stream's text and KV cache."""

    kind: ClassVar[str] = "stream_rollback"
    stream: int
    round: int
    attempt: int
    removed: int
    text: str
    readiness: float


@dataclass(frozen=True)
class NoteSnapshot(Event):
    """A note was committed to the bus (stream −1: snapshot 0, the plan note)."""

    kind: ClassVar[str] = "note_snapshot"
    stream: int
    round: int
    version: int
    visible_from_round: int
    forced: bool = False


@dataclass(frozen=True)
class Readiness(Event):
    """The agreement head's score for a finished block, against γ, and what was decided."""

    kind: ClassVar[str] = "readiness"
    stream: int
    round: int
    attempt: int
    score: float
    gamma: float
    decision: str
    """commit | rollback | forced (committed below γ after the last retry)."""


@dataclass(frozen=True)
class Coverage(Event):
    """Coverage probability of each of the stream's plan items at a block end."""

    kind: ClassVar[str] = "coverage"
    stream: int
    round: int
    items: list[str]
    probs: list[float]


@dataclass(frozen=True)
class GateTrace(Event):
    """The SNC gate of each instrumented layer (λ_l; the effective gate is λ_l · g)."""

    kind: ClassVar[str] = "gate"
    layers: list[int]
    values: list[float]
    g: float = 1.0


@dataclass(frozen=True)
class StreamDone(Event):
    """A stream stopped: `reason` is eos | budget; `tail` is committed text the live pieces held
    back (the stream ended mid-character), so the pieces plus the tail are the stream's text."""

    kind: ClassVar[str] = "stream_done"
    stream: int
    reason: str
    tokens: int
    tail: str = ""


@dataclass(frozen=True)
class Timing(Event):
    """Speed of one mode for this answer. `speedup`: sequential's wall time / this mode's (0: unknown)."""

    kind: ClassVar[str] = "timing"
    mode: str
    tokens: int
    seconds: float
    tokens_per_s: float
    steps: int = 0
    """Batched trunk forwards (one per token of every active stream at once)."""
    step_ms: float = 0.0
    speedup: float = 0.0
    engine: str = "eager"
    """The decode-step engine: eager (an HF forward per token) or cuda_graph (a replayed capture)."""


@dataclass(frozen=True)
class Answer(Event):
    """An answer is complete: the merged text (committed sections in stream order) and its manifest."""

    kind: ClassVar[str] = "answer"
    answer: int
    text: str
    sections: list[str] = field(default_factory=list)
    manifest: str = ""


EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls
    for cls in (
        Progress,
        Metric,
        Checkpoint,
        Log,
        Sample,
        Memory,
        RunStarted,
        Done,
        Error,
        DecodeStarted,
        StreamToken,
        StreamRollback,
        NoteSnapshot,
        Readiness,
        Coverage,
        GateTrace,
        StreamDone,
        Timing,
        Answer,
    )
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
