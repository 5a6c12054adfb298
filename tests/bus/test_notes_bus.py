"""Decode-time bus: lag, budget W, topology, versioning, self-note, snapshot 0, fixed-shape windows.

Each note vector encodes its tags — [producer, round, version, 1] — so a test can read back exactly
which commit a window slot shows.
"""

from __future__ import annotations

import json

import pytest
import torch

from pdt.bus import Counterfactual, NotesBus, WindowBatch
from pdt.presets.schema import BusConfig

D = 4
SNAPSHOT = torch.tensor([-1.0, -1.0, -1.0, -1.0])


def vec(stream: int, round_: int, version: int = 0) -> torch.Tensor:
    return torch.tensor([float(stream), float(round_), float(version), 1.0])


def make_bus(
    k: int, lag: int, window: int, rounds: int, topology: str = "all_to_all", max_rounds: int = 64
) -> NotesBus:
    """A bus where every stream committed rounds 0..rounds-1."""
    bus = NotesBus(k, D, BusConfig(lag=lag, window=window, topology=topology), max_rounds)
    bus.set_snapshot0(SNAPSHOT)
    for r in range(rounds):
        for s in range(k):
            bus.commit(s, r, vec(s, r), step=10 * r + s)
    return bus


def rounds_of(bus: NotesBus, reader: int, round_: int, producer: int) -> list[int]:
    return [r for j, r in bus.visible_pairs(reader, round_) if j == producer]


# Δ -> {reader round v: rounds of ANOTHER stream's notes in the window} (W large enough to keep all)
LAG_TABLE = {
    0: {0: [], 1: [0], 2: [0, 1], 3: [0, 1, 2], 4: [0, 1, 2, 3]},
    1: {0: [], 1: [0], 2: [0, 1], 3: [0, 1, 2], 4: [0, 1, 2, 3]},
    2: {0: [], 1: [], 2: [0], 3: [0, 1], 4: [0, 1, 2]},
}


@pytest.mark.parametrize("lag", [0, 1, 2])
@pytest.mark.parametrize("v", [0, 1, 2, 3, 4])
def test_lag_table_other_streams(lag: int, v: int) -> None:
    bus = make_bus(k=2, lag=lag, window=8, rounds=6)
    assert rounds_of(bus, reader=0, round_=v, producer=1) == LAG_TABLE[lag][v]


# Δ = 2: the reader's own notes: lag-visible ones plus its latest (r = v - 1), which Δ alone would hide
@pytest.mark.parametrize(("v", "own"), [(0, []), (1, [0]), (2, [0, 1]), (3, [0, 1, 2]), (5, [0, 1, 2, 3, 4])])
def test_self_note_visible_despite_lag(v: int, own: list[int]) -> None:
    bus = make_bus(k=2, lag=2, window=8, rounds=6)
    assert rounds_of(bus, reader=1, round_=v, producer=1) == own
    assert rounds_of(bus, reader=1, round_=v, producer=0) == LAG_TABLE[2].get(v, [0, 1, 2, 3])


def test_self_latest_counts_in_budget() -> None:
    # Δ = 2, W = 2 at round 4: own lag-visible {0, 1, 2} + latest 3 -> newest two {2, 3}; others {1, 2}.
    bus = make_bus(k=2, lag=2, window=2, rounds=6)
    assert rounds_of(bus, 0, 4, 0) == [2, 3]
    assert rounds_of(bus, 0, 4, 1) == [1, 2]


def test_self_latest_when_own_stream_has_a_gap() -> None:
    # Stream 0 committed only round 0; at round 4 with Δ = 2 that is both lag-visible and its latest.
    bus = NotesBus(2, D, BusConfig(lag=2, window=1), 8)
    bus.set_snapshot0(SNAPSHOT)
    bus.commit(0, 0, vec(0, 0))
    bus.commit(1, 3, vec(1, 3))
    assert bus.visible_pairs(0, 4) == [(2, 0), (0, 0)]
    assert bus.visible_pairs(1, 4) == [(2, 0), (0, 0), (1, 3)]


@pytest.mark.parametrize(("window", "kept"), [(1, [4]), (2, [3, 4]), (3, [2, 3, 4]), (8, [0, 1, 2, 3, 4])])
def test_budget_keeps_the_w_newest(window: int, kept: list[int]) -> None:
    bus = make_bus(k=3, lag=0, window=window, rounds=5)
    for producer in range(3):
        assert rounds_of(bus, reader=1, round_=5, producer=producer) == kept


