"""Counterfactual controls of the Dynamic Notes Bus: ablate, freeze, swap, stale, shuffle.

What it is: one frozen dataclass, `Counterfactual`, that says how the bus must lie to its readers
for a research run (SPEC §2 "Counterfactual controls"), plus the small pure functions both window
builders share to apply it — the decode-time store (`pdt.bus.notes_bus`) and the teacher-forced
builder (`pdt.bus.teacher`). The default instance changes nothing.

What it is not: the visibility rule itself (lag, budget, topology live in the window builders)
and not a training augmentation (stream dropout / bus mixing belong to the curriculum).

Semantics (K streams, ids 0..K-1; "producer" = the stream that wrote a note, "reader" = the
stream whose window is being built):

- `ablate`: these readers get an empty window — snapshot 0 included (an all-masked row).
- `freeze` + `freeze_round`: notes of these producers tagged round >= `freeze_round` are ignored
  by everyone (the producer included), so readers keep seeing the older ones. A note of round r
  is committed at the end of round r, so "frozen at round f" = "commits made after round f
  starts are dropped". The store still records them (flagged `frozen`) for the manifest.
- `swap = (a, b)`: the note *vectors* of a and b are exchanged; producer/round tags stay, so a
  reader sees b's content labelled as a. Slot (a, r) takes b's note of round r, or b's newest
  note of a round <= r when b has none of round r (b stopped early); when b has no note at all
  up to round r, slot (a, r) does not exist.
- `shuffle = seed`: the same for every producer at once, through a seeded permutation with no
  fixed point (a derangement, so every stream really reads someone else's content; K = 1 has
  none and stays unchanged). Deterministic for the seed, on any device.
- `stale = {k: extra}`: reader k counts `extra` more rounds of lag (its own latest note stays
  visible, like every reader's).

`swap` and `shuffle` are exclusive (one permutation per run keeps the manifest unambiguous).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

#: Rejection-sampling bound for the derangement: P(a uniform permutation has no fixed point) ≈ 1/e,
#: so 1000 draws fail with probability (1 - 1/e)^1000 ≈ 1e-199.
_MAX_DERANGEMENT_DRAWS = 1000


class CounterfactualError(ValueError):
    """A counterfactual that cannot apply to this bus; the message names the field and the reason."""


@dataclass(frozen=True)
class Counterfactual:
    """How the bus alters windows for a research run; the default alters nothing."""

    ablate: frozenset[int] = frozenset()
    """Readers whose window is empty (snapshot 0 too)."""
    freeze: frozenset[int] = frozenset()
    """Producers whose notes stop updating at `freeze_round`."""
    freeze_round: int = 0
    """First round whose notes from a frozen producer are ignored (0: they never contribute)."""
    swap: tuple[int, int] | None = None
    """Two producers whose note vectors are exchanged (tags stay)."""
    stale: Mapping[int, int] = field(default_factory=dict)
    """Reader -> extra rounds of lag on top of the bus's Δ."""
    shuffle: int | None = None
    """Seed of a derangement of all producers' note vectors (tags stay)."""

    def __post_init__(self) -> None:
        # Accept any iterable / mapping from callers and JSON, store immutable normalised copies.
        object.__setattr__(self, "ablate", frozenset(_ints("ablate", self.ablate)))
        object.__setattr__(self, "freeze", frozenset(_ints("freeze", self.freeze)))
        object.__setattr__(self, "stale", {int(k): int(v) for k, v in dict(self.stale).items()})
        if self.swap is not None:
            a, b = (int(x) for x in self.swap)
            if a == b:
                raise CounterfactualError(f"swap: cannot swap stream {a} with itself")
            object.__setattr__(self, "swap", (a, b))
        if self.freeze_round < 0:
            raise CounterfactualError(f"freeze_round must be >= 0, got {self.freeze_round}")
        bad = {k: v for k, v in self.stale.items() if v < 0}
        if bad:
            raise CounterfactualError(f"stale: extra lag must be >= 0 rounds, got {bad}")
        if self.swap is not None and self.shuffle is not None:
            raise CounterfactualError(
                "give `swap` or `shuffle`, not both: they are both producer permutations"
            )

    # ------------------------------------------------------------------ checks and queries

    @property
    def is_identity(self) -> bool:
        """True when no window is altered (the default)."""
        return not (
            self.ablate or self.freeze or self.stale or self.swap is not None or self.shuffle is not None
        )

    def validate(self, num_streams: int) -> None:
        """Raise `CounterfactualError` when a stream id is outside 0..num_streams-1."""
        fields: list[tuple[str, Iterable[int]]] = [
            ("ablate", self.ablate),
            ("freeze", self.freeze),
            ("stale", self.stale.keys()),
            ("swap", self.swap or ()),
        ]
        for name, ids in fields:
            out = sorted(i for i in ids if not 0 <= i < num_streams)
            if out:
                raise CounterfactualError(
                    f"{name}: stream id(s) {out} out of range; this bus has K = {num_streams} streams "
                    f"(ids 0..{num_streams - 1})"
                )

    def lag_for(self, reader: int, base_lag: int) -> int:
        """Δ seen by `reader`: the bus's lag plus its stale extra."""
        return base_lag + self.stale.get(reader, 0)

    def is_frozen(self, producer: int, round_: int) -> bool:
        """True when the note (producer, round_) is ignored because its producer is frozen."""
        return producer in self.freeze and round_ >= self.freeze_round

    def permutation(self, num_streams: int) -> list[int]:
        """π with slot j showing producer π[j]'s vectors (identity without swap/shuffle)."""
        perm = list(range(num_streams))
        if self.swap is not None:
            a, b = self.swap
            perm[a], perm[b] = b, a
        elif self.shuffle is not None:
            perm = derangement(num_streams, self.shuffle)
        return perm

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for run manifests."""
        return {
            "ablate": sorted(self.ablate),
            "freeze": sorted(self.freeze),
            "freeze_round": self.freeze_round,
            "swap": list(self.swap) if self.swap is not None else None,
            "stale": {str(k): v for k, v in sorted(self.stale.items())},
            "shuffle": self.shuffle,
        }


def _ints(name: str, values: Iterable[Any]) -> list[int]:
    try:
        return [int(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise CounterfactualError(f"{name}: expected stream ids (integers), got {values!r}") from exc


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation of range(n) with no fixed point (identity for n < 2)."""
    if n < 2:
        return list(range(n))
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    for _ in range(_MAX_DERANGEMENT_DRAWS):
        perm = torch.randperm(n, generator=gen).tolist()
        if all(p != i for i, p in enumerate(perm)):
            return perm
    raise RuntimeError(f"no derangement of {n} found in {_MAX_DERANGEMENT_DRAWS} draws")  # pragma: no cover


