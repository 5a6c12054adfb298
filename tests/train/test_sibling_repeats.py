"""The sibling-repeat negatives and their unlikelihood loss (pdt.train.sibling_repeats, losses)."""

from __future__ import annotations

import math

import pytest
import torch

from pdt.data.tokenizer import Tokenizer
from pdt.train.losses import sibling_unlikelihood
from pdt.train.sibling_repeats import (
    MAX_NEGATIVES,
    ContentVocab,
    SiblingRows,
    content_vocab,
    sibling_continuations,
    sibling_negatives,
)


def test_content_vocab_marks_capitalised_words_and_sentence_ends() -> None:
    tok = Tokenizer(vocab_size=8192)
    vocab = content_vocab(tok, tok.vocab_size)
    (london,) = tok.encode(" London")
    (the,) = tok.encode(" the")
    (period,) = tok.encode(".")
    (comma,) = tok.encode(",")
    assert vocab.name_like[london] and not vocab.name_like[the] and not vocab.name_like[period]
    assert vocab.ends_sentence[period] and not vocab.ends_sentence[comma] and not vocab.ends_sentence[london]
    assert 0 < int(vocab.name_like.sum()) < tok.vocab_size // 2


# A toy vocabulary: ids 10.. are name-like, 1 ends a sentence, everything else is a plain word.
VOCAB = ContentVocab(
    name_like=torch.tensor([i >= 10 for i in range(40)]),
    ends_sentence=torch.tensor([i == 1 for i in range(40)]),
)


