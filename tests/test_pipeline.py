"""The `pipeline` job: presets resolved up front, run in order in one process, skipped when done.

End to end through `python main.py` (a tiny dataset_tiny → pretrain_tiny pipeline, then its rerun;
a missing preset; a SIGINT while the first child trains), and in-process with fake jobs for the
contract with each child: its own context, the shared emitter and stop flag, failures named.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pdt import jobs
from pdt.infer import inbox
from pdt.jobs import JobContext
from pdt.pipeline import PIPELINE_STAGE, PipelineError, resolve_steps, run_pipeline
from pdt.presets import find_preset, validate_preset
from pdt.presets.loader import SHIPPED_DIR
from pdt.telemetry.events import Event, Log, Progress
from tests.conftest import MAIN, PYTHON, TINY_PRETRAIN, child_env

# --------------------------------------------------------------------------- helpers


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        )
    return out


def _write(folder: Path, data: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{data['name']}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _tiny_dataset(name: str = "dataset_tiny") -> dict[str, Any]:
    data = find_preset("dataset_tiny", SHIPPED_DIR).model_dump(mode="json")
    data["data"]["sources"] = [{"type": "wiki_vital", "limit": 40}]
    return {**data, "name": name}


def _tiny_pretrain(steps: int) -> dict[str, Any]:
    shipped = find_preset("pretrain_tiny", SHIPPED_DIR).model_dump(mode="json")
    over = {k: v for k, v in TINY_PRETRAIN.items() if k not in ("extends", "kind", "description")}
    data = _merge(shipped, over)
    data["train"]["token_budget"] = steps * 32 * 4  # seq_len 32 x micro batch 4 per step
    return data


def _pipeline(name: str, presets: list[str]) -> dict[str, Any]:
    return {"name": name, "kind": "pipeline", "description": "test pipeline", "presets": presets}


def _env(tmp_path: Path, run_dir: Path, preset: str) -> dict[str, str]:
    return child_env(
        tmp_path,
        PDT_PRESETS_DIR=str(tmp_path / "presets"),
        PDT_DATA_DIR=str(tmp_path / "data"),
        PDT_RUN_DIR=str(run_dir),
        PDT_PRESET=preset,
        PDT_HEADLESS="1",
    )


def _run_main(tmp_path: Path, run_dir: Path, preset: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, MAIN],
        env=_env(tmp_path, run_dir, preset),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _events(run_dir: Path) -> list[dict[str, Any]]:
    """Complete lines only: a live run may be mid-write of its last one."""
    lines = (run_dir / "events.jsonl").read_text(encoding="utf-8").split("\n")[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def _progress(events: list[dict[str, Any]], stage: str) -> list[tuple[int, int]]:
    return [(e["step"], e["total"]) for e in events if e["kind"] == "progress" and e["stage"] == stage]


def _logs(events: list[dict[str, Any]]) -> list[str]:
    return [e["message"] for e in events if e["kind"] == "log"]


# --------------------------------------------------------------------------- through main.py


def test_pipeline_runs_children_in_order_then_a_rerun_skips_them(tmp_path: Path) -> None:
    presets = tmp_path / "presets"
    _write(presets, _tiny_dataset())
    _write(presets, _tiny_pretrain(steps=4))
    _write(presets, _pipeline("pipe", ["dataset_tiny", "pretrain_tiny"]))

    first = tmp_path / "logs" / "first"
    t0 = time.monotonic()
    proc = _run_main(tmp_path, first, "pipe")
    first_s = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    events = _events(first)
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "run_started" and events[0]["preset_kind"] == "pipeline"
    assert kinds.count("run_started") == 1 and kinds[-1] == "done" and events[-1]["status"] == "finished"
    # The pipeline's own bar: 0/2 at the first child, 1/2 at the second, 2/2 at the end.
    assert _progress(events, PIPELINE_STAGE) == [(0, 2), (1, 2), (2, 2)]
    # Both children's events land in the one events.jsonl, dataset entirely before pretrain.
    stage_of = [(i, e["stage"]) for i, e in enumerate(events) if e["kind"] == "progress"]
    dataset_at = [i for i, s in stage_of if s in ("preflight", "plans", "notes", "collate", "export")]
    pretrain_at = [i for i, s in stage_of if s == "pretrain"]
    assert dataset_at and pretrain_at and max(dataset_at) < min(pretrain_at)
    assert _progress(events, "pretrain")[-1] == (4, 4)
    assert any(e["kind"] == "checkpoint" for e in events)
    # One folder per child under the pipeline's run folder; checkpoints under the child's name.
    assert sorted(p.name for p in first.iterdir() if p.is_dir()) == ["1-dataset_tiny", "2-pretrain_tiny"]
    assert (tmp_path / "data" / "processed" / "dataset_tiny" / "export" / "manifest.json").is_file()
    state_path = tmp_path / "checkpoints" / "pretrain_tiny" / "current" / "state.json"
    state = json.loads(state_path.read_text())
    assert state["finished"] and state["step"] == 4
    plans = sorted((tmp_path / "data" / "processed" / "dataset_tiny" / "plans").iterdir())
    plan_mtimes = [p.stat().st_mtime_ns for p in plans]

    second = tmp_path / "logs" / "second"
    t0 = time.monotonic()
    proc = _run_main(tmp_path, second, "pipe")
    second_s = time.monotonic() - t0
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    events = _events(second)
    assert events[-1] == {**events[-1], "kind": "done", "status": "finished"}
    assert _progress(events, "pretrain") == [], "the rerun trained again"
    assert not any(e["kind"] == "checkpoint" for e in events)
    assert any("pretrain_tiny already finished at step 4" in m for m in _logs(events))
    assert [p.stat().st_mtime_ns for p in plans] == plan_mtimes, "the rerun rebuilt the dataset's plans"
    assert json.loads(state_path.read_text())["step"] == 4
    print(f"first run {first_s:.1f}s, rerun {second_s:.1f}s")


def test_a_missing_preset_is_named_before_anything_runs(tmp_path: Path) -> None:
    presets = tmp_path / "presets"
    _write(presets, _tiny_dataset())
    _write(presets, _tiny_pretrain(steps=4))
    _write(presets, _pipeline("pipe", ["dataset_tiny", "pretrain_tinyy"]))
    run_dir = tmp_path / "logs" / "run"
    proc = _run_main(tmp_path, run_dir, "pipe")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    events = _events(run_dir)
    assert [e["kind"] for e in events] == ["run_started", "error"]
    message = events[-1]["message"]
    assert "presets[1] 'pretrain_tinyy'" in message
    assert 'did you mean "pretrain_tiny"' in message and "nothing was run" in message
    assert not (tmp_path / "data").exists() and not (tmp_path / "checkpoints").exists()
    assert [p for p in run_dir.iterdir() if p.is_dir()] == []


def test_a_failing_child_is_named_with_its_own_message(tmp_path: Path) -> None:
    """stage1 on a fresh clone: its job says which preset to run first; the pipeline says it was stage1."""
    presets = tmp_path / "presets"
    _write(presets, find_preset("stage1", SHIPPED_DIR).model_dump(mode="json"))
    _write(presets, _tiny_dataset())
    _write(presets, _pipeline("pipe", ["stage1", "dataset_tiny"]))
    run_dir = tmp_path / "logs" / "run"
    proc = _run_main(tmp_path, run_dir, "pipe")
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    events = _events(run_dir)
    message = events[-1]["message"]
    assert events[-1]["kind"] == "error" and message.startswith("stage1 failed: ")
    assert "run the preset 'pretrain_tiny' to the end first" in message
    assert not any("dataset_tiny (dataset)" in m for m in _logs(events)), "the next child started"
    assert not (tmp_path / "data" / "processed" / "dataset_tiny").exists()


def test_sigint_stops_the_running_child_and_no_later_child_starts(tmp_path: Path) -> None:
    """The stop is sent once the first child is in its training loop (seen in events.jsonl), and
    that child cannot finish first (100000 steps), so the outcome does not depend on timing."""
    presets = tmp_path / "presets"
    _write(presets, _tiny_pretrain(steps=100_000))
    _write(presets, _tiny_dataset())
    _write(presets, _pipeline("pipe", ["pretrain_tiny", "dataset_tiny"]))
    run_dir = tmp_path / "logs" / "run"
    proc = subprocess.Popen(
        [PYTHON, MAIN],
        env=_env(tmp_path, run_dir, "pipe"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if (run_dir / "events.jsonl").is_file() and _progress(_events(run_dir), "pretrain"):
                break
            time.sleep(0.1)
        assert proc.poll() is None, f"the pipeline ended before training:\n{proc.stdout.read()[-3000:]}"
        assert _progress(_events(run_dir), "pretrain"), "no training step within 180 s"
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    events = _events(run_dir)
    assert events[-1]["kind"] == "done" and events[-1]["status"] == "stopped"
    assert any("not started: dataset_tiny" in m for m in _logs(events))
    assert not any(e["kind"] == "progress" and e["stage"] == "preflight" for e in events)
    assert not (tmp_path / "data" / "processed" / "dataset_tiny").exists()
    assert not (run_dir / "2-dataset_tiny").exists()
    state = json.loads((tmp_path / "checkpoints" / "pretrain_tiny" / "current" / "state.json").read_text())
    assert not state["finished"] and 1 <= state["step"] < 100_000  # stopped at a step, checkpointed


# --------------------------------------------------------------------------- in process, fake jobs


class _Recorder:
    """Fake jobs: record the context each child got, then do what the test asks."""

    def __init__(self, behaviour: dict[str, Any]) -> None:
        self.behaviour = behaviour
        self.contexts: list[JobContext] = []

    def __call__(self, ctx: JobContext) -> str:
        self.contexts.append(ctx)
        action = self.behaviour.get(ctx.preset.name, "finished")
        return action(ctx) if callable(action) else action


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    presets = tmp_path / "presets"
    for name in ("a", "b", "c"):
        _write(presets, _tiny_dataset(name))
    monkeypatch.setenv("PDT_PRESETS_DIR", str(presets))
    return presets


def _run(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, names: list[str], behaviour: dict
) -> tuple[str, _Recorder, JobContext, list[Event]]:
    recorder = _Recorder(behaviour)
    monkeypatch.setitem(jobs.JOBS, "dataset", recorder)
    monkeypatch.setitem(jobs.JOBS, "inference", recorder)
    events: list[Event] = []
    run_dir = tmp_path / "logs" / "pipe-run"
    run_dir.mkdir(parents=True)
    preset = validate_preset(_pipeline("pipe", names))
    ctx = JobContext(
        preset=preset, run_dir=run_dir, checkpoints_dir=tmp_path / "ck" / "pipe", emit=events.append
    )
    return run_pipeline(ctx), recorder, ctx, events


def test_each_child_gets_its_own_context_and_the_shared_emitter_and_stop(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    status, rec, ctx, events = _run(folder, tmp_path, monkeypatch, ["a", "b"], {})
    assert status == "finished"
    assert [c.preset.name for c in rec.contexts] == ["a", "b"]
    for i, child in enumerate(rec.contexts, start=1):
        name = child.preset.name
        assert child.run_dir == ctx.run_dir / f"{i}-{name}" and child.run_dir.is_dir()
        assert child.checkpoints_dir == tmp_path / "checkpoints" / name  # as run_job gives it
        assert child.emit is ctx.emit
        assert not child.stop_requested()
        ctx.request_stop()
        assert child.stop_requested()  # one flag: the pipeline's signal handler reaches the child
        ctx._stop.clear()
    logs = [e.message for e in events if isinstance(e, Log)]
    assert any("pipeline 2/2: b (dataset)" in m for m in logs)
    assert [(e.step, e.total) for e in events if isinstance(e, Progress)] == [(0, 2), (1, 2), (2, 2)]


def test_a_child_returning_stopped_stops_the_pipeline(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    status, rec, _, events = _run(folder, tmp_path, monkeypatch, ["a", "b", "c"], {"b": "stopped"})
    assert status == "stopped" and [c.preset.name for c in rec.contexts] == ["a", "b"]
    assert any("not started: c" in e.message for e in events if isinstance(e, Log))


def test_a_stop_during_a_child_that_still_finishes_starts_no_further_child(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo in serve mode returns "finished" when stopped; the pipeline must not go on."""

    def stop_then_finish(ctx: JobContext) -> str:
        ctx.request_stop()
        return "finished"

    status, rec, _, _ = _run(folder, tmp_path, monkeypatch, ["a", "b"], {"a": stop_then_finish})
    assert status == "stopped" and [c.preset.name for c in rec.contexts] == ["a"]
    # The last child finishing after a stop is a finished pipeline: every preset ran to its end.
    status, rec, _, _ = _run(folder, tmp_path / "again", monkeypatch, ["a"], {"a": stop_then_finish})
    assert status == "finished"


