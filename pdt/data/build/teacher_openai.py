"""The `openai_compatible` teacher: plan items per stream from a chat-completions HTTP endpoint.

What it is: one POST per document to `<base_url>/chat/completions` (temperature 0, JSON reply
asked for), retried with exponential backoff on HTTP 429/5xx, timeouts and malformed replies; a
response cache keyed by the sha256 of the request (never of the key) under
`$PDT_DATA_DIR/teacher_cache/`, so a rerun asks nothing twice and stays byte-identical; strict
validation: the reply must be {"plan_items": [[str, ...] x K]} and every item must occur in its
section (an item the text does not contain would be a hallucinated plan). The API key is read
from the environment variable the preset names and is sent only in the Authorization header.
What it is not: sectioning or notes — those stay extractive, built from the validated items.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pdt.data.build.layout import dumps, write_atomic
from pdt.presets.schema import OpenAICompatibleTeacher
from pdt.runs import data_root

BACKOFF_S = 0.5  # first retry waits this long, then doubles (capped at 8 s)
SYSTEM = (
    "You plan a text written by {k} writers in parallel, one section each. For each section, list "
    "up to 8 salient entities, dates, numbers or noun phrases, copied exactly as they appear in it. "
    'Reply with JSON only: {{"plan_items": [[...], ...]}} with one list per section, in order.'
)


class TeacherError(Exception):
    """The teacher endpoint cannot be used; the message names the endpoint or variable to fix."""


def cache_dir() -> Path:
    return data_root() / "teacher_cache"


def validate_reply(content: str, sections: list[str]) -> list[list[str]] | None:
    """The plan items of a reply, or None when it is not exactly the promised JSON shape."""
    try:
        data = json.loads(content)
    except ValueError:
        return None
    items = data.get("plan_items") if isinstance(data, dict) else None
    if not isinstance(items, list) or len(items) != len(sections):
        return None
    out: list[list[str]] = []
    for its, section in zip(items, sections, strict=True):
        if not isinstance(its, list) or not all(isinstance(x, str) and x.strip() for x in its):
            return None
        if not its or any(x.strip() not in section for x in its):
            return None  # empty, or an item its section does not contain
        out.append([x.strip() for x in its][:8])
    return out


class OpenAITeacher:
    """Plan items from an OpenAI-compatible server, cached and validated."""

    def __init__(self, cfg: OpenAICompatibleTeacher) -> None:
        self.cfg = cfg
        self.key = os.environ.get(cfg.api_key_env, "")
        if not self.key:
            raise TeacherError(
                f"teacher.api_key_env names {cfg.api_key_env!r}, which is not set: export "
                f"{cfg.api_key_env}=<your key> (use any value for a local server that needs none)"
            )
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"

    def _request(self, title: str, sections: list[str]) -> dict[str, Any]:
        user = f"Title: {title}\n\n" + "\n\n".join(f"Section {i + 1}:\n{s}" for i, s in enumerate(sections))
        return {
            "model": self.cfg.model,
            "temperature": 0,
            "response_format": {"type": "json_object"},
            "messages": [
                {"role": "system", "content": SYSTEM.format(k=len(sections))},
                {"role": "user", "content": user},
            ],
        }

    def _post(self, body: dict[str, Any]) -> str | None:
        """The reply's message content; None for a retryable failure (5xx, 429, timeout, bad JSON)."""
        req = urllib.request.Request(
            self.url,
            data=dumps(body).encode("utf-8"),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout) as resp:
                reply = json.loads(resp.read().decode("utf-8"))
            return str(reply["choices"][0]["message"]["content"])
        except urllib.error.HTTPError as exc:
            if exc.code == 429 or exc.code >= 500:
                return None
            raise TeacherError(
                f"teacher {self.url} answered HTTP {exc.code}: check base_url and model"
            ) from exc
        except (urllib.error.URLError, TimeoutError, OSError, ValueError, KeyError, IndexError, TypeError):
            return None

    def plan_items(self, title: str, sections: list[str]) -> tuple[list[list[str]] | None, str]:
        """(items, outcome): outcome is "cached", "ok", "malformed" (rejected) or "unreachable"."""
        body = self._request(title, sections)
        key = hashlib.sha256((self.url + "\n" + dumps(body)).encode("utf-8")).hexdigest()
        path = cache_dir() / key[:2] / f"{key}.json"
        if path.exists():
            return validate_reply(json.loads(path.read_text(encoding="utf-8"))["content"], sections), "cached"
        answered = False
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                time.sleep(min(BACKOFF_S * 2 ** (attempt - 1), 8.0))
            content = self._post(body)
            answered = answered or content is not None
            items = validate_reply(content, sections) if content is not None else None
            if items is not None:
                write_atomic(path, dumps({"content": content, "request": body}).encode("utf-8"))
                return items, "ok"
        return None, "malformed" if answered else "unreachable"
