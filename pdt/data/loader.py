"""Train and eval batches: shards, worker processes and an exact, JSON-serialisable data cursor.

What it is: `make_train_batches` (an infinite iterator of LongTensor [B, seq_len + 1] with
`state_dict()` / `load_state_dict()`) and `make_eval_batches` (a fixed list of validation
batches). A shard is (rank, world_size, worker_id, num_workers): the split's documents are dealt
round-robin to the `world_size * num_workers` shards. With `num_workers > 0` each DataLoader
worker is one shard and sends its shard's cursor with every batch; the main process keeps the
latest cursor per shard and which shard comes next, and on resume rotates the worker -> shard
assignment (a DataLoader always starts with worker 0), so a resumed run continues batch for batch.
What it is not: reading sources (`pdt.data.sources`), mixing (`pdt.data.mixing`) or packing
(`pdt.data.packing`) — and not a training loop.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pdt.data.documents import Source
from pdt.data.mixing import DocStream, Mixer
from pdt.data.packing import CyclingDocs, Packer
from pdt.data.sources import open_sources
from pdt.presets.schema import DataConfig

CURSOR_VERSION = 1
Warn = Callable[[str], None]


@dataclass
class _Plan:
    """Everything a shard needs to build its stream (inherited by forked DataLoader workers)."""

    data: DataConfig
    tokenizer: Any
    sources: list[Source]
    seq_len: int
    batch_size: int
    seed: int
    rank: int
    world_size: int
    max_epochs: int | None

    @property
    def n_local(self) -> int:
        return max(1, self.data.num_workers)

    def shard(self, local: int) -> int:
        return self.rank * self.n_local + local

    def layout(self) -> dict[str, Any]:
        """What a cursor is only valid for (the batch size is not: cursors count tokens)."""
        return {
            "rank": self.rank,
            "n_shards": self.world_size * self.n_local,
            "workers": self.n_local,
            "mix": self.data.mix,
            "shuffle": self.data.shuffle,
            "seed": self.seed,
            "validation_fraction": self.data.validation_fraction,
            "seq_len": self.seq_len,
            "sources": [s.label for s in self.sources],
        }


class _ShardStream:
    """One shard's train stream: documents of the train split -> packed batches."""

    def __init__(self, plan: _Plan, local: int, state: dict[str, Any] | None) -> None:
        cfg = plan.data
        mixer = Mixer(plan.sources, cfg.mix, plan.seed, cfg.shuffle, plan.max_epochs)
        docs = DocStream(
            mixer, "train", cfg.validation_fraction, plan.shard(local), plan.world_size * plan.n_local
        )
        self.packer = Packer(docs, plan.tokenizer, plan.seq_len + 1)
        self.batch_size = plan.batch_size
        self.sources = plan.sources
        self._told = [len(s.warnings) for s in plan.sources]
        if state is not None:
            self.packer.load_state_dict(state)

    def next_batch(self) -> np.ndarray | None:
        return self.packer.blocks(self.batch_size)  # [B, T+1]

    def state_dict(self) -> dict[str, Any]:
        return self.packer.state_dict()

    def new_warnings(self) -> list[str]:
        out: list[str] = []
        for i, source in enumerate(self.sources):
            out.extend(source.warnings[self._told[i] :])
            self._told[i] = len(source.warnings)
        return out


class _WorkerBatches(torch.utils.data.IterableDataset):
    """DataLoader side: worker w serves local shard (w + offset) % num_workers."""

    def __init__(self, plan: _Plan, states: dict[int, dict[str, Any]], offset: int) -> None:
        super().__init__()
        self.plan, self.states, self.offset = plan, states, offset

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, str, list[str]]]:
        info = torch.utils.data.get_worker_info()
        if info is None:
            raise RuntimeError("_WorkerBatches runs only inside DataLoader workers")
        for source in self.plan.sources:
            source.reset_caches()  # file handles inherited through fork share their offsets
        local = (info.id + self.offset) % info.num_workers
        stream = _ShardStream(self.plan, local, self.states.get(local))
        while (batch := stream.next_batch()) is not None:
            # The cursor travels as JSON text so DataLoader's conversion leaves it untouched.
            yield (
                torch.from_numpy(batch.astype(np.int64)),
                local,
                json.dumps(stream.state_dict()),
                stream.new_warnings(),
            )