def test_a_crashing_child_is_named_and_its_traceback_kept(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(ctx: JobContext) -> str:
        raise RuntimeError("boom")

    with pytest.raises(PipelineError) as err:
        _run(folder, tmp_path, monkeypatch, ["a", "b", "c"], {"b": crash})
    message = str(err.value)
    assert message.startswith("b failed: RuntimeError: boom — this is a bug")
    traceback_file = tmp_path / "logs" / "pipe-run" / "2-b" / "traceback.txt"
    assert str(traceback_file) in message and "RuntimeError: boom" in traceback_file.read_text()
    assert jobs.user_message(err.value) == message  # run_job shows it as is, not as a pipeline bug


def test_an_unknown_status_is_a_failure_not_a_success(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(PipelineError, match="a failed: its job ended with status 'weird'"):
        _run(folder, tmp_path, monkeypatch, ["a", "b"], {"a": "weird"})


def test_nested_pipelines_are_flattened_and_cycles_refused(folder: Path) -> None:
    _write(folder, _pipeline("inner", ["b", "c"]))
    outer = validate_preset(_pipeline("outer", ["a", "inner", "a"]))
    steps = resolve_steps(outer, folder)
    assert [s.label for s in steps] == ["a", "inner/b", "inner/c", "a"]
    _write(folder, _pipeline("loop1", ["a", "loop2"]))
    _write(folder, _pipeline("loop2", ["loop1"]))
    with pytest.raises(PipelineError, match=r"loop2: presets\[0\] 'loop1': .*\(loop1 -> loop2 -> loop1\)"):
        resolve_steps(find_preset("loop1", folder), folder)


def test_every_bad_entry_is_listed_at_once(folder: Path) -> None:
    (folder / "broken.json").write_text('{"name": "broken", "kind": "dataset", "stride": "x"}')
    pipe = validate_preset(_pipeline("pipe", ["a", "nope", "broken"]))
    with pytest.raises(PipelineError) as err:
        resolve_steps(pipe, folder)
    message = str(err.value)
    assert "2 problems" in message and "presets[1] 'nope'" in message
    assert "presets[2] 'broken'" in message and "stride" in message


def test_under_torchrun_the_pipeline_refuses_with_what_to_do(tmp_path: Path) -> None:
    preset = validate_preset(_pipeline("pipe", ["a"]))
    ctx = JobContext(preset=preset, run_dir=tmp_path, checkpoints_dir=tmp_path, emit=print, world_size=2)
    with pytest.raises(PipelineError, match="cannot run under torchrun.*run each training preset"):
        run_pipeline(ctx)


def test_the_demo_child_reads_the_prompts_sent_to_the_pipeline_run(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TUI's prompt box writes to the followed run's folder (the pipeline's)."""
    _write(folder, find_preset("demo_tiny", SHIPPED_DIR).model_dump(mode="json"))
    received: list[str] = []

    def serve(ctx: JobContext) -> str:
        box = inbox.Inbox(ctx.run_dir, from_start=True)
        inbox.ask(ctx.run_dir.parent, "how far is the Moon?")
        received.extend(box.poll())
        return "finished"

    status, _, _, _ = _run(folder, tmp_path, monkeypatch, ["a", "demo_tiny"], {"demo_tiny": serve})
    assert status == "finished" and received == ["how far is the Moon?"]


def test_importing_the_pipeline_loads_neither_torch_nor_the_ui() -> None:
    code = "import sys, pdt.pipeline; print(sorted(m for m in ('torch', 'textual') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_shipped_quickstart_resolves_to_its_seven_steps() -> None:
    quickstart = find_preset("quickstart", SHIPPED_DIR)
    steps = resolve_steps(quickstart, SHIPPED_DIR)
    assert [s.label for s in steps] == [
        "dataset_tiny",
        "pretrain_tiny",
        "stage0",
        "stage1",
        "stage2",
        "stage3",
        "demo_tiny",
    ]
