"""The decode-step API: K rows in one batched forward, each with its own length; rollback masks a
row's later cache slots, and the next token equals a fresh decode of the committed prefix."""

from __future__ import annotations

import pytest
import torch

from pdt.model.decode import StreamDecoder
from pdt.model.instrument import SidecarContext
from pdt.model.pdt_model import PDTModel

from .test_pdt_model import CFG, DN, K, V, Window, open_gates, tiny_trunk

PROMPT = [5, 17, 3, 44, 9]
PREFIXES = [[11], [12, 13, 14], [15, 16]]  # ragged on purpose


def plain_next_logits(trunk: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return trunk(input_ids=torch.tensor([ids])).logits[0, -1]


def feed_prefixes(decoder: StreamDecoder, state, context=None):  # noqa: ANN001, ANN202
    longest = max(len(p) for p in PREFIXES)
    logits = None
    for i in range(longest):
        active = torch.tensor([i < len(p) for p in PREFIXES])
        tokens = torch.tensor([p[i] if i < len(p) else 0 for p in PREFIXES])
        out, _ = decoder.step(state, tokens, active, context)
        logits = out if logits is None else torch.where(active[:, None], out, logits)
    return logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2", "gpt_neox", "gpt_oss"])
def test_batched_rows_equal_solo_decodes_and_rollback(arch: str) -> None:
    model = PDTModel(tiny_trunk(arch), CFG)
    decoder = StreamDecoder(model)
    state, _ = decoder.prefill(PROMPT, rows=K)
    logits = feed_prefixes(decoder, state)
    for step in range(3):  # greedy, hooks inactive: each row must match the plain trunk on its own text
        for r in range(K):
            expect = plain_next_logits(
                model.trunk, PROMPT + PREFIXES[r] + state.tokens[r][len(PREFIXES[r]) :]
            )
            assert torch.allclose(logits[r], expect, atol=1e-5), (arch, step, r)
        logits, _ = decoder.step(state, logits.argmax(-1), torch.ones(K, dtype=torch.bool), None)
    # Roll row 1 back to the end of its prefix and feed another token: a fresh decode must agree.
    committed = len(PROMPT) + len(PREFIXES[1])
    decoder.rollback(state, 1, committed)
    assert state.tokens[1] == PREFIXES[1]
    new = torch.tensor([7, 7, 7])
    logits, _ = decoder.step(state, new, torch.tensor([False, True, False]), None)
    expect = plain_next_logits(model.trunk, PROMPT + PREFIXES[1] + [7])
    assert torch.allclose(logits[1], expect, atol=1e-5)
    assert int(state.lengths[1]) == committed + 1
    assert state.kv_bytes() > 0


def test_rows_are_independent_with_sidecars_on() -> None:
    """Row r's logits in a K-row batch equal a 1-row decode of that stream with the same window."""
    model = PDTModel(tiny_trunk("llama"), CFG)
    open_gates(model, snc=True, adapters=True)
    gen = torch.Generator().manual_seed(0)
    notes = torch.randn(K, 4, DN, generator=gen)  # [R, N, d_n]
    producer = torch.tensor([[K, 0, 1, 2]] * K)
    rounds = torch.zeros(K, 4, dtype=torch.long)
    visible = torch.ones(K, 4, dtype=torch.bool)

    def ctx(rows: list[int]) -> SidecarContext:
        return SidecarContext(
            stream_ids=torch.tensor(rows),
            notes=notes[rows],
            producer=producer[rows],
            rounds=rounds[rows],
            visible=visible[rows],
        )

    decoder = StreamDecoder(model)
    state, _ = decoder.prefill(PROMPT, rows=K)
    batched, _ = decoder.step(
        state, torch.tensor([11, 12, 13]), torch.ones(K, dtype=torch.bool), ctx([0, 1, 2])
    )
    for r in range(K):
        solo_state, _ = decoder.prefill(PROMPT, rows=1)
        solo, _ = decoder.step(solo_state, torch.tensor([11 + r]), torch.ones(1, dtype=torch.bool), ctx([r]))
        assert torch.allclose(batched[r], solo[0], atol=1e-5), r
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)
    assert V > 0


