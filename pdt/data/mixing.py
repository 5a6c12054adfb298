"""Mixing several sources into one document order, the train/validation split, and sharding.

What it is: `Mixer` walks the opened sources in a preset's `mix` mode and yields
(source index, DocRef) pairs — ids only, no text; `DocStream` keeps the documents of one split
(a stable hash of source type + id, independent of seed, order and sharding) and deals them
round-robin to shards by their index in that split, reading only its own shard's text.
Everything that decides the order is integers (positions, epochs, draw counters), so a stream's
whole state is a small JSON dict and restoring it continues exactly where it stopped.
What it is not: reading files (`pdt.data.sources`), tokenising or packing (`pdt.data.packing`).

Modes (an epoch ends when every source has been read once; shuffled sources get a new order):
- round_robin: one document from each source in turn; exhausted sources drop out until the epoch ends.
- sequential: source after source.
- weighted: each draw picks a source with probability proportional to its weight, from a
  counter-based RNG keyed by (seed, epoch, draw index). A source that runs out restarts on its own
  (reshuffled), so shares match the weights at every scale; with `max_epochs` (the finite
  validation pass) it drops out instead.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from pdt.data.documents import DataSourceError, DocRef, Document, Source

MIX_MODES = ("round_robin", "sequential", "weighted")
_SPLIT_SALT = b"pdt-split-v1"  # changing it reshuffles which documents are held out: never do
_MIX_SALT = b"pdt-mix"


def is_validation(source_type: str, doc_id: str, fraction: float) -> bool:
    """True iff the document is held out: blake2b(source_type:doc_id) mapped to [0, 1) < fraction."""
    if fraction <= 0.0:
        return False
    digest = hashlib.blake2b(f"{source_type}:{doc_id}".encode(), digest_size=8, key=_SPLIT_SALT).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < fraction


def uniform(seed: int, epoch: int, draw: int) -> float:
    """A uniform number in [0, 1) from (seed, epoch, draw) alone: the mixer's whole RNG state is `draw`."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{draw}".encode(), digest_size=8, key=_MIX_SALT).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def permutation(count: int, groups: list[int] | None, seed: int, source: int, epoch: int) -> np.ndarray:
    """The shuffled order of one source in one epoch; grouped sources keep rows of a run together."""
    rng = np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, source, epoch, 0x6D6978])
    if not groups:
        return rng.permutation(count)
    starts = np.cumsum([0] + groups[:-1])
    parts = [starts[g] + rng.permutation(groups[g]) for g in rng.permutation(len(groups))]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class Mixer:
    """The global document order over opened sources (both splits, every shard walks the same)."""

    def __init__(
        self, sources: list[Source], mode: str, seed: int, shuffle: bool, max_epochs: int | None = None
    ) -> None:
        if mode not in MIX_MODES:
            raise DataSourceError(f"unknown mix mode {mode!r} (known: {', '.join(MIX_MODES)})")
        self.sources, self.mode, self.seed, self.shuffle = sources, mode, seed, shuffle
        self.max_epochs = max_epochs
        self._orders: dict[int, tuple[int, np.ndarray]] = {}
        self._empty_epochs = 0
        self.reset()

    def reset(self) -> None:
        n = len(self.sources)
        self.epoch, self.draw, self.turn, self.ended = 0, 0, 0, False
        self.pos, self.src_epoch = [0] * n, [0] * n
        self.done, self.passes = [False] * n, [0] * n
        self._yielded = False

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "draw": self.draw,
            "turn": self.turn,
            "ended": self.ended,
            "pos": list(self.pos),
            "src_epoch": list(self.src_epoch),
            "done": list(self.done),
            "passes": list(self.passes),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["pos"]) != len(self.sources):
            raise DataSourceError(
                f"data cursor has {len(state['pos'])} sources, the preset opens {len(self.sources)}"
            )
        self.epoch, self.draw, self.turn = int(state["epoch"]), int(state["draw"]), int(state["turn"])
        self.ended = bool(state["ended"])
        self.pos = [int(x) for x in state["pos"]]
        self.src_epoch = [int(x) for x in state["src_epoch"]]
        self.done = [bool(x) for x in state["done"]]
        self.passes = [int(x) for x in state["passes"]]

    # ----------------------------------------------------------------- one source
    def _order(self, i: int) -> np.ndarray | None:
        count = self.sources[i].count()
        if not self.shuffle or count is None:
            return None
        cached = self._orders.get(i)
        if cached is None or cached[0] != self.src_epoch[i]:
            order = permutation(count, self.sources[i].groups(), self.seed, i, self.src_epoch[i])
            cached = self._orders[i] = (self.src_epoch[i], order)
        return cached[1]

    def _take(self, i: int) -> DocRef | None:
        """The next document of source i in its current epoch's order, or None when it is exhausted."""
        source, pos = self.sources[i], self.pos[i]
        count = source.count()
        if count is not None and pos >= count:
            return None
        order = self._order(i)
        ref = source.ref(int(order[pos]) if order is not None else pos)
        if ref is not None:
            self.pos[i] = pos + 1
        return ref

    def _finish(self, i: int) -> None:
        self.done[i] = True
        self.passes[i] += 1

    # ----------------------------------------------------------------- the modes
    def _next_round_robin(self) -> tuple[int, DocRef] | None:
        n = len(self.sources)
        for _ in range(n):
            i = self.turn
            self.turn = (i + 1) % n
            if not self.done[i]:
                ref = self._take(i)
                if ref is not None:
                    return i, ref
                self._finish(i)
        return None

    def _next_sequential(self) -> tuple[int, DocRef] | None:
        while self.turn < len(self.sources):
            ref = self._take(self.turn)
            if ref is not None:
                return self.turn, ref
            self._finish(self.turn)
            self.turn += 1
        return None

    def _next_weighted(self) -> tuple[int, DocRef] | None:
        while True:
            active = [i for i, done in enumerate(self.done) if not done]
            if not active:
                return None
            x = uniform(self.seed, self.epoch, self.draw) * sum(self.sources[i].weight for i in active)
            self.draw += 1
            i = active[-1]
            for j in active:
                x -= self.sources[j].weight
                if x < 0:
                    i = j
                    break
            ref = self._take(i)
            if ref is None:
                ref = self._wrap(i)
            if ref is not None:
                return i, ref

    def _wrap(self, i: int) -> DocRef | None:
        """Weighted mode: source i ran out; start its next pass (or drop it after max_epochs)."""
        self.passes[i] += 1
        self.src_epoch[i] += 1
        self.pos[i] = 0
        if self.max_epochs is not None and self.src_epoch[i] >= self.max_epochs:
            self.done[i] = True
            return None
        ref = self._take(i)
        if ref is None:  # an empty pass: the source has nothing left to give at all
            self.done[i] = True
        return ref

    def _new_epoch(self) -> None:
        self._empty_epochs = 0 if self._yielded else self._empty_epochs + 1
        if self._empty_epochs >= 2:  # a resume can land exactly on an epoch end, so allow one
            raise DataSourceError(
                "every source came back empty for a whole pass; " + ", ".join(s.label for s in self.sources)
            )
        n = len(self.sources)
        self.epoch += 1
        self.turn, self._yielded = 0, False
        self.pos, self.done, self.src_epoch = [0] * n, [False] * n, [self.epoch] * n

    def next(self) -> tuple[int, DocRef] | None:
        """(source index, ref) of the next document, or None when a finite stream has ended."""
        while not self.ended:
            if self.mode == "weighted":
                got = self._next_weighted()
            elif self.mode == "round_robin":
                got = self._next_round_robin()
            else:
                got = self._next_sequential()
            if got is not None:
                self._yielded = True
                return got
            if self.mode == "weighted" or (self.max_epochs is not None and self.epoch + 1 >= self.max_epochs):
                self.ended = True
            else:
                self._new_epoch()
        return None


