"""Teacher-forced windows: identical to the decode-time bus for every (reader, round), and §2b.7 timing.

The agreement tests build the same notes both ways — a `NotesBus` fed commit by commit (with
retries that re-commit) and the dataset-style tensors given to `teacher_windows` — and compare,
for every reader and every round, the (producer, round) pairs and the vectors each one shows.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from pdt.bus import (
    Counterfactual,
    NotesBus,
    TeacherWindow,
    default_layout,
    section_pos_round,
    teacher_windows,
)
from pdt.presets.schema import BusConfig

D, RN, B = 5, 4, 2
PREFIX, STRIDE = 3, 2  # prompt/prefix positions (round 0), then STRIDE tokens per round


def random_notes(k: int, gen: torch.Generator, p_present: float = 0.8) -> tuple[torch.Tensor, ...]:
    """(snapshot0 [B, d], notes [B, K, Rn, d], mask [B, K, Rn]); round 0 of stream 0 may be missing too."""
    snapshot0 = torch.randn(B, D, generator=gen, dtype=torch.float64)
    notes = torch.randn(B, k, RN, D, generator=gen, dtype=torch.float64)
    mask = torch.rand(B, k, RN, generator=gen) < p_present
    return snapshot0, notes, mask


def bus_for_example(snapshot0, notes, mask, b: int, cfg: BusConfig, cf: Counterfactual, gen) -> NotesBus:
    """The decode-time bus of example b: commits in round order, some after a rolled-back first try."""
    k = notes.shape[1]
    bus = NotesBus(k, D, cfg, max_rounds=64, counterfactual=cf)
    bus.set_snapshot0(snapshot0[b])
    for r in range(RN):
        for j in range(k):
            if mask[b, j, r] and torch.rand((), generator=gen) < 0.3:  # a retry: older version replaced
                bus.commit(j, r, torch.randn(D, generator=gen, dtype=torch.float64))
            bus.propose(j, r, torch.randn(D, generator=gen, dtype=torch.float64))  # provisional: never read
            if mask[b, j, r]:
                bus.commit(j, r, notes[b, j, r])
            else:
                bus.discard(j, r)
    return bus


def pos_rounds(rows: int, num_rounds: int) -> torch.Tensor:
    """[R, T]: PREFIX positions of round 0, then rounds 0..num_rounds-1 of STRIDE tokens each."""
    start = torch.full((rows,), PREFIX)
    return section_pos_round(start, PREFIX + num_rounds * STRIDE, STRIDE)


def assert_agree(cfg: BusConfig, k: int, cf: Counterfactual, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    snapshot0, notes, mask = random_notes(k, gen)
    if mask[:, 0, 0].all() and k > 0:
        mask[0, 0, 0] = False  # make sure missing notes are exercised
    num_rounds = RN + cfg.lag + 3
    tw = teacher_windows(snapshot0, notes, mask, pos_rounds(B * k, num_rounds), cfg, 64, counterfactual=cf)
    for b in range(B):
        bus = bus_for_example(snapshot0, notes, mask, b, cfg, cf, gen)
        for reader, v in itertools.product(range(k), range(num_rounds)):
            w = bus.windows([reader], v)
            for t in (PREFIX + v * STRIDE, PREFIX + v * STRIDE + 1):
                row = b * k + reader
                where = f"K={k} {cfg} {cf} example {b} reader {reader} round {v} position {t}"
                assert tw.pairs(row, t) == w.pairs(0), where
                torch.testing.assert_close(
                    tw.notes[row][tw.visible[row, t]], w.notes[0][w.mask[0]], msg=where
                )


CONFIGS = list(itertools.product([1, 2, 3, 4], [0, 1, 2], [1, 2, 3], ["all_to_all", "triangular"]))


@pytest.mark.parametrize(("k", "lag", "window", "topology"), CONFIGS)
def test_teacher_windows_equal_decode_windows(k: int, lag: int, window: int, topology: str) -> None:
    cfg = BusConfig(lag=lag, window=window, topology=topology)
    assert_agree(cfg, k, Counterfactual(), seed=1000 * k + 100 * lag + 10 * window + len(topology))


COUNTERFACTUALS = [
    Counterfactual(ablate={1}),
    Counterfactual(freeze={0, 2}, freeze_round=1),
    Counterfactual(freeze={1}, freeze_round=0),
    Counterfactual(swap=(0, 2)),
    Counterfactual(stale={1: 1, 2: 3}),
    Counterfactual(shuffle=7),
    Counterfactual(ablate={0}, freeze={2}, freeze_round=2, swap=(1, 2), stale={1: 2}),
]


@pytest.mark.parametrize("cf", COUNTERFACTUALS, ids=lambda cf: str(cf.to_dict()))
@pytest.mark.parametrize("topology", ["all_to_all", "triangular"])
def test_teacher_windows_equal_decode_windows_under_counterfactuals(
    cf: Counterfactual, topology: str
) -> None:
    for seed, (lag, window) in enumerate(itertools.product([0, 2], [1, 3])):
        assert_agree(BusConfig(lag=lag, window=window, topology=topology), 3, cf, seed)


# ---------------------------------------------------------------------- §2b.7: timing


def run_teacher(
    k: int, cfg: BusConfig, seed: int, notes: torch.Tensor | None = None
) -> tuple[TeacherWindow, ...]:
    gen = torch.Generator().manual_seed(seed)
    snapshot0, fresh, mask = random_notes(k, gen, p_present=0.9)
    notes = fresh if notes is None else notes
    tw = teacher_windows(snapshot0, notes, mask, pos_rounds(B * k, RN + 3), cfg, 64)
    return tw, notes, mask


@pytest.mark.parametrize(
    ("lag", "window", "topology"), list(itertools.product([0, 1, 2], [1, 3], ["all_to_all", "triangular"]))
)
def test_position_in_round_v_sees_nothing_newer_than_v_minus_lag(
    lag: int, window: int, topology: str
) -> None:
    k = 3
    tw, _, mask = run_teacher(k, BusConfig(lag=lag, window=window, topology=topology), seed=lag + 7 * window)
    pos = pos_rounds(B * k, RN + 3)
    rows, ts, slots = tw.visible.nonzero(as_tuple=True)
    for row, t, n in zip(rows.tolist(), ts.tolist(), slots.tolist(), strict=True):
        j, r, v, reader = (
            int(tw.producer[row, n]),
            int(tw.rounds[row, n]),
            int(pos[row, t]),
            int(tw.row_stream[row]),
        )
        if j == k:
            continue  # snapshot 0
        b = int(tw.row_example[row])
        own_latest = j == reader and r == max(x for x in range(min(v, RN)) if mask[b, j, x])
        assert r < v and (r <= v - lag or own_latest), (row, t, j, r, v)
        assert topology == "all_to_all" or j <= reader


def masked_mean(tw: TeacherWindow) -> torch.Tensor:
    """[R, T, d]: a reference consumer; an all-masked position gives 0."""
    weights = tw.visible.to(tw.notes.dtype)  # [R, T, N]
    total = torch.einsum("rtn,rnd->rtd", weights, tw.notes)
    return total / weights.sum(-1, keepdim=True).clamp(min=1)


@pytest.mark.parametrize("lag", [0, 1, 2])
def test_perturbing_a_note_only_moves_positions_that_see_it(lag: int) -> None:
    k, cfg = 3, BusConfig(lag=lag, window=2)
    tw, notes, mask = run_teacher(k, cfg, seed=lag)
    base = masked_mean(tw)
    for j, r in itertools.product(range(k), range(RN)):
        moved = notes.clone()
        moved[:, j, r] += 10.0
        out = masked_mean(run_teacher(k, cfg, seed=lag, notes=moved)[0])
        changed = (out - base).abs().amax(dim=-1) > 0  # [R, T]
        sees = tw.visible[:, :, 1 + j * RN + r]  # [R, T]
        assert torch.equal(changed, sees), (j, r)
        assert not sees.any() or mask[:, j, r].any()


def test_gradients_reach_exactly_the_visible_notes() -> None:
    k, cfg = 2, BusConfig(lag=2, window=1)
    gen = torch.Generator().manual_seed(3)
    snapshot0, notes, mask = random_notes(k, gen)
    notes.requires_grad_(True)
    snapshot0.requires_grad_(True)
    pos = pos_rounds(B * k, 2)  # rounds 0 and 1 only: Δ = 2 hides every other stream's note
    tw = teacher_windows(snapshot0, notes, mask, pos, cfg, 8)
    masked_mean(tw).sum().backward()
    seen = torch.zeros(B, k, RN, dtype=torch.bool)
    for row in range(B * k):
        for n in tw.visible[row].any(dim=0).nonzero().flatten().tolist():
            if n:
                seen[int(tw.row_example[row]), (n - 1) // RN, (n - 1) % RN] = True
    assert torch.equal(notes.grad.abs().sum(-1) > 0, seen)  # not detached, and nothing unseen
    assert snapshot0.grad.abs().sum() > 0
    assert not seen[:, :, 1:].any()  # at round 1 only the own round-0 note is readable


# ---------------------------------------------------------------------- shapes and layout


@pytest.mark.parametrize(
    ("start", "stride", "want"),
    [
        (3, 2, [0, 0, 0, 0, 0, 1, 1, 2, 2, 3]),
        (0, 4, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]),
        (9, 1, [0] * 10),
    ],
)
def test_section_pos_round(start: int, stride: int, want: list[int]) -> None:
    assert section_pos_round(torch.tensor([start]), 10, stride).tolist() == [want]


def test_shapes_tags_and_layout() -> None:
    k, cfg = 3, BusConfig(lag=1, window=2)
    gen = torch.Generator().manual_seed(0)
    snapshot0, notes, mask = random_notes(k, gen)
    pos = pos_rounds(B * k, 5)
    tw = teacher_windows(snapshot0, notes, mask, pos, cfg, max_rounds=3)
    n = 1 + k * RN
    assert tw.notes.shape == (B * k, n, D) and tw.visible.shape == (B * k, pos.shape[1], n)
    assert tw.notes.dtype == torch.float64 and tw.visible.dtype == torch.bool
    assert tw.producer[0].tolist() == [3] + [0] * RN + [1] * RN + [2] * RN
    assert tw.rounds[0].tolist() == [0] + [0, 1, 2, 2] * k  # round tags clipped to max_rounds - 1
    example, stream = default_layout(B, k, torch.device("cpu"))
    assert example.tolist() == [0, 0, 0, 1, 1, 1] and stream.tolist() == [0, 1, 2, 0, 1, 2]
    torch.testing.assert_close(tw.notes[4, 0], snapshot0[1])
    assert torch.all(
        tw.notes[~torch.cat([torch.ones(B, 1, dtype=torch.bool), mask.flatten(1)], 1)[example]] == 0
    )


def test_custom_rows_match_default_rows() -> None:
    k, cfg = 3, BusConfig(lag=0, window=2, topology="triangular")
    gen = torch.Generator().manual_seed(5)
    snapshot0, notes, mask = random_notes(k, gen)
    full = teacher_windows(snapshot0, notes, mask, pos_rounds(B * k, 6), cfg, 64)
    rows = torch.tensor([5, 1])  # (example 1, stream 2) and (example 0, stream 1)
    some = teacher_windows(
        snapshot0, notes, mask, pos_rounds(2, 6), cfg, 64, row_example=rows // k, row_stream=rows % k
    )
    assert torch.equal(some.visible, full.visible[rows]) and torch.equal(some.notes, full.notes[rows])


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"notes": torch.zeros(2, 3, 4)}, "notes must be"),
        ({"snapshot0": torch.zeros(2, 4)}, "snapshot0 must be"),
        ({"notes_mask": torch.ones(2, 3, 3, dtype=torch.bool)}, "notes_mask must be"),
        ({"pos_round": torch.zeros(5, 4, dtype=torch.long)}, "agree on R"),
        ({"row_example": torch.zeros(6, dtype=torch.long), "row_stream": torch.full((6,), 3)}, "row_stream"),
    ],
)
def test_bad_shapes_are_refused(change: dict, error: str) -> None:
    args = {
        "snapshot0": torch.zeros(2, 5),
        "notes": torch.zeros(2, 3, 4, 5),
        "notes_mask": torch.ones(2, 3, 4, dtype=torch.bool),
        "pos_round": torch.zeros(6, 4, dtype=torch.long),
    } | change
    with pytest.raises(ValueError, match=error):
        teacher_windows(cfg=BusConfig(), max_rounds=8, **args)
