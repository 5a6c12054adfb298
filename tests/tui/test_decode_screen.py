"""The inference view: the fold of an answer's events, and the run screen driven by a recorded
event stream (Pilot) at 80×24 and large — live text, a struck rollback, readiness, coverage,
speedup, memory — plus the prompt box writing to the demo's inbox."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pdt.telemetry.events import (
    Answer,
    Coverage,
    DecodeStarted,
    Done,
    Event,
    GateTrace,
    Memory,
    NoteSnapshot,
    Progress,
    Readiness,
    RunStarted,
    StreamDone,
    StreamRollback,
    StreamToken,
    Timing,
)
from pdt.tui.app import PDTApp
from pdt.tui.decode_state import DecodeView
from pdt.tui.event_source import ListEventSource
from pdt.tui.screens.run import RunScreen
from pdt.tui.widgets.decode_panes import BusTimeline, ReadinessPane, SpeedPane, stream_text
from pdt.tui.widgets.memory_pane import MemoryPane

from .conftest import screen_text, wait_until

SMALL, LARGE = (80, 24), (160, 48)
T0 = 1_700_000_000.0


def _tokens(stream: int, rnd: int, words: list[str], attempt: int = 0, t: float = T0) -> list[Event]:
    return [
        StreamToken(stream=stream, round=rnd, token=100 + i, text=w, attempt=attempt, t=t + 0.01 * i)
        for i, w in enumerate(words)
    ]


def answer_events(finish: bool = True) -> list[Event]:
    """Three streams; stream 2's first block is rolled back and rewritten."""
    ev: list[Event] = [
        RunStarted(run="demo-1", preset="demo_tiny", preset_kind="inference", pid=7, t=T0),
        DecodeStarted(
            answer=0,
            prompt="Tell me about the Moon.",
            mode="pdt",
            k=3,
            tau=4,
            lag=1,
            gamma=0.6,
            g=1.0,
            alpha=1.0,
            max_new_tokens=8,
            layers=[2, 3],
            plan_items=[["Moon"], ["tides"], ["Apollo"]],
            t=T0,
        ),
        NoteSnapshot(stream=-1, round=0, version=0, visible_from_round=0, t=T0),
    ]
    ev += _tokens(0, 0, ["The", " Moon", " orbits", " Earth"], t=T0 + 1)
    ev += _tokens(1, 0, ["Tides", " rise", " and", " fall"], t=T0 + 1)
    ev += _tokens(2, 0, ["Moon", " Moon", " Moon", " Moon"], t=T0 + 1)
    ev += [
        Readiness(stream=0, round=0, attempt=0, score=0.91, gamma=0.6, decision="commit", t=T0 + 2),
        Coverage(stream=0, round=0, items=["Moon"], probs=[0.97], t=T0 + 2),
        NoteSnapshot(stream=0, round=0, version=0, visible_from_round=1, t=T0 + 2),
        Readiness(stream=1, round=0, attempt=0, score=0.72, gamma=0.6, decision="commit", t=T0 + 2),
        Coverage(stream=1, round=0, items=["tides"], probs=[0.2], t=T0 + 2),
        NoteSnapshot(stream=1, round=0, version=0, visible_from_round=1, t=T0 + 2),
        Readiness(stream=2, round=0, attempt=0, score=0.12, gamma=0.6, decision="rollback", t=T0 + 2),
        Coverage(stream=2, round=0, items=["Apollo"], probs=[0.05], t=T0 + 2),
        StreamRollback(
            stream=2, round=0, attempt=0, removed=4, text="Moon Moon Moon Moon", readiness=0.12, t=T0 + 2
        ),
    ]
    ev += _tokens(2, 0, ["Apollo", " 11", " landed", " there"], attempt=1, t=T0 + 3)
    if not finish:
        return ev
    ev += [
        Readiness(stream=2, round=0, attempt=1, score=0.88, gamma=0.6, decision="commit", t=T0 + 4),
        Coverage(stream=2, round=0, items=["Apollo"], probs=[0.93], t=T0 + 4),
        NoteSnapshot(stream=2, round=0, version=0, visible_from_round=1, t=T0 + 4),
        StreamDone(stream=0, reason="budget", tokens=4, t=T0 + 4),
        StreamDone(stream=1, reason="budget", tokens=4, t=T0 + 4),
        StreamDone(stream=2, reason="eos", tokens=4, t=T0 + 4),
        GateTrace(layers=[2, 3], values=[0.25, 0.5], g=1.0, t=T0 + 4),
        Memory(rss_bytes=2**30, kv_cache_bytes=3 * 2**20, t=T0 + 4),
        Timing(mode="pdt", tokens=12, seconds=0.5, tokens_per_s=24.0, steps=12, speedup=2.5, t=T0 + 5),
        Timing(mode="sequential", tokens=12, seconds=1.25, tokens_per_s=9.6, steps=12, speedup=1.0, t=T0 + 5),
        Answer(answer=0, text="The Moon orbits Earth", sections=["a", "b", "c"], manifest="m.json", t=T0 + 5),
        Done(status="finished", t=T0 + 6),
    ]
    return ev


