"""Stage 4, collate: Parquet train / validation / test, a manifest and a dataset card.

What it is: one unit (marker: `manifest.json`, written last) that joins the plans and notes
shards in document order into `train.parquet`, `validation.parquet`, `test.parquet` with the
fixed schema `SCHEMA` (zstd), counts QC rejections per reason, and records rows + sha256 per
file. What it is not: token-level export for the trainer.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pdt.data.build.layout import dumps, write_atomic

SPLITS = ("train", "validation", "test")
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("title", pa.string()),
        ("prompt", pa.string()),
        ("num_streams", pa.int32()),
        ("sections", pa.list_(pa.string())),
        ("prefixes", pa.list_(pa.string())),
        ("section_tokens", pa.list_(pa.int32())),
        ("sectional_independence", pa.list_(pa.bool_())),
        ("plan_items_json", pa.string()),  # per stream: [{text, start, end, kind, plan_id}]
        ("notes_json", pa.string()),  # per stream: {stream, ent, fact, snapshots}
        ("variants_json", pa.string()),  # corrupted variants: [{kind, stream, ent, fact, corrupted}]
    ]
)


def _row(plan: dict[str, Any], notes: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": plan["id"],
        "title": plan["title"],
        "prompt": plan["prompt"],
        "num_streams": len(plan["sections"]),
        "sections": plan["sections"],
        "prefixes": plan["prefixes"],
        "section_tokens": plan["section_tokens"],
        "sectional_independence": plan["sectional_independence"],
        "plan_items_json": dumps(plan["plan_items"]),
        "notes_json": dumps(notes["streams"]),
        "variants_json": dumps(notes["variants"]),
    }


def _parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=1024)
    return buf.getvalue()


def _card(name: str, manifest: dict[str, Any], sources: list[Any]) -> str:
    lines = [
        f"# Dataset card: {name}",
        "",
        f"Sources: {', '.join(s['type'] for s in sources)}. Wikipedia text is CC BY-SA 4.0; "
        "this derived dataset keeps that licence.",
        f"Teacher: {manifest['teacher']}; K = {manifest['num_streams']}, stride B = {manifest['stride']}.",
        "",
        "| split | rows |",
        "|---|---|",
        *[f"| {s} | {manifest['files'][f'{s}.parquet']['rows']} |" for s in SPLITS],
        "",
        f"QC rejections: {dumps(manifest['rejected'])}",
        "",
        "Schema: " + ", ".join(f"{f.name}: {f.type}" for f in SCHEMA),
        "",
    ]
    return "\n".join(lines)


def collate(
    root: Path, plans: list[dict[str, Any]], notes: list[dict[str, Any]], info: dict[str, Any]
) -> dict[str, Any]:
    """Write the splits, the card and (last) the manifest; returns the manifest."""
    rejected: Counter[str] = Counter(info.pop("preflight_rejected"))
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    for plan, note in zip(plans, notes, strict=True):
        reason = note["reject"] or ("duplicate" if plan["id"] in seen else None)
        if reason:
            rejected[reason] += 1
            continue
        seen.add(plan["id"])
        by_split[plan["split"]].append(_row(plan, note))
    files = {}
    for split in SPLITS:
        data = _parquet_bytes(by_split[split])
        write_atomic(root / f"{split}.parquet", data)
        files[f"{split}.parquet"] = {"rows": len(by_split[split]), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {**info, "files": files, "rejected": dict(sorted(rejected.items())), "schema": str(SCHEMA)}
    write_atomic(root / "README.md", _card(info["name"], manifest, info["sources"]).encode("utf-8"))
    write_atomic(root / "manifest.json", (dumps(manifest) + "\n").encode("utf-8"))
    return manifest