def _rows(sections: list[list[int]], prefix: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = [prefix + s for s in sections]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    start = torch.full((len(rows),), len(prefix))
    return ids, start, torch.tensor([len(r) for r in rows])


def _negatives(sections, lag=1, topology="all_to_all", stride=2, prefix=(2, 3)):
    ids, start, lengths = _rows(sections, list(prefix))
    t = torch.arange(ids.shape[1])
    label_pos = torch.stack(torch.meshgrid(torch.arange(ids.shape[0]), t[:-1], indexing="ij"), -1).flatten(
        0, 1
    )
    keep = (label_pos[:, 1] + 1 >= start[label_pos[:, 0]]) & (label_pos[:, 1] + 1 < lengths[label_pos[:, 0]])
    label_pos = label_pos[keep]
    pos_round = torch.div(t[None, :] - start[:, None], stride, rounding_mode="floor").clamp(min=0)
    rows = SiblingRows.of(ids, start, lengths, label_pos, pos_round, len(sections), stride, lag, topology)
    out = sibling_negatives(rows, VOCAB)
    by_pos = {(int(r), int(p)): [x for x in out[i].tolist() if x >= 0] for i, (r, p) in enumerate(label_pos)}
    return out, by_pos


def test_negatives_are_the_siblings_visible_names_that_the_row_does_not_write() -> None:
    # stride 2: stream 1 writes rounds [11, 4] [1, 12] [13, 14]; 12 starts a sentence (after 1).
    sections = [[5, 20, 6, 7, 8, 9], [11, 4, 1, 12, 13, 14], [20, 15, 16, 17, 4, 4]]
    out, neg = _negatives(sections)
    assert out.shape[1] == MAX_NEGATIVES
    # stream 0, position 2 (round 0; its prefix's last position is 1): nothing is visible yet
    assert neg[(0, 1)] == [] and neg[(0, 2)] == [] and neg[(0, 3)] == []
    # round 1 (positions 4, 5): round 0 of streams 1 and 2 → 11 (stream 1), 15 (stream 2); 20 is its own
    assert sorted(neg[(0, 4)]) == [11, 15]
    # round 2: rounds 0-1 → newest first: stream 2's round 1 (16, 17); 12 starts a sentence
    assert neg[(0, 6)] == [16, 17, 11, 15]
    # stream 2 reads streams 0 and 1, never its own 20 / 15 / 16 / 17
    assert sorted(neg[(2, 6)]) == [11]
    # lag 2: round 2 sees only round 0
    assert sorted(_negatives(sections, lag=2)[1][(0, 6)]) == [11, 15]
    # triangular: stream 0 reads nobody, stream 1 only stream 0 (20, then its round 1: none new)
    tri = _negatives(sections, topology="triangular")[1]
    assert all(v == [] for (r, _), v in tri.items() if r == 0)
    assert tri[(1, 4)] == [20] and tri[(2, 4)] == [11]  # 20 is stream 2's own too


def test_negatives_are_capped_newest_first() -> None:
    names = list(range(10, 40))
    sections = [[5] * 8 + [5, 5], names[:15] + [5] * 4, [5] + names[15:] + [5] * 4]
    out, neg = _negatives(sections, stride=30)
    assert all(len(v) == 0 for v in neg.values())  # one round only: never visible
    out, neg = _negatives(sections, stride=4)
    seen = max(neg.values(), key=len)
    assert len(seen) == len(set(seen)) and set(seen) <= set(names)


def test_continuations_are_what_a_visible_sibling_wrote_after_the_same_two_tokens() -> None:
    # stride 3, prefix (2, 3); stream 1 writes "5 6 7" in round 0 and "5 6 9" in round 1
    sections = [[5, 6, 8, 4, 5, 6, 1, 5, 6], [5, 6, 7, 5, 6, 9, 4, 4, 4], [4, 5, 6, 7, 0, 0, 0, 0, 0]]
    ids, start, lengths = _rows(sections, [2, 3])
    t = torch.arange(ids.shape[1])
    label_pos = torch.tensor([(r, p) for r in range(3) for p in range(1, int(lengths[r]) - 1)])
    pos_round = torch.div(t[None, :] - start[:, None], 3, rounding_mode="floor").clamp(min=0)
    out = sibling_continuations(
        SiblingRows.of(ids, start, lengths, label_pos, pos_round, 3, 3, 1, "all_to_all")
    )
    neg = {(int(r), int(p)): [x for x in out[i].tolist() if x >= 0] for i, (r, p) in enumerate(label_pos)}
    # stream 0 at position 7 (its second "5 6", round 1; next token 1) reads round 0: stream 1 wrote
    # "5 6 7" there (stream 2's "5 6 7" is in its round 1, not yet visible)
    assert neg[(0, 7)] == [7]
    assert neg[(0, 3)] == []  # its first "5 6" (round 0): nothing is visible yet
    assert neg[(0, 9)] == []  # "6 1": no sibling wrote it
    # stream 1 at position 6 ("5 6" → 9, round 1): stream 0's round 0 "5 6 8" and stream 2's
    # round 0 (no "5 6 x"); 9 itself, the true next token, is never a negative
    assert neg[(1, 6)] == [8]
    # stream 0's own "5 6 8" is no negative for it even where a sibling wrote "5 6 8"
    assert 8 not in neg[(0, 7)]
    # lag 2: round 1 reads nothing
    late = sibling_continuations(
        SiblingRows.of(ids, start, lengths, label_pos, pos_round, 3, 3, 2, "all_to_all")
    )
    assert [x for x in late[list(neg).index((0, 7))].tolist() if x >= 0] == []


def test_sibling_unlikelihood_values_padding_and_gradient() -> None:
    logits = torch.zeros(2, 4, requires_grad=True)  # p = 0.25 everywhere
    ids = torch.tensor([[0, 2, -1], [-1, -1, -1]])
    logp = torch.log_softmax(logits, -1).gather(1, ids.clamp_min(0))
    loss = sibling_unlikelihood(logp, ids)
    assert float(loss.detach()) == pytest.approx(2 * -math.log(0.75) / 2)
    loss.backward()
    g = logits.grad
    assert g[0, 0] > 0 and g[0, 2] > 0 and g[0, 1] < 0 and torch.all(g[1] == 0)  # negatives pushed down
    certain = torch.zeros(1, 1)  # log p = 0: finite
    assert math.isfinite(float(sibling_unlikelihood(certain, torch.tensor([[3]]))))
    assert float(sibling_unlikelihood(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long))) == 0.0
