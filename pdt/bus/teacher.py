"""Teacher-forced notes windows: which notes each training position may read (SPEC §2b.7).

What it is: the vectorised twin of `NotesBus.windows` for the curriculum. A training row is
(example, reader stream) with T positions; position t lies in round `pos_round[row, t]`
(= floor((t - section_start) / stride) for section tokens; prompt/prefix positions are round 0).
Every teacher note of the example is "committed"; `teacher_windows` returns all of them once per
row (snapshot 0 first, then producer-major, round-minor) and a per-position mask `visible
[R, T, N]` that applies exactly the decode-time rule of `pdt.bus.notes_bus`: snapshot 0; notes
with round r <= v - Δ and r < v; topology; the W newest per producer; the reader's own latest
note (newest r < v) even when Δ hides it; counterfactual controls on top.
So a position in round v never reads a note of round > v - Δ other than its own stream's latest.
What it is not: the attention over the window (the SNC sidecar) and not the choice of which
notes are teacher vs speculation (stage 2's bus mixing swaps vectors in `notes` before calling).
The note vectors are gathered by indexing, never detached, so gradients reach whatever produced
them (e.g. speculation notes that replaced teacher notes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdt.bus.counterfactual import Counterfactual, effective_notes
from pdt.presets.schema import BusConfig


@dataclass(frozen=True)
class TeacherWindow:
    """All notes of each row's example, and which of them each position sees."""

    notes: torch.Tensor  # [R, N, d_n], N = 1 + K·Rn, snapshot 0 first; zeros where a note is absent
    producer: torch.Tensor  # [R, N] long; snapshot 0 = K
    rounds: torch.Tensor  # [R, N] long; round tag clipped to max_rounds - 1
    visible: torch.Tensor  # [R, T, N] bool
    row_stream: torch.Tensor  # [R] long, reader stream of each row
    row_example: torch.Tensor  # [R] long, example of each row

    def pairs(self, row: int, t: int) -> list[tuple[int, int]]:
        """(producer, round) of the notes position t of `row` sees, in slot order."""
        keep = self.visible[row, t]
        return list(zip(self.producer[row][keep].tolist(), self.rounds[row][keep].tolist(), strict=True))


