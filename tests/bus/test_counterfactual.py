"""Counterfactual controls (ablate, freeze, swap, stale, shuffle) on the bus and in teacher forcing."""

from __future__ import annotations

import json

import pytest
import torch

from pdt.bus import Counterfactual, CounterfactualError, NotesBus, TeacherWindow, derangement, teacher_windows
from pdt.presets.schema import BusConfig
from tests.bus.test_notes_bus import SNAPSHOT, make_bus, rounds_of, vec


def slot_vector(bus: NotesBus, reader: int, round_: int, pair: tuple[int, int]) -> torch.Tensor:
    w = bus.windows([reader], round_)
    return w.notes[0, w.pairs(0).index(pair)]


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"swap": (1, 1)}, "with itself"),
        ({"swap": (0, 1), "shuffle": 3}, "not both"),
        ({"stale": {0: -1}}, "extra lag must be >= 0"),
        ({"freeze_round": -2}, "freeze_round"),
        ({"ablate": ["x"]}, "stream ids"),
    ],
)
def test_invalid_counterfactual_refused_at_construction(kwargs: dict, error: str) -> None:
    with pytest.raises(CounterfactualError, match=error):
        Counterfactual(**kwargs)


@pytest.mark.parametrize(
    ("cf", "field"),
    [
        (Counterfactual(ablate={3}), "ablate"),
        (Counterfactual(freeze={-1}), "freeze"),
        (Counterfactual(stale={5: 1}), "stale"),
        (Counterfactual(swap=(0, 3)), "swap"),
    ],
)
def test_stream_ids_out_of_range(cf: Counterfactual, field: str) -> None:
    bus = make_bus(k=3, lag=0, window=1, rounds=0)
    with pytest.raises(
        CounterfactualError, match=rf"{field}: stream id\(s\) .* out of range; this bus has K = 3"
    ):
        bus.set_counterfactual(cf)
    notes = torch.zeros(1, 3, 2, 4)
    with pytest.raises(CounterfactualError, match=field):
        teacher_windows(
            torch.zeros(1, 4),
            notes,
            torch.ones(1, 3, 2, dtype=torch.bool),
            torch.zeros(3, 5, dtype=torch.long),
            BusConfig(),
            8,
            counterfactual=cf,
        )


def test_default_changes_nothing_and_is_json() -> None:
    assert Counterfactual().is_identity
    cf = Counterfactual(ablate=[2, 0], freeze={1}, freeze_round=2, stale={1: 3}, shuffle=5)
    assert not cf.is_identity and cf.ablate == frozenset({0, 2})
    assert json.loads(json.dumps(cf.to_dict()))["stale"] == {"1": 3}
    plain, same = make_bus(3, 1, 2, 4), make_bus(3, 1, 2, 4)
    same.set_counterfactual(Counterfactual())
    for v in range(6):
        a, b = plain.windows([0, 1, 2], v), same.windows([0, 1, 2], v)
        assert torch.equal(a.notes, b.notes) and torch.equal(a.mask, b.mask)


# ---------------------------------------------------------------------- the controls


def test_ablate_empties_only_that_reader() -> None:
    bus = make_bus(k=3, lag=0, window=2, rounds=3)
    bus.set_counterfactual(Counterfactual(ablate={1}))
    w = bus.windows([0, 1, 2], 3)
    assert w.mask.sum(dim=1).tolist() == [7, 0, 7]  # reader 1: nothing, not even snapshot 0
    assert torch.all(w.notes[1] == 0)
    assert (1, 2) in w.pairs(0)  # its notes are still read by others


def test_freeze_ignores_later_commits() -> None:
    bus = NotesBus(
        3, 4, BusConfig(lag=0, window=3), 16, counterfactual=Counterfactual(freeze={1}, freeze_round=2)
    )
    bus.set_snapshot0(SNAPSHOT)
    for r in range(5):
        for s in range(3):
            bus.commit(s, r, vec(s, r))
    assert rounds_of(bus, reader=0, round_=5, producer=1) == [
        0,
        1,
    ]  # frozen at round 2: keeps its older notes
    assert rounds_of(bus, reader=0, round_=5, producer=2) == [2, 3, 4]
    assert rounds_of(bus, reader=1, round_=5, producer=1) == [0, 1]  # the frozen stream too
    frozen = [(e["stream"], e["round"]) for e in bus.timeline() if e["frozen"]]
    assert frozen == [(1, 2), (1, 3), (1, 4)]  # recorded, not lost
    bus.set_counterfactual(Counterfactual())
    assert rounds_of(bus, reader=0, round_=5, producer=1) == [2, 3, 4]  # control: unfrozen they show


