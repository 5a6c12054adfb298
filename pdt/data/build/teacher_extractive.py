"""The extractive teacher: offline, deterministic PDT annotations taken from the text itself.

What it is: the prompt ("Tell me about {title}."), a K-way section split at sentence boundaries
balanced by tokens, per-stream prefixes, plan items per stream (salient names, years, numbers
with units found IN that section, with their character offsets) and the notes of a section:
ENT, FACT (each with an evidence span that indexes the section text) and per-snapshot COVERAGE.
What it is not: a language model; it never writes text that is not in the document.
"""

from __future__ import annotations

import re
from typing import Any

# A sentence ends at . ! ? followed by space and an upper-case letter, digit or quote; the
# lookbehind skips common abbreviations so "St. Louis" stays one sentence.
_SENT_END = re.compile(r"(?<![A-Z])(?<!\b(?:Mr|Dr|St|Mt|vs|Jr|Sr|No))[.!?]\s+(?=[\"'(A-Z0-9])")
_YEAR = re.compile(r"\b(?:1[0-9]{3}|20[0-9]{2})\b")
_NUMBER_UNIT = re.compile(
    r"\b\d[\d,.]*\s?(?:%|per cent|percent|km|kilometres|kilometers|miles|metres|meters|kg|tonnes|"
    r"people|inhabitants|million|billion|years|species|languages|members)\b"
)
_NAME = re.compile(
    r"\b[A-Z][a-zA-Z\u00c0-\u024f'-]+(?:\s+(?:of|the|de|von|van|and)?\s*[A-Z][a-zA-Z\u00c0-\u024f'-]+)*"
)
_STOP_NAMES = {"The", "A", "An", "It", "In", "On", "He", "She", "They", "This", "These", "Its", "His", "Her"}
# Fallback noun phrases: a long lower-case word, optionally preceded by another (e.g. "free reed
# aerophone"); used only to bring a section without names up to MIN_PLAN_ITEMS.
_PHRASE = re.compile(r"\b(?:[a-z]{4,}\s)?[a-z][a-z-]{8,}\b")
MIN_PLAN_ITEMS = 2
MAX_PLAN_ITEMS = 8  # per stream: enough to cover a ~100-token section without listing every word


def prompt_for(title: str) -> str:
    return f"Tell me about {title}."