def test_fold_commits_strikes_and_replaces() -> None:
    view = DecodeView()
    view.apply(answer_events(finish=False))
    s0, s2 = view.streams[0], view.streams[2]
    assert s0.committed == "The Moon orbits Earth" and s0.provisional == ""
    assert s2.committed == "" and s2.struck == ["Moon Moon Moon Moon"]
    assert s2.provisional == "Apollo 11 landed there" and s2.attempt == 1 and s2.rollbacks == 1
    spans = stream_text(s2).spans
    assert any("strike" in str(span.style) for span in spans)
    view.apply(answer_events()[len(answer_events(finish=False)) :])
    assert s2.committed == "Apollo 11 landed there" and s2.struck == [] and s2.done == "eos"
    assert view.readiness[2] == [(0, 0, 0.12, "rollback"), (0, 1, 0.88, "commit")]
    assert view.coverage[2] == (["Apollo"], [0.93])
    assert view.notes[-1] == {0: (0, False)} and view.notes[2] == {0: (0, False)}
    assert view.speedup() == 2.5 and view.gates == [0.25, 0.5]
    assert not view.answering


def test_a_new_answer_resets_the_panes_and_keeps_the_old_answer() -> None:
    view = DecodeView()
    view.apply(answer_events())
    view.apply(
        [
            DecodeStarted(
                answer=1,
                prompt="And Mars?",
                mode="pdt",
                k=3,
                tau=4,
                lag=1,
                gamma=0.6,
                g=1.0,
                alpha=1.0,
                max_new_tokens=8,
            )
        ]
    )
    assert view.answer == 1 and view.prompt == "And Mars?" and view.answering
    assert all(s.committed == "" and s.tokens == 0 for s in view.streams)
    assert view.readiness == {} and view.timings == {}
    assert view.answers[0].text == "The Moon orbits Earth"


@pytest.mark.parametrize("size", [SMALL, LARGE])
async def test_the_run_screen_switches_to_the_streams(workdir: Path, size: tuple[int, int]) -> None:
    source = ListEventSource(answer_events(finish=False), keep_open=True, run_dir=workdir)
    app = PDTApp()
    async with app.run_test(size=size) as pilot:
        app.open_source(source)
        await wait_until(pilot, lambda: isinstance(app.screen, RunScreen))
        screen = app.screen
        await wait_until(pilot, lambda: screen.has_class("-decode") and "Apollo" in screen_text(app))
        text = screen_text(app)
        regions = [screen.query_one(f"#stream-{k}").region for k in range(3)]
        assert all(r.height >= 3 for r in regions)  # every stream is visible
        if size == SMALL:  # stacked
            assert regions[0].x == regions[1].x == regions[2].x and regions[0].y < regions[1].y < regions[2].y
        else:  # side by side
            assert regions[0].y == regions[1].y == regions[2].y and regions[0].x < regions[1].x < regions[2].x
        assert "The Moon orbits Earth" in text and "Tides rise and fall" in text
        assert "Moon Moon" in text  # the withdrawn block, still shown (struck) while the retry writes
        assert "↺" in text and "retry 1" in text
        assert "Tell me about the Moon." in text
        assert not screen.query_one("#run-main").display  # the training panes gave way
        source.events += answer_events()[len(answer_events(finish=False)) :]
        await wait_until(pilot, lambda: "×2.50" in screen_text(app), timeout=8)
        text = screen_text(app)
        assert "Apollo 11 landed there" in text and "Moon Moon" not in text  # replaced
        if size == LARGE:  # the side panes have room to show everything
            assert "3.0 MiB" in text and "0.500" in text and "1/1" in text