def test_swap_exchanges_vectors_not_tags() -> None:
    plain = make_bus(k=3, lag=1, window=2, rounds=4)
    swapped = make_bus(k=3, lag=1, window=2, rounds=4)
    swapped.set_counterfactual(Counterfactual(swap=(0, 2)))
    for reader in range(3):
        a, b = plain.windows([reader], 4), swapped.windows([reader], 4)
        assert a.pairs(0) == b.pairs(0)  # same tags
        assert torch.equal(a.producer, b.producer) and torch.equal(a.rounds, b.rounds)
        for slot, (j, r) in enumerate(b.pairs(0)):
            want = SNAPSHOT if j == 3 else vec({0: 2, 2: 0}.get(j, j), r)
            torch.testing.assert_close(b.notes[0, slot], want)


def test_swap_falls_back_to_the_partners_newest_older_note() -> None:
    bus = NotesBus(2, 4, BusConfig(lag=0, window=4), 16, counterfactual=Counterfactual(swap=(0, 1)))
    bus.set_snapshot0(SNAPSHOT)
    for r in range(4):
        bus.commit(0, r, vec(0, r))
    bus.commit(1, 1, vec(1, 1))  # stream 1 wrote only round 1
    assert rounds_of(bus, 1, 4, 0) == [1, 2, 3]  # slot (0, 0) has no content: b had nothing by round 0
    torch.testing.assert_close(slot_vector(bus, 1, 4, (0, 3)), vec(1, 1))
    torch.testing.assert_close(slot_vector(bus, 1, 4, (1, 1)), vec(0, 1))


@pytest.mark.parametrize(("reader", "others"), [(0, [0, 1, 2]), (1, [0, 1]), (2, [0, 1, 2])])
def test_stale_adds_lag_for_that_reader_only(reader: int, others: list[int]) -> None:
    bus = make_bus(k=3, lag=0, window=8, rounds=5)
    bus.set_counterfactual(Counterfactual(stale={1: 2}))  # Δ 0 -> 2 for reader 1 (Δ = 1 would equal Δ = 0)
    producer = (reader + 1) % 3
    assert rounds_of(bus, reader, 3, producer) == others
    assert rounds_of(bus, reader, 3, reader) == [0, 1, 2]  # own latest still visible


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8])
def test_shuffle_is_a_seeded_derangement(k: int) -> None:
    for seed in range(20):
        perm = derangement(k, seed)
        assert sorted(perm) == list(range(k))  # a real permutation
        assert all(p != i for i, p in enumerate(perm))  # nobody keeps its own content
        assert derangement(k, seed) == perm  # deterministic
    if k > 2:
        assert len({tuple(derangement(k, seed)) for seed in range(20)}) > 1  # the seed matters
    assert derangement(1, 3) == [0]


def test_shuffle_permutes_every_producer_on_the_bus() -> None:
    bus = make_bus(k=4, lag=0, window=2, rounds=3)
    cf = Counterfactual(shuffle=11)
    bus.set_counterfactual(cf)
    perm = cf.permutation(4)
    assert perm == derangement(4, 11)
    w = bus.windows([0], 3)
    for slot, (j, r) in enumerate(w.pairs(0)[1:], start=1):
        torch.testing.assert_close(w.notes[0, slot], vec(perm[j], r))


def test_counterfactuals_in_teacher_forcing() -> None:
    """Each control changes the teacher windows the same way it changes the bus (spot checks)."""
    k, rn, d = 3, 3, 4
    notes = torch.stack([torch.stack([vec(j, r) for r in range(rn)]) for j in range(k)])[
        None
    ]  # [1, K, Rn, d]
    mask = torch.ones(1, k, rn, dtype=torch.bool)
    pos = torch.full((k, 1), 3)  # one position per row, in round 3

    def run(cf: Counterfactual) -> TeacherWindow:
        return teacher_windows(
            SNAPSHOT[None], notes, mask, pos, BusConfig(lag=0, window=8), 8, counterfactual=cf
        )

    assert not run(Counterfactual(ablate={2})).visible[2].any()
    frozen = run(Counterfactual(freeze={0}, freeze_round=1))
    assert frozen.pairs(1, 0)[:2] == [(3, 0), (0, 0)] and (0, 1) not in frozen.pairs(1, 0)
    swapped = run(Counterfactual(swap=(0, 1)))
    torch.testing.assert_close(swapped.notes[2, 1 + 0 * rn + 2], vec(1, 2))  # slot (0, 2) shows b's vector
    assert swapped.producer[2, 1].item() == 0
    stale = run(Counterfactual(stale={1: 2}))
    assert [p for p in stale.pairs(1, 0) if p[0] == 0] == [(0, 0), (0, 1)]
    assert [p for p in stale.pairs(0, 0) if p[0] == 1] == [(1, 0), (1, 1), (1, 2)]
    assert d == notes.shape[-1]