def test_rollback_bounds_are_checked() -> None:
    decoder = StreamDecoder(PDTModel(tiny_trunk("llama"), CFG))
    state, _ = decoder.prefill(PROMPT, rows=2)
    with pytest.raises(ValueError, match="within"):
        decoder.rollback(state, 0, len(PROMPT) - 1)


def test_note_kv_cache_gives_the_same_logits() -> None:
    """A context reused for a round projects the notes once; the logits equal recomputing them."""
    model = PDTModel(tiny_trunk("llama"), CFG)
    open_gates(model, snc=True, adapters=True)
    gen = torch.Generator().manual_seed(4)
    n = 4
    base = dict(
        stream_ids=torch.arange(K),
        notes=torch.randn(K, n, DN, generator=gen),
        producer=torch.tensor([[K, 0, 1, 2]] * K),
        rounds=torch.zeros(K, n, dtype=torch.long),
        visible=torch.ones(K, n, dtype=torch.bool),
    )
    cached = SidecarContext(**base, kv_cache={})
    decoder = StreamDecoder(model)
    a_state, _ = decoder.prefill(PROMPT, rows=K)
    b_state, _ = decoder.prefill(PROMPT, rows=K)
    active = torch.ones(K, dtype=torch.bool)
    for token in (11, 12, 13):
        a, _ = decoder.step(a_state, torch.full((K,), token), active, cached)
        b, _ = decoder.step(b_state, torch.full((K,), token), active, SidecarContext(**base))
        assert torch.allclose(a, b, atol=1e-6)
    assert len(cached.kv_cache) == CFG.n_layers


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2", "gpt_oss"])
def test_extend_equals_a_token_at_a_time(arch: str) -> None:
    """Ragged runs of tokens in one forward leave the rows as stepping them one token at a time does:
    the same last logits and hidden states, then the same next steps (sliding windows crossed: the
    tiny mistral and gpt_oss windows are 8) and the same rollback."""
    model = PDTModel(tiny_trunk(arch), CFG)
    open_gates(model, snc=True, adapters=True)
    window = Window(K, 4, 1, seed=2)
    ctx = SidecarContext(
        stream_ids=torch.arange(K),
        notes=window.notes,
        producer=window.producer,
        rounds=window.rounds,
        visible=window.visible[:, 0],
    )
    decoder = StreamDecoder(model)
    stepped, _ = decoder.prefill(PROMPT, rows=K)
    extended, _ = decoder.prefill(PROMPT, rows=K)
    a = feed_prefixes(decoder, stepped, ctx)
    b, hidden = decoder.extend(extended, PREFIXES, ctx)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert hidden.shape == (K, model.d_model)
    assert extended.tokens == stepped.tokens == PREFIXES
    assert torch.equal(extended.lengths, stepped.lengths)
    assert not torch.allclose(b[0], b[1], atol=1e-3)  # each row's own last token, not a shared one
    live = torch.ones(K, dtype=torch.bool)
    for _ in range(6):  # past the sliding window
        token = a.argmax(-1)
        assert torch.equal(token, b.argmax(-1))
        a, _ = decoder.step(stepped, token, live, ctx)
        b, _ = decoder.step(extended, token, live, ctx)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    for state in (stepped, extended):
        decoder.rollback(state, 2, len(PROMPT) + len(PREFIXES[2]))
    a, _ = decoder.step(stepped, torch.tensor([7, 7, 7]), torch.tensor([False, False, True]), ctx)
    b, _ = decoder.step(extended, torch.tensor([7, 7, 7]), torch.tensor([False, False, True]), ctx)
    torch.testing.assert_close(b[2], a[2], atol=1e-5, rtol=1e-5)


def test_extend_refuses_an_empty_run() -> None:
    decoder = StreamDecoder(PDTModel(tiny_trunk("llama"), CFG))
    state, _ = decoder.prefill(PROMPT, rows=2)
    with pytest.raises(ValueError, match="non-empty run"):
        decoder.extend(state, [[3], []], None)
