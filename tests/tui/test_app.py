"""Pilot tests of the TUI: home screen, run screen (driven by a fake event source), runs list,
editor, help and quit. Each test drives the real app at a fixed size and checks what it drew."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from textual.widgets import DataTable, ProgressBar, TextArea

from pdt.presets.loader import PresetInfo
from pdt.telemetry.events import Done, Error, RunStarted
from pdt.tui.app import PDTApp
from pdt.tui.event_source import EventSource, ListEventSource
from pdt.tui.screens.editor import EditorScreen
from pdt.tui.screens.help import HelpScreen
from pdt.tui.screens.home import HomeScreen
from pdt.tui.screens.run import RunScreen
from pdt.tui.screens.runs import RunsScreen
from pdt.tui.widgets.checkpoint_list import CheckpointList
from pdt.tui.widgets.log_tail import LogTail
from pdt.tui.widgets.loss_plot import LossPlot
from pdt.tui.widgets.memory_pane import MemoryPane
from pdt.tui.widgets.metrics_pane import MetricsPane
from pdt.tui.widgets.preset_details import PresetDetails
from pdt.tui.widgets.preset_list import PresetList
from pdt.tui.widgets.run_status import RunStatus
from pdt.tui.widgets.sample_pane import SamplePane

from .conftest import FINISHED, screen_text, training_events, wait_until

SMALL = (80, 24)
LARGE = (180, 50)


def _text(widget) -> str:  # noqa: ANN001 - any Static-like widget
    return str(widget.render())


def _home(app: PDTApp) -> HomeScreen:
    assert isinstance(app.screen, HomeScreen)
    return app.screen


async def _loaded_home(pilot) -> PresetList:  # noqa: ANN001
    await wait_until(pilot, lambda: bool(pilot.app.screen.query_one(PresetList).rows))
    return pilot.app.screen.query_one(PresetList)


# ---------------------------------------------------------------------------------------- home


class TestHome:
    @pytest.mark.parametrize("size", [SMALL, LARGE])
    async def test_presets_grouped_by_kind_and_visible(self, workdir: Path, size: tuple[int, int]) -> None:
        app = PDTApp()
        async with app.run_test(size=size) as pilot:
            presets = await _loaded_home(pilot)
            ids = [option.id for option in presets.options]
            # quickstart first in its group, invalid presets in their own group, last
            assert ids == ["group:pretrain", "quickstart", "alpha", "beta", "group:invalid", "broken"]
            text = screen_text(app)
            for name in ("quickstart", "alpha", "beta", "broken", "PRETRAIN", "INVALID"):
                assert name in text, f"{name!r} not drawn at {size}"
            assert "★ quickstart" in text  # highlighted
            assert presets.highlighted_name == "quickstart"
            assert "Start here" in _text(app.screen.query_one("#details-body"))

    async def test_a_featured_pipeline_is_starred_first_and_selected(self, workdir: Path) -> None:
        pipe = {"name": "getting_started", "kind": "pipeline", "presets": ["alpha", "beta"], "featured": True}
        (workdir / "presets" / "getting_started.json").write_text(json.dumps(pipe), encoding="utf-8")
        (workdir / "presets" / "quickstart.json").unlink()
        app = PDTApp()
        async with app.run_test(size=SMALL) as pilot:
            presets = await _loaded_home(pilot)
            ids = [option.id for option in presets.options]
            assert ids[:2] == ["group:pipeline", "getting_started"]
            assert "★ getting_started  quickstart" in screen_text(app)  # marked as the place to start
            assert "PIPELINE  1 · end to end" in screen_text(app)
            assert "★ alpha" not in screen_text(app)
            assert presets.highlighted_name == "getting_started"
            assert "alpha, beta" in _text(app.screen.query_one("#details-body"))

    async def test_invalid_preset_shows_its_error(self, workdir: Path) -> None:
        app = PDTApp()
        async with app.run_test(size=SMALL) as pilot:
            presets = await _loaded_home(pilot)
            presets.highlighted = presets.get_option_index("broken")
            await pilot.pause(0.1)
            details = _text(app.screen.query_one("#details-body"))
            assert "invalid preset" in details
            assert "train.lrr: unknown key" in details
            assert 'did you mean "lr"' in details
            # enter on an invalid preset launches nothing
            await pilot.press("enter")
            await pilot.pause(0.1)
            assert isinstance(app.screen, HomeScreen)

    async def test_status_from_checkpoint_and_last_run(self, workdir: Path) -> None:
        state = workdir / "checkpoints" / "alpha" / "current" / "state.json"
        state.parent.mkdir(parents=True)
        state.write_text(json.dumps({"step": 50, "total_steps": 120}))
        finished = workdir / "checkpoints" / "beta" / "current" / "state.json"
        finished.parent.mkdir(parents=True)
        finished.write_text(json.dumps({"step": 10, "total_steps": 10, "finished": True}))
        run = workdir / "logs" / "alpha-20240101-000000"
        run.mkdir(parents=True)
        events = [
            RunStarted(run=run.name, preset="alpha", preset_kind="pretrain", pid=0),
            Error(message="boom"),
        ]
        run.joinpath("events.jsonl").write_text("".join(json.dumps(e.to_dict()) + "\n" for e in events))
        app = PDTApp()
        async with app.run_test(size=SMALL) as pilot:
            presets = await _loaded_home(pilot)
            alpha, beta, quick = presets.row("alpha"), presets.row("beta"), presets.row("quickstart")
            assert (alpha.status, alpha.last_run_status) == ("step 50/120", "failed")
            assert beta.status == "finished"
            assert quick.status == "not started"
            text = screen_text(app)
            assert "alpha  step 50/120  ✖ failed" in text
            presets.highlighted = presets.get_option_index("alpha")
            await pilot.pause(0.1)
            assert "last run    failed" in _text(app.screen.query_one("#details-body"))

    async def test_details_show_key_settings(self, workdir: Path) -> None:
        app = PDTApp()
        async with app.run_test(size=LARGE) as pilot:
            presets = await _loaded_home(pilot)
            presets.highlighted = presets.get_option_index("alpha")
            await pilot.pause(0.1)
            details = _text(app.screen.query_one(PresetDetails).query_one("#details-body"))
            assert "token budget  200,000" in details
            assert "peak lr       0.002" in details

    async def test_enter_launches_with_nproc_from_preset(self, workdir: Path) -> None:
        launched: list[tuple[str, int]] = []
        fake = ListEventSource(training_events(final=FINISHED))

        def launcher(info: PresetInfo, nproc: int) -> EventSource:
            launched.append((info.name, nproc))
            return fake

        app = PDTApp(launcher=launcher)
        async with app.run_test(size=SMALL) as pilot:
            await _loaded_home(pilot)
            await pilot.press("enter")
            await wait_until(pilot, lambda: isinstance(app.screen, RunScreen))
            assert launched == [("quickstart", 2)]
            assert app.screen.source is fake
            await wait_until(pilot, lambda: app.screen.query_one(RunStatus).kind == "finished")

    async def test_duplicate_creates_a_renamed_copy(self, workdir: Path) -> None:
        app = PDTApp()
        async with app.run_test(size=SMALL) as pilot:
            presets = await _loaded_home(pilot)
            presets.highlighted = presets.get_option_index("alpha")
            await pilot.press("d")
            await wait_until(pilot, lambda: isinstance(app.screen, EditorScreen))
            copy = workdir / "presets" / "alpha-copy.json"
            assert json.loads(copy.read_text())["name"] == "alpha-copy"
            assert app.screen.path == copy


# ---------------------------------------------------------------------------------------- run


async def _run_screen(app: PDTApp, pilot, source: EventSource) -> RunScreen:  # noqa: ANN001
    await _loaded_home(pilot)
    app.open_source(source)
    await wait_until(pilot, lambda: isinstance(app.screen, RunScreen))
    return app.screen  # type: ignore[return-value]


class TestRunScreen:
    @pytest.mark.parametrize("size", [SMALL, LARGE])
    async def test_shows_progress_loss_checkpoint_and_final_status(
        self, workdir: Path, size: tuple[int, int]
    ) -> None:
        source = ListEventSource(training_events(steps=40, total=100, final=FINISHED), delay=0.002)
        app = PDTApp()
        async with app.run_test(size=size) as pilot:
            screen = await _run_screen(app, pilot, source)
            await wait_until(pilot, lambda: screen.query_one(RunStatus).kind == "finished")
            bar = screen.query_one(ProgressBar)
            assert (bar.progress, bar.total) == (40, 100)
            metrics = _text(screen.query_one(MetricsPane))
            assert "2.5000" in metrics  # the latest train/loss: 10 - 40 * 0.1875
            assert "3.0000" in metrics  # the latest eval/loss: 10.2 - 40 * 0.18
            assert "4,096" in metrics  # tokens/s
            assert "2.50e-03" in metrics  # lr
            checkpoints = _text(screen.query_one(CheckpointList))
            assert "step 40" in checkpoints and "step 20" in checkpoints
            assert checkpoints.index("step 40") < checkpoints.index("step 20")  # newest first
            memory = _text(screen.query_one(MemoryPane))
            assert "3.0 GiB" in memory and "5.5 GiB" in memory
            assert "Yunnan" in _text(screen.query_one(SamplePane).query_one("#sample-text"))
            assert screen.query_one(LossPlot).curves["train/loss"][-1] == (40, 2.5)
            status = screen.query_one(RunStatus).text
            assert status.startswith("finished at step 40")
            assert "finished at step 40" in screen_text(app)
            assert "step 40/100" in screen_text(app)

    async def test_error_event_shows_message(self, workdir: Path) -> None:
        error = Error(message="CUDA out of memory: lower train.micro_batch_size")
        source = ListEventSource(training_events(steps=5, final=error))
        app = PDTApp()
        async with app.run_test(size=SMALL) as pilot:
            screen = await _run_screen(app, pilot, source)
            await wait_until(pilot, lambda: screen.query_one(RunStatus).kind == "failed")
            assert "CUDA out of memory" in screen.query_one(RunStatus).text
            assert "CUDA out of memory" in screen_text(app)

    async def test_exit_without_final_event_shows_code_and_console(self, workdir: Path) -> None:
        source = ListEventSource(
            training_events(steps=5),
            exit_code=1,
            console=["Traceback (most recent call last):", "RuntimeError: boom in collate"],
        )
        app = PDTApp()
        async with app.run_test(size=SMALL) as pilot:
            screen = await _run_screen(app, pilot, source)
            await wait_until(pilot, lambda: screen.query_one(RunStatus).kind == "exited")
            status = screen.query_one(RunStatus).text
            assert "process exited with code 1" in status and "console.log" in status
            log = screen.query_one(LogTail)
            assert any("RuntimeError: boom in collate" in line.text for line in log.lines)

    async def test_stop_then_force(self, workdir: Path) -> None:
        source = ListEventSource(training_events(steps=5), keep_open=True)
        app = PDTApp()
        async with app.run_test(size=SMALL) as pilot:
            screen = await _run_screen(app, pilot, source)
            await wait_until(pilot, lambda: screen.state.step == 5)
            assert screen.query_one(RunStatus).kind == "running"
            await pilot.press("s")
            assert source.stop_calls == [False]  # polite: checkpoint and exit
            await wait_until(pilot, lambda: screen.query_one(RunStatus).kind == "stopping")
            assert "s again" in screen.query_one(RunStatus).text
            await pilot.press("s")
            assert source.stop_calls == [False, True]  # second press: force
            await wait_until(pilot, lambda: screen.query_one(RunStatus).kind == "stopped")
            assert "killed at step 5" in screen.query_one(RunStatus).text
            await pilot.press("s")  # nothing left to stop
            assert source.stop_calls == [False, True]

    async def test_stop_on_finished_run_does_nothing(self, workdir: Path) -> None:
        source = ListEventSource(training_events(steps=3, final=Done(status="stopped")))
        app = PDTApp()
        async with app.run_test(size=SMALL) as pilot:
            screen = await _run_screen(app, pilot, source)
            await wait_until(pilot, lambda: screen.query_one(RunStatus).kind == "stopped")
            await pilot.press("s")
            assert source.stop_calls == []

    async def test_escape_goes_home_and_leaves_the_job_running(self, workdir: Path) -> None:
        source = ListEventSource(training_events(steps=3), keep_open=True)
        app = PDTApp()
        async with app.run_test(size=SMALL) as pilot:
            await _run_screen(app, pilot, source)
            await pilot.press("escape")
            await wait_until(pilot, lambda: isinstance(app.screen, HomeScreen))
            assert source.stop_calls == []

    async def test_source_that_cannot_start_is_reported(self, workdir: Path) -> None:
        class Broken(ListEventSource):
            def start(self) -> None:
                raise OSError("no such interpreter")

        app = PDTApp()
        async with app.run_test(size=SMALL) as pilot:
            screen = await _run_screen(app, pilot, Broken([]))
            await wait_until(pilot, lambda: screen.query_one(RunStatus).kind == "failed")
            assert "could not start the job: no such interpreter" in screen.query_one(RunStatus).text


# ---------------------------------------------------------------------------------------- runs / attach


def _write_run(workdir: Path, name: str, events) -> Path:  # noqa: ANN001
    run = workdir / "logs" / name
    run.mkdir(parents=True)
    run.joinpath("events.jsonl").write_text("".join(json.dumps(e.to_dict()) + "\n" for e in events))
    return run


_SIGINT_CHILD = (
    "import signal, time; signal.signal(signal.SIGINT, signal.default_int_handler); time.sleep(30)"
)


class TestRuns:
    async def test_replay_a_finished_run_from_logs(self, workdir: Path) -> None:
        _write_run(workdir, "alpha-20240101-000000", training_events(steps=40, total=100, final=FINISHED))
        app = PDTApp()
        async with app.run_test(size=SMALL) as pilot:
            await _loaded_home(pilot)
            await pilot.press("r")
            await wait_until(
                pilot,
                lambda: isinstance(app.screen, RunsScreen) and app.screen.query_one(DataTable).row_count == 1,
            )
            assert "alpha-20240101-000000" in screen_text(app)
            await pilot.press("enter")
            await wait_until(pilot, lambda: isinstance(app.screen, RunScreen))
            screen = app.screen
            await wait_until(pilot, lambda: screen.query_one(RunStatus).kind == "finished")
            assert screen.query_one(ProgressBar).progress == 40
            assert "2.5000" in _text(screen.query_one(MetricsPane))
            await pilot.press("escape")  # back goes home, not to the runs list
            await wait_until(pilot, lambda: isinstance(app.screen, HomeScreen))

    async def test_reattach_to_a_job_launched_here_keeps_its_process(self, workdir: Path) -> None:
        run = _write_run(workdir, "alpha-20240101-000001", training_events(steps=2))
        # like launch_job: its own session, so the stop signal goes to the job's group only
        process = subprocess.Popen(
            # A real job installs its own SIGINT handler (pdt.jobs); do the same, so a SIGINT disposition
            # inherited from the test process cannot decide the outcome.
            [sys.executable, "-c", _SIGINT_CHILD],
            start_new_session=True,
        )
        try:
            app = PDTApp()
            async with app.run_test(size=SMALL) as pilot:
                await _loaded_home(pilot)
                app.register_job("alpha", run, process)
                assert app.running_presets() == frozenset({"alpha"})
                _home(app).refresh_catalog()
                presets = app.screen.query_one(PresetList)
                await wait_until(pilot, lambda: presets.row("alpha").status == "running")
                presets.highlighted = presets.get_option_index("alpha")
                await pilot.press("enter")  # running preset: attach instead of launching twice
                await wait_until(pilot, lambda: isinstance(app.screen, RunScreen))
                screen = app.screen
                assert screen.source.process is process
                await wait_until(pilot, lambda: screen.state.step == 2)
                await pilot.press("s")  # SIGINT to the process group of our child
                await wait_until(pilot, lambda: screen.query_one(RunStatus).kind == "exited", timeout=20)
                assert process.returncode is not None
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


# ---------------------------------------------------------------------------------------- editor


class TestEditor:
    async def _open(self, pilot, name: str, key: str = "e") -> EditorScreen:  # noqa: ANN001
        presets = await _loaded_home(pilot)
        presets.highlighted = presets.get_option_index(name)
        await pilot.press(key)
        await wait_until(
            pilot,
            lambda: isinstance(pilot.app.screen, EditorScreen) and pilot.app.screen.saved_text is not None,
        )
        return pilot.app.screen

    async def test_invalid_json_is_never_saved(self, workdir: Path) -> None:
        path = workdir / "presets" / "alpha.json"
        before = path.read_text()
        app = PDTApp()
        async with app.run_test(size=SMALL) as pilot:
            editor = await self._open(pilot, "alpha")
            editor.query_one(TextArea).load_text(
                '{"name": "alpha", "kind": "pretrain",\n  "train": {"lr": }\n}'
            )
            await pilot.press("ctrl+s")
            error = editor.query_one("#editor-error")
            await wait_until(pilot, lambda: error.display)
            assert "invalid JSON at line 2" in _text(error)
            assert editor.query_one(TextArea).cursor_location[0] == 1
            assert path.read_text() == before

    async def test_schema_error_names_the_field_and_is_not_saved(self, workdir: Path) -> None:
        path = workdir / "presets" / "alpha.json"
        before = path.read_text()
        app = PDTApp()
        async with app.run_test(size=SMALL) as pilot:
            editor = await self._open(pilot, "alpha")
            bad = '{\n  "name": "alpha",\n  "kind": "pretrain",\n  "train": {\n    "seq_len": 2\n  }\n}\n'
            editor.query_one(TextArea).load_text(bad)
            await pilot.press("ctrl+s")
            error = editor.query_one("#editor-error")
            await wait_until(pilot, lambda: error.display)
            assert "train.seq_len" in _text(error)
            assert editor.query_one(TextArea).cursor_location == (4, 4)  # on "seq_len"
            assert path.read_text() == before
            assert not list(path.parent.glob(".*tmp"))  # the temporary file is gone

    async def test_valid_edit_is_saved(self, workdir: Path) -> None:
        path = workdir / "presets" / "alpha.json"
        app = PDTApp()
        async with app.run_test(size=SMALL) as pilot:
            editor = await self._open(pilot, "alpha")
            data = json.loads(path.read_text())
            data["description"] = "edited in the TUI"
            editor.query_one(TextArea).load_text(json.dumps(data, indent=2))
            await pilot.press("ctrl+s")
            await wait_until(pilot, lambda: editor.saved_text == editor.text)
            assert json.loads(path.read_text())["description"] == "edited in the TUI"
            await pilot.press("escape")
            await wait_until(pilot, lambda: isinstance(app.screen, HomeScreen))

    async def test_view_is_read_only_and_escape_returns(self, workdir: Path) -> None:
        app = PDTApp()
        async with app.run_test(size=SMALL) as pilot:
            editor = await self._open(pilot, "beta", key="v")
            assert editor.query_one(TextArea).read_only
            assert '"beta"' in screen_text(app)
            await pilot.press("x")  # typing does nothing in the viewer
            assert editor.text == editor.saved_text
            await pilot.press("e")  # ...until e switches to editing
            assert not editor.query_one(TextArea).read_only and "edit" in editor.sub_title
            await pilot.press("escape")
            await wait_until(pilot, lambda: isinstance(app.screen, HomeScreen))


# ---------------------------------------------------------------------------------------- app


class TestApp:
    async def test_help_opens_and_closes(self, workdir: Path) -> None:
        app = PDTApp()
        async with app.run_test(size=SMALL) as pilot:
            await _loaded_home(pilot)
            await pilot.press("question_mark")
            await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen))
            assert "duplicate" in app.screen.markdown
            await pilot.press("escape")
            await wait_until(pilot, lambda: isinstance(app.screen, HomeScreen))

    async def test_quit_returns_zero(self, workdir: Path) -> None:
        app = PDTApp()
        async with app.run_test(size=SMALL) as pilot:
            await _loaded_home(pilot)
            await pilot.press("q")
            await pilot.pause(0.1)
        assert app.return_code == 0

    async def test_quit_asks_again_while_a_job_runs(self, workdir: Path) -> None:
        process = subprocess.Popen(
            # A real job installs its own SIGINT handler (pdt.jobs); do the same, so a SIGINT disposition
            # inherited from the test process cannot decide the outcome.
            [sys.executable, "-c", _SIGINT_CHILD],
            start_new_session=True,
        )
        try:
            app = PDTApp()
            async with app.run_test(size=SMALL) as pilot:
                await _loaded_home(pilot)
                app.register_job("alpha", workdir / "logs" / "alpha-x", process)
                await pilot.press("q")
                await pilot.pause(0.1)
                assert app.return_code is None  # still running: warned, not quit
                await pilot.press("q")
                await pilot.pause(0.1)
            assert app.return_code == 0
            assert process.poll() is None  # quitting the UI does not kill the job
        finally:
            process.kill()
            process.wait()


def test_launched_jobs_serve_the_prompt_box(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An inference job started from the TUI stays up for more prompts (PDT_INFER_SERVE=1)."""
    import pdt.runs

    seen: dict[str, str] = {}

    class FakePopen:
        def __init__(self, cmd: list[str], env: dict[str, str], **kwargs: object) -> None:
            seen.update(env)

    monkeypatch.setattr(pdt.runs.subprocess, "Popen", FakePopen)
    run_dir = workdir / "logs" / "demo-1"
    run_dir.mkdir(parents=True)
    pdt.runs.launch_job("demo_tiny", run_dir)
    assert seen["PDT_INFER_SERVE"] == "1" and seen["PDT_PRESET"] == "demo_tiny"