class DocStream:
    """One split's documents for one shard: the mixer's order, filtered by split, dealt by index.

    The k-th document of the split (counted over the global order, across epochs) belongs to
    shard k % n_shards, so shards are disjoint and together cover the split; only the shard's own
    documents have their text read.
    """

    def __init__(self, mixer: Mixer, split: str, fraction: float, shard: int = 0, n_shards: int = 1) -> None:
        if split not in ("train", "validation"):
            raise ValueError(f"split must be train or validation, not {split!r}")
        if not 0 <= shard < n_shards:
            raise ValueError(f"shard {shard} is outside 0..{n_shards - 1}")
        self.mixer, self.split, self.fraction = mixer, split, fraction
        self.shard, self.n_shards = shard, n_shards
        self.seen = 0
        self.mark = list(mixer.passes)

    def state_dict(self) -> dict[str, Any]:
        return {"mix": self.mixer.state_dict(), "seen": self.seen, "mark": list(self.mark)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mixer.load_state_dict(state["mix"])
        self.seen = int(state["seen"])
        self.mark = [int(x) for x in state["mark"]]

    def restart(self) -> None:
        """Back to the very first document (the validation pass is read again from the start)."""
        self.mixer.reset()
        self.seen = 0
        self.mark = list(self.mixer.passes)

    def _starved(self) -> bool:
        """Every source has been through two whole passes without one document for this shard."""
        passes = zip(self.mixer.passes, self.mark, strict=True)
        return self.mixer.max_epochs is None and all(p - m >= 2 for p, m in passes)

    def next(self) -> Document | None:
        """The shard's next document, or None at the end of a finite stream."""
        want_validation = self.split == "validation"
        while True:
            if self._starved():
                raise DataSourceError(
                    f"shard {self.shard} of {self.n_shards} found no readable {self.split} documents in two "
                    f"full passes over the sources ({self.seen} {self.split} documents seen in all); "
                    "add text, lower validation_fraction, or use fewer ranks / data workers"
                )
            got = self.mixer.next()
            if got is None:
                if self.mixer.max_epochs is None:
                    raise DataSourceError(
                        "every source stopped giving documents: "
                        + ", ".join(s.label for s in self.mixer.sources)
                    )
                return None
            i, ref = got
            source = self.mixer.sources[i]
            if is_validation(source.type, ref.id, self.fraction) != want_validation:
                continue
            k = self.seen
            self.seen += 1
            if k % self.n_shards == self.shard:
                doc = source.load(ref)
                if doc is not None:
                    self.mark = list(self.mixer.passes)
                    return doc