async def test_the_prompt_box_asks_the_running_demo(workdir: Path) -> None:
    source = ListEventSource(answer_events(finish=False), keep_open=True, run_dir=workdir)
    app = PDTApp()
    async with app.run_test(size=SMALL) as pilot:
        app.open_source(source)
        await wait_until(pilot, lambda: isinstance(app.screen, RunScreen) and app.screen.has_class("-decode"))
        app.screen.query_one("#ask").focus()
        await pilot.press(*"What about Mars?")
        await pilot.press("enter")
        await wait_until(pilot, lambda: (workdir / "prompts.jsonl").exists())
        lines = (workdir / "prompts.jsonl").read_text().splitlines()
        assert [json.loads(x)["prompt"] for x in lines] == ["What about Mars?"]
        assert app.screen.query_one("#ask").value == ""


async def test_the_prompt_box_says_so_when_the_demo_has_ended(workdir: Path) -> None:
    source = ListEventSource(answer_events(finish=True), run_dir=workdir)
    app = PDTApp()
    async with app.run_test(size=SMALL) as pilot:
        app.open_source(source)
        await wait_until(pilot, lambda: isinstance(app.screen, RunScreen) and "finished" in screen_text(app))
        # visible before anyone types: the box says it cannot ask and how to start the demo again
        assert "ended · to ask again: esc, then Enter on demo_tiny" in screen_text(app)
        assert app.screen.query_one("#ask").has_class("-closed")
        app.screen.query_one("#ask").focus()
        await pilot.press(*"again")
        await pilot.press("enter")
        await pilot.pause(0.2)
        assert not (workdir / "prompts.jsonl").exists()
        assert any("The demo has ended" in str(n.message) for n in app._notifications)


def _started(answer: int = 0, prompt: str = "And Mars?") -> DecodeStarted:
    return DecodeStarted(
        answer=answer,
        prompt=prompt,
        mode="pdt",
        k=2,
        tau=4,
        lag=1,
        gamma=0.5,
        g=1.0,
        alpha=1.0,
        max_new_tokens=8,
    )


def test_the_bus_timeline_and_readiness_show_retries_and_forced_commits() -> None:
    view = DecodeView()
    view.apply(
        [
            _started(),
            NoteSnapshot(stream=0, round=0, version=0, visible_from_round=1),
            NoteSnapshot(stream=0, round=1, version=1, visible_from_round=2),  # re-committed after a retry
            NoteSnapshot(stream=0, round=3, version=0, visible_from_round=4, forced=True),
            Readiness(stream=0, round=1, attempt=0, score=0.1, gamma=0.5, decision="rollback"),
            Readiness(stream=0, round=1, attempt=1, score=0.9, gamma=0.5, decision="commit"),
            Readiness(stream=0, round=3, attempt=2, score=0.3, gamma=0.5, decision="forced"),
        ]
    )
    bus = BusTimeline.describe(view).plain.splitlines()
    assert bus[1].startswith("s0 ●◆·! r3")  # r0 v0, r1 v1, no note for r2 yet, r3 forced
    assert bus[2] == "s1 no note yet"
    ready = ReadinessPane.describe(view).plain.splitlines()
    assert ready[0].startswith("γ 0.500")
    assert ready[1] == "s0 ▁▇▂ r3′′ 0.30! 1↺"  # one bar per scored block, the latest against γ
    colours = [str(span.style) for span in ReadinessPane.describe(view).spans]
    assert "red" in colours and "green" in colours and "yellow" in colours


