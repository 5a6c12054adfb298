"""The Dynamic Notes Bus at decode time: a versioned store of notes and the windows read from it.

What it is: per prompt, the store of note vectors (size d_n) that K streams commit at the end of
each round, tagged (producer stream, round, version), plus snapshot 0 (the plan note), and the
batched, fixed-shape windows (`WindowBatch`) the model reads at every decode step.
What it is not: the decode loop (who commits when, rollback, readiness — `pdt.infer`), the
teacher-forced windows (`pdt.bus.teacher`, same rule, vectorised over positions) or the
attention over a window (`pdt.model.sidecars.snc`). Embeddings only: no text crosses streams.

Visibility rule (SPEC §2 "DNB", §2b.4, §2b.7 — `pdt.bus.teacher` applies exactly the same):
rounds are 0-based; round v is the v-th block of τ tokens; a note tagged round r is committed at
the end of round r. The window of reader stream k while it decodes round v holds

1. snapshot 0 (producer id K, the reserved plan producer; round 0) — always;
2. for each producer j that k may read (`all_to_all`: every j; `triangular`: j <= k), the latest
   version of each committed note (j, r) with  r <= v - Δ  and  r < v  (a note exists only once
   its round has ended, so with Δ = 0 a note of round r is visible from round r + 1);
3. plus, for j = k, its own latest committed note (newest r < v) even when Δ hides it;
4. at most W notes per producer: the W newest rounds (own latest is the newest, always kept).

First round from which note (j, r) is in a window (before the budget W drops old ones):

    Δ | other streams read it from | its producer reads it from | reader at round v sees others' r <=
    0 | r + 1                      | r + 1                      | v - 1
    1 | r + 1                      | r + 1                      | v - 1
    2 | r + 2                      | r + 1 (own-latest rule)    | v - 2

e.g. Δ = 2, reader at round 3 sees others' rounds 0..1 and its own rounds 0..2 (newest W each).
The window is everything visible at that round, at every step — never only the unseen notes.
A re-commit of (stream, round) (a retry after rollback) replaces it and bumps its version; the
history is kept for manifests; provisional (proposed, uncommitted) notes are never visible.
Counterfactual controls (`pdt.bus.counterfactual`) apply on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pdt.bus.counterfactual import Counterfactual
from pdt.presets.schema import BusConfig


@dataclass(frozen=True)
class NoteRecord:
    """One commit in the store's history."""

    stream: int
    round: int
    version: int
    vector: torch.Tensor  # [d_n], kept as given (no detach: the caller owns autograd)
    committed_at_step: int | None = None
    forced: bool = False
    """Committed after `max_retries` rollbacks although readiness stayed below γ."""
    frozen: bool = False
    """Ignored by windows: its producer was frozen by the counterfactual when it was committed."""


@dataclass(frozen=True)
class WindowBatch:
    """Windows of R readers for one forward; W_max = 1 + K·W slots, padding masked."""

    notes: torch.Tensor  # [R, W_max, d_n] float, zeros in padding
    mask: torch.Tensor  # [R, W_max] bool, True = a real note
    producer: torch.Tensor  # [R, W_max] long; snapshot 0 = K; padding 0
    rounds: torch.Tensor  # [R, W_max] long; round tag clipped to max_rounds - 1; padding 0
    streams: torch.Tensor  # [R] long, the reader of each row
    reader_rounds: torch.Tensor  # [R] long, the round each row decodes

    @property
    def visible(self) -> torch.Tensor:
        """[R, W_max] bool: the name the model's sidecar context uses for `mask`."""
        return self.mask

    def pairs(self, row: int) -> list[tuple[int, int]]:
        """(producer, round) of the real notes of one row, in slot order."""
        keep = self.mask[row]
        return list(zip(self.producer[row][keep].tolist(), self.rounds[row][keep].tolist(), strict=True))


