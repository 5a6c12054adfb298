"""The K-stream decoder: batching is exact, rollback really removes a block, Δ holds, baselines are honest.

A tiny Llama from a config with opened sidecar gates (trained-looking sidecars), and a character
tokenizer (a stand-in: the decoder only needs encode/decode/eot_id).
"""

from __future__ import annotations

import pytest
import torch

from pdt.bus import Counterfactual
from pdt.infer.orchestrator import DecodeSettings, ParallelDecoder
from pdt.model.pdt_model import PDTModel
from pdt.presets.schema import BusConfig
from tests.model.test_pdt_model import CFG, K, open_gates, tiny_trunk

PROMPT = "Tell me about the Moon."


class CharTok:
    """Printable ASCII ↔ ids 1..95; id 0 is the trunk's EOS."""

    eot_id = 0

    def encode(self, text: str) -> list[int]:
        return [min(95, max(1, ord(c) - 31)) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i + 31) for i in ids if 1 <= i <= 95)


@pytest.fixture(scope="module")
def model() -> PDTModel:
    m = PDTModel(tiny_trunk("llama"), CFG)
    open_gates(m, snc=True, adapters=True)
    return m.eval()


def settings(**over) -> DecodeSettings:  # noqa: ANN003
    base = dict(
        num_streams=K,
        tau=4,
        bus=BusConfig(lag=1, window=4),
        gamma=0.0,
        max_retries=2,
        temperature=0.0,
        no_repeat_ngram=0,
        max_new_tokens=12,
        ignore_eos=True,
    )
    base.update(over)
    return DecodeSettings(**base)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_batched_streams_equal_each_stream_decoded_alone_with_the_same_windows(
    model: PDTModel, temperature: float
) -> None:
    dec = ParallelDecoder(model, CharTok(), settings(temperature=temperature, top_k=20))
    full = dec.decode(PROMPT, "pdt")
    assert full.steps > 0 and all(len(s.token_ids) == 12 for s in full.streams)
    assert len({tuple(s.token_ids) for s in full.streams}) == K  # the streams really differ
    for k in range(K):
        alone = dec.decode(PROMPT, "pdt", streams=[k], recorded=full.recorded)
        assert alone.streams[0].token_ids == full.streams[k].token_ids, k


def test_the_window_changes_what_a_stream_writes(model: PDTModel) -> None:
    """Guard for the test above: the notes really reach the logits (an ablated bus gives other text)."""
    base = ParallelDecoder(model, CharTok(), settings()).decode(PROMPT, "pdt")
    ablated = ParallelDecoder(model, CharTok(), settings(counterfactual=Counterfactual(ablate={0, 1, 2})))
    other = ablated.decode(PROMPT, "pdt")
    assert [s.token_ids for s in other.streams] != [s.token_ids for s in base.streams]


def test_a_rollback_removes_the_block_from_text_and_cache(model: PDTModel) -> None:
    """γ = 1 rolls every block back twice and then forces it. Stream 0 alone reads only its own
    notes, so its retries see the same window: greedy retries equal the first try and the answer
    equals one decoded without rollbacks — only if the rolled-back tokens left the cache."""
    clean = ParallelDecoder(model, CharTok(), settings()).decode(PROMPT, "pdt", streams=[0])
    dec = ParallelDecoder(model, CharTok(), settings(gamma=1.0, max_retries=2))
    rolled = dec.decode(PROMPT, "pdt", streams=[0])
    rec = rolled.streams[0]
    assert rolled.rollbacks == 2 * len(rec.blocks) > 0
    assert all([a.decision for a in block] == ["rollback", "rollback", "forced"] for block in rec.blocks)
    assert all(block[0].tokens == block[-1].tokens for block in rec.blocks)
    assert rec.token_ids == clean.streams[0].token_ids
    state = rolled.state
    assert state.tokens[0] == rec.prefix_ids + rec.token_ids  # conditioned on exactly the committed text
    assert int(state.lengths[0]) == len(rolled.prompt_ids) + len(rec.prefix_ids) + len(rec.token_ids)


def test_rollbacks_in_a_batch_leave_every_row_as_if_decoded_alone(model: PDTModel) -> None:
    """All three rows roll back and retry in one batch (the retries read fresher windows); each
    row's committed text equals that stream decoded alone through the same windows and decisions."""
    dec = ParallelDecoder(model, CharTok(), settings(gamma=1.0, max_retries=1, max_new_tokens=8))
    out = dec.decode(PROMPT, "pdt")
    assert out.rollbacks == sum(len(s.blocks) for s in out.streams) > 0
    for r, rec in enumerate(out.streams):
        assert out.state.tokens[r] == rec.prefix_ids + rec.token_ids
        alone = dec.decode(PROMPT, "pdt", streams=[r], recorded=out.recorded)
        assert alone.streams[0].token_ids == rec.token_ids


