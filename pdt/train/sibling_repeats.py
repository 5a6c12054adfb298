"""What a stream's siblings have already written: the negatives of the sibling terms.

What it is: the curriculum's optional unlikelihood term (`losses.sibling_ul`): at each labelled
position, the stream's probability of the name-like tokens its sibling streams have already written
— in rounds whose notes that position can read under the bus's lag and topology, and that appear
nowhere in its own row (prompt, stream prefix, section) — is pushed down by −log(1 − p) each (token-level
unlikelihood, Welleck et al. 2019, "Neural Text Generation with Unlikelihood Training"). LM CE
alone hardly rewards reading the notes (a sibling's notes barely help predict one's own section);
this term can only be lowered selectively by knowing what the siblings said, which the stream
learns only through the bus. Here: the vocabulary's name-like tokens (`ContentVocab`) and the
per-position negative ids, built on the host at collation. What it is not: the loss itself
(`pdt.train.losses.sibling_unlikelihood`) or the decode-time redundancy figure
(`pdt.infer.quality.redundancy`), which it aims to lower.

`sibling_continuations` (`losses.sibling_next`) is the same for the tokens a sibling wrote after the
position's last two tokens: what would repeat a sibling's 3-gram — the stock phrases two sections
of one answer can share even when they name nothing in common.

Name-like tokens: a token whose text, spaces stripped, starts with an upper-case letter followed by
a letter, not right after a sentence end (so a sentence's first word — "The", "In" — is not one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

#: Negative ids kept per position (the newest rounds' first): [N, MAX_NEGATIVES], -1 padded.
MAX_NEGATIVES = 64
#: Continuations kept per position (`sibling_continuations`).
MAX_CONTINUATIONS = 16
_SENTENCE_END = (".", "!", "?", "\n", ":")


@dataclass(frozen=True)
class ContentVocab:
    name_like: torch.Tensor  # [V] bool: a token that starts a capitalised word
    ends_sentence: torch.Tensor  # [V] bool: a token after which the next word starts a sentence


def content_vocab(tokenizer: Any, vocab_size: int) -> ContentVocab:
    """Classify every token id of `tokenizer` (decoded one by one) below `vocab_size`."""
    name_like = torch.zeros(vocab_size, dtype=torch.bool)
    ends = torch.zeros(vocab_size, dtype=torch.bool)
    for i in range(vocab_size):
        try:
            text = tokenizer.decode([i])
        except (KeyError, ValueError):  # an id the encoding does not define (a gap in its ranks)
            continue
        word = text.lstrip()
        name_like[i] = len(word) >= 2 and word[0].isupper() and word[1].isalpha()
        ends[i] = text.rstrip(" ").endswith(_SENTENCE_END) or text == ""
    return ContentVocab(name_like, ends)


@dataclass(frozen=True)
class SiblingRows:
    """A collated batch as both sibling terms read it: every row's tokens (up to its length) and
    section start, each labelled position (row, t) with its round, and the bus's visibility rule."""

    rows: list[list[int]]  # [R] row r's token ids, prompt + stream prefix + section
    starts: list[int]  # [R] index of each row's first section token
    labels: list[tuple[int, int, int]]  # [N] (row, t, round of t) of each labelled position
    num_streams: int
    stride: int
    lag: int
    topology: str

    @classmethod
    def of(
        cls,
        ids: torch.Tensor,
        section_start: torch.Tensor,
        lengths: torch.Tensor,
        label_pos: torch.Tensor,
        pos_round: torch.Tensor,
        num_streams: int,
        stride: int,
        lag: int,
        topology: str,
    ) -> SiblingRows:
        """From a batch's ids [R, T] (example-major B·K rows), section starts and lengths [R],
        labelled positions `label_pos` [N, 2] (row, t) and rounds `pos_round` [R, T]."""
        rounds = pos_round[label_pos[:, 0], label_pos[:, 1]].tolist()
        return cls(
            [ids[r, : int(n)].tolist() for r, n in enumerate(lengths)],
            [int(x) for x in section_start],
            [(r, t, v) for (r, t), v in zip(label_pos.tolist(), rounds, strict=True)],
            num_streams,
            stride,
            lag,
            topology,
        )

    def section_rounds(self, r: int) -> int:
        return (max(0, len(self.rows[r]) - self.starts[r]) + self.stride - 1) // self.stride

    def visible(self, r: int, v: int) -> list[tuple[int, int]]:
        """(sibling row, round) pairs whose notes row `r` reads in round `v`: rounds u ≤ v − Δ and
        u < v, newest first, of the streams its topology reads (not its own)."""
        k = self.num_streams
        last = min(v - self.lag, v - 1)
        b, j = divmod(r, k)
        siblings = [b * k + s for s in range(k) if s != j and (self.topology == "all_to_all" or s < j)]
        return [(sib, u) for u in range(last, -1, -1) for sib in siblings]


