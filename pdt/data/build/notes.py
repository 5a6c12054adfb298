"""Stage 3, notes: ENT / FACT / COVERAGE per stream, versioned snapshots and corrupted variants.

What it is: one unit per plans shard, written atomically to `notes/shard-NNNNN.jsonl`. Snapshot
0 is the plan contract (every item missing, no facts); snapshot r ≥ 1 is the notes once r·B
tokens of the section are written (facts whose evidence has been passed, coverage moved on).
Corrupted variants of the final notes — entity swap, dropped fact, wrong owner, duplicate (the
stream's notes are a sibling's: it wrote what another stream wrote) — are labelled `corrupted:
true` with their kind: readiness negatives with a real error in them (SPEC §2b.6).
What it is not: Parquet writing (collate) or token-level export.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pdt.data.build import teacher_extractive as tx
from pdt.presets.schema import DatasetPreset

CORRUPTIONS = ("entity_swap", "dropped_fact", "wrong_owner", "duplicate")


def _char_cuts(section: str, stride: int, tokenizer: Any) -> list[int]:
    """Character offsets after each stride of B tokens (the last one is the section end)."""
    ids = tokenizer.encode(section)
    cuts = [len(tokenizer.decode(ids[:t])) for t in range(stride, len(ids), stride)]
    return [min(c, len(section)) for c in cuts] + [len(section)]


def stream_notes(section: str, items: list[dict[str, Any]], k: int, stride: int, tok: Any) -> dict[str, Any]:
    """Final ENT/FACT notes of stream k and its snapshots (0 = plan contract, then one per stride)."""
    ents = tx.entities(items, k)
    fcts = tx.facts(section, items, ents)
    ids = [x["plan_id"] for x in items]
    snaps = [{"version": 0, "upto_char": 0, "facts": [], "coverage": tx.coverage(items, ids, 0)}]
    for v, cut in enumerate(_char_cuts(section, stride, tok), start=1):
        seen = [i for i, f in enumerate(fcts) if f["evidence_span"]["end"] <= cut]
        snaps.append(
            {"version": v, "upto_char": cut, "facts": seen, "coverage": tx.coverage(items, ids, cut)}
        )
    return {"stream": k, "ent": ents, "fact": fcts, "snapshots": snaps}


def _pick(seed: int, doc_id: str, what: str, n: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{doc_id}:{what}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n


def corrupted_variants(doc_id: str, streams: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Entity swap (two names across streams), dropped fact, wrong owner (subject from another
    stream), duplicate (a sibling's entities and facts as the stream's own)."""
    out: list[dict[str, Any]] = []
    all_ents = [(s["stream"], e) for s in streams for e in s["ent"]]
    with_facts = [s for s in streams if s["fact"]]
    if with_facts:
        s = with_facts[_pick(seed, doc_id, "drop", len(with_facts))]
        i = _pick(seed, doc_id, "drop_i", len(s["fact"]))
        fact = s["fact"][:i] + s["fact"][i + 1 :]
        out.append({"kind": "dropped_fact", "stream": s["stream"], "ent": s["ent"], "fact": fact})
        foreign = [e for st, e in all_ents if st != s["stream"]]
        if foreign:
            j = _pick(seed, doc_id, "owner_i", len(s["fact"]))
            owner = foreign[_pick(seed, doc_id, "owner", len(foreign))]
            fact = [dict(f, subj_id=owner["id"]) if n == j else f for n, f in enumerate(s["fact"])]
            out.append({"kind": "wrong_owner", "stream": s["stream"], "ent": s["ent"], "fact": fact})
    for s in [s for s in streams if s["ent"]][:1]:
        i = _pick(seed, doc_id, "swap_i", len(s["ent"]))
        # a swap with a same-named entity of another stream would be no corruption at all
        others = [e for st, e in all_ents if st != s["stream"] and e["canonical"] != s["ent"][i]["canonical"]]
        if others:
            other = others[_pick(seed, doc_id, "swap", len(others))]
            ent = [
                dict(e, name=other["name"], canonical=other["canonical"]) if n == i else e
                for n, e in enumerate(s["ent"])
            ]
            out.append({"kind": "entity_swap", "stream": s["stream"], "ent": ent, "fact": s["fact"]})
    if len(streams) > 1:  # the readiness negative of a block that repeats a sibling's content
        s = streams[_pick(seed, doc_id, "dup", len(streams))]
        siblings = [
            t
            for t in streams
            if t["stream"] != s["stream"]
            and (t["ent"] or t["fact"])
            and (t["ent"], t["fact"]) != (s["ent"], s["fact"])
        ]
        if siblings:
            t = siblings[_pick(seed, doc_id, "dup_of", len(siblings))]
            out.append(
                {
                    "kind": "duplicate",
                    "stream": s["stream"],
                    "ent": t["ent"],
                    "fact": t["fact"],
                    "of": t["stream"],
                }
            )
    return [dict(v, corrupted=True) for v in sorted(out, key=lambda v: CORRUPTIONS.index(v["kind"]))]


def qc_coverage(plan: dict[str, Any], streams: list[dict[str, Any]]) -> str | None:
    """The QC reason when a coverage entry names a plan item the stream's plan does not have."""
    for s, items in zip(streams, plan["plan_items"], strict=True):
        known = {x["plan_id"] for x in items}
        for snap in s["snapshots"]:
            if any(c["plan_item_id"] not in known for c in snap["coverage"]):
                return "coverage_unknown_plan_item"
    return None


def notes_document(plan: dict[str, Any], preset: DatasetPreset, tok: Any) -> dict[str, Any]:
    """The notes row of one plan row (rejected plans pass through with their reason)."""
    row = {"id": plan["id"], "split": plan["split"], "reject": plan["reject"]}
    if plan["reject"]:
        return row
    streams = [
        stream_notes(sec, items, k, preset.stride, tok)
        for k, (sec, items) in enumerate(zip(plan["sections"], plan["plan_items"], strict=True))
    ]
    row["reject"] = qc_coverage(plan, streams)
    return {**row, "streams": streams, "variants": corrupted_variants(plan["id"], streams, preset.seed)}
