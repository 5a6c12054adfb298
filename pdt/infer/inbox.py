"""The ask-again inbox: new prompts for a running inference job, as lines of one JSONL file.

What it is: `ask(run_dir, prompt)` appends `{"prompt": ...}` to `<run_dir>/prompts.jsonl` (one
`write` of a whole line, so a reader never sees half a prompt), and `Inbox.poll()` returns the
prompts appended since the last poll (only complete lines). An inference job started with
`PDT_INFER_SERVE=1` (the TUI sets it) keeps its model loaded after the preset's prompt and answers
each prompt that arrives here until it is stopped — a 20B trunk is loaded once, not per question.
What it is not: a queue with acknowledgements; the job's `answer` events say what was answered.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

INBOX_FILE = "prompts.jsonl"
SERVE_ENV = "PDT_INFER_SERVE"


def serving() -> bool:
    """Whether this inference job should wait for more prompts after its preset's prompt."""
    return os.environ.get(SERVE_ENV, "") not in ("", "0")


def ask(run_dir: str | Path, prompt: str) -> None:
    """Queue a prompt for the job of `run_dir`. An empty prompt is refused (ValueError)."""
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    line = json.dumps({"prompt": prompt, "t": time.time()}, ensure_ascii=False) + "\n"
    fd = os.open(Path(run_dir) / INBOX_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


class Inbox:
    """Reads the prompts appended to `<run_dir>/prompts.jsonl` after it was opened (or all: `from_start`)."""

    def __init__(self, run_dir: str | Path, from_start: bool = False) -> None:
        self.path = Path(run_dir) / INBOX_FILE
        self.offset = 0 if from_start or not self.path.exists() else self.path.stat().st_size

    def poll(self) -> list[str]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # complete lines only; a partial one is read next time
        self.offset += end
        prompts = []
        for raw in data[:end].splitlines():
            try:
                prompt = json.loads(raw).get("prompt", "")
            except (json.JSONDecodeError, AttributeError):
                continue  # a damaged line is skipped, never fatal to the job
            if isinstance(prompt, str) and prompt.strip():
                prompts.append(prompt)
        return prompts