def test_readiness_reads_the_means_of_the_block_and_of_the_committed_section(model: PDTModel) -> None:
    """The content the readiness head gets at a block end is the mean hidden state of the block's
    own steps and of the committed blocks with it (training's `content_means`); a rolled-back
    block leaves the section's mean."""
    dec = ParallelDecoder(model, CharTok(), settings(gamma=1.0, max_retries=1, max_new_tokens=8))
    steps: list[torch.Tensor] = []  # hidden [R, D] of every step
    judged: list[tuple[int, torch.Tensor]] = []  # (steps so far, content [R, 2, D]) at each block end
    step, score = dec.decoder.step, model.agreement_head.score

    def record_step(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        logits, hidden = step(*args, **kwargs)
        steps.append(hidden.detach().float().clone())
        return logits, hidden

    def record_score(*args):  # noqa: ANN002, ANN202
        judged.append((len(steps), args[4].detach().clone()))
        return score(*args)

    dec.decoder.step, model.agreement_head.score = record_step, record_score
    try:
        out = dec.decode(PROMPT, "pdt")
    finally:
        del model.agreement_head.score
    assert out.rollbacks > 0 and len(judged) == 4  # two blocks of 4 tokens, each rolled back once
    assert out.prefix_steps == 1  # the prefixes: one `extend` forward, so `steps` holds the answer's only
    start = 0
    for r, rec in enumerate(out.streams):
        attempts = sorted((a for block in rec.blocks for a in block), key=lambda a: a.slot)
        committed: list[torch.Tensor] = []
        for (upto, content), a in zip(judged, attempts, strict=True):
            first = judged[a.slot - 1][0] if a.slot else start
            block = torch.stack([h[r] for h in steps[first:upto]])  # this try's τ steps
            assert len(block) == len(a.tokens) == 4
            torch.testing.assert_close(content[r, 0], block.mean(0))
            torch.testing.assert_close(content[r, 1], torch.cat(committed + [block]).mean(0))
            if a.decision in ("commit", "forced"):
                committed.append(block)
        assert [a.decision for a in attempts] == ["rollback", "forced"] * 2


def test_content_sums_count_only_the_rows_each_step_fed() -> None:
    """Rows that a step did not feed (finished, or waiting) add nothing to their block's mean; a
    rolled-back block leaves the section; every block starts afresh."""
    from pdt.infer.orchestrator import _ContentSums

    sums = _ContentSums(3, 4, torch.device("cpu"))
    h = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    sums.add(h[0], [True, True, True])
    sums.add(h[1], [True, False, True])
    sums.add(h[2], [False, False, True])
    got = sums.means()
    torch.testing.assert_close(got[0, 0], (h[0][0] + h[1][0]) / 2)
    torch.testing.assert_close(got[1, 0], h[0][1])
    torch.testing.assert_close(got[2, 0], (h[0][2] + h[1][2] + h[2][2]) / 3)
    torch.testing.assert_close(got[:, 1], got[:, 0])  # nothing committed yet: the section is the block
    sums.end_block([0, 2])  # row 1 rolled back
    sums.add(h[3], [True, True, False])
    got = sums.means()
    torch.testing.assert_close(got[0, 0], h[3][0])
    torch.testing.assert_close(got[0, 1], (h[0][0] + h[1][0] + h[3][0]) / 3)
    torch.testing.assert_close(got[1, 1], h[3][1])  # its rolled-back block is gone
    assert not got[2, 0].any()  # fed nothing this block: zeros, not NaN
    torch.testing.assert_close(got[2, 1], (h[0][2] + h[1][2] + h[2][2]) / 3)


@pytest.mark.parametrize("lag", [0, 1, 2])
def test_lag_is_respected_at_decode(model: PDTModel, lag: int) -> None:
    dec = ParallelDecoder(model, CharTok(), settings(bus=BusConfig(lag=lag, window=8), max_new_tokens=20))
    out = dec.decode(PROMPT, "pdt")
    seen_other = False
    for slot, per_stream in out.windows.items():
        for k, pairs in per_stream.items():
            for producer, r in pairs:
                if producer == K:
                    continue  # snapshot 0
                assert r < slot, (slot, k, producer, r)
                if producer != k:
                    assert r <= slot - lag, (slot, k, producer, r)
                    seen_other = True
    assert seen_other


def test_sequential_baseline_equals_transformers_greedy_generate(model: PDTModel) -> None:
    tok = CharTok()
    dec = ParallelDecoder(model, tok, settings(max_new_tokens=7))
    out = dec.decode(PROMPT, "sequential")
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        ref = model.trunk.generate(
            ids,
            max_new_tokens=K * 7,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            min_new_tokens=K * 7,
        )
    expect = ref[0, ids.shape[1] :].tolist()
    assert out.streams[0].token_ids == expect
    assert len(expect) == K * 7


def test_sequential_writes_the_total_it_is_given_and_independent_has_no_bus(model: PDTModel) -> None:
    dec = ParallelDecoder(model, CharTok(), settings(max_new_tokens=6))
    seq = dec.decode(PROMPT, "sequential", total_tokens=11)
    assert len(seq.streams[0].token_ids) == 11
    ind = dec.decode(PROMPT, "independent")
    assert ind.windows == {} and ind.timeline == []
    assert all(a.decision == "" and a.readiness is None for s in ind.streams for b in s.blocks for a in b)
    # g = 0 with the adapters on: the same as PDT with the bus ablated and g = 0
    ablated = ParallelDecoder(model, CharTok(), settings(max_new_tokens=6, g=0.0)).decode(PROMPT, "pdt")
    assert [s.token_ids for s in ind.streams] == [s.token_ids for s in ablated.streams]


@pytest.mark.parametrize("mode", ["pdt", "sequential"])
def test_the_phases_account_for_the_answers_wall_clock(model: PDTModel, mode: str) -> None:
    res = ParallelDecoder(model, CharTok(), settings(max_new_tokens=8)).decode(PROMPT, mode)
    phases = res.phase_seconds
    want = {"prefill", "steps", "capture", "other"} | ({"plan", "block_ends"} if mode == "pdt" else set())
    assert set(phases) == want
    assert phases["capture"] == 0.0  # the eager engine captures no graph
    assert all(v >= 0.0 for v in phases.values())
    assert phases["steps"] == pytest.approx(sum(res.step_seconds))
    assert phases["prefill"] > 0.0 and phases["steps"] > 0.0
    assert sum(phases.values()) == pytest.approx(res.seconds, rel=1e-6, abs=1e-6)


def test_a_step_is_queued_before_its_tokens_host_work(model: PDTModel) -> None:
    """Each decode step is launched as soon as its tokens are sampled; their live text and events
    follow it (on CUDA they run while the GPU computes the step), and each step's events come
    before the next step. The step's time on the CPU is the step alone, not that host work."""
    from pdt.telemetry.events import StreamToken

    log: list[tuple[str, tuple[int, ...]]] = []

    def emit(event: object) -> None:
        if isinstance(event, StreamToken):
            log.append(("token", (event.stream, event.token)))

    dec = ParallelDecoder(model, CharTok(), settings(max_new_tokens=8), emit=emit)
    step = dec.decoder.step

    def spy(state, tokens, active, ctx):  # noqa: ANN001, ANN202
        fed = zip(tokens.tolist(), active.tolist(), strict=True)
        log.append(("step", tuple((k, t) for k, (t, a) in enumerate(fed) if a)))
        return step(state, tokens, active, ctx)

    dec.decoder.step = spy  # type: ignore[method-assign]
    res = dec.decode(PROMPT, "pdt")
    steps = [i for i, (what, _) in enumerate(log) if what == "step"]  # the answer's (prefixes: `extend`)
    tokens = [i for i, (what, _) in enumerate(log) if what == "token"]
    assert len(tokens) == K * 8
    for n, i in enumerate(steps):
        fed = set(log[i][1])
        following = [log[j][1] for j in tokens if i < j < (steps[n + 1] if n + 1 < len(steps) else len(log))]
        assert set(following) == fed  # this step's tokens, after it and before the next step
    assert all(len(s.token_ids) == 8 for s in res.streams)


@pytest.mark.parametrize("mode", ["pdt", "sequential", "independent"])
def test_every_trunk_pass_of_an_answer_keeps_cudnn_attention_off(model: PDTModel, mode: str) -> None:
    """cuDNN attention builds a plan per new shape; an answer's prefill and plan-item embeddings have
    a new shape with each prompt, so they run on the decode backends like the steps do."""
    seen: list[tuple[int, bool]] = []
    hook = model.trunk.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(
            (
                (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[1],
                torch.backends.cuda.cudnn_sdp_enabled(),
            )
        ),
        with_kwargs=True,
    )
    assert torch.backends.cuda.cudnn_sdp_enabled()  # the default outside an answer
    try:
        items = [["Moon", "Apollo"], ["tides"], ["Luna 2", "craters", "orbit"]]
        ParallelDecoder(model, CharTok(), settings(max_new_tokens=4)).decode(
            PROMPT, mode, plan_items=items if mode == "pdt" else None
        )
    finally:
        hook.remove()
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored after it
    lengths = {n for n, _ in seen}
    assert len(PROMPT) in lengths and 1 in lengths  # the prefill and the steps were both seen
    if mode == "pdt":
        assert max(len(x) for row in items for x in row) in lengths  # the items' embedding pass
    assert not any(enabled for _, enabled in seen)


def test_live_text_pieces_never_split_a_character() -> None:
    from pdt.data.tokenizer import Tokenizer
    from pdt.infer.orchestrator import _Detok

    tok = Tokenizer(vocab_size=1024)  # a small BPE: Greek letters split into byte tokens
    text = "The word is derived from the Greek χλλύγευγία (euangelion), meaning “good news”."
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the case being tested occurs
    detok = _Detok(tok)
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert detok.flush() == ""  # nothing held back
    # A stream that ends mid-character: the held-back bytes come out at the end (as the record's
    # text has them), so the live pieces plus the tail are the stream's text.
    cut = next(n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd"))
    detok = _Detok(tok)
    pieces = [detok.push(i) for i in ids[:cut]]
    tail = detok.flush()
    assert tail.endswith("\ufffd") and "".join(pieces) + tail == tok.decode(ids[:cut])
    assert detok.flush() == ""


def test_the_planners_plan_reads_as_the_item_texts_it_stands_for(model: PDTModel) -> None:
    plain = ParallelDecoder(model, CharTok(), settings(max_new_tokens=4)).decode(PROMPT, "pdt")
    assert plain.plan is not None and plain.plan.source == "planner"
    slots = plain.plan.slot_ids
    assert plain.plan.items[0] == [f"plan id {i}" for i in slots]
    names = {slots[0]: "Apollo 11"}  # one id named, the others not
    named = ParallelDecoder(model, CharTok(), settings(max_new_tokens=4), plan_names=names).decode(
        PROMPT, "pdt"
    )
    assert named.plan.items[0][0] == "Apollo 11"
    assert named.plan.items[0][1:] == [f"plan id {i}" for i in slots[1:]]
    assert named.streams[0].token_ids == plain.streams[0].token_ids  # names label, they change nothing


def test_coverage_reads_each_plan_items_text_embedding(
    model: PDTModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The coverage head scores the stream's plan items as the frozen trunk's embeddings of their
    texts (as the curriculum trained it): given items by their own text, the planner's ids by the
    training text they stand for (`plan_names`), an id with no text by its learned embedding."""
    seen: list[torch.Tensor] = []
    real = model.coverage_head.forward

    def spy(state, items, mask):  # noqa: ANN001, ANN202
        seen.append(items.detach().clone())
        return real(state, items, mask)

    monkeypatch.setattr(model.coverage_head, "forward", spy)
    tok = CharTok()

    def text_key(text: str) -> torch.Tensor:
        ids = torch.tensor([tok.encode(text)])
        return torch.nn.functional.normalize(model.embed_texts(ids, torch.ones_like(ids))[0], dim=-1)

    items = [["Moon", "Apollo"], ["tides"], ["Luna 2", "craters", "orbit"]]
    ParallelDecoder(model, tok, settings(max_new_tokens=4)).decode(PROMPT, "pdt", plan_items=items)
    assert seen
    for r, row in enumerate(items):
        for j, text in enumerate(row):
            torch.testing.assert_close(seen[0][r, j], text_key(text), atol=1e-5, rtol=1e-5)

    seen.clear()
    plain = ParallelDecoder(model, tok, settings(max_new_tokens=4)).decode(PROMPT, "pdt")
    slots = plain.plan.slot_ids
    seen.clear()
    ParallelDecoder(model, tok, settings(max_new_tokens=4), plan_names={slots[0]: "Apollo 11"}).decode(
        PROMPT, "pdt"
    )
    torch.testing.assert_close(seen[0][0, 0], text_key("Apollo 11"), atol=1e-5, rtol=1e-5)
    learned = model.planner.item_embeddings(torch.tensor(slots[1:]))
    torch.testing.assert_close(seen[0][0, 1 : len(slots)], learned)

    # Embeddings handed over (the export's file) are read, not recomputed: given "Luna 2"'s vector
    # for the text "Apollo 11", the head sees it, and the trunk embeds nothing for the plan.
    ids = torch.tensor([tok.encode("Luna 2")])
    given = (["Apollo 11"], model.embed_texts(ids, torch.ones_like(ids), centred=False).detach())
    embedded = []
    real_embed = model.embed_texts
    expect = text_key("Luna 2")
    monkeypatch.setattr(model, "embed_texts", lambda *a, **k: embedded.append(1) or real_embed(*a, **k))
    seen.clear()
    ParallelDecoder(
        model, tok, settings(max_new_tokens=4), plan_names={slots[0]: "Apollo 11"}, item_vectors=given
    ).decode(PROMPT, "pdt")
    torch.testing.assert_close(seen[0][0, 0], expect, atol=1e-5, rtol=1e-5)
    assert not embedded


def test_own_snapshot0_gives_each_stream_the_snapshot_of_its_own_plan(model: PDTModel) -> None:
    """`own_snapshot0`: stream k's window holds the snapshot of its own plan items (given items, or
    the planner's slots j with j mod K = k); a stream with none reads the whole plan's; the streams'
    text changes with it, and batching stays exact (each stream alone, same windows)."""
    from pdt.infer.orchestrator import masked_mean_pool

    items = [["Moon", "Apollo"], ["Luna"], []]
    dec = ParallelDecoder(model, CharTok(), settings(own_snapshot0=True))
    res = dec.decode(PROMPT, "pdt", plan_items=items)
    whole = ParallelDecoder(model, CharTok(), settings()).decode(PROMPT, "pdt", plan_items=items)
    planner = model.planner

    def snap(ids: list[int]) -> torch.Tensor:
        return planner.snapshot0(torch.tensor([ids]))[0]

    window = res.recorded[0]
    for k in range(K):
        want = snap(res.plan.item_ids[k]) if items[k] else snap(res.plan.slot_ids)
        torch.testing.assert_close(window.notes[k, 0], want)
        torch.testing.assert_close(whole.recorded[0].notes[k, 0], snap(res.plan.slot_ids))
    assert [s.token_ids for s in res.streams] != [s.token_ids for s in whole.streams]
    for k in range(K):
        alone = dec.decode(PROMPT, "pdt", plan_items=items, streams=[k], recorded=res.recorded)
        assert alone.streams[0].token_ids == res.streams[k].token_ids, k
    # the planner's own plan: slot j belongs to stream j mod K
    res = dec.decode(PROMPT, "pdt")
    state, _ = dec.decoder.prefill(CharTok().encode(PROMPT), 1, 4)
    chosen, active = planner.own_plan(planner.logits_pooled(masked_mean_pool(state.prompt_hidden, None)))
    for k in range(K):
        mine = [int(chosen[0, j]) for j in range(chosen.shape[1]) if active[0, j] and j % K == k]
        want = snap(mine) if mine else snap(res.plan.slot_ids)
        torch.testing.assert_close(res.recorded[0].notes[k, 0], want)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("mode", ["pdt", "independent"])
def test_prefixes_in_one_forward_give_the_token_a_step_answer(
    model: PDTModel, mode: str, alpha: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`PREFIX_ONE_FORWARD` (every stream's prefix in one `extend`, ragged prefixes, the α < 1 base
    state too) writes the answer the prefixes fed a token a step write: the same tokens and
    rollbacks, each row's cache as long; one forward booked for the prefixes instead of one a token."""
    from pdt.infer import orchestrator

    over = dict(
        alpha=alpha, gamma=0.6, max_retries=1, prefixes=("A:", "Part two:", "3"), temperature=0.9, top_k=20
    )
    monkeypatch.setattr(orchestrator, "PREFIX_ONE_FORWARD", False)
    stepped = ParallelDecoder(model, CharTok(), settings(**over)).decode(PROMPT, mode)
    monkeypatch.setattr(orchestrator, "PREFIX_ONE_FORWARD", True)
    one = ParallelDecoder(model, CharTok(), settings(**over)).decode(PROMPT, mode)
    assert [s.token_ids for s in one.streams] == [s.token_ids for s in stepped.streams]
    assert one.rollbacks == stepped.rollbacks and (mode == "independent" or one.rollbacks > 0)
    assert one.state.lengths.tolist() == stepped.state.lengths.tolist()
    longest = max(len(s.prefix_ids) for s in one.streams)
    assert stepped.prefix_steps == longest > 2 and one.prefix_steps == 1
    assert one.steps == stepped.steps - longest + 1
