"""Packing: exact blocks, eot at document ends, no loss and no padding, an exact tiny state."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pdt.data import packing
from pdt.data.documents import Document
from pdt.data.packing import Packer, tokenize_documents
from pdt.data.sources import open_sources
from pdt.data.tokenizer import Tokenizer
from pdt.presets.schema import WikiVitalSource


class ListDocs:
    """A finite document stream over a list (the packer only needs next/state_dict/load_state_dict)."""

    def __init__(self, texts: list[str]) -> None:
        self.texts, self.i = texts, 0

    def next(self) -> Document | None:
        if self.i >= len(self.texts):
            return None
        self.i += 1
        return Document(str(self.i - 1), self.texts[self.i - 1])

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(vocab_size=8192)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    (source,) = open_sources([WikiVitalSource(limit=60)])
    return [source.load(source.ref(i)).text for i in range(source.count())]


def reference_stream(tok: Tokenizer, texts: list[str]) -> list[int]:
    out: list[int] = []
    for text in texts:
        out += tok.encode(text) + [tok.eot_id]
    return out


def test_tokenize_documents_appends_eot(tok):
    arr = tokenize_documents(tok, ["hello world", "", "again"])
    assert arr.dtype == np.int32
    assert arr.tolist() == tok.encode("hello world") + [8192, 8192] + tok.encode("again") + [8192]


@pytest.mark.parametrize("chunk_docs", [1, 7, 256])
def test_blocks_are_exact_and_lossless(tok, texts, monkeypatch, chunk_docs):
    monkeypatch.setattr(packing, "CHUNK_DOCS", chunk_docs)
    block_len = 65
    packer = Packer(ListDocs(texts), tok, block_len)
    blocks = []
    while (b := packer.blocks(3)) is not None:
        assert b.shape == (3, block_len)
        blocks.append(b)
    flat = np.concatenate(blocks).reshape(-1).tolist()
    ref = reference_stream(tok, texts)
    assert len(ref) - block_len * 3 < len(flat) <= len(ref)  # only the final partial batch is left
    assert flat == ref[: len(flat)]  # no loss, no padding, order kept, documents span blocks
    assert flat.count(tok.eot_id) == ref[: len(flat)].count(tok.eot_id) > 50
    assert any(row[-1] != tok.eot_id and tok.eot_id in row for b in blocks for row in b.tolist())


def test_long_document_spans_many_blocks(tok):
    text = "The long document goes on and on. " * 40
    packer = Packer(ListDocs([text, "short"]), tok, 17)
    blocks = []
    while (b := packer.blocks(1)) is not None:
        blocks.append(b[0].tolist())
    flat = [i for b in blocks for i in b]
    assert flat == reference_stream(tok, [text, "short"])[: len(flat)]
    assert len(blocks) > 10 and tok.eot_id not in flat[: len(tok.encode(text))]


@pytest.mark.parametrize("chunk_docs", [2, 256])
def test_state_resumes_exactly(tok, texts, monkeypatch, chunk_docs):
    monkeypatch.setattr(packing, "CHUNK_DOCS", chunk_docs)
    packer = Packer(ListDocs(texts), tok, 33)
    for steps in (1, 5, 13):
        for _ in range(steps):
            packer.blocks(2)
        state = json.loads(json.dumps(packer.state_dict()))
        assert len(json.dumps(state)) < 100  # a document position and a token count, never the tokens
        expected = [packer.blocks(2) for _ in range(4)]
        fresh = Packer(ListDocs(texts), tok, 33)
        fresh.load_state_dict(state)
        assert fresh.state_dict() == state  # saving again before reading anything changes nothing
        for want in expected:
            assert np.array_equal(fresh.blocks(2), want)


def test_block_len_must_hold_a_target(tok):
    with pytest.raises(ValueError, match="block_len"):
        Packer(ListDocs(["x"]), tok, 1)
