"""Events: JSON round trip, the JSONL sink + follower contract, the console printer."""

from __future__ import annotations

import io
import json
from pathlib import Path

from pdt.telemetry.events import (
    EVENT_TYPES,
    Answer,
    Checkpoint,
    DecodeStarted,
    Done,
    Error,
    Log,
    Memory,
    Metric,
    Progress,
    Readiness,
    Sample,
    StreamRollback,
    StreamToken,
    Timing,
    event_from_dict,
)
from pdt.telemetry.memory import sample_memory
from pdt.telemetry.sinks import ConsolePrinter, Emitter, EventFollower, JsonlSink, read_events

EXAMPLES = [
    Progress(step=3, total=10, tokens=300),
    Metric(name="train/loss", value=2.5, step=3),
    Checkpoint(step=3, slot="current", path="/x"),
    Log(level="info", message="hi"),
    Sample(text="abc"),
    Memory(rss_bytes=1, gpu_allocated_bytes=2, gpu_reserved_bytes=3, gpu_peak_bytes=4),
    Done(status="finished"),
    Error(message="boom"),
]


def test_required_fields_present() -> None:
    required = {
        "progress": {"step", "total", "tokens"},
        "metric": {"name", "value", "step"},
        "checkpoint": {"step", "slot", "path"},
        "log": {"level", "message"},
        "sample": {"text"},
        "memory": {"rss_bytes", "gpu_allocated_bytes", "gpu_reserved_bytes", "gpu_peak_bytes"},
        "done": {"status"},
        "error": {"message"},
    }
    for event in EXAMPLES:
        data = event.to_dict()
        assert {"kind", "t"} <= set(data)
        assert required[data["kind"]] <= set(data), data["kind"]
    assert set(required) <= set(EVENT_TYPES)


def test_round_trip_and_unknown_kind() -> None:
    for event in EXAMPLES:
        assert event_from_dict(json.loads(json.dumps(event.to_dict()))) == event
    assert event_from_dict({"kind": "from_the_future", "t": 1.0}) is None


def test_to_dict_is_a_snapshot_of_the_event() -> None:
    """A decode event's dict equals the recursive dataclass dict, and a list its caller changes after
    the event was made (a coverage list, say) does not change a dict already taken (the manifest
    keeps them until the answer ends)."""
    import dataclasses

    from pdt.telemetry.events import Coverage, DecodeStarted, GateTrace, StreamToken

    items, probs = ["Moon", "Apollo"], [0.9, 0.2]
    events = [
        Coverage(stream=1, round=2, items=items, probs=probs),
        GateTrace(layers=[0, 1], values=[0.1, 0.2], g=1.0),
        StreamToken(stream=0, round=1, token=5, text="a", committed=True, attempt=1),
        DecodeStarted(
            answer=0,
            prompt="p",
            mode="pdt",
            k=2,
            tau=4,
            lag=1,
            gamma=0.3,
            g=1.0,
            alpha=1.0,
            max_new_tokens=8,
            plan_items=[["x"], ["y"]],
        ),
    ]
    for event in [*EXAMPLES, *events]:
        assert event.to_dict() == {"kind": event.kind, **dataclasses.asdict(event)}
    taken = events[0].to_dict()
    items.append("Luna")
    probs[0] = 0.0
    assert taken["items"] == ["Moon", "Apollo"] and taken["probs"] == [0.9, 0.2]


def test_jsonl_sink_and_follower(tmp_path: Path) -> None:
    path = tmp_path / "run" / "events.jsonl"
    sink = JsonlSink(path)
    follower = EventFollower(path)
    assert follower.poll() == []
    sink(EXAMPLES[0])
    assert follower.poll() == [EXAMPLES[0]]
    with open(path, "a", encoding="utf-8") as fh:  # a writer caught mid-line
        fh.write('{"kind": "log", "t": 1.0, "level": "info", ')
    assert follower.poll() == []
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('"message": "done writing"}\n')
    assert follower.poll() == [Log(level="info", message="done writing", t=1.0)]
    sink.close()
    assert len(read_events(path)) == 2


def test_console_printer_lines() -> None:
    out = io.StringIO()
    printer = ConsolePrinter(out, min_interval_s=0)
    printer(Metric(name="train/loss", value=1.2345, step=5))
    printer(Progress(step=5, total=10, tokens=500))
    printer(Error(message="disk full"))
    text = out.getvalue()
    assert "step 5/10" in text and "loss 1.2345" in text and "[error] disk full" in text


def test_emitter_drops_a_failing_sink() -> None:
    seen = []

    def broken(_event: object) -> None:
        raise RuntimeError("view crashed")

    emitter = Emitter([broken, seen.append])
    emitter(Done(status="finished"))
    emitter(Done(status="finished"))
    assert len(seen) == 2 and broken not in emitter.sinks


def test_memory_sample_is_real() -> None:
    mem = sample_memory()
    assert mem.rss_bytes > 10 * 1024 * 1024 and mem.available_bytes > 0


def test_console_printer_shows_an_answer() -> None:
    """An unattended inference run prints what ran, rollbacks, forced commits, timings and the sections."""
    out = io.StringIO()
    printer = ConsolePrinter(out, min_interval_s=0)
    printer(
        DecodeStarted(
            answer=0,
            prompt="Tell me about the Moon.",
            mode="pdt",
            k=2,
            tau=8,
            lag=1,
            gamma=0.25,
            g=1.0,
            alpha=1.0,
            max_new_tokens=16,
        )
    )
    printer(StreamToken(stream=0, round=0, token=5, text="tok"))  # tokens stay in the events
    printer(StreamRollback(stream=1, round=2, attempt=0, removed=8, text="the same\nblock", readiness=0.1))
    printer(Readiness(stream=1, round=2, attempt=1, score=0.2, gamma=0.25, decision="forced"))
    printer(Readiness(stream=0, round=2, attempt=0, score=0.9, gamma=0.25, decision="commit"))
    printer(Timing(mode="pdt", tokens=32, seconds=0.5, tokens_per_s=64.0, steps=16, step_ms=3.0, speedup=2.5))
    printer(Timing(mode="sequential", tokens=32, seconds=1.25, tokens_per_s=25.6, steps=32, step_ms=3.9))
    printer(
        Answer(answer=0, text="A\n\nB", sections=["The Moon orbits.", ""], manifest="logs/r/manifest-0.json")
    )
    lines = out.getvalue().splitlines()
    assert (
        lines[0].startswith("[decode] answer 0: pdt, K = 2, τ = 8")
        and "'Tell me about the Moon.'" in lines[0]
    )
    assert "tok" not in out.getvalue().replace("tokens", "")
    assert (
        lines[1] == "[rollback] stream 1 round 2 try 1: readiness 0.100, 8 tokens withdrawn 'the same block'"
    )
    assert lines[2].startswith("[forced] stream 1 round 2: committed at readiness 0.200 < γ 0.250")
    assert not any("stream 0 round 2" in line for line in lines)  # a commit is not a log line
    assert lines[3].startswith("[timing] pdt: 32 tokens in 0.50 s") and lines[3].endswith(
        "2.50× as fast as sequential"
    )
    assert lines[4].startswith("[timing] sequential:") and "as fast" not in lines[4]
    assert lines[5] == "[answer 0] 2 sections (manifest logs/r/manifest-0.json)"
    assert lines[6:] == ["--- stream 0 ---", "The Moon orbits.", "--- stream 1 ---", "(empty)"]
