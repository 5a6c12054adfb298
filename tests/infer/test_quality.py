"""Quality figures: redundancy between sections, NLL under the plain trunk, the merged answer's ids."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdt.data.tokenizer import build_tokenizer
from pdt.infer.orchestrator import SECTION_SEPARATOR
from pdt.infer.quality import (
    _entities,
    answer_nll,
    headed_section_nlls,
    merged_answer_ids,
    redundancy,
    shared,
    token_nlls,
)
from pdt.presets.schema import TokenizerConfig
from tests.model.test_pdt_model import tiny_trunk


def test_redundancy_orders_overlap() -> None:
    same = "The Moon orbits the Earth every month and Luna Park is lit."
    assert redundancy([same, same]) == pytest.approx(1.0)
    assert redundancy(["red green blue yellow", "one two three four"]) == 0.0
    partial = redundancy([same, "The Moon orbits the Sun as well, said Carl Sagan."])
    assert 0.0 < partial < 1.0
    assert redundancy([same, ""]) == 0.0  # an empty section pairs with nothing


def test_entities_are_names_not_sentence_starts() -> None:
    """A capitalised word that only starts a sentence ("It", "The", "In") is no entity; runs keep
    their names ("The United States" is "united states")."""
    text = "It orbits. The Moon is near. In 1905 Einstein wrote. He met Carl Sagan in The United States."
    assert _entities(text) == {"moon", "einstein", "carl sagan", "united states"}
    # two sections that share only their sentence starts and no 3-gram do not repeat each other
    assert redundancy(["It is big. The sky was red.", "It rains often. The sea stays calm."]) == 0.0
    # the same name and no 3-gram: entity overlap 1, 3-gram overlap 0
    assert redundancy(["It is big. The Moon was red.", "It rains often. The Moon stays calm."]) == 0.5
    # what the pairs share, once a pair: all 3 pairs of non-empty sections hold "moon" and "moon was
    # red", the first pair "the moon was" too
    ents, grams = shared(["It is big. The Moon was red.", "The Moon was red too.", "", "Moon was red"])
    assert ents == {"moon": 3} and grams == {"moon was red": 3, "the moon was": 1}


def test_answer_nll_is_the_mean_ce_of_the_answer_tokens() -> None:
    torch.manual_seed(0)
    trunk = tiny_trunk("llama").eval()
    prompt, answer = [5, 9, 2], [7, 7, 1, 30]
    with torch.no_grad():
        logits = trunk(input_ids=torch.tensor([prompt + answer])).logits[0]
    expect = F.cross_entropy(logits[len(prompt) - 1 : -1], torch.tensor(answer)).item()
    assert answer_nll(trunk, prompt, answer) == pytest.approx(expect, rel=1e-5)
    assert answer_nll(trunk, prompt, []) != answer_nll(trunk, prompt, [])  # nan: nothing to score


def test_merged_answer_ids_keep_the_sections_as_generated() -> None:
    assert merged_answer_ids([[1, 2], [], [3]], [9, 9]) == [1, 2, 9, 9, 3]
    assert merged_answer_ids([[4, 5]], [9]) == [4, 5]
    assert merged_answer_ids([[], []], [9]) == []
    tok = build_tokenizer(TokenizerConfig(vocab_size=4096))
    sections = [tok.encode(" The Moon is bright."), tok.encode(" (1858) It was"), tok.encode(" far away.")]
    ids = merged_answer_ids(sections, tok.encode(SECTION_SEPARATOR))
    assert tok.decode(ids) == SECTION_SEPARATOR.join(tok.decode(s) for s in sections)
    # re-encoding the stripped display text would not give the generated tokens back
    stripped = SECTION_SEPARATOR.join(tok.decode(s).strip() for s in sections)
    assert tok.encode(stripped) != ids


def test_headed_section_nlls_score_each_section_after_its_header_only() -> None:
    torch.manual_seed(0)
    trunk = tiny_trunk("llama").eval()
    prompt, sep = [5, 9, 2], [3, 3]
    sections = [([40, 41], [7, 8, 9]), ([42, 41], []), ([43, 41], [10, 11])]  # the empty one is skipped
    got = headed_section_nlls(trunk, prompt, sections, sep)
    # the layout: prompt | 40 41 7 8 9 | 3 3 43 41 10 11; scored: 7 8 9 and 10 11
    every = token_nlls(trunk, prompt, [40, 41, 7, 8, 9, 3, 3, 43, 41, 10, 11])
    assert got.shape == (5,)
    assert torch.allclose(got, every[[2, 3, 4, 9, 10]])
    with torch.no_grad():
        logits = trunk(input_ids=torch.tensor([prompt + [40, 41, 7, 8, 9, 3, 3, 43, 41, 10]])).logits[0]
    assert got[-1].item() == pytest.approx(F.cross_entropy(logits[-1:], torch.tensor([11])).item(), rel=1e-5)
    # the header is context: another header changes the section's score
    other = headed_section_nlls(trunk, prompt, [([44, 45], [7, 8, 9])], sep)
    assert not torch.allclose(other, got[:3])
    assert headed_section_nlls(trunk, prompt, [([1], [])], sep).numel() == 0
