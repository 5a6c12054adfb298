"""Quality figures of an answer: cross-stream redundancy and NLL under the plain trunk.

What it is: `redundancy(sections)` — how much K sections repeat each other: the mean, over stream
pairs, of the Jaccard overlap of their word 3-grams and of their named entities (capitalised
words and runs of them, less the function words that are capitalised only because they start a
sentence — "It", "The", "In"), averaged; 0 = nothing shared. `answer_nll(model, prompt_ids, ids)` — the
mean negative log-likelihood per token of an answer given the prompt, under the plain trunk
(sidecars off), the yardstick for "PDT writes as well as the trunk alone"; `merged_answer_ids`
— the token ids it scores for a K-section answer; `headed_section_nlls` — each section scored after
its stream header, the context it was written in (to compare PDT with the plain trunk writing the
same sectioned layout); `shared` — the entities and 3-grams behind the redundancy figure. What it is
not: a judge of factual quality.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter

import torch

_WORD = re.compile(r"\w+")
_ENTITY = re.compile(r"\b[A-Z][\w'-]*(?:\s+[A-Z][\w'-]*)*")


def _trigrams(text: str) -> set[tuple[str, ...]]:
    words = [w.lower() for w in _WORD.findall(text)]
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}


#: English function words that start a capitalised run only because they start a sentence ("It",
#: "The", "In 1905 Einstein"): dropped from the front of a run, so they never count as an entity.
FUNCTION_WORDS = frozenset(
    """a an the this that these those it its he his him she her hers they them their theirs we our
    us you your i my me in on at of for from to by with as into onto upon about after before during
    since until while when where which who whom whose what why how and but or nor so yet if then
    than though although because also however there here some many most such each every all both
    one not no""".split()
)


def _entities(text: str) -> set[str]:
    """Capitalised runs of words, lower-cased, less any function words at their front."""
    out = set()
    for m in _ENTITY.finditer(text):
        words = m.group().split()
        while words and words[0].lower() in FUNCTION_WORDS:
            words.pop(0)
        if words:
            out.add(" ".join(words).lower())
    return out


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def redundancy(sections: list[str]) -> float:
    """Mean pairwise overlap of word 3-grams and entities between sections, in [0, 1]."""
    pairs = list(itertools.combinations([s for s in sections if s.strip()], 2))
    if not pairs:
        return 0.0
    total = 0.0
    for a, b in pairs:
        total += 0.5 * (_jaccard(_trigrams(a), _trigrams(b)) + _jaccard(_entities(a), _entities(b)))
    return total / len(pairs)


def shared(sections: list[str]) -> tuple[Counter, Counter]:
    """What the section pairs share, the items behind `redundancy`: (entities, word 3-grams), each
    counted once per pair of non-empty sections that both hold it."""
    entities: Counter = Counter()
    trigrams: Counter = Counter()
    for a, b in itertools.combinations([s for s in sections if s.strip()], 2):
        entities.update(_entities(a) & _entities(b))
        trigrams.update(" ".join(t) for t in _trigrams(a) & _trigrams(b))
    return entities, trigrams


def merged_answer_ids(sections: list[list[int]], separator: list[int]) -> list[int]:
    """The merged answer as token ids: each non-empty section's ids as generated, in stream order,
    the separator's ids between them (the separator is scored too).

    Not `encode(merged text)`: the display text strips each section and re-encoding it changes the
    tokens at every seam (the leading space a section was generated with becomes part of another
    token), which the trunk then scores as text no stream wrote — on the tiny pipeline that cost
    0.2–0.3 nats a token of the merged answer, a seam artefact, not the streams' writing."""
    out: list[int] = []
    for ids in (s for s in sections if s):
        if out:
            out.extend(separator)
        out.extend(ids)
    return out


@torch.no_grad()
def token_nlls(trunk: torch.nn.Module, prompt_ids: list[int], ids: list[int]) -> torch.Tensor:
    """NLL (nats) of each of `ids` after `prompt_ids` under `trunk` alone, [len(ids)] fp32 on the CPU."""
    if not ids:
        return torch.zeros(0)
    device = next(trunk.parameters()).device
    x = torch.tensor([prompt_ids + ids], device=device)  # [1, P + A]
    logits = trunk(input_ids=x).logits[0, len(prompt_ids) - 1 : -1].float()  # [A, V]
    return torch.nn.functional.cross_entropy(logits, x[0, len(prompt_ids) :], reduction="none").cpu()


def answer_nll(trunk: torch.nn.Module, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """Mean NLL (nats/token) of `answer_ids` after `prompt_ids` under `trunk` alone (no hooks active)."""
    return float(token_nlls(trunk, prompt_ids, answer_ids).mean()) if answer_ids else float("nan")


def headed_section_nlls(
    trunk: torch.nn.Module,
    prompt_ids: list[int],
    sections: list[tuple[list[int], list[int]]],
    separator: list[int],
) -> torch.Tensor:
    """NLL of the sections' own tokens, each section after its stream's header.

    `sections`: (header ids, section ids) per stream, in stream order — the header being the stream
    prefix it read before writing ("Part k of K:"). Laid out as prompt, header 1, section 1,
    separator, header 2, section 2, …, and scored by `trunk` alone on the section tokens only (the
    headers and separators are context): each section in the context it was written in, less the
    notes. Empty sections are skipped. Returns [total section tokens] fp32 on the CPU."""
    ids: list[int] = []
    scored: list[bool] = []
    for header, section in (s for s in sections if s[1]):
        lead = (separator if ids else []) + list(header)
        ids += lead + list(section)
        scored += [False] * len(lead) + [True] * len(section)
    return token_nlls(trunk, prompt_ids, ids)[torch.tensor(scored, dtype=torch.bool)]
