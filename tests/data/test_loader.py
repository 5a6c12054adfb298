"""Loader: batch shapes, exact resume for every mix mode (in-process and with real DataLoader
workers), sharding over 2 ranks x 2 workers, deterministic eval batches, clear failures."""

from __future__ import annotations

import json

import pytest
import torch

from pdt.data import packing
from pdt.data.documents import DataSourceError
from pdt.data.loader import make_eval_batches, make_train_batches
from pdt.data.mixing import is_validation
from pdt.data.tokenizer import Tokenizer
from pdt.presets.schema import DataConfig, JsonlSource, TextDirSource, WikiVitalSource

SEQ_LEN, BATCH = 32, 4


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(vocab_size=8192)


@pytest.fixture
def three_sources(tmp_path) -> list:
    """wiki (8 one-line articles) + a folder of 4 notes + 6 JSONL records: an epoch is ~2 batches."""
    notes = tmp_path / "notes"
    notes.mkdir()
    for i in range(4):
        text = f"Note {i}: the harbour crane lifted crate {i * 7}."
        (notes / f"n{i}.txt").write_text(text, encoding="utf-8")
    path = tmp_path / "qa.jsonl"
    path.write_text(
        "".join(json.dumps({"q": f"What is {i}+{i}?", "a": f"It is {2 * i}."}) + "\n" for i in range(6)),
        encoding="utf-8",
    )
    return [
        WikiVitalSource(limit=8, format="{title}: {description}."),
        TextDirSource(path=str(notes), weight=2.0),
        JsonlSource(path=str(path), format="Q: {q}\nA: {a}", weight=0.5),
    ]


def take(it, n: int) -> list[torch.Tensor]:
    return [next(it) for _ in range(n)]


def test_batches_shape_dtype_and_range(three_sources, tok):
    it = make_train_batches(DataConfig(sources=three_sources), tok, SEQ_LEN, BATCH, seed=1)
    batch = next(it)
    assert batch.shape == (BATCH, SEQ_LEN + 1) and batch.dtype == torch.long
    assert int(batch.min()) >= 0 and int(batch.max()) < tok.vocab_size
    assert it.tokens_per_batch == BATCH * (SEQ_LEN + 1)


@pytest.mark.parametrize("chunk_docs", [3, 256])
@pytest.mark.parametrize("mix", ["round_robin", "sequential", "weighted"])
def test_resume_is_exact(three_sources, tok, monkeypatch, mix, chunk_docs):
    monkeypatch.setattr(packing, "CHUNK_DOCS", chunk_docs)
    cfg = DataConfig(sources=three_sources, mix=mix, validation_fraction=0.1, shuffle=True)
    straight = take(make_train_batches(cfg, tok, SEQ_LEN, BATCH, seed=7), 12)
    first = make_train_batches(cfg, tok, SEQ_LEN, BATCH, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(take(first, 7), straight[:7], strict=True))
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make_train_batches(cfg, tok, SEQ_LEN, BATCH, seed=7, state=state)
    for want, got in zip(straight[7:], take(resumed, 5), strict=True):
        assert torch.equal(want, got)
    assert min(resumed._stream.packer.docs.mixer.passes) >= 2  # the 12 batches crossed epochs
    other_seed = take(make_train_batches(cfg, tok, SEQ_LEN, BATCH, seed=8), 12)
    assert not all(torch.equal(a, b) for a, b in zip(straight, other_seed, strict=True))


@pytest.mark.parametrize("mix", ["round_robin", "weighted"])
def test_resume_is_exact_with_two_workers(three_sources, tok, mix):
    cfg = DataConfig(sources=three_sources, mix=mix, num_workers=2)
    straight_it = make_train_batches(cfg, tok, SEQ_LEN, BATCH, seed=3, rank=1, world_size=2)
    straight = take(straight_it, 12)
    straight_it.close()
    first = make_train_batches(cfg, tok, SEQ_LEN, BATCH, seed=3, rank=1, world_size=2)
    take(first, 7)  # odd: the next batch is worker 1's, so the resumed loader must rotate its workers
    state = json.loads(json.dumps(first.state_dict()))
    first.close()
    assert sorted(state["shards"]) == ["2", "3"] and state["next"] == 1
    resumed = make_train_batches(cfg, tok, SEQ_LEN, BATCH, seed=3, rank=1, world_size=2, state=state)
    got = take(resumed, 5)
    resumed.close()
    for want, have in zip(straight[7:], got, strict=True):
        assert torch.equal(want, have)