def sentences(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the sentences of `text` (end includes the final mark)."""
    spans, start = [], 0
    for m in _SENT_END.finditer(text):
        spans.append((start, m.start() + 1))
        start = m.end()
    if text[start:].strip():
        spans.append((start, len(text.rstrip())))
    return spans


def split_sections(body: str, counts: list[int], k: int) -> list[tuple[int, int]] | None:
    """K contiguous sentence groups whose token totals are closest to total/K each; None if < K sentences.

    `counts[i]` is the token count of sentence i. Greedy cut after the sentence whose cumulative
    total is nearest k·total/K, keeping at least one sentence per section.
    """
    spans = sentences(body)
    if len(spans) < k:
        return None
    total, cum, cuts, acc = sum(counts), [], [], 0
    for c in counts:
        acc += c
        cum.append(acc)
    last = -1
    for j in range(1, k):
        target = total * j / k
        lo, hi = last + 1, len(spans) - (k - j) - 1
        best = min(range(lo, hi + 1), key=lambda i: (abs(cum[i] - target), i))
        cuts.append(best)
        last = best
    bounds, begin = [], 0
    for cut in [*cuts, len(spans) - 1]:
        bounds.append((spans[begin][0], spans[cut][1]))
        begin = cut + 1
    return bounds


def item_kind(text: str) -> str:
    if _YEAR.fullmatch(text):
        return "date"
    return "number" if text[:1].isdigit() else "entity"


def plan_items(section: str) -> list[dict[str, Any]]:
    """Salient spans of `section` in order of first occurrence (years, numbers with units, names)."""
    found: dict[str, dict[str, Any]] = {}
    sent_starts = {s for s, _ in sentences(section)}
    candidates: list[tuple[int, int]] = []
    for rx in (_YEAR, _NUMBER_UNIT, _NAME):
        candidates += [(m.start(), m.end()) for m in rx.finditer(section)]
    for start, end in sorted(candidates, key=lambda se: (se[0], -se[1])):
        first = section[start:end].split(" ", 1)
        if len(first) == 2 and first[0] in _STOP_NAMES:  # "The Roman Empire" → "Roman Empire"
            start += len(first[0]) + 1
        text = section[start:end].strip(" ,.'-")
        end = start + len(text)
        if (
            not text
            or text in _STOP_NAMES
            or (start in sent_starts and " " not in text and item_kind(text) == "entity")
        ):
            continue  # a lone capitalised word opening a sentence is grammar, not a name
        key = text.lower()
        if key in found or any(start < f["end"] and f["start"] < end for f in found.values()):
            continue
        found[key] = {"text": text, "start": start, "end": end, "kind": item_kind(text)}
    if len(found) < MIN_PLAN_ITEMS:
        for m in _PHRASE.finditer(section):
            key = m.group().lower()
            if key not in found and not any(
                m.start() < f["end"] and f["start"] < m.end() for f in found.values()
            ):
                found[key] = {"text": m.group(), "start": m.start(), "end": m.end(), "kind": "phrase"}
            if len(found) >= MIN_PLAN_ITEMS:
                break
    items = sorted(found.values(), key=lambda x: x["start"])
    return items[:MAX_PLAN_ITEMS]


def locate_items(texts: list[str], section: str) -> list[dict[str, Any]]:
    """Plan items given as text (by another teacher), placed at their first occurrence in `section`."""
    found: dict[str, dict[str, Any]] = {}
    for text in texts:
        start = section.find(text)
        if start >= 0 and text.lower() not in found:
            found[text.lower()] = {
                "text": text,
                "start": start,
                "end": start + len(text),
                "kind": item_kind(text),
            }
    return sorted(found.values(), key=lambda x: x["start"])


def stream_prefix(title: str, k: int, num_streams: int) -> str:
    """What stream k is told before it writes: the prompt plus its part number."""
    return f"{prompt_for(title)} Part {k + 1} of {num_streams}:"


def entities(items: list[dict[str, Any]], stream: int) -> list[dict[str, Any]]:
    """ENT notes: one per named plan item; aliases are the last word of a multi-word name."""
    out = []
    for i, item in enumerate(x for x in items if x["kind"] == "entity"):
        words = item["text"].split()
        aliases = [words[-1]] if len(words) > 1 and words[-1] not in _STOP_NAMES else []
        out.append(
            {
                "id": f"s{stream}e{i}",
                "name": item["text"],
                "aliases": aliases,
                "type": "name",
                "canonical": item["text"].lower(),
            }
        )
    return out


def facts(section: str, items: list[dict[str, Any]], ents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """FACT notes: an entity and another plan item in one sentence; the sentence is the evidence."""
    by_name = {e["name"]: e for e in ents}
    out = []
    for s_start, s_end in sentences(section):
        inside = [x for x in items if s_start <= x["start"] and x["end"] <= s_end]
        subj = next((x for x in inside if x["text"] in by_name), None)
        if subj is None:
            continue
        for n, obj in enumerate(inside):
            if obj is subj:
                continue
            # Only the item right after the subject takes the words in between as its predicate
            # ("X is an ancient citadel ... Y"); later items merely co-occur in the sentence.
            adjacent = n == inside.index(subj) + 1
            between = section[subj["end"] : obj["start"]] if adjacent else ""
            words = re.findall(r"[a-z]+", between)[:4]
            out.append(
                {
                    "subj_id": by_name[subj["text"]]["id"],
                    "predicate": " ".join(words) or "mentioned_with",
                    "object": obj["text"],
                    "certainty": 0.9 if words else 0.5,  # an explicit verb phrase vs. mere co-occurrence
                    "evidence_span": {"start": s_start, "end": s_end, "text": section[s_start:s_end]},
                }
            )
    return out


def coverage(items: list[dict[str, Any]], item_ids: list[int], upto: int) -> list[dict[str, Any]]:
    """COVERAGE once the first `upto` characters are written: covered / partial / missing per item."""
    out = []
    for item, pid in zip(items, item_ids, strict=True):
        status = "covered" if item["end"] <= upto else "partial" if item["start"] < upto else "missing"
        out.append({"plan_item_id": pid, "status": status})
    return out
