"""The inference manifest: one JSON file per answer, its schema, and its replay as events.

What it is: `Manifest` (pydantic, extra fields forbidden — the schema; `python -m
pdt.infer.manifest` prints it as JSON Schema), `build_manifest` from a decode result and its
baselines, `write_manifest` (atomic), `load_manifest` (validated, errors name the file and field)
and `manifest_events` (the answer's recorded event sequence, for the TUI to replay). It holds the
configuration, prompt, per-stream text and token ids, every block attempt (committed and
rolled-back ones), commits with readiness, rollbacks, coverage per plan item, the gate trace, the
notes timeline, timings (per token too), memory (the KV cache's real bytes), quality figures,
tokenizer, trunk, sidecars and code version. What it is not: the decoder (`pdt.infer.orchestrator`).
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

FORMAT = "pdt-manifest/1"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AttemptRecord(_Strict):
    attempt: int
    slot: int
    tokens: list[int]
    token_times: list[float]
    text: str
    readiness: float | None
    decision: Literal["commit", "rollback", "forced", ""]
    coverage: list[float]
    note_version: int | None


class StreamManifest(_Strict):
    stream: int
    prefix: str
    prefix_ids: list[int]
    text: str
    token_ids: list[int]
    done_reason: str
    blocks: list[list[AttemptRecord]]
    """Per round, every attempt in order; the last one is committed, the others were rolled back."""


class CommitRecord(_Strict):
    stream: int
    round: int
    attempt: int
    readiness: float | None
    forced: bool
    note_version: int | None
    slot: int


class RollbackRecord(_Strict):
    stream: int
    round: int
    attempt: int
    removed: int
    text: str
    readiness: float | None


class CoverageItem(_Strict):
    item: str
    plan_id: int
    prob: float
    covered: bool


class TimingRecord(_Strict):
    mode: str
    seconds: float
    new_tokens: int
    generated_tokens: int
    steps: int
    step_ms_mean: float
    tokens_per_s: float
    per_token_s: list[float]
    engine: str = "eager"  # the decode-step engine: eager | cuda_graph (manifests before it: eager)
    # where `seconds` went (prefill, plan, steps, block_ends, capture, other): DecodeResult.phase_seconds
    phase_seconds: dict[str, float] = {}


class BaselineRecord(_Strict):
    mode: str
    text: str
    sections: list[str]
    token_ids: list[list[int]]
    timing: TimingRecord


class Manifest(_Strict):
    format: Literal["pdt-manifest/1"]
    created: str
    code_version: str
    preset: str
    answer: int
    prompt: str
    prompt_ids: list[int]
    config: dict[str, Any]
    trunk: dict[str, Any]
    sidecars: dict[str, Any]
    tokenizer: dict[str, Any]
    plan: dict[str, Any]
    streams: list[StreamManifest]
    merged: str
    commits: list[CommitRecord]
    rollbacks: list[RollbackRecord]
    coverage: list[list[CoverageItem]]
    gate_trace: dict[str, Any]
    notes_timeline: list[dict[str, Any]]
    timings: dict[str, TimingRecord]
    speedup: dict[str, float]
    memory: dict[str, int]
    baselines: dict[str, BaselineRecord]
    quality: dict[str, float | None]
    """None where undefined (e.g. the NLL of an empty answer)."""
    events: list[dict[str, Any]]


class ManifestError(Exception):
    """A manifest file cannot be read; the message names the file and the field."""


def timing_record(result: Any) -> TimingRecord:
    times = [t for s in result.streams for b in s.blocks for a in b for t in a.token_times]
    steps = max(1, result.steps)
    return TimingRecord(
        mode=result.mode,
        seconds=result.seconds,
        new_tokens=result.new_tokens,
        generated_tokens=sum(s.generated for s in result.streams),
        steps=result.steps,
        step_ms_mean=1000.0 * sum(result.step_seconds) / steps,
        tokens_per_s=result.new_tokens / result.seconds if result.seconds > 0 else 0.0,
        per_token_s=sorted(times),
        engine=getattr(result, "engine", "eager"),
        phase_seconds=dict(getattr(result, "phase_seconds", {})),
    )


def _attempt(a: Any) -> AttemptRecord:
    return AttemptRecord(
        attempt=a.attempt,
        slot=a.slot,
        tokens=list(a.tokens),
        token_times=list(a.token_times),
        text=a.text,
        readiness=a.readiness,
        decision=a.decision,
        coverage=list(a.coverage),
        note_version=a.note_version,
    )


def build_manifest(
    *,
    preset: str,
    answer: int,
    result: Any,
    baselines: dict[str, Any],
    config: dict[str, Any],
    trunk: dict[str, Any],
    sidecars: dict[str, Any],
    tokenizer: dict[str, Any],
    memory: dict[str, int],
    quality: dict[str, float | None],
    events: list[dict[str, Any]],
    coverage_threshold: float,
    gate_layers: list[int],
    code_version: str,
) -> Manifest:
    plan = result.plan
    streams, commits, rollbacks, coverage = [], [], [], []
    for s in result.streams:
        streams.append(
            StreamManifest(
                stream=s.stream,
                prefix=s.prefix,
                prefix_ids=list(s.prefix_ids),
                text=s.text,
                token_ids=list(s.token_ids),
                done_reason=s.done_reason,
                blocks=[[_attempt(a) for a in block] for block in s.blocks],
            )
        )
        last_cov: list[float] = []
        for r, block in enumerate(s.blocks):
            for a in block:
                if a.decision == "rollback":
                    rollbacks.append(
                        RollbackRecord(
                            stream=s.stream,
                            round=r,
                            attempt=a.attempt,
                            removed=len(a.tokens),
                            text=a.text,
                            readiness=a.readiness,
                        )
                    )
                else:
                    commits.append(
                        CommitRecord(
                            stream=s.stream,
                            round=r,
                            attempt=a.attempt,
                            readiness=a.readiness,
                            forced=a.decision == "forced",
                            note_version=a.note_version,
                            slot=a.slot,
                        )
                    )
                    last_cov = a.coverage or last_cov
        labels, ids = plan.items[s.stream], plan.item_ids[s.stream]
        coverage.append(
            [
                CoverageItem(item=lab, plan_id=pid, prob=p, covered=p >= coverage_threshold)
                for lab, pid, p in zip(labels, ids, last_cov, strict=False)
            ]
        )
    timings = {"pdt": timing_record(result)}
    base_records = {}
    for mode, res in baselines.items():
        timings[mode] = timing_record(res)
        base_records[mode] = BaselineRecord(
            mode=mode,
            text=res.merged,
            sections=res.sections,
            token_ids=[list(s.token_ids) for s in res.streams],
            timing=timings[mode],
        )
    speedup = {}
    if "sequential" in timings and result.seconds > 0:
        seq = timings["sequential"]
        speedup["e2e_vs_sequential"] = seq.seconds / result.seconds
        pdt_rate = timings["pdt"].generated_tokens / max(1e-9, sum(result.step_seconds))
        seq_rate = seq.generated_tokens / max(1e-9, seq.step_ms_mean * seq.steps / 1000.0)
        speedup["step_throughput_vs_sequential"] = pdt_rate / seq_rate if seq_rate > 0 else 0.0
    return Manifest(
        format=FORMAT,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        code_version=code_version,
        preset=preset,
        answer=answer,
        prompt=result.prompt,
        prompt_ids=list(result.prompt_ids),
        config=config,
        trunk=trunk,
        sidecars=sidecars,
        tokenizer=tokenizer,
        plan={
            "source": plan.source,
            "slot_ids": plan.slot_ids,
            "items": plan.items,
            "item_ids": plan.item_ids,
            "seed_texts": plan.seed_texts,
        },
        streams=streams,
        merged=result.merged,
        commits=commits,
        rollbacks=rollbacks,
        coverage=coverage,
        gate_trace={"layers": gate_layers, "values": result.gates, "g": config.get("g", 1.0)},
        notes_timeline=result.timeline,
        timings=timings,
        speedup=speedup,
        memory=memory,
        baselines=base_records,
        quality=quality,
        events=events,
    )


def write_manifest(manifest: Manifest, path: Path) -> Path:
    """Atomic write (a temporary file renamed over the target)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".manifest-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(manifest.model_dump_json(indent=1))
    os.replace(tmp, path)
    return path


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    try:
        return Manifest.model_validate_json(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read ({exc})") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ManifestError(f"{path}: not a PDT manifest — {where}: {first['msg']}") from None


def manifest_events(path: str | Path) -> list[Any]:
    """The answer's events, in the order they were emitted (unknown kinds skipped), for replay."""
    from pdt.telemetry.events import event_from_dict

    events = [event_from_dict(e) for e in load_manifest(path).events]
    return [e for e in events if e is not None]


def schema() -> dict[str, Any]:
    return Manifest.model_json_schema()


if __name__ == "__main__":
    print(json.dumps(schema(), indent=2))
