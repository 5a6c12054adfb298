"""The whole build: Parquet schema, splits, manifest, QC counts, reruns, stops and SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pdt.data.build.collate import SCHEMA, SPLITS
from pdt.data.build.layout import build_root
from pdt.data.build.pipeline import run_dataset
from pdt.jobs import JOBS, JobContext
from pdt.presets.schema import DatasetPreset
from pdt.telemetry.events import Event, Metric, Progress
from tests.conftest import MAIN, PYTHON, child_env
from tests.data.build.conftest import TINY


def _ctx(preset: DatasetPreset, tmp: Path, stop_after: int | None = None) -> tuple[JobContext, list[Event]]:
    events: list[Event] = []
    ctx = JobContext(preset=preset, run_dir=tmp, checkpoints_dir=tmp, emit=events.append)
    if stop_after is not None:

        def emit(event: Event) -> None:
            events.append(event)
            if isinstance(event, Progress) and event.stage == "plans" and event.step >= stop_after:
                ctx.request_stop()

        ctx.emit = emit
    return ctx, events


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_build_writes_splits_manifest_and_card(
    tiny_preset: DatasetPreset, data_dir: Path, tmp_path: Path
) -> None:
    assert JOBS["dataset"] is not None
    ctx, events = _ctx(tiny_preset, tmp_path)
    assert run_dataset(ctx) == "finished"
    root = build_root(tiny_preset.name)
    assert root == data_dir / "processed" / "ds_test"
    manifest = json.loads((root / "manifest.json").read_text())
    ids: dict[str, str] = {}
    for split in SPLITS:
        path = root / f"{split}.parquet"
        table = pq.read_table(path)
        assert table.schema.equals(SCHEMA)
        assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"
        entry = manifest["files"][f"{split}.parquet"]
        assert entry["rows"] == table.num_rows
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        for doc_id in table.column("id").to_pylist():
            assert doc_id not in ids, f"{doc_id} in {ids.get(doc_id)} and {split}"  # no doc in two splits
            ids[doc_id] = split
    assert manifest["files"]["train.parquet"]["rows"] > 20
    assert manifest["plan_salt"] == "pdt-plan-v1" and sum(manifest["rejected"].values()) > 0
    assert "licence" in (root / "README.md").read_text()
    stages = {e.stage for e in events if isinstance(e, Progress)}
    assert stages == {"preflight", "plans", "notes", "collate", "export"}
    qc = {e.name for e in events if isinstance(e, Metric) and e.name.startswith("dataset/qc/")}
    assert qc == {f"dataset/qc/rejected_{r}" for r in manifest["rejected"]}


def test_rerun_skips_units_and_is_byte_identical(
    tiny_preset: DatasetPreset, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dataset(_ctx(tiny_preset, tmp_path)[0])
    root = build_root(tiny_preset.name)
    before = _digests(root)
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*.jsonl")}
    assert run_dataset(_ctx(tiny_preset, tmp_path)[0]) == "finished"
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.jsonl")} == mtimes  # nothing rewritten
    assert _digests(root) == before
    # a fresh build elsewhere, from the same inputs, seed and code, is byte-identical too
    monkeypatch.setenv("PDT_DATA_DIR", str(tmp_path / "other"))
    run_dataset(_ctx(tiny_preset, tmp_path)[0])
    assert _digests(build_root(tiny_preset.name)) == before


def test_stop_between_units_then_resume(
    tiny_preset: DatasetPreset, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx, _ = _ctx(tiny_preset, tmp_path, stop_after=2)
    assert run_dataset(ctx) == "stopped"
    root = build_root(tiny_preset.name)
    assert len(list((root / "plans").glob("*.jsonl"))) == 2 and not (root / "manifest.json").exists()
    assert run_dataset(_ctx(tiny_preset, tmp_path)[0]) == "finished"
    resumed = _digests(root)
    monkeypatch.setenv("PDT_DATA_DIR", str(tmp_path / "clean"))
    run_dataset(_ctx(tiny_preset, tmp_path)[0])
    assert _digests(build_root(tiny_preset.name)) == resumed


def _first_stage_event(logs: Path, proc: subprocess.Popen, deadline: float) -> bool:
    while time.monotonic() < deadline and proc.poll() is None:
        for events in logs.glob("*/events.jsonl"):
            for line in events.read_text(encoding="utf-8").splitlines():
                if '"progress"' in line and '"plans"' in line:
                    return True
        time.sleep(0.005)
    return False


def test_sigkill_mid_stage_then_rerun_matches_clean_build(tmp_path: Path) -> None:
    preset = dict(
        TINY, name="ds_kill", shard_size=1, data={"sources": [{"type": "wiki_vital", "limit": 200}]}
    )
    path = tmp_path / "ds_kill.json"
    path.write_text(json.dumps(preset), encoding="utf-8")
    killed_env = child_env(tmp_path, PDT_PRESET=str(path), PDT_DATA_DIR=str(tmp_path / "killed"))
    proc = subprocess.Popen(
        [PYTHON, MAIN], env=killed_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        assert _first_stage_event(tmp_path / "logs", proc, time.monotonic() + 60), "no plans progress event"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    root = tmp_path / "killed" / "processed" / "ds_kill"
    assert not (root / "manifest.json").exists(), "the build finished before the kill: make it longer"
    for env in (killed_env, child_env(tmp_path, PDT_PRESET=str(path), PDT_DATA_DIR=str(tmp_path / "clean"))):
        subprocess.run([PYTHON, MAIN], env=env, check=True, capture_output=True, timeout=120)
    assert not list(root.rglob(".*.tmp-*"))  # the rerun removed the killed writer's torn temp file
    assert _digests(root) == _digests(tmp_path / "clean" / "processed" / "ds_kill")
    train = pq.read_table(root / "train.parquet").column("id").to_pylist()
    assert len(train) == len(set(train))  # no duplicate rows


def test_export_records_for_the_trainer(tiny_preset: DatasetPreset, data_dir: Path, tmp_path: Path) -> None:
    from pdt.data.build.export import EXPORT_SCHEMA
    from pdt.data.plan_ids import plan_item_id
    from pdt.data.tokenizer import build_tokenizer

    run_dataset(_ctx(tiny_preset, tmp_path)[0])
    root = build_root(tiny_preset.name)
    manifest = json.loads((root / "export" / "manifest.json").read_text())
    assert manifest["plan_salt"] == tiny_preset.plan_salt and manifest["plan_vocab"] == tiny_preset.plan_vocab
    tok = build_tokenizer(tiny_preset.tokenizer)
    collated = {r["id"]: r for r in pq.read_table(root / "train.parquet").to_pylist()}
    table = pq.read_table(root / "export" / "train.parquet")
    assert table.schema.equals(EXPORT_SCHEMA) and manifest["files"]["train.parquet"]["rows"] == table.num_rows
    labels: set[str] = set()
    for rec in table.to_pylist():
        src = collated[rec["id"]]
        for k in range(tiny_preset.num_streams):
            ids, mask = rec["token_ids"][k], rec["label_mask"][k]
            assert len(ids) == len(mask) and mask[0] == 0 and mask[-1] == 1
            assert tok.decode([t for t, m in zip(ids, mask, strict=True) if m]) == src["sections"][k]
            # The prompt is shared and tokenised alone, as the decoder encodes it once for all streams.
            n_prompt = len(rec["prompt_ids"])
            assert ids[:n_prompt] == rec["prompt_ids"] == tok.encode(src["prompt"])
            assert tok.decode(ids[: len(mask) - sum(mask)]) == src["prefixes"][k] + "\n"
            texts, pids = rec["plan_item_texts"][k], rec["plan_item_ids"][k]
            assert pids == [plan_item_id(t, tiny_preset.plan_salt, tiny_preset.plan_vocab) for t in texts]
            cov = rec["coverage_targets"][k]
            assert len(cov) == len(rec["snapshot_texts"][k]) == len(rec["snapshot_token_pos"][k])
            assert all(len(row) == len(texts) for row in cov) and set(cov[0]) == {0} and set(cov[-1]) == {2}
            assert rec["snapshot_token_pos"][k][-1] == sum(mask)
        labels.update(rec["variant_labels"])
        for stream, text in zip(rec["variant_streams"], rec["variant_texts"], strict=True):
            final = rec["snapshot_texts"][stream][-1]
            # Only the corruption differs from the real final notes: same coverage lines, names not ids.
            assert text != final
            assert [x for x in text.splitlines() if x.startswith("COVERAGE")] == [
                x for x in final.splitlines() if x.startswith("COVERAGE")
            ]
            assert not re.search(r"^FACT s\d+e\d+ ", text, flags=re.M)
        assert len(rec["variant_texts"]) == len(rec["variant_labels"]) == len(rec["variant_streams"])
    assert labels == {"entity_swap", "dropped_fact", "wrong_owner", "duplicate"}


def _hf_tokenizer_folder(folder: Path) -> Path:
    """A real Hugging Face tokenizer folder, trained here on bundled text (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pdt.data.sources import open_sources
    from pdt.presets.schema import WikiVitalSource

    (source,) = open_sources([WikiVitalSource(limit=200)])
    docs = (source.load(source.ref(i)) for i in range(source.count() or 0))
    texts = [doc.text for doc in docs if doc is not None]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=600,
            special_tokens=["<unk>", "<eos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    from tokenizers import decoders

    bpe.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", unk_token="<unk>").save_pretrained(
        folder
    )
    return folder


def test_export_uses_the_trunk_folders_own_tokenizer(data_dir: Path, tmp_path: Path) -> None:
    from pdt.data.tokenizer import load_tokenizer
    from pdt.presets.loader import validate_preset

    folder = _hf_tokenizer_folder(tmp_path / "trunk")
    preset = validate_preset(
        {**TINY, "name": "ds_trunk_tok", "tokenizer": {"type": "trunk", "path": str(folder)}}
    )
    run_dataset(_ctx(preset, tmp_path)[0])
    root = build_root(preset.name)
    tok = load_tokenizer(folder)
    assert json.loads((root / "manifest.json").read_text())["tokenizer"] == tok.identity()
    collated = {r["id"]: r for r in pq.read_table(root / "train.parquet").to_pylist()}
    records = pq.read_table(root / "export" / "train.parquet").to_pylist()
    assert records
    for rec in records:
        for k, (ids, mask) in enumerate(zip(rec["token_ids"], rec["label_mask"], strict=True)):
            assert max(ids) < 600  # the trunk's vocabulary, not cl100k's
            section = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
            assert section.strip() == collated[rec["id"]]["sections"][k].strip()


def test_trunk_tokenizer_without_a_folder_is_refused() -> None:
    from pdt.presets.loader import PresetError, validate_preset

    with pytest.raises(PresetError, match="tokenizer.path"):
        validate_preset({**TINY, "tokenizer": {"type": "trunk"}})
