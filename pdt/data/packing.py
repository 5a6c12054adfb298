"""Packing: documents -> token ids -> one stream with `eot` after each document -> fixed blocks.

What it is: `Packer`, which reads documents from a document stream in chunks (tokenised with the
tokenizer's threaded `encode_batch`, joined with numpy — no per-token Python loop), and hands out
exactly the next n tokens of the shard's token stream. Blocks are exactly `seq_len + 1` ids, never
padded; a document may span blocks and the tail carries over. Its state is tiny and exact: the
document-stream state at the start of the chunk that holds the next token, plus how many tokens
of that chunk were already handed out (restoring re-reads and re-tokenises at most one chunk).
`CyclingDocs` repeats a finite document stream (the validation pass) so it fills whole batches.
What it is not: choosing documents (`pdt.data.mixing`) or batching into tensors/workers
(`pdt.data.loader`).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pdt.data.documents import Document

CHUNK_DOCS = 256  # documents per encode_batch call: enough to keep tiktoken's 8 threads busy
CHUNK_CHARS = 1 << 20  # ...or ~1M characters, so a few huge files don't make a huge chunk


class DocumentStream(Protocol):
    def next(self) -> Document | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TextTokenizer(Protocol):
    eot_id: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


@dataclass
class _Chunk:
    docs_state: dict[str, Any]  # the document stream's state before this chunk's first document
    start: int  # position of the chunk's first token in the shard's token stream
    tokens: np.ndarray  # int32 ids, eot after each document

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


def tokenize_documents(tokenizer: TextTokenizer, texts: list[str]) -> np.ndarray:
    """Token ids of the texts, each followed by eot, as one int32 array."""
    ids = tokenizer.encode_batch(texts)
    lengths = np.fromiter((len(t) for t in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    return np.insert(flat, np.cumsum(lengths), np.int32(tokenizer.eot_id))  # eot after each document


class Packer:
    """The shard's token stream, handed out in exact slices (a batch is B blocks of seq_len + 1)."""

    def __init__(self, docs: DocumentStream, tokenizer: TextTokenizer, block_len: int) -> None:
        if block_len < 2:
            raise ValueError(f"block_len must be at least 2 (inputs + shifted targets), got {block_len}")
        self.docs, self.tokenizer, self.block_len = docs, tokenizer, block_len
        self._chunks: deque[_Chunk] = deque()
        self._pos = 0  # position of the next token to hand out
        self._end = 0  # position just after the last token read
        self._exhausted = False
        self.documents = 0  # documents read in this process (a statistic, not state)

    def _read_chunk(self) -> bool:
        """Read and tokenise the next chunk of documents; False when the stream has ended."""
        docs_state = self.docs.state_dict()
        texts: list[str] = []
        chars = 0
        while len(texts) < CHUNK_DOCS and chars < CHUNK_CHARS:
            doc = self.docs.next()
            if doc is None:
                self._exhausted = True
                break
            texts.append(doc.text)
            chars += len(doc.text)
        if not texts:
            return False
        self.documents += len(texts)
        chunk = _Chunk(docs_state, self._end, tokenize_documents(self.tokenizer, texts))
        self._chunks.append(chunk)
        self._end = chunk.end
        return True

    def take(self, n: int) -> np.ndarray | None:
        """The next n tokens (int32), or None when a finite stream has fewer than n left."""
        while self._end - self._pos < n:
            if self._exhausted or not self._read_chunk():
                return None
        lo, hi = self._pos, self._pos + n
        parts = [
            c.tokens[max(lo, c.start) - c.start : min(hi, c.end) - c.start]
            for c in self._chunks
            if c.start < hi and c.end > lo
        ]
        self._pos = hi
        while self._chunks and self._chunks[0].end <= self._pos:
            self._chunks.popleft()
        return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)

    def blocks(self, count: int) -> np.ndarray | None:
        """`count` blocks as a [count, block_len] int32 array (or None at the end of a finite stream)."""
        tokens = self.take(count * self.block_len)
        return None if tokens is None else tokens.reshape(count, self.block_len)  # [count, T+1]

    def state_dict(self) -> dict[str, Any]:
        """Where the next token comes from: a document-stream state plus tokens to skip after it."""
        for chunk in self._chunks:
            if chunk.end > self._pos:
                return {"docs": chunk.docs_state, "skip": self._pos - chunk.start}
        # Nothing buffered holds the next token: the document stream itself is at position _end.
        return {"docs": self.docs.state_dict(), "skip": self._pos - self._end}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.docs.load_state_dict(state["docs"])
        self._chunks.clear()
        self._end, self._exhausted = 0, False
        self._pos = int(state["skip"])


class CyclingDocs:
    """A finite document stream read again from its start when it ends (if it gave any document).

    Validation packs through this so every rank gets the same number of batches even when its
    shard holds less text than `max_batches` blocks; an empty stream stays empty (None)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._got = False

    def next(self) -> Document | None:
        doc = self.stream.next()
        if doc is None and self._got:
            self.stream.restart()
            self._got = False
            doc = self.stream.next()
        self._got = self._got or doc is not None
        return doc

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)