def default_layout(batch: int, num_streams: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Example-major rows: row b·K + k is (example b, stream k). Returns (row_example, row_stream)."""
    row_example = torch.arange(batch, device=device).repeat_interleave(num_streams)  # [B·K]
    row_stream = torch.arange(num_streams, device=device).repeat(batch)  # [B·K]
    return row_example, row_stream


def section_pos_round(section_start: torch.Tensor, seq_len: int, stride: int) -> torch.Tensor:
    """[R, T] round of each position: floor((t - section_start) / stride), prompt/prefix -> 0."""
    if stride < 1:
        raise ValueError(f"stride (round length in tokens) must be >= 1, got {stride}")
    t = torch.arange(seq_len, device=section_start.device)
    return torch.div(t[None, :] - section_start[:, None], stride, rounding_mode="floor").clamp(min=0)


def _check_shapes(
    snapshot0: torch.Tensor,
    notes: torch.Tensor,
    notes_mask: torch.Tensor,
    pos_round: torch.Tensor,
    row_example: torch.Tensor,
    row_stream: torch.Tensor,
) -> None:
    b, k, rn, d = notes.shape
    if snapshot0.shape != (b, d):
        raise ValueError(f"snapshot0 must be [B, d_n] = [{b}, {d}], got {tuple(snapshot0.shape)}")
    if notes_mask.shape != (b, k, rn):
        raise ValueError(f"notes_mask must be [B, K, Rn] = [{b}, {k}, {rn}], got {tuple(notes_mask.shape)}")
    if (
        pos_round.dim() != 2
        or row_example.shape != (pos_round.shape[0],)
        or row_stream.shape != row_example.shape
    ):
        raise ValueError(
            f"pos_round [R, T] {tuple(pos_round.shape)}, row_example {tuple(row_example.shape)} and "
            f"row_stream {tuple(row_stream.shape)} must agree on R"
        )
    # A range check reads the ids back to the host: on a GPU that is a sync per training step, so
    # it runs on CPU tensors only (the curriculum builds its row ids itself; tests run on CPU).
    if (
        not row_stream.is_cuda
        and row_stream.numel()
        and (int(row_stream.min()) < 0 or int(row_stream.max()) >= k)
    ):
        raise ValueError(f"row_stream must hold stream ids in 0..{k - 1}")


def _visible_by_round(
    exists: torch.Tensor, row_stream: torch.Tensor, lag: torch.Tensor, num_rounds: int, cfg: BusConfig
) -> torch.Tensor:
    """[R, V, K, Rn] bool: note (j, r) in the window of row's reader at round v, for v < V.

    `exists` [R, K, Rn] are the notes present (after freeze/permutation), `lag` [R] the reader's Δ.
    """
    _, k, rn = exists.shape
    device = exists.device
    v = torch.arange(num_rounds, device=device)[None, :, None, None]  # [1, V, 1, 1]
    r = torch.arange(rn, device=device)[None, None, None, :]  # [1, 1, 1, Rn]
    ended = exists[:, None] & (r < v)  # [R, V, K, Rn]: a note exists once its round has ended
    cand = ended & (r <= v - lag[:, None, None, None])  # the lag rule
    is_self = torch.arange(k, device=device)[None, :] == row_stream[:, None]  # [R, K]
    newest = torch.where(ended, r, torch.full_like(r, -1)).amax(dim=-1, keepdim=True)  # [R, V, K, 1]
    cand |= ended & (r == newest) & is_self[:, None, :, None]  # own latest, despite Δ
    if cfg.topology == "triangular":
        readable = torch.arange(k, device=device)[None, :] <= row_stream[:, None]  # [R, K]
        cand &= readable[:, None, :, None]
    # Budget W per producer: count the candidates strictly newer than each one, keep the W newest.
    at_or_after = cand.flip(-1).cumsum(dim=-1).flip(-1)  # [R, V, K, Rn]
    return cand & (at_or_after - cand.long() < cfg.window)


def _gather_notes(
    snapshot0: torch.Tensor,
    notes: torch.Tensor,
    row_example: torch.Tensor,
    exists: torch.Tensor,
    src_round: torch.Tensor,
    perm: list[int],
) -> torch.Tensor:
    """[R, N, d_n]: snapshot 0 then slot (j, r) = notes of producer perm[j] at round src_round."""
    _, k, rn, d = notes.shape
    perm_t = _index(perm, notes.device)
    rows = row_example[:, None, None]  # [R, 1, 1]
    slots = notes[rows, perm_t[None, :, None], src_round[row_example]]  # [R, K, Rn, d_n]
    slots = torch.where(
        exists[row_example][..., None], slots, torch.zeros((), dtype=notes.dtype, device=notes.device)
    )
    flat = slots.reshape(len(row_example), k * rn, d)  # [R, K, Rn, d_n] -> [R, K·Rn, d_n]
    return torch.cat([snapshot0[row_example][:, None, :], flat], dim=1)  # [R, 1 + K·Rn, d_n]


def teacher_windows(
    snapshot0: torch.Tensor,
    notes: torch.Tensor,
    notes_mask: torch.Tensor,
    pos_round: torch.Tensor,
    cfg: BusConfig,
    max_rounds: int,
    *,
    row_example: torch.Tensor | None = None,
    row_stream: torch.Tensor | None = None,
    counterfactual: Counterfactual | None = None,
) -> TeacherWindow:
    """Per-position windows for teacher forcing, identical to `NotesBus.windows` round by round.

    snapshot0 [B, d_n]; notes [B, K, Rn, d_n] (note of producer j, round r); notes_mask
    [B, K, Rn] bool (which exist); pos_round [R, T] long. Rows default to `default_layout`
    (R = B·K, row b·K + k = example b read by stream k); give row_example/row_stream [R] otherwise.
    """
    cf = counterfactual or Counterfactual()
    if notes.dim() != 4:
        raise ValueError(f"notes must be [B, K, Rn, d_n], got {tuple(notes.shape)}")
    b, k, rn, _ = notes.shape
    device = notes.device
    if row_example is None or row_stream is None:
        row_example, row_stream = default_layout(b, k, device)
    _check_shapes(snapshot0, notes, notes_mask, pos_round, row_example, row_stream)
    exists_b, src_round, perm = effective_notes(cf, notes_mask)  # [B, K, Rn] each
    # From round Rn + max lag on, every note passes the lag test: later rounds see the same window.
    num_rounds = rn + cfg.lag + max(cf.stale.values(), default=0) + 1
    lag = _reader_lag(cf, cfg, row_stream, k)  # [R]
    by_round = _visible_by_round(exists_b[row_example], row_stream, lag, num_rounds, cfg)  # [R, V, K, Rn]
    n_rows = len(row_example)
    by_round = by_round.reshape(n_rows, num_rounds, k * rn)  # [R, V, K, Rn] -> [R, V, K·Rn]
    snap = torch.ones(n_rows, num_rounds, 1, dtype=torch.bool, device=device)  # [R, V, 1]
    by_round = torch.cat([snap, by_round], dim=-1)  # [R, V, N]
    if cf.ablate:  # an ablated reader sees nothing, snapshot 0 included
        ablated = torch.tensor(sorted(cf.ablate), device=device)
        by_round &= ~torch.isin(row_stream, ablated)[:, None, None]
    v = pos_round.clamp(0, num_rounds - 1)  # [R, T]
    producer, tags = _note_tags(k, rn, max_rounds, device)  # [N] each
    return TeacherWindow(
        notes=_gather_notes(snapshot0, notes, row_example, exists_b, src_round, perm),
        producer=producer.expand(n_rows, -1),  # [N] -> [R, N], a view
        rounds=tags.expand(n_rows, -1),  # [N] -> [R, N]
        visible=by_round[torch.arange(n_rows, device=device)[:, None], v],  # [R, T, N]
        row_stream=row_stream,
        row_example=row_example,
    )


def _reader_lag(
    cf: Counterfactual, cfg: BusConfig, row_stream: torch.Tensor, num_streams: int
) -> torch.Tensor:
    """[R] long: Δ of each row's reader, stale extra included."""
    extra = torch.zeros(num_streams, dtype=torch.long, device=row_stream.device)
    for reader, extra_rounds in cf.stale.items():
        extra[reader] = extra_rounds
    return cfg.lag + extra[row_stream]


def _note_tags(
    num_streams: int, rn: int, max_rounds: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(producer [N], round [N]) of the slots: snapshot 0 (K, 0), then (j, r) producer-major."""
    # Built on the device: a host tensor copied to a GPU is a synchronous copy (a stall per step).
    producer = torch.arange(num_streams, device=device).repeat_interleave(rn)
    producer = torch.cat([torch.full((1,), num_streams, dtype=torch.long, device=device), producer])
    tags = torch.cat(
        [torch.zeros(1, dtype=torch.long, device=device), torch.arange(rn, device=device).repeat(num_streams)]
    )
    return producer, tags.clamp(max=max_rounds - 1)


def _index(perm: list[int], device: torch.device) -> torch.Tensor:
    """A permutation as a device tensor; the identity (no swap/shuffle) without a host copy."""
    if perm == list(range(len(perm))):
        return torch.arange(len(perm), device=device)
    return torch.tensor(perm, dtype=torch.long, device=device)
