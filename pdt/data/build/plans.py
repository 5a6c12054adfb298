"""Stage 2, plans: per document, the prompt, K token-balanced sections, prefixes and plan items.

What it is: one unit per shard of `shard_size` preflight documents, written atomically to
`plans/shard-NNNNN.jsonl` (the file is the marker; a rerun skips it). A document that cannot be
split well is kept as a row with `reject` set (counted per reason by collate), never silently
dropped. What it is not: notes (`notes`) or HTTP (`teacher_openai`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pdt.data.build import teacher_extractive as tx
from pdt.data.build.teacher_openai import OpenAITeacher, TeacherError
from pdt.data.plan_ids import plan_item_id
from pdt.presets.schema import DatasetPreset

MAX_IMBALANCE = 4.0  # largest / smallest section tokens; beyond this a stream has little to write


def _independence(items: list[list[dict[str, Any]]], sections: list[str]) -> list[bool]:
    """Stream k is sectionally independent when none of its plan items is named in another section."""
    out = []
    for k, its in enumerate(items):
        others = " ".join(s for j, s in enumerate(sections) if j != k).lower()
        out.append(not any(x["text"].lower() in others for x in its))
    return out


def plan_document(
    doc: dict[str, Any], preset: DatasetPreset, tokenizer: Any, teacher: OpenAITeacher | None = None
) -> dict[str, Any]:
    """The plan row of one preflight document (plan items from `teacher` when given, else extracted)."""
    body, k = doc["body"], preset.num_streams
    row: dict[str, Any] = {"id": doc["id"], "split": doc["split"], "title": doc["title"], "reject": None}
    spans = tx.sentences(body)
    counts = [len(ids) for ids in tokenizer.encode_batch([body[s:e] for s, e in spans])]
    bounds = tx.split_sections(body, counts, k)
    if bounds is None:
        return {**row, "reject": "too_few_sentences"}
    sections = [body[s:e] for s, e in bounds]
    tokens = [len(ids) for ids in tokenizer.encode_batch(sections)]
    if min(tokens) < preset.min_section_tokens:
        return {**row, "reject": "short_section"}
    if max(tokens) > MAX_IMBALANCE * min(tokens):
        return {**row, "reject": "unbalanced_sections"}
    if teacher is None:
        items = [tx.plan_items(s) for s in sections]
    else:
        texts, outcome = teacher.plan_items(doc["title"], sections)
        if outcome == "unreachable":
            raise TeacherError(
                f"teacher {teacher.url} did not answer after {teacher.cfg.max_retries} retries; check that "
                "it runs and teacher.base_url, then run again (finished shards are kept)"
            )
        if texts is None:
            return {**row, "reject": "teacher_malformed"}
        items = [tx.locate_items(t, s) for t, s in zip(texts, sections, strict=True)]
    if any(not its for its in items):
        return {**row, "reject": "no_plan_items"}
    for its in items:
        for x in its:
            x["plan_id"] = plan_item_id(x["text"], preset.plan_salt, preset.plan_vocab)
    return {
        **row,
        "prompt": tx.prompt_for(doc["title"]),
        "body": body,
        "section_bounds": [list(b) for b in bounds],
        "sections": sections,
        "section_tokens": tokens,
        "prefixes": [tx.stream_prefix(doc["title"], j, k) for j in range(k)],
        "plan_items": items,
        "sectional_independence": _independence(items, sections),
    }


def plan_shard(
    docs: list[dict[str, Any]], preset: DatasetPreset, tokenizer: Any, teacher: OpenAITeacher | None = None
) -> list[dict[str, Any]]:
    return [plan_document(d, preset, tokenizer, teacher) for d in docs]


def shard_dir(root: Path) -> Path:
    return root / "plans"