def _padded(lists: list[list[int]], width: int) -> torch.Tensor:
    """[len(lists), width] long, each list's first `width` ids, -1 after."""
    out = torch.full((len(lists), width), -1, dtype=torch.long)
    for i, ids in enumerate(lists):
        if ids:
            out[i, : min(len(ids), width)] = torch.tensor(ids[:width], dtype=torch.long)
    return out


def sibling_negatives(batch: SiblingRows, vocab: ContentVocab) -> torch.Tensor:
    """[N, MAX_NEGATIVES] long, -1 padded: for each labelled position, the name-like ids its
    siblings wrote in rounds r with r ≤ v − Δ and r < v (v = the position's round: the notes it can
    read), newest round first, minus every id of its own row (prompt, stream prefix and section)."""
    n_ids = len(vocab.name_like)
    # per row: the name-like ids of each round of its section, in order of first occurrence
    written: list[list[list[int]]] = []
    for r, row in enumerate(batch.rows):
        start = batch.starts[r]
        by_round: list[list[int]] = [[] for _ in range(batch.section_rounds(r))]
        for p in range(start, len(row)):
            prev = row[p - 1] if p > 0 else -1  # the token before it
            starts_sentence = prev < 0 or (prev < n_ids and bool(vocab.ends_sentence[prev]))
            tok = row[p]
            if tok < n_ids and vocab.name_like[tok] and not starts_sentence:
                bucket = by_round[(p - start) // batch.stride]
                if tok not in bucket:
                    bucket.append(tok)
        written.append(by_round)
    own = [set(row) for row in batch.rows]
    cache: dict[tuple[int, int], list[int]] = {}
    negatives = []
    for r, _, v in batch.labels:
        if (r, v) not in cache:
            picked: list[int] = []
            seen = set(own[r])
            for sib, u in batch.visible(r, v):
                for tok in written[sib][u] if u < len(written[sib]) else ():
                    if tok not in seen:
                        seen.add(tok)
                        picked.append(tok)
            cache[r, v] = picked
        negatives.append(cache[r, v])
    return _padded(negatives, MAX_NEGATIVES)


def sibling_continuations(batch: SiblingRows) -> torch.Tensor:
    """[N, MAX_CONTINUATIONS] long, -1 padded: for each labelled position (row r, t: it predicts
    row[t + 1] after (row[t - 1], row[t])), the tokens a sibling wrote after that same pair of
    tokens in a round its window covers (as `sibling_negatives`) — what would repeat a sibling's
    3-gram — less the true next token and any continuation the row itself writes after that pair."""
    # per row: per round of its section, (a, b) -> the tokens c written after it, in order
    after: list[list[dict[tuple[int, int], list[int]]]] = []
    own: list[set[tuple[int, int, int]]] = []
    for r, row in enumerate(batch.rows):
        start = batch.starts[r]
        by_round: list[dict[tuple[int, int], list[int]]] = [{} for _ in range(batch.section_rounds(r))]
        for p in range(max(start, 2), len(row)):
            nxt = by_round[(p - start) // batch.stride].setdefault((row[p - 2], row[p - 1]), [])
            if row[p] not in nxt:
                nxt.append(row[p])
        after.append(by_round)
        own.append({(row[p - 2], row[p - 1], row[p]) for p in range(2, len(row))})
    continuations = []
    for r, t, v in batch.labels:
        row = batch.rows[r]
        picked: list[int] = []
        if 1 <= t < len(row) - 1:
            pair = (row[t - 1], row[t])
            for sib, u in batch.visible(r, v):
                for tok in after[sib][u].get(pair, ()) if u < len(after[sib]) else ():
                    if tok != row[t + 1] and (*pair, tok) not in own[r] and tok not in picked:
                        picked.append(tok)
        continuations.append(picked)
    return _padded(continuations, MAX_CONTINUATIONS)
