"""The dataset job: preflight → plans → notes → collate, resumable between units, with events.

What it is: `run_dataset(ctx)`, the `dataset` row of `pdt.jobs.JOBS`. Each stage skips the units
whose files exist, checks `ctx.stop_requested()` between units (then returns "stopped"; a rerun
resumes), and emits `Progress(stage=..., step=units done, total=units)` plus
`Metric("dataset/<stage>/<count>")` for counts and QC rejections. What it is not: stage logic
(one module per stage).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pdt.data.build import collate as collate_stage
from pdt.data.build import export as export_stage
from pdt.data.build import notes as notes_stage
from pdt.data.build import plans as plans_stage
from pdt.data.build.layout import build_root, read_jsonl, shard_name, write_jsonl
from pdt.data.build.preflight import load_documents, run_preflight
from pdt.data.build.teacher_openai import OpenAITeacher
from pdt.data.tokenizer import build_tokenizer
from pdt.presets.schema import DatasetPreset, OpenAICompatibleTeacher
from pdt.telemetry.events import Metric, Progress

STAGES = ("preflight", "plans", "notes", "collate", "export")


def _tokenizer(preset: DatasetPreset) -> Any:
    """The preset's tokenizer: tiktoken, or (type "trunk") the trunk folder's own, so the exported
    token ids are the ones that trunk reads."""
    return build_tokenizer(preset.tokenizer)


def _sharded(
    ctx: Any, stage: str, inputs: list[list[dict[str, Any]]], fn: Callable[[list[dict[str, Any]]], list]
) -> bool:
    """Run `fn` on every shard whose output is missing; False when a stop was requested."""
    out_dir = ctx_root(ctx) / stage
    done = 0
    for i, shard in enumerate(inputs):
        path = out_dir / shard_name(i)
        if not path.exists():
            if ctx.stop_requested():
                return False
            write_jsonl(path, fn(shard))
        done += 1
        ctx.emit(Progress(step=done, total=len(inputs), stage=stage))
    return True


def ctx_root(ctx: Any) -> Path:
    return build_root(ctx.preset.name)


def _read_stage(root: Path, stage: str, n: int) -> list[list[dict[str, Any]]]:
    return [read_jsonl(root / stage / shard_name(i)) for i in range(n)]


def _info(preset: DatasetPreset, tok: Any) -> dict[str, Any]:
    return {
        "name": preset.name,
        "teacher": preset.teacher.type,
        "num_streams": preset.num_streams,
        "stride": preset.stride,
        "plan_salt": preset.plan_salt,
        "plan_vocab": preset.plan_vocab,
        "seed": preset.seed,
        "tokenizer": tok.identity(),
        "sources": [s.model_dump(mode="json") for s in preset.data.sources],
    }


def run_dataset(ctx: Any) -> str:
    """Build the dataset of `ctx.preset`; "finished", or "stopped" when asked to stop between units."""
    preset: DatasetPreset = ctx.preset
    teacher = OpenAITeacher(preset.teacher) if isinstance(preset.teacher, OpenAICompatibleTeacher) else None
    root = ctx_root(ctx)
    ctx.log(f"building dataset {preset.name} under {root}")
    for torn in sorted(root.rglob(".*.tmp-*")) if root.exists() else []:
        torn.unlink()  # left by a writer killed mid-write; its unit has no file yet and is redone
    tok = _tokenizer(preset)
    ctx.emit(Progress(step=0, total=1, stage="preflight"))
    stats = run_preflight(preset, root, warn=lambda m: ctx.log(m, "warning"))
    ctx.emit(Progress(step=1, total=1, stage="preflight"))
    ctx.emit(Metric(name="dataset/preflight/kept", value=float(stats["kept"]), step=0))
    for reason, count in stats["rejected"].items():
        ctx.emit(Metric(name=f"dataset/preflight/rejected_{reason}", value=float(count), step=0))
    docs = load_documents(root)
    size = preset.shard_size
    shards = [docs[i : i + size] for i in range(0, len(docs), size)]
    if not _sharded(ctx, "plans", shards, lambda s: plans_stage.plan_shard(s, preset, tok, teacher)):
        return "stopped"
    plans = _read_stage(root, "plans", len(shards))
    if not _sharded(ctx, "notes", plans, lambda s: [notes_stage.notes_document(p, preset, tok) for p in s]):
        return "stopped"
    notes = _read_stage(root, "notes", len(shards))
    status = _collate(ctx, root, preset, tok, stats, plans, notes)
    return status if status != "finished" else _export(ctx, root, preset, tok)


def _export(ctx: Any, root: Path, preset: DatasetPreset, tok: Any) -> str:
    files: dict[str, Any] = {}
    for done, split in enumerate(collate_stage.SPLITS, start=1):
        if ctx.stop_requested() and not (root / "export" / f"{split}.parquet").exists():
            return "stopped"
        files[f"{split}.parquet"] = export_stage.export_split(root, split, preset.stride, tok)
        ctx.emit(Progress(step=done, total=len(collate_stage.SPLITS), stage="export"))
    export_stage.write_export_manifest(root, files, _info(preset, tok))
    examples = sum(f["rows"] for f in files.values())
    ctx.emit(Metric(name="dataset/export/examples", value=float(examples), step=0))
    ctx.log(f"exported {examples} trainer records to {root / 'export'}")
    return "finished"


def _collate(
    ctx: Any, root: Path, preset: DatasetPreset, tok: Any, stats: dict, plans: list, notes: list
) -> str:
    if ctx.stop_requested():
        return "stopped"
    manifest_path = root / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    else:
        info = {**_info(preset, tok), "preflight_rejected": stats["rejected"]}
        flat_plans = [p for shard in plans for p in shard]
        flat_notes = [n for shard in notes for n in shard]
        manifest = collate_stage.collate(root, flat_plans, flat_notes, info)
    ctx.emit(Progress(step=1, total=1, stage="collate"))
    for fname, entry in manifest["files"].items():
        ctx.emit(
            Metric(name=f"dataset/collate/rows_{fname.split('.')[0]}", value=float(entry["rows"]), step=0)
        )
    for reason, count in manifest["rejected"].items():
        ctx.emit(Metric(name=f"dataset/qc/rejected_{reason}", value=float(count), step=0))
        ctx.log(f"QC rejected {count} document(s): {reason}")
    ctx.log(
        f"dataset {preset.name}: " + ", ".join(f"{k} {v['rows']} rows" for k, v in manifest["files"].items())
    )
    return "finished"
