"""Stage 1, preflight: read the preset's documents, filter, dedupe, score and split them.

What it is: one unit of work that writes `preflight/documents.jsonl` (the completion marker) and
`preflight/stats.json`. Each kept document gets a title (its first line, else its id), a body,
a quality score and a split chosen by a stable hash of its id alone, so no document can be in
two splits and adding documents never moves an old one. What it is not: sectioning (plans).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pdt.data.build.layout import dumps, read_jsonl, write_atomic, write_jsonl
from pdt.data.sources import open_sources
from pdt.presets.schema import DatasetPreset

MIN_BODY_CHARS = 80  # shorter than ~2 sentences cannot be split into K sections
_WS = re.compile(r"\s+")


def split_of(doc_id: str, validation: float, test: float) -> str:
    """train / validation / test from a 64-bit blake2b of the id (never Python's salted hash)."""
    u = int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little") / 2**64
    if u < validation:
        return "validation"
    return "test" if u < validation + test else "train"


def title_and_body(doc_id: str, text: str) -> tuple[str, str]:
    """Title = first line when a blank line follows it (wiki format), else the id's last part."""
    head, sep, rest = text.strip().partition("\n")
    if sep and rest.strip() and len(head) <= 200:
        return head.strip(), rest.strip()
    return doc_id.split(":", 1)[-1].rsplit("/", 1)[-1], text.strip()


def quality_score(body: str) -> float:
    """Share of letters and spaces among characters: low for tables, code and markup."""
    good = sum(ch.isalpha() or ch.isspace() for ch in body)
    return round(good / max(len(body), 1), 4)


def _read_documents(preset: DatasetPreset, warn: Callable[[str], None]) -> list[tuple[str, str]]:
    docs: list[tuple[str, str]] = []
    for source in open_sources(list(preset.data.sources), warn=warn, what="documents to build from"):
        i = 0
        while (ref := source.ref(i)) is not None:
            i += 1
            doc = source.load(ref)
            if doc is not None:
                docs.append((doc.id, doc.text))
    return docs


def run_preflight(preset: DatasetPreset, root: Path, warn: Callable[[str], None]) -> dict[str, Any]:
    """Run the stage unless its marker exists; returns its stats (kept, rejected per reason)."""
    out = root / "preflight" / "documents.jsonl"
    stats_path = root / "preflight" / "stats.json"
    if out.exists() and stats_path.exists():
        return json.loads(stats_path.read_text(encoding="utf-8"))
    rejects: Counter[str] = Counter()
    seen: set[str] = set()
    seen_ids: set[str] = set()
    rows: list[dict[str, Any]] = []
    for doc_id, text in _read_documents(preset, warn):
        title, body = title_and_body(doc_id, text)
        if not body.strip():
            rejects["empty"] += 1
            continue
        if len(body) < MIN_BODY_CHARS:
            rejects["too_short"] += 1
            continue
        key = hashlib.sha256(_WS.sub(" ", body).strip().lower().encode("utf-8")).hexdigest()
        if key in seen or doc_id in seen_ids:
            rejects["duplicate"] += 1
            continue
        seen.add(key)
        seen_ids.add(doc_id)
        split = split_of(doc_id, preset.validation_fraction, preset.test_fraction)
        rows.append(
            {"id": doc_id, "title": title, "body": body, "score": quality_score(body), "split": split}
        )
        if preset.max_documents is not None and len(rows) >= preset.max_documents:
            break
    stats = {"kept": len(rows), "rejected": dict(sorted(rejects.items()))}
    write_atomic(stats_path, dumps(stats).encode("utf-8"))
    write_jsonl(out, rows)
    return stats


def load_documents(root: Path) -> list[dict[str, Any]]:
    """The preflight output (raises naming the file if it is damaged)."""
    return read_jsonl(root / "preflight" / "documents.jsonl")
