"""Each dataset-build stage on a tiny fixture: preflight, the extractive teacher, plans, notes."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdt.data.build import teacher_extractive as tx
from pdt.data.build.notes import notes_document
from pdt.data.build.plans import plan_document
from pdt.data.build.preflight import load_documents, run_preflight, split_of
from pdt.data.plan_ids import plan_item_id
from pdt.data.tokenizer import build_tokenizer
from pdt.presets.loader import validate_preset
from pdt.presets.schema import DatasetPreset
from tests.data.build.conftest import TINY


def _text_dir_preset(folder: Path) -> DatasetPreset:
    data = dict(TINY, data={"sources": [{"type": "text_dir", "path": str(folder)}]})
    preset = validate_preset(data, source="test")
    assert isinstance(preset, DatasetPreset)
    return preset


def test_preflight_filters_dedupes_and_splits(tmp_path: Path, data_dir: Path) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    body = "Paris is the capital of France. It had 2,100,000 people in 2019. The Seine crosses it."
    (folder / "a.txt").write_text(f"Paris\n\n{body}", encoding="utf-8")
    (folder / "b.txt").write_text(f"Paris again\n\n{body.upper()}", encoding="utf-8")  # duplicate text
    (folder / "c.txt").write_text("Tiny\n\nToo short.", encoding="utf-8")
    (folder / "d.txt").write_text("   ", encoding="utf-8")
    preset = _text_dir_preset(folder)
    stats = run_preflight(preset, data_dir / "x", warn=lambda m: None)
    assert stats["kept"] == 1
    assert stats["rejected"]["duplicate"] == 1 and stats["rejected"]["too_short"] == 1
    (doc,) = load_documents(data_dir / "x")
    assert doc["title"] == "Paris" and doc["body"] == body
    assert doc["split"] == split_of(doc["id"], preset.validation_fraction, preset.test_fraction)


def test_split_is_stable_and_roughly_proportional() -> None:
    splits = [split_of(f"doc{i}", 0.1, 0.1) for i in range(5000)]
    assert splits == [split_of(f"doc{i}", 0.1, 0.1) for i in range(5000)]
    assert 350 < splits.count("validation") < 650 and 350 < splits.count("test") < 650


def test_sections_balanced_at_sentence_boundaries() -> None:
    body = " ".join(f"Sentence number {i} talks about Rome in {1900 + i}." for i in range(9))
    tok = build_tokenizer(validate_preset(dict(TINY), source="t").tokenizer)  # type: ignore[attr-defined]
    spans = tx.sentences(body)
    assert len(spans) == 9
    counts = [len(tok.encode(body[s:e])) for s, e in spans]
    bounds = tx.split_sections(body, counts, 3)
    assert bounds is not None and len(bounds) == 3
    assert [body[s:e].count(".") for s, e in bounds] == [3, 3, 3]
    assert tx.split_sections("One sentence only.", [4], 3) is None


def test_plan_items_are_found_in_their_section() -> None:
    section = "The Roman Empire grew until 117 under Trajan. It covered 5,000,000 km of land."
    items = tx.plan_items(section)
    texts = [x["text"] for x in items]
    assert "Roman Empire" in texts and "117" not in texts and "Trajan" in texts
    assert any(x["kind"] == "number" for x in items)
    for x in items:
        assert section[x["start"] : x["end"]] == x["text"]


@pytest.fixture
def planned(tiny_preset: DatasetPreset, data_dir: Path) -> list[tuple[dict, dict]]:
    root = data_dir / "p"
    run_preflight(tiny_preset, root, warn=lambda m: None)
    tok = build_tokenizer(tiny_preset.tokenizer)
    plans = [plan_document(d, tiny_preset, tok) for d in load_documents(root)]
    return [(p, notes_document(p, tiny_preset, tok)) for p in plans]


def test_plans_and_notes_schema(planned: list[tuple[dict, dict]], tiny_preset: DatasetPreset) -> None:
    good = [(p, n) for p, n in planned if not n["reject"]]
    assert len(good) >= 20
    for plan, notes in good:
        assert plan["prompt"] == f"Tell me about {plan['title']}."
        assert "".join(plan["sections"]) in plan["body"].replace(" ", "") or len(plan["sections"]) == 3
        for (s, e), section in zip(plan["section_bounds"], plan["sections"], strict=True):
            assert plan["body"][s:e] == section
        for items in plan["plan_items"]:
            for x in items:
                assert x["plan_id"] == plan_item_id(x["text"], tiny_preset.plan_salt, tiny_preset.plan_vocab)
        for stream, section, items in zip(
            notes["streams"], plan["sections"], plan["plan_items"], strict=True
        ):
            ids = {e["id"] for e in stream["ent"]}
            for fact in stream["fact"]:
                span = fact["evidence_span"]
                assert section[span["start"] : span["end"]] == span["text"]  # evidence is real text
                assert fact["subj_id"] in ids and 0.0 <= fact["certainty"] <= 1.0
            snaps = stream["snapshots"]
            assert [s["version"] for s in snaps] == list(range(len(snaps)))
            assert all(c["status"] == "missing" for c in snaps[0]["coverage"])  # the plan contract
            assert all(c["status"] == "covered" for c in snaps[-1]["coverage"])
            assert {c["plan_item_id"] for c in snaps[0]["coverage"]} == {x["plan_id"] for x in items}


def test_corrupted_variants_really_differ(planned: list[tuple[dict, dict]]) -> None:
    kinds = set()
    for _plan, notes in planned:
        if notes["reject"]:
            continue
        for v in notes["variants"]:
            assert v["corrupted"] is True
            original = notes["streams"][v["stream"]]
            assert (v["ent"], v["fact"]) != (original["ent"], original["fact"])
            if v["kind"] == "duplicate":  # a sibling's notes word for word, as this stream's
                sibling = notes["streams"][v["of"]]
                assert v["of"] != v["stream"] and (v["ent"], v["fact"]) == (sibling["ent"], sibling["fact"])
            kinds.add(v["kind"])
    assert kinds == {"entity_swap", "dropped_fact", "wrong_owner", "duplicate"}


def test_qc_rejects_coverage_of_an_unknown_plan_item(planned: list[tuple[dict, dict]]) -> None:
    from pdt.data.build.notes import qc_coverage

    plan, notes = next((p, n) for p, n in planned if not n["reject"])
    assert qc_coverage(plan, notes["streams"]) is None
    tampered = [dict(s) for s in notes["streams"]]
    snap = dict(tampered[1]["snapshots"][-1])
    snap["coverage"] = [*snap["coverage"], {"plan_item_id": -1, "status": "covered"}]
    tampered[1]["snapshots"] = [*tampered[1]["snapshots"][:-1], snap]
    assert qc_coverage(plan, tampered) == "coverage_unknown_plan_item"


def test_collate_counts_rejects_and_duplicates(planned: list[tuple[dict, dict]], data_dir: Path) -> None:
    from pdt.data.build.collate import collate

    plans = [p for p, _ in planned]
    notes = [n for _, n in planned]
    good = next(i for i, n in enumerate(notes) if not n["reject"])
    info = {"name": "q", "teacher": "extractive", "num_streams": 3, "stride": 16, "sources": []}
    manifest = collate(
        data_dir / "q",
        [*plans, plans[good]],
        [*notes, notes[good]],
        {**info, "preflight_rejected": {"empty": 2}},
    )
    assert manifest["rejected"]["duplicate"] == 1 and manifest["rejected"]["empty"] == 2
    expected = sum(1 for n in notes if n["reject"]) + 3
    assert sum(manifest["rejected"].values()) == expected
    assert sum(f["rows"] for f in manifest["files"].values()) == sum(1 for n in notes if not n["reject"])
