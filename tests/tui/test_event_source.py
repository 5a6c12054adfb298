"""Event sources and the run-state fold, without the app: following a growing events.jsonl,
the exit code of a launched child, attaching to runs whose process is gone, ETA arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pdt.telemetry.events import Done, Error, Metric, Progress, RunStarted
from pdt.tui.event_source import FileEventSource, ListEventSource, tail_lines
from pdt.tui.run_state import RunState
from pdt.tui.screens.editor import check_and_save, locate_key
from pdt.tui.widgets.loss_plot import thin


def _append(path: Path, *events, partial: str = "") -> None:  # noqa: ANN002
    with open(path, "a", encoding="utf-8") as fh:
        for event in events:
            fh.write(json.dumps(event.to_dict()) + "\n")
        fh.write(partial)


def _poll_until_ended(source: FileEventSource, timeout: float = 10.0) -> list:
    events, deadline = [], time.monotonic() + timeout
    while not source.ended:
        assert time.monotonic() < deadline, "source never ended"
        events += source.poll()
        time.sleep(0.02)
    return events


def test_follows_a_growing_file_and_ends_with_the_process(tmp_path: Path) -> None:
    events_path = tmp_path / "events.jsonl"
    # a stand-in job: exits with code 3 once told to (by a file), without writing a final event
    go = tmp_path / "go"
    code = f"import os, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.01)\nraise SystemExit(3)"
    process = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        source = FileEventSource(tmp_path, process=process)
        assert source.poll() == [] and not source.ended  # no file yet
        _append(events_path, RunStarted(run="r", preset="p", preset_kind="pretrain", pid=process.pid))
        _append(events_path, Progress(step=1, total=4), partial='{"kind": "progress", "st')
        got = source.poll()
        assert [type(e).__name__ for e in got] == ["RunStarted", "Progress"]  # the torn line waits
        with open(events_path, "a") as fh:
            fh.write('ep": 2, "total": 4, "t": 1.0}\n')
        assert source.poll()[0] == Progress(step=2, total=4, t=1.0)
        assert source.can_stop()
        _append(events_path, Metric(name="train/loss", value=1.5, step=2))
        go.touch()
        rest = _poll_until_ended(source)
        assert [e.name for e in rest if isinstance(e, Metric)] == ["train/loss"]  # drained after exit
        assert source.exit_code() == 3
        assert not source.can_stop()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_replay_of_a_finished_run_ends_at_once(tmp_path: Path) -> None:
    _append(
        tmp_path / "events.jsonl",
        RunStarted(run="r", preset="p", preset_kind="pretrain", pid=1),
        Progress(step=5, total=5),
        Done(status="finished"),
    )
    source = FileEventSource(tmp_path)
    events = source.poll()
    assert source.ended and len(events) == 3
    assert not source.can_stop() and source.exit_code() is None


def test_attached_run_whose_process_is_gone_ends(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _append(
        tmp_path / "events.jsonl",
        RunStarted(run="r", preset="p", preset_kind="pretrain", pid=dead.pid),
        Progress(step=1, total=5),
    )
    (tmp_path / "console.log").write_text("line 1\nTraceback\nValueError: bad\n")
    source = FileEventSource(tmp_path)
    assert len(source.poll()) == 2 and source.ended
    assert source.console_tail(2) == ["Traceback", "ValueError: bad"]
    state = RunState()
    state.end(source.exit_code(), source.console_tail())
    assert "without a done/error event" in state.final_status().text


def test_file_source_needs_exactly_one_of_folder_or_launch(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        FileEventSource()
    source = FileEventSource.launch("presets/x.json", "x", nproc=2)
    assert source.title == "x (starting)" and source.run_dir is None and source.poll() == []


def test_list_source_releases_events_over_time_and_records_stops() -> None:
    events = [Progress(step=i, total=3) for i in range(1, 4)]
    source = ListEventSource(events, delay=0.05, keep_open=True)
    source.start()
    assert len(source.poll()) == 1
    time.sleep(0.12)
    assert len(source.poll()) == 2
    assert not source.ended and source.can_stop()
    source.stop()
    source.stop(force=True)
    assert source.stop_calls == [False, True] and source.ended and source.exit_code() == -9


def test_tail_lines_drops_the_cut_first_line(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    path.write_text("".join(f"line {i}\n" for i in range(1000)))
    lines = tail_lines(path, 5, max_bytes=100)
    assert lines == [f"line {i}" for i in range(995, 1000)]
    assert tail_lines(tmp_path / "missing.log", 5) == []


class TestRunState:
    def test_eta_from_event_times_ignores_resumed_steps(self) -> None:
        state = RunState()
        state.apply(
            [
                RunStarted(run="r", preset="p", preset_kind="pretrain", pid=1, resumed_from_step=100, t=0.0),
                Progress(step=100, total=300, t=10.0),
                Progress(step=150, total=300, t=20.0),
            ]
        )
        assert state.steps_per_s() == pytest.approx(5.0)  # 50 steps in 10 s, not 150 in 20
        assert state.eta_s() == pytest.approx(30.0)  # 150 left at 5/s
        assert state.elapsed_s(now=25.0) == pytest.approx(25.0)

    def test_eta_restarts_with_the_next_job_of_a_pipeline(self) -> None:
        state = RunState()
        state.apply(
            [
                Progress(step=0, total=2, stage="pipeline", t=0.0),
                Progress(step=10, total=10, stage="stage0", t=100.0),  # the first child, slow
                Progress(step=1, total=2, stage="pipeline", t=101.0),
                Progress(step=5, total=100, stage="stage1", t=110.0),
                Progress(step=25, total=100, stage="stage1", t=120.0),
            ]
        )
        assert state.steps_per_s() == pytest.approx(2.0)  # 20 steps in 10 s of stage1 alone
        assert state.eta_s() == pytest.approx(37.5)

    def test_final_status_precedence(self) -> None:
        state = RunState()
        assert state.final_status() is None
        state.end(exit_code=-9, console_tail=[])
        assert "code -9 (killed by SIGKILL)" in state.final_status().text
        state.apply([Error(message="disk full")])
        assert state.final_status().kind == "failed" and "disk full" in state.final_status().text

    def test_history_keeps_plotted_metrics_only(self) -> None:
        state = RunState()
        changed = state.apply(
            [Metric(name="train/loss", value=2.0, step=1), Metric(name="lr", value=1e-3, step=1)]
        )
        assert changed == {"plot", "metrics"}
        assert state.history["train/loss"] == [(1, 2.0)] and "lr" not in state.history
        assert state.metrics == {"train/loss": 2.0, "lr": 1e-3}


def test_thin_keeps_the_last_point() -> None:
    points = [(i, float(i)) for i in range(1001)]
    out = thin(points, limit=100)
    assert len(out) <= 101 and out[0] == (0, 0.0) and out[-1] == (1000, 1000.0)
    assert thin(points[:10], limit=100) == points[:10]


def test_locate_key_walks_the_field_path() -> None:
    text = '{\n  "data": {"lr": 1},\n  "train": {\n    "lr": 2\n  }\n}'
    assert locate_key(text, "train.lr") == (3, 4)
    assert locate_key(text, "nope") is None


def test_check_and_save_writes_only_valid_presets(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text('{"name": "a", "kind": "pretrain"}\n')
    assert check_and_save(path, '{"name": "b", "kind": "pretrain"}').message.startswith("name:")
    assert "unknown kind" in check_and_save(path, '{"name": "a", "kind": "pretrian"}').message
    assert json.loads(path.read_text()) == {"name": "a", "kind": "pretrain"}
    assert check_and_save(path, '{"name": "a", "kind": "pretrain", "description": "ok"}') is None
    assert json.loads(path.read_text())["description"] == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
