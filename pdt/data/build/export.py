"""Stage 5, export: the records the trainer streams directly, one Parquet file per split.

What it is: from each collated split, `export/<split>.parquet` (schema `EXPORT_SCHEMA`, zstd):
the prompt's token ids, and per stream the token ids of prompt + stream prefix + section, each
part tokenised on its own exactly as the decoder feeds them (the prompt is encoded once and shared;
each stream then reads its prefix and writes its section), a label mask (0 on prompt and prefix,
1 on the section the stream must write), plan item ids (salted hash into V_p; salt and
V_p in `export/manifest.json`) with their texts, coverage targets per snapshot (0 missing,
1 partial, 2 covered), the token position each snapshot belongs to and the snapshot rendered as
note text; and the corrupted variants as note texts with their corruption label. Each split is
one unit; `export/manifest.json` is written last. What it is not: batching or packing.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pdt.data.build.layout import dumps, write_atomic

STATUS_CODE = {"missing": 0, "partial": 1, "covered": 2}
_ints = pa.list_(pa.list_(pa.int32()))
EXPORT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),  # the prompt alone: a prefix of every stream's token_ids
        ("token_ids", _ints),  # K x T_k: prompt + stream prefix + section
        ("label_mask", pa.list_(pa.list_(pa.int8()))),  # K x T_k: 1 where the stream is trained
        ("plan_item_ids", _ints),  # K x items_k
        ("plan_item_texts", pa.list_(pa.list_(pa.string()))),  # K x items_k
        ("coverage_targets", pa.list_(pa.list_(pa.list_(pa.int8())))),  # K x snapshots_k x items_k
        ("snapshot_token_pos", _ints),  # K x snapshots_k: section tokens written at that snapshot
        ("snapshot_texts", pa.list_(pa.list_(pa.string()))),  # K x snapshots_k
        ("variant_streams", pa.list_(pa.int32())),
        ("variant_texts", pa.list_(pa.string())),
        ("variant_labels", pa.list_(pa.string())),  # corruption kind of each variant
    ]
)


def render_notes(
    ent: list[dict[str, Any]],
    facts: list[dict[str, Any]],
    cov: list[dict[str, Any]],
    names: dict[str, str] | None = None,
) -> str:
    """Notes as the text a teacher would emit: one ENT / FACT / COVERAGE line each.

    `names`: entity id → name across all streams (a wrong-owner fact names another stream's entity).
    """
    names = {**(names or {}), **{e["id"]: e["name"] for e in ent}}
    lines = [f"ENT {e['id']} {e['name']} ({e['type']})" for e in ent]
    lines += [
        f"FACT {names.get(f['subj_id'], f['subj_id'])} | {f['predicate']} | {f['object']}" for f in facts
    ]
    lines += [f"COVERAGE {c['plan_item_id']} {c['status']}" for c in cov]
    return "\n".join(lines)


def _stream(
    prompt_ids: list[int], rest: str, section: str, items: list[dict], notes: dict, stride: int, tok: Any
) -> dict:
    head, body = prompt_ids + tok.encode(rest + "\n"), tok.encode(section)
    snaps = notes["snapshots"]
    return {
        "token_ids": head + body,
        "label_mask": [0] * len(head) + [1] * len(body),
        "plan_item_ids": [x["plan_id"] for x in items],
        "plan_item_texts": [x["text"] for x in items],
        "coverage_targets": [[STATUS_CODE[c["status"]] for c in s["coverage"]] for s in snaps],
        "snapshot_token_pos": [min(s["version"] * stride, len(body)) for s in snaps],
        "snapshot_texts": [
            render_notes(notes["ent"], [notes["fact"][i] for i in s["facts"]], s["coverage"]) for s in snaps
        ],
    }


def export_row(row: dict[str, Any], stride: int, tok: Any) -> dict[str, Any]:
    """One trainer record from one collated row."""
    items, notes = json.loads(row["plan_items_json"]), json.loads(row["notes_json"])
    prompt = row["prompt"]
    prompt_ids = tok.encode(prompt)
    # A prefix is the prompt plus the stream's part line; the part line is tokenised on its own.
    rests = [p[len(prompt) :] if p.startswith(prompt) else " " + p for p in row["prefixes"]]
    streams = [
        _stream(prompt_ids, r, s, i, n, stride, tok)
        for r, s, i, n in zip(rests, row["sections"], items, notes, strict=True)
    ]
    out: dict[str, Any] = {"id": row["id"], "prompt_ids": prompt_ids}
    for key in EXPORT_SCHEMA.names[2:9]:
        out[key] = [s[key] for s in streams]
    variants = json.loads(row["variants_json"])
    names = {e["id"]: e["name"] for n in notes for e in n["ent"]}
    out["variant_streams"] = [v["stream"] for v in variants]
    # A variant corrupts the stream's final notes; it is rendered exactly like the final snapshot
    # (same coverage lines, entity names resolved across streams), so only the corruption differs.
    out["variant_texts"] = [
        render_notes(v["ent"], v["fact"], notes[v["stream"]]["snapshots"][-1]["coverage"], names)
        for v in variants
    ]
    out["variant_labels"] = [v["kind"] for v in variants]
    return out


def export_split(root: Path, split: str, stride: int, tok: Any) -> dict[str, Any]:
    """Write `export/<split>.parquet` unless present; returns its rows and sha256."""
    path = root / "export" / f"{split}.parquet"
    if not path.exists():
        rows = [export_row(r, stride, tok) for r in pq.read_table(root / f"{split}.parquet").to_pylist()]
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=EXPORT_SCHEMA), buf, compression="zstd")
        write_atomic(path, buf.getvalue())
    data = path.read_bytes()
    return {
        "rows": pq.ParquetFile(io.BytesIO(data)).metadata.num_rows,
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def write_export_manifest(root: Path, files: dict[str, Any], info: dict[str, Any]) -> None:
    manifest = {**info, "files": files, "schema": str(EXPORT_SCHEMA), "status_codes": STATUS_CODE}
    write_atomic(root / "export" / "manifest.json", (dumps(manifest) + "\n").encode("utf-8"))
