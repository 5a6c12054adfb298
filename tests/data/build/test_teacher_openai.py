"""The openai_compatible teacher against a fake HTTP server on 127.0.0.1 (no network)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pdt.data.build import teacher_extractive as tx
from pdt.data.build import teacher_openai
from pdt.data.build.layout import build_root
from pdt.data.build.pipeline import run_dataset
from pdt.data.build.teacher_openai import OpenAITeacher
from pdt.jobs import JobContext
from pdt.presets.loader import validate_preset
from pdt.presets.schema import DatasetPreset, OpenAICompatibleTeacher
from tests.data.build.conftest import TINY

SECRET = "sk-test-THIS-KEY-MUST-NOT-LEAK-0123456789"
SECTIONS = ["Rome was founded in 753 BC by Romulus.", "Julius Caesar crossed the Rubicon in 49 BC."]


class FakeServer:
    """Serves each request by the next scripted behaviour; "good" once the script runs out."""

    def __init__(self) -> None:
        self.script: list[str] = []
        self.hits = 0
        self.auth: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.hits += 1
                fake.auth.append(self.headers.get("Authorization", ""))
                behaviour = fake.script.pop(0) if fake.script else "good"
                if behaviour == "500":
                    self.send_error(500)
                    return
                if behaviour == "timeout":
                    time.sleep(0.6)
                content = fake.content(body, behaviour)
                data = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @staticmethod
    def content(body: dict[str, Any], behaviour: str) -> str:
        if behaviour == "malformed":
            return '{"plan_items": [["unterminated'
        user = body["messages"][1]["content"]
        sections = [part.split(":\n", 1)[1] for part in user.split("\n\nSection ")[1:]]
        if behaviour == "invented":
            return json.dumps({"plan_items": [["Napoleon"] for _ in sections]})
        items = [[x["text"] for x in tx.plan_items(s)] or [s.split()[-1].strip(".")] for s in sections]
        return json.dumps({"plan_items": items})


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> Iterator[FakeServer]:
    monkeypatch.setattr(teacher_openai, "BACKOFF_S", 0.01)
    monkeypatch.setenv("PDT_TEST_TEACHER_KEY", SECRET)
    fake = FakeServer()
    thread = threading.Thread(target=fake.server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def _teacher(url: str, retries: int = 2) -> OpenAITeacher:
    cfg = OpenAICompatibleTeacher(
        base_url=url, model="fake", api_key_env="PDT_TEST_TEACHER_KEY", timeout=0.3, max_retries=retries
    )
    return OpenAITeacher(cfg)


def test_good_reply_is_validated_and_cached(server: FakeServer) -> None:
    teacher = _teacher(server.url)
    items, outcome = teacher.plan_items("Rome", SECTIONS)
    assert outcome == "ok" and items is not None and "Romulus" in items[0]
    assert server.auth == [f"Bearer {SECRET}"]
    again, outcome = teacher.plan_items("Rome", SECTIONS)
    assert (again, outcome, server.hits) == (items, "cached", 1)  # asked once only


@pytest.mark.parametrize("script", [["500", "500"], ["timeout"], ["malformed", "500"]])
def test_failures_are_retried(server: FakeServer, script: list[str]) -> None:
    server.script = list(script)
    items, outcome = _teacher(server.url).plan_items("Rome", SECTIONS)
    assert outcome == "ok" and items is not None and server.hits == len(script) + 1


@pytest.mark.parametrize("bad", ["malformed", "invented"])
def test_persistently_bad_reply_is_rejected(server: FakeServer, bad: str) -> None:
    server.script = [bad] * 3
    assert _teacher(server.url).plan_items("Rome", SECTIONS) == (None, "malformed")
    assert server.hits == 3


def test_missing_key_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PDT_TEST_TEACHER_KEY", raising=False)
    with pytest.raises(teacher_openai.TeacherError, match="PDT_TEST_TEACHER_KEY"):
        _teacher("http://127.0.0.1:9/v1")


def test_build_with_http_teacher_never_writes_the_key(server: FakeServer, tmp_path: Path) -> None:
    server.script = ["malformed"] * 4  # 1 try + max_retries (3): the first document is rejected
    teacher = {"type": "openai_compatible", "base_url": server.url, "model": "fake"}
    data = dict(TINY, data={"sources": [{"type": "wiki_vital", "limit": 20}]}, shard_size=4)
    preset = validate_preset({**data, "teacher": {**teacher, "api_key_env": "PDT_TEST_TEACHER_KEY"}}, "t")
    assert isinstance(preset, DatasetPreset)
    events: list[Any] = []
    ctx = JobContext(preset=preset, run_dir=tmp_path, checkpoints_dir=tmp_path, emit=events.append)
    assert run_dataset(ctx) == "finished"
    manifest = json.loads((build_root(preset.name) / "manifest.json").read_text())
    assert (
        manifest["rejected"].get("teacher_malformed") == 1 and manifest["files"]["train.parquet"]["rows"] > 0
    )
    assert list((tmp_path / "data" / "teacher_cache").rglob("*.json"))
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"the API key leaked into {path}"
    assert SECRET not in repr(events)