class TrainBatches:
    """Iterator of LongTensor [batch_size, seq_len + 1]; `state_dict()` is the cursor after the
    last batch returned, so a checkpoint after step N resumes with batch N + 1."""

    def __init__(self, plan: _Plan, state: dict[str, Any] | None, warn: Warn | None) -> None:
        self.plan, self._warn = plan, warn
        self.tokens_per_batch = plan.batch_size * (plan.seq_len + 1)
        self._iter: Iterator[Any] | None = None
        self._stream: _ShardStream | None = None
        self.load_state_dict(state)

    def _accept(self, state: dict[str, Any] | None) -> tuple[dict[int, dict[str, Any]], int]:
        """(cursor per local shard, next local shard) from a saved cursor, or a fresh start."""
        if not state:
            return {}, 0
        layout = self.plan.layout()
        saved = state.get("layout", {}) if state.get("version") == CURSOR_VERSION else {}
        changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in layout.items() if saved.get(k) != v]
        if changed:
            if self._warn is not None:
                self._warn(
                    "the saved data cursor does not fit this run ("
                    + "; ".join(changed)
                    + "): the data order restarts from the beginning"
                )
            return {}, 0
        first = self.plan.shard(0)
        states = {int(k) - first: v for k, v in state["shards"].items()}
        return states, int(state.get("next", 0))

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.close()
        self._states, self._next = self._accept(state)
        if self.plan.data.num_workers == 0:
            self._stream = _ShardStream(self.plan, 0, self._states.get(0))

    def state_dict(self) -> dict[str, Any]:
        if self._stream is not None:
            self._states = {0: self._stream.state_dict()}
        shards = {str(self.plan.shard(local)): s for local, s in sorted(self._states.items())}
        return {"version": CURSOR_VERSION, "layout": self.plan.layout(), "shards": shards, "next": self._next}

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> torch.Tensor:
        if self._stream is not None:
            batch = self._stream.next_batch()
            self._tell(self._stream.new_warnings())
            if batch is None:
                raise StopIteration
            return torch.from_numpy(batch.astype(np.int64))  # [B, T+1]
        if self._iter is None:
            self._iter = iter(self._data_loader())
        tensor, local, cursor, warnings = next(self._iter)
        self._states[int(local)] = json.loads(cursor)
        self._next = (int(local) + 1) % self.plan.n_local
        self._tell(warnings)
        return tensor

    def _data_loader(self) -> torch.utils.data.DataLoader:
        dataset = _WorkerBatches(self.plan, dict(self._states), self._next)
        # batch_size=None: workers yield whole batches; DataLoader serves workers strictly in turn.
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.plan.data.num_workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4,
        )

    def _tell(self, warnings: list[str]) -> None:
        if self._warn is not None:
            for message in warnings:
                self._warn(message)

    def close(self) -> None:
        """Stop the worker processes (a later `next` starts them again from the cursor)."""
        if self._iter is not None:
            shutdown = getattr(self._iter, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self._iter = None


def make_train_batches(
    data_cfg: DataConfig,
    tokenizer: Any,
    seq_len: int,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    state: dict[str, Any] | None = None,
    warn: Warn | None = None,
    *,
    max_epochs: int | None = None,
) -> TrainBatches:
    """This rank's infinite stream of train batches (finite with `max_epochs`, e.g. for tests)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    sources = open_sources(list(data_cfg.sources), warn)
    if warn is not None:
        for source in sources:
            for message in source.warnings:
                warn(message)
    plan = _Plan(data_cfg, tokenizer, sources, seq_len, batch_size, seed, rank, world_size, max_epochs)
    return TrainBatches(plan, state, warn)


def make_eval_batches(
    data_cfg: DataConfig,
    tokenizer: Any,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    rank: int = 0,
    world_size: int = 1,
) -> list[torch.Tensor]:
    """The first `max_batches` validation batches of this rank's shard — the same every call.

    Every rank returns the same number of batches (so collective ops line up): a shard with too
    little validation text reads it again from the start, and a shard with none reads the whole
    validation split. No validation documents at all -> [] on every rank.
    """
    sources = open_sources(list(data_cfg.sources), None, "validation text")
    for shard, n_shards in ((rank, world_size), (0, 1)):
        mixer = Mixer(sources, data_cfg.mix, seed=0, shuffle=False, max_epochs=1)
        docs = CyclingDocs(DocStream(mixer, "validation", data_cfg.validation_fraction, shard, n_shards))
        packer = Packer(docs, tokenizer, seq_len + 1)
        batches: list[torch.Tensor] = []
        while len(batches) < max_batches and (block := packer.blocks(batch_size)) is not None:
            batches.append(torch.from_numpy(block.astype(np.int64)))  # [B, T+1]
        if batches:
            return batches
    return []