def test_a_pipeline_moving_on_after_its_demo_leaves_the_inference_view() -> None:
    view = DecodeView()
    view.apply([Progress(step=0, total=3, stage="pipeline"), _started()])
    assert view.active and view.answering
    view.apply([Progress(step=1, total=3, stage="pipeline")])  # mid-answer: not a move-on
    assert view.active
    view.apply([Answer(answer=0, text="x"), Progress(step=2, total=3, stage="pipeline")])
    assert not view.active and view.answers[0].text == "x"
    view.apply([_started(answer=0, prompt="second demo")])  # a second demo restarts its numbering
    assert view.active and view.answering and view.prompt == "second demo"
    view.apply([Answer(answer=0, text="y"), Progress(step=3, total=3, stage="pipeline")])  # the end
    assert view.active and not view.answering


def test_the_speed_pane_shows_the_speedup_and_the_step_engine() -> None:
    view = DecodeView(answer=0)
    assert "step" not in SpeedPane.describe(view).plain  # no timing yet: no engine to name
    view.apply(
        [
            Timing(mode="pdt", tokens=96, seconds=0.5, tokens_per_s=192.0, speedup=2.4, engine="cuda_graph"),
            Timing(mode="sequential", tokens=96, seconds=1.2, tokens_per_s=80.0, engine="cuda_graph"),
        ]
    )
    text = SpeedPane.describe(view).plain
    assert "×2.40 vs sequential" in text and "cuda_graph" in text and "80.0 tok/s" in text


def test_the_memory_pane_shows_the_kv_cache() -> None:
    text = MemoryPane.describe(Memory(rss_bytes=2**30, kv_cache_bytes=3 * 2**20)).plain
    assert "kv" in text and "3.0 MiB" in text
    assert "kv" not in MemoryPane.describe(Memory(rss_bytes=2**30)).plain


async def test_an_inference_run_shows_its_layout_before_the_first_answer(workdir: Path) -> None:
    events: list[Event] = [
        RunStarted(run="demo-1", preset="demo_tiny", preset_kind="inference", pid=7, t=T0),
        Memory(rss_bytes=2**30, t=T0),
    ]
    source = ListEventSource(events, keep_open=True, run_dir=workdir)
    app = PDTApp()
    async with app.run_test(size=SMALL) as pilot:
        app.open_source(source)
        await wait_until(pilot, lambda: isinstance(app.screen, RunScreen) and app.screen.has_class("-decode"))
        screen = app.screen
        assert "loading the trunk and sidecars" in screen_text(app)
        assert not screen.query_one("#run-main").display
        assert not screen.query_one("#ask").has_class("-closed")  # still running: asking is possible
        source.events += answer_events(finish=False)[1:]
        await wait_until(pilot, lambda: "The Moon orbits Earth" in screen_text(app))
        assert "loading the trunk" not in screen_text(app)


async def test_a_pipeline_switches_to_the_streams_at_its_demo(workdir: Path) -> None:
    head: list[Event] = [
        RunStarted(run="qs-1", preset="quickstart", preset_kind="pipeline", pid=7, t=T0),
        Progress(step=0, total=2, stage="pipeline", t=T0),
    ]
    source = ListEventSource(head, keep_open=True, run_dir=workdir)
    app = PDTApp()
    async with app.run_test(size=SMALL) as pilot:
        app.open_source(source)
        await wait_until(pilot, lambda: isinstance(app.screen, RunScreen) and "running" in screen_text(app))
        screen = app.screen
        assert not screen.has_class("-decode") and screen.query_one("#run-main").display
        demo = answer_events()[1:-2]  # the demo's answer, without the child's run_started and the done
        demo[-1] = Answer(
            answer=0, text="t", manifest=str(workdir / "2-demo_tiny" / "manifest-0.json"), t=T0 + 5
        )
        source.events += [Progress(step=1, total=2, stage="pipeline", t=T0), *demo]
        await wait_until(pilot, lambda: screen.has_class("-decode") and "×2.50" in screen_text(app))
        source.events.append(Done(status="finished", t=T0 + 9))
        await wait_until(pilot, lambda: "finished" in screen_text(app))
        assert "Enter on demo_tiny" in screen_text(app)  # the demo preset, not the pipeline