def equal_length_docs(tok: Tokenizer, n: int) -> list[str]:
    """n distinct documents of the same token length (so a block can hold exactly one)."""
    candidates = [f"Document {i:03d} says hello." for i in range(1000)]
    lengths = [len(tok.encode(d)) for d in candidates]
    common = max(set(lengths), key=lengths.count)
    docs = [d for d, k in zip(candidates, lengths, strict=True) if k == common][:n]
    assert len(docs) == n
    return docs


def test_two_ranks_two_workers_partition_the_documents(tmp_path, tok):
    docs = equal_length_docs(tok, 40)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    cfg = DataConfig(
        sources=[JsonlSource(path=str(path), field="text")], validation_fraction=0.0, num_workers=2
    )
    seq_len = len(tok.encode(docs[0]))  # a block is exactly one document + eot
    seen: dict[int, list[str]] = {}
    for rank in range(2):
        it = make_train_batches(cfg, tok, seq_len, 1, seed=11, rank=rank, world_size=2, max_epochs=1)
        blocks = list(it)
        assert all(int(b[0, -1]) == tok.eot_id for b in blocks)
        seen[rank] = [tok.decode(b[0, :-1]) for b in blocks]
    assert len(seen[0]) == len(seen[1]) == 20
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(docs)  # disjoint and complete, no duplicates
    assert seen[0] != sorted(seen[0])  # shuffled


def test_eval_batches_are_deterministic_and_validation_only(tmp_path, tok):
    docs = equal_length_docs(tok, 200)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    cfg = DataConfig(sources=[JsonlSource(path=str(path), field="text")], validation_fraction=0.2)
    val = {d for i, d in enumerate(docs) if is_validation("jsonl", f"docs.jsonl:{i}", 0.2)}
    assert 20 < len(val) < 60
    seq_len = len(tok.encode(docs[0]))
    for rank in range(2):
        a = make_eval_batches(cfg, tok, seq_len, 2, 8, rank, 2)
        b = make_eval_batches(cfg, tok, seq_len, 2, 8, rank, 2)
        assert len(a) == 8 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        assert a[0].shape == (2, seq_len + 1)
        texts = {tok.decode(row[:-1]) for batch in a for row in batch}
        assert texts <= val
    train = take(make_train_batches(cfg, tok, seq_len, 2, seed=0), 30)
    assert not {tok.decode(row[:-1]) for batch in train for row in batch} & val


def test_eval_without_validation_documents_is_empty(three_sources, tok):
    cfg = DataConfig(sources=three_sources, validation_fraction=0.0)
    assert make_eval_batches(cfg, tok, SEQ_LEN, BATCH, 4, 0, 1) == []


def test_a_cursor_for_another_layout_restarts_with_a_warning(three_sources, tok):
    cfg = DataConfig(sources=three_sources)
    it = make_train_batches(cfg, tok, SEQ_LEN, BATCH, seed=1)
    take(it, 3)
    warnings: list[str] = []
    other = make_train_batches(cfg, tok, SEQ_LEN, BATCH, seed=2, state=it.state_dict(), warn=warnings.append)
    assert len(warnings) == 1 and "seed 1 -> 2" in warnings[0]
    assert torch.equal(next(other), next(make_train_batches(cfg, tok, SEQ_LEN, BATCH, seed=2)))


def test_every_source_failing_stops_with_one_message(tmp_path, tok):
    cfg = DataConfig(
        sources=[
            TextDirSource(path=str(tmp_path / "missing")),
            JsonlSource(path=str(tmp_path / "none.jsonl"), field="text"),
        ]
    )
    with pytest.raises(DataSourceError, match="no training text: source 0 .*missing.*source 1 .*none.jsonl"):
        make_train_batches(cfg, tok, SEQ_LEN, BATCH, seed=0)


def test_a_failing_source_warns_and_training_goes_on(three_sources, tmp_path, tok):
    warnings: list[str] = []
    cfg = DataConfig(sources=[TextDirSource(path=str(tmp_path / "gone")), *three_sources])
    it = make_train_batches(cfg, tok, SEQ_LEN, BATCH, seed=0, warn=warnings.append)
    assert next(it).shape == (BATCH, SEQ_LEN + 1)
    assert len(warnings) == 1 and "source 0 (text_dir" in warnings[0] and "gone" in warnings[0]