class NotesBus:
    """Versioned store of one prompt's notes; `windows()` builds what each stream reads."""

    def __init__(
        self,
        num_streams: int,
        d_notes: int,
        cfg: BusConfig,
        max_rounds: int,
        counterfactual: Counterfactual | None = None,
    ) -> None:
        if num_streams < 1 or d_notes < 1 or max_rounds < 1:
            raise ValueError(
                f"need K >= 1, d_n >= 1, max_rounds >= 1; got {num_streams}, {d_notes}, {max_rounds}"
            )
        self.num_streams = num_streams
        self.d_notes = d_notes
        self.cfg = cfg
        self.max_rounds = max_rounds
        self.counterfactual = Counterfactual()
        self.snapshot0: torch.Tensor | None = None
        self.snapshot0_version = -1
        self._latest: dict[tuple[int, int], NoteRecord] = {}  # (stream, round) -> newest version
        self._history: list[NoteRecord] = []
        self._provisional: dict[tuple[int, int], torch.Tensor] = {}
        self._cache: dict[tuple[tuple[int, ...], tuple[int, ...]], WindowBatch] = {}
        if counterfactual is not None:
            self.set_counterfactual(counterfactual)

    # ------------------------------------------------------------------ properties

    @property
    def plan_producer(self) -> int:
        """Producer id of snapshot 0: K, one past the streams."""
        return self.num_streams

    @property
    def width(self) -> int:
        """W_max = 1 + K·W: slots per window row, fixed for this bus so shapes never change."""
        return 1 + self.num_streams * self.cfg.window

    @property
    def history(self) -> tuple[NoteRecord, ...]:
        """Every commit, in order, every version (frozen ones included)."""
        return tuple(self._history)

    # ------------------------------------------------------------------ writing

    def set_snapshot0(self, vector: torch.Tensor) -> None:
        """Set (or re-set, bumping its version) snapshot 0, the plan note: one vector [d_n] every
        stream reads, or one per stream [K, d_n] (stream k reads row k: its own plan)."""
        if vector.dim() == 2:
            if vector.shape[0] != self.num_streams:
                k, got = self.num_streams, tuple(vector.shape)
                raise ValueError(f"snapshot 0 per stream is [K={k}, d_n], got {got}")
            self.snapshot0 = torch.stack([self._check_vector(v) for v in vector])
        else:
            self.snapshot0 = self._check_vector(vector)
        self.snapshot0_version += 1
        self._cache.clear()

    def set_counterfactual(self, counterfactual: Counterfactual) -> None:
        """Apply a counterfactual to every later window (validated against K)."""
        counterfactual.validate(self.num_streams)
        self.counterfactual = counterfactual
        self._cache.clear()

    def propose(self, stream: int, round_: int, vector: torch.Tensor) -> None:
        """Record a provisional note (the speculation head's output): invisible until committed."""
        self._check_key(stream, round_)
        self._provisional[(stream, round_)] = self._check_vector(vector)

    def discard(self, stream: int, round_: int) -> None:
        """Drop a provisional note (the block was rolled back)."""
        self._provisional.pop((stream, round_), None)

    def commit(
        self,
        stream: int,
        round_: int,
        vector: torch.Tensor | None = None,
        *,
        step: int | None = None,
        forced: bool = False,
    ) -> NoteRecord:
        """Commit the note of (stream, round_): `vector`, else the provisional one.

        A second commit of the same (stream, round_) replaces the first and bumps the version.
        """
        self._check_key(stream, round_)
        key = (stream, round_)
        if vector is None:
            if key not in self._provisional:
                raise KeyError(f"no vector given and no provisional note for stream {stream}, round {round_}")
            vector = self._provisional[key]
        vector = self._check_vector(vector)
        self._provisional.pop(key, None)
        previous = self._latest.get(key)
        frozen = self.counterfactual.is_frozen(stream, round_)
        record = NoteRecord(
            stream, round_, 0 if previous is None else previous.version + 1, vector, step, forced, frozen
        )
        self._latest[key] = record
        self._history.append(record)
        self._cache.clear()
        return record

    def latest(self, stream: int, round_: int) -> NoteRecord | None:
        """The committed (newest) version of (stream, round_), or None."""
        return self._latest.get((stream, round_))

    def _check_key(self, stream: int, round_: int) -> None:
        if not 0 <= stream < self.num_streams:
            raise ValueError(f"stream {stream} out of range 0..{self.num_streams - 1}")
        if round_ < 0:
            raise ValueError(f"round must be >= 0, got {round_}")

    def _check_vector(self, vector: torch.Tensor) -> torch.Tensor:
        if vector.shape != (self.d_notes,):
            raise ValueError(f"a note is a vector of shape ({self.d_notes},), got {tuple(vector.shape)}")
        return vector

    # ------------------------------------------------------------------ the rule

    def _rounds_of(self, producer: int) -> list[int]:
        """Committed, non-frozen rounds of `producer`, ascending."""
        cf = self.counterfactual
        return sorted(r for (j, r) in self._latest if j == producer and not cf.is_frozen(j, r))

    def _content_round(self, source_rounds: list[int], round_: int) -> int | None:
        """Newest round <= round_ in `source_rounds` (the content a permuted slot shows)."""
        older = [r for r in source_rounds if r <= round_]
        return older[-1] if older else None

    def visible_pairs(self, stream: int, round_: int) -> list[tuple[int, int]]:
        """(producer, round) of every note in the window of `stream` at round `round_`, in slot order."""
        self._check_key(stream, round_)
        cf = self.counterfactual
        if stream in cf.ablate:
            return []
        lag = cf.lag_for(stream, self.cfg.lag)
        perm = cf.permutation(self.num_streams)
        readable = range(self.num_streams) if self.cfg.topology == "all_to_all" else range(stream + 1)
        pairs = [(self.plan_producer, 0)]
        for j in readable:
            source = self._rounds_of(perm[j])
            rounds = [r for r in self._rounds_of(j) if self._content_round(source, r) is not None]
            seen = [r for r in rounds if r <= round_ - lag and r < round_]
            own = [r for r in rounds if r < round_]
            if j == stream and own and own[-1] not in seen:
                seen.append(own[-1])  # the own latest is newer than every lag-visible own note
            pairs += [(j, r) for r in seen[-self.cfg.window :]]
        return pairs

    def _vector_of(self, producer: int, round_: int, perm: list[int], reader: int) -> torch.Tensor:
        """The vector slot (producer, round_) shows `reader`: perm[producer]'s newest note of round
        <= round_, or snapshot 0 (the reader's own row when there is one per stream)."""
        if producer == self.plan_producer:
            assert self.snapshot0 is not None
            return self.snapshot0 if self.snapshot0.dim() == 1 else self.snapshot0[reader]
        source = perm[producer]
        content_round = self._content_round(self._rounds_of(source), round_)
        assert content_round is not None  # visible_pairs only lists slots with content
        return self._latest[(source, content_round)].vector

    # ------------------------------------------------------------------ windows

    def windows(self, streams: list[int], round_: int | list[int]) -> WindowBatch:
        """Fixed-shape windows [R, W_max] for readers `streams` at their round(s)."""
        if self.snapshot0 is None:
            raise RuntimeError("snapshot 0 is not set: call set_snapshot0() (planner or seeds) first")
        rounds = list(round_) if isinstance(round_, list | tuple) else [int(round_)] * len(streams)
        if len(rounds) != len(streams):
            raise ValueError(f"{len(streams)} streams but {len(rounds)} rounds")
        key = (tuple(streams), tuple(rounds))
        if key not in self._cache:  # windows change only on commits: reuse them every step of a round
            self._cache[key] = self._build(streams, rounds)
        return self._cache[key]

    def _build(self, streams: list[int], rounds: list[int]) -> WindowBatch:
        assert self.snapshot0 is not None
        device, dtype = self.snapshot0.device, self.snapshot0.dtype
        n_rows, width = len(streams), self.width
        mask = torch.zeros(n_rows, width, dtype=torch.bool)
        producer = torch.zeros(n_rows, width, dtype=torch.long)
        tags = torch.zeros(n_rows, width, dtype=torch.long)
        perm = self.counterfactual.permutation(self.num_streams)
        vectors: list[torch.Tensor] = []
        for row, (stream, round_) in enumerate(zip(streams, rounds, strict=True)):
            for slot, (j, r) in enumerate(self.visible_pairs(stream, round_)):
                vectors.append(self._vector_of(j, r, perm, stream).to(device=device, dtype=dtype))
                mask[row, slot] = True
                producer[row, slot] = j
                tags[row, slot] = min(r, self.max_rounds - 1)
        flat = torch.zeros(n_rows * width, self.d_notes, device=device, dtype=dtype)  # [R·W_max, d_n]
        if vectors:  # one scatter instead of a device write per slot
            slots = mask.flatten().nonzero().squeeze(1).to(device)  # [R, W_max] -> [R·W_max] -> [n_real]
            flat = flat.index_put((slots,), torch.stack(vectors))  # [n_real, d_n] into [R·W_max, d_n]
        return WindowBatch(
            notes=flat.view(n_rows, width, self.d_notes),  # [R·W_max, d_n] -> [R, W_max, d_n]
            mask=mask.to(device),
            producer=producer.to(device),
            rounds=tags.to(device),
            streams=torch.tensor(streams, dtype=torch.long, device=device),
            reader_rounds=torch.tensor(rounds, dtype=torch.long, device=device),
        )

    # ------------------------------------------------------------------ reporting

    def visible_from_round(self, round_: int) -> int:
        """First round at which another stream reads a note of round `round_` (no stale extra)."""
        return round_ + max(self.cfg.lag, 1)

    def timeline(self) -> list[dict[str, Any]]:
        """Every commit, JSON-able, for the TUI timeline and run manifests."""
        return [
            {
                "stream": rec.stream,
                "round": rec.round,
                "version": rec.version,
                "committed_at_step": rec.committed_at_step,
                "visible_from_round": self.visible_from_round(rec.round),
                "forced": rec.forced,
                "frozen": rec.frozen,
            }
            for rec in self._history
        ]

    def snapshot_versions(self) -> dict[int, dict[int, int]]:
        """Per stream: round -> its latest committed version (every stream present, maybe empty)."""
        out: dict[int, dict[int, int]] = {k: {} for k in range(self.num_streams)}
        for (stream, round_), rec in sorted(self._latest.items()):
            out[stream][round_] = rec.version
        return out