def _write_manifest(path: Path, events: list[Event], prompt: str) -> Path:
    data = {
        "format": "pdt-manifest/1",
        "created": "2026-11-22T12:00:00Z",
        "code_version": "test",
        "preset": "demo_tiny",
        "answer": 0,
        "prompt": prompt,
        **{
            key: [] for key in ("prompt_ids", "streams", "commits", "rollbacks", "coverage", "notes_timeline")
        },
        **{key: {} for key in ("config", "trunk", "sidecars", "tokenizer", "plan", "gate_trace")},
        **{key: {} for key in ("timings", "speedup", "memory", "baselines", "quality")},
        "merged": "",
        "events": [e.to_dict() for e in events],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _run_folder(workdir: Path, name: str) -> Path:
    """A finished inference run under logs/ (its events.jsonl holds only the start and the end)."""
    run_dir = workdir / "logs" / name
    run_dir.mkdir(parents=True)
    events = [
        RunStarted(run=name, preset="demo_tiny", preset_kind="inference", pid=1, t=T0),
        Done(status="finished", t=T0 + 1),
    ]
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e.to_dict()) + "\n" for e in events))
    return run_dir


async def _runs_screen(app: PDTApp, pilot) -> None:  # noqa: ANN001 - Pilot
    from pdt.tui.screens.runs import RunsScreen

    await wait_until(pilot, lambda: app.screen.__class__.__name__ == "HomeScreen", timeout=10)
    await pilot.press("r")
    await wait_until(pilot, lambda: isinstance(app.screen, RunsScreen) and "run(s)" in screen_text(app))


async def test_m_on_the_runs_screen_replays_an_answer_manifest(workdir: Path) -> None:
    run_dir = _run_folder(workdir, "demo_tiny-1")
    _write_manifest(run_dir / "manifest-0.json", answer_events()[1:-1], "Tell me about the Moon.")
    app = PDTApp()
    async with app.run_test(size=SMALL) as pilot:
        await _runs_screen(app, pilot)
        await pilot.press("m")
        await wait_until(pilot, lambda: isinstance(app.screen, RunScreen))
        screen = app.screen
        await wait_until(pilot, lambda: "×2.50" in screen_text(app), timeout=10)  # played at its pace
        text = screen_text(app)
        assert "Apollo 11 landed there" in text and "Moon Moon" not in text
        assert "replay of manifest-0.json" in text or screen.sub_title == "replay of manifest-0.json"
        assert "a replay · to ask again: esc, then Enter on demo_tiny" in text


async def test_with_several_answers_m_asks_which_one(workdir: Path) -> None:
    from pdt.tui.screens.manifests import ManifestPicker

    run_dir = _run_folder(workdir, "demo_tiny-2")
    first = _write_manifest(run_dir / "manifest-0.json", answer_events()[1:-1], "Tell me about the Moon.")
    second = answer_events()[1:-1]
    second[0] = _started(answer=1, prompt="And what about Mars?")
    _write_manifest(run_dir / "manifest-1.json", second[:1], "And what about Mars?")
    os.utime(first, (T0, T0))  # the older answer
    app = PDTApp()
    async with app.run_test(size=SMALL) as pilot:
        await _runs_screen(app, pilot)
        await pilot.press("m")
        await wait_until(pilot, lambda: isinstance(app.screen, ManifestPicker))
        text = screen_text(app)
        assert text.index("And what about Mars?") < text.index("Tell me about the Moon.")  # newest first
        await pilot.press("down", "enter")
        await wait_until(pilot, lambda: isinstance(app.screen, RunScreen))
        await wait_until(pilot, lambda: "Apollo 11 landed there" in screen_text(app), timeout=10)