@pytest.mark.parametrize(
    ("topology", "reader", "producers"),
    [
        ("triangular", 0, {0}),
        ("triangular", 1, {0, 1}),
        ("triangular", 2, {0, 1, 2}),
        ("all_to_all", 0, {0, 1, 2}),
        ("all_to_all", 2, {0, 1, 2}),
    ],
)
def test_topology(topology: str, reader: int, producers: set[int]) -> None:
    bus = make_bus(k=3, lag=0, window=2, rounds=3, topology=topology)
    pairs = bus.visible_pairs(reader, 3)
    assert pairs[0] == (3, 0)  # snapshot 0 (producer id K = 3) first
    assert {j for j, _ in pairs[1:]} == producers


@pytest.mark.parametrize("lag", [0, 1, 2])
def test_snapshot0_always_first_and_visible(lag: int) -> None:
    bus = make_bus(k=3, lag=lag, window=2, rounds=4, topology="triangular")
    for reader in range(3):
        for v in range(7):
            w = bus.windows([reader], v)
            assert bool(w.mask[0, 0]) and int(w.producer[0, 0]) == 3 and int(w.rounds[0, 0]) == 0
            torch.testing.assert_close(w.notes[0, 0], SNAPSHOT)


def test_windows_need_snapshot0() -> None:
    bus = NotesBus(2, D, BusConfig(), 8)
    with pytest.raises(RuntimeError, match="snapshot 0"):
        bus.windows([0], 0)


def test_recommit_replaces_and_keeps_history() -> None:
    bus = make_bus(k=2, lag=0, window=2, rounds=2)
    rec = bus.commit(1, 1, vec(1, 1, version=1), step=99, forced=True)
    assert rec.version == 1 and rec.forced
    w = bus.windows([0], 2)
    slot = w.pairs(0).index((1, 1))
    torch.testing.assert_close(w.notes[0, slot], vec(1, 1, version=1))  # the new version, once
    assert w.pairs(0).count((1, 1)) == 1
    versions = [(e["stream"], e["round"], e["version"]) for e in bus.timeline() if e["stream"] == 1]
    assert versions == [(1, 0, 0), (1, 1, 0), (1, 1, 1)]
    assert bus.snapshot_versions() == {0: {0: 0, 1: 0}, 1: {0: 0, 1: 1}}
    assert len(bus.history) == 5


def test_provisional_note_is_invisible_until_committed() -> None:
    bus = make_bus(k=2, lag=0, window=4, rounds=1)
    bus.propose(0, 1, vec(0, 1, version=7))
    assert (0, 1) not in bus.visible_pairs(1, 2) and (0, 1) not in bus.visible_pairs(0, 2)
    bus.discard(0, 1)  # rolled back
    with pytest.raises(KeyError, match="provisional"):
        bus.commit(0, 1)
    bus.propose(0, 1, vec(0, 1, version=8))
    bus.commit(0, 1)  # commits the provisional vector
    w = bus.windows([1], 2)
    torch.testing.assert_close(w.notes[0, w.pairs(0).index((0, 1))], vec(0, 1, version=8))


def test_window_is_everything_visible_not_read_once() -> None:
    bus = make_bus(k=2, lag=0, window=3, rounds=4)
    first, again = bus.windows([0, 1], 2), bus.windows([0, 1], 2)  # two steps of the same round
    assert first.pairs(0) == again.pairs(0) and first.pairs(1) == again.pairs(1)
    later = bus.windows([0, 1], 3)
    assert set(first.pairs(1)) <= set(later.pairs(1))  # round-2 notes are still read in round 3


def test_cache_invalidated_by_commit() -> None:
    bus = make_bus(k=2, lag=0, window=3, rounds=1)
    before = bus.windows([0], 2).pairs(0)
    bus.commit(1, 1, vec(1, 1))
    assert bus.windows([0], 2).pairs(0) == before + [(1, 1)]


def check_padding(w: WindowBatch) -> None:
    pad = ~w.mask
    assert torch.all(w.notes[pad] == 0)
    assert torch.all(w.producer[pad] == 0) and torch.all(w.rounds[pad] == 0)


@pytest.mark.parametrize("topology", ["all_to_all", "triangular"])
def test_window_batch_shapes_constant_and_padding_masked(topology: str) -> None:
    k, window = 3, 2
    bus = NotesBus(k, D, BusConfig(lag=1, window=window, topology=topology), 64)
    bus.set_snapshot0(SNAPSHOT)
    shapes = set()
    for v in range(6):
        w = bus.windows([0, 1, 2], v)
        shapes.add(
            (tuple(w.notes.shape), tuple(w.mask.shape), tuple(w.producer.shape), tuple(w.rounds.shape))
        )
        check_padding(w)
        assert w.mask.sum().item() == sum(len(bus.visible_pairs(s, v)) for s in range(k))
        assert w.visible is w.mask and w.mask.dtype == torch.bool and w.producer.dtype == torch.long
        for s in range(k):
            bus.commit(s, v, vec(s, v))
    assert shapes == {((3, 1 + k * window, D), (3, 7), (3, 7), (3, 7))}