# ---------------------------------------------------------------------- tensor helpers


def frozen_mask(cf: Counterfactual, num_streams: int, num_rounds: int, device: torch.device) -> torch.Tensor:
    """[K, Rn] bool: True where note (producer j, round r) is ignored by the freeze."""
    frozen = torch.zeros(num_streams, num_rounds, dtype=torch.bool, device=device)
    if cf.freeze:
        rows = torch.tensor(sorted(cf.freeze), dtype=torch.long, device=device)
        frozen[rows, cf.freeze_round :] = True
    return frozen


def content_source(exists: torch.Tensor, perm: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Where slot (j, r) takes its vector from, under producer permutation `perm`.

    `exists` is [..., K, Rn] bool (which notes are in the store after the freeze). Returns
    `src_round` [..., K, Rn] long — the newest round r' <= r that producer perm[j] has — and
    `has_content` [..., K, Rn] bool (False when perm[j] has no note up to round r).
    """
    rn = exists.shape[-1]
    index = torch.arange(rn, device=exists.device).expand_as(exists)  # [..., K, Rn]
    last = torch.where(exists, index, torch.full_like(index, -1)).cummax(dim=-1).values  # [..., K, Rn]
    identity = perm == list(range(len(perm)))  # the usual case: no host → device copy (a GPU sync)
    perm_t = None if identity else torch.tensor(perm, dtype=torch.long, device=exists.device)
    src = (
        last if perm_t is None else last.index_select(-2, perm_t)
    )  # [..., K, Rn]: row j now describes producer perm[j]
    return src.clamp(min=0), src >= 0


def effective_notes(
    cf: Counterfactual, notes_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Apply freeze + swap/shuffle to a [..., K, Rn] mask of teacher notes.

    Returns (`exists` [..., K, Rn] bool: the tags a window may show — a tag exists only where it
    has content —, `src_round` [..., K, Rn] long: the round of producer perm[j] that slot (j, r)
    shows, `perm`).
    """
    k, rn = notes_mask.shape[-2:]
    cf.validate(k)
    exists = notes_mask.bool() & ~frozen_mask(cf, k, rn, notes_mask.device)
    perm = cf.permutation(k)
    src_round, has_content = content_source(exists, perm)
    return exists & has_content, src_round, perm