def test_slot_order_and_vectors() -> None:
    bus = make_bus(k=3, lag=1, window=2, rounds=4)
    w = bus.windows([1], 4)
    assert w.pairs(0) == [(3, 0), (0, 2), (0, 3), (1, 2), (1, 3), (2, 2), (2, 3)]
    for slot, (j, r) in enumerate(w.pairs(0)[1:], start=1):
        torch.testing.assert_close(w.notes[0, slot], vec(j, r))


def test_per_row_rounds_and_round_clipping() -> None:
    bus = make_bus(k=2, lag=0, window=8, rounds=6, max_rounds=3)
    w = bus.windows([0, 1], [1, 6])
    assert w.reader_rounds.tolist() == [1, 6] and w.streams.tolist() == [0, 1]
    assert int(w.mask[0].sum()) == 1 + 2  # snapshot + round 0 of both streams
    assert int(w.rounds[1].max()) == 2  # round tags 3..5 clipped to max_rounds - 1


def masked_attend(query: torch.Tensor, w: WindowBatch) -> torch.Tensor:
    """A consumer that survives an all-masked row: zero contribution, never a softmax over -inf."""
    scores = torch.einsum("rd,rnd->rn", query, w.notes).masked_fill(~w.mask, float("-inf"))
    any_note = w.mask.any(dim=-1, keepdim=True)
    probs = torch.where(any_note, scores, torch.zeros_like(scores)).softmax(dim=-1) * w.mask
    return torch.einsum("rn,rnd->rd", probs, w.notes)


def test_all_masked_row_gives_zero_not_nan() -> None:
    bus = make_bus(k=2, lag=0, window=2, rounds=2)
    bus.set_counterfactual(Counterfactual(ablate={1}))
    w = bus.windows([0, 1], 2)
    assert not w.mask[1].any() and w.mask[0].all()  # reader 0 keeps its full window
    check_padding(w)
    out = masked_attend(torch.ones(2, D), w)
    assert torch.isfinite(out).all() and torch.all(out[1] == 0) and out[0].abs().sum() > 0


def test_timeline_is_json_and_says_when_visible() -> None:
    bus = make_bus(k=2, lag=2, window=2, rounds=2)
    line = json.loads(json.dumps(bus.timeline()))
    first = line[0]
    assert first == {
        "stream": 0,
        "round": 0,
        "version": 0,
        "committed_at_step": 0,
        "visible_from_round": 2,
        "forced": False,
        "frozen": False,
    }
    assert NotesBus(1, D, BusConfig(lag=0), 4).visible_from_round(3) == 4  # never before the round ends
    json.dumps(bus.snapshot_versions())


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda b: b.commit(2, 0, vec(2, 0)), "stream 2 out of range"),
        (lambda b: b.commit(0, -1, vec(0, 0)), "round must be >= 0"),
        (lambda b: b.commit(0, 0, torch.zeros(3)), "shape"),
        (lambda b: b.windows([0, 1], [0]), "2 streams but 1 rounds"),
    ],
)
def test_bad_input_is_refused(call, error: str) -> None:
    bus = make_bus(k=2, lag=0, window=2, rounds=0)
    with pytest.raises(ValueError, match=error):
        call(bus)


def test_a_snapshot_0_per_stream_is_read_by_its_own_stream_only() -> None:
    """set_snapshot0 with [K, d_n]: every reader's snapshot slot holds its own row (the decoder's
    `own_snapshot0`); the other slots are unchanged, and a shape that is not K rows is refused."""
    bus = make_bus(k=3, lag=1, window=2, rounds=2)
    shared = bus.windows([0, 1, 2], 2)
    own = torch.stack([torch.full((D,), -10.0 - s) for s in range(3)])  # [K, d_n]
    version = bus.snapshot0_version
    bus.set_snapshot0(own)
    assert bus.snapshot0_version == version + 1
    win = bus.windows([2, 0, 1], 2)  # rows in another order: each row is its reader's
    for row, reader in enumerate([2, 0, 1]):
        assert torch.equal(win.notes[row, 0], own[reader])
        assert win.pairs(row)[0] == (bus.plan_producer, 0)
        assert torch.equal(win.notes[row, 1:], shared.notes[reader, 1:])  # the notes as before
    with pytest.raises(ValueError, match=r"\[K=3, d_n\]"):
        bus.set_snapshot0(own[:2])
