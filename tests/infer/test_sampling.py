"""Sampling: n-gram blocking, top-p, and the KV-cached loop against a full recompute."""

from __future__ import annotations

import torch

from pdt.infer.sampling import banned_by_ngram, generate, sample_rows, top_p_filter
from pdt.model.trunk import build_trunk
from pdt.presets.schema import TrunkConfig


def test_ngram_blocking() -> None:
    assert banned_by_ngram([1, 2, 3, 9, 1, 2], 3) == [3]
    assert banned_by_ngram([1, 2, 3, 1, 2, 4, 1, 2], 3) == [3, 4]
    assert banned_by_ngram([5, 6], 3) == []
    assert banned_by_ngram([5, 6, 5], 1) == [5, 6, 5]
    assert banned_by_ngram([1, 2, 1], 0) == []
    # bytes that match across a token boundary are no match: 256 = 00 01 00 …, 1 = 01 00 00 …
    assert banned_by_ngram([256, 0, 0, 1, 0], 3) == []
    assert banned_by_ngram([2**40, 3, 2**40], 2) == [3]


def test_ngram_blocking_equals_the_slice_by_slice_rule() -> None:
    """The byte search bans what comparing every (n − 1)-slice with the history's suffix bans, in the
    same order: random histories over small and large vocabularies, n = 1..5, lengths 0..300."""

    def by_slices(history: list[int], n: int) -> list[int]:
        if n < 1 or len(history) < n:
            return []
        suffix = history[len(history) - n + 1 :] if n > 1 else []
        return [history[i + n - 1] for i in range(len(history) - n + 1) if history[i : i + n - 1] == suffix]

    gen = torch.Generator().manual_seed(0)
    found = 0
    for trial in range(400):
        vocab = (3, 40, 70000)[trial % 3]
        length = int(torch.randint(0, 300, (1,), generator=gen))
        history = torch.randint(0, vocab, (length,), generator=gen).tolist()
        for n in range(0, 6):
            want = by_slices(history, n)
            assert banned_by_ngram(history, n) == want, (trial, n)
            found += bool(want) and n > 1
    assert found > 100  # the check met many real bans, not only empty lists


def test_top_p_keeps_the_nucleus() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [True, True, False, False]
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()
    assert torch.isfinite(top_p_filter(logits, 0.1)).sum() == 1  # the top token always survives


def test_greedy_generate_matches_full_recompute() -> None:
    cfg = TrunkConfig(
        model_type="llama",
        config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    )
    model = build_trunk(cfg, vocab_size=50, seq_len=64, eot_id=49, seed=0).eval()
    prompt = [3, 7, 11]
    out = generate(model, prompt, 8, eot_id=None, temperature=0.0, no_repeat_ngram=0)
    ids = list(prompt)
    for _ in range(8):  # no cache: recompute the whole prefix every token
        with torch.no_grad():
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert out == ids[len(prompt) :]


def test_the_nucleus_head_draws_what_the_full_sort_draws(monkeypatch) -> None:  # noqa: ANN001
    """sample_rows keeping only the tokens above a probability floor == with the whole vocabulary
    sorted, for peaked rows (the first floor holds ≥ top_p), middling rows (only the second does)
    and flat rows (neither: the last floor, (1 − top_p) / V), alone and mixed in one batch, and for
    uniforms at both ends of [0, 1)."""
    import pdt.infer.sampling as sampling

    gen = torch.Generator().manual_seed(0)
    v, top_p, temperature = 8192, 0.9, 0.8
    peaked = torch.randn(4, v, generator=gen) * 4
    middling = torch.randn(3, v, generator=gen) * 1.5
    flat = torch.randn(2, v, generator=gen) * 0.01  # half the vocabulary a little likelier: over
    flat[:, : v // 2] += 1.6  # 10% of the mass is in tokens under either floor

    def floor_mass(x: torch.Tensor, floor: float) -> torch.Tensor:
        p = torch.softmax(x / temperature, -1)
        return (p * (p >= floor)).sum(-1)

    first, second = sampling.NUCLEUS_FLOORS
    assert bool((floor_mass(peaked, first) >= top_p).all())
    assert bool((floor_mass(middling, first) < top_p).all())
    assert bool((floor_mass(middling, second) >= top_p).all())
    assert bool((floor_mass(flat, second) < top_p).all())
    mixed = torch.cat([flat[:1], peaked[:2], middling[:1]])
    args = dict(temperature=temperature, top_p=top_p, top_k=0, no_repeat_ngram=0)
    for logits in (peaked, middling, flat, mixed):
        n = logits.shape[0]
        for uniforms in (torch.rand(n, generator=gen).tolist(), [0.0] * n, [1.0 - 2**-24] * n):
            fast = sampling.sample_rows(logits, [[]] * n, uniforms, **args)
            with monkeypatch.context() as m:  # the full sort: what the CUDA path does
                m.setattr(sampling, "_sorted_head", lambda p, _: torch.sort(p, dim=-1, descending=True))
                full = sampling.sample_rows(logits, [[]] * n, uniforms, **args)
            assert fast == full
            # each row's draw is its own: the same as sampled alone (the padding changes nothing)
            pairs = zip(logits, uniforms, strict=True)
            alone = [sampling.sample_rows(row[None], [[]], [u], **args)[0] for row, u in pairs]
            assert fast == alone
            probs = torch.softmax(logits / temperature, -1)
            assert all(float(probs[i, t]) > 0 for i, t in enumerate(fast))


def test_uniforms_at_both_ends_pick_tokens_top_p_keeps() -> None:
    """The largest uniform picks the last token top-p keeps, not the first one it cuts (nor a padding
    entry of the CPU's head); the smallest picks the likeliest."""
    logits = torch.randn(1, 8192, generator=torch.Generator().manual_seed(1)) * 3  # no ties
    probs = torch.softmax(logits, -1)
    order = torch.sort(probs[0], descending=True)
    keep = int(((order.values.cumsum(0) - order.values) < 0.5).sum())
    allowed = set(order.indices[:keep].tolist())
    for u in (1.0 - 2**-24, 0.999999, 0.0):
        (token,) = sample_rows(logits, [[]], [u], temperature=1.0, top_p=0.5, top_k=0, no_repeat_ngram=0)
        assert token in allowed
    assert sample_rows(logits, [[]], [0.0], temperature=1.0, top_p=0.5, top_k=0, no_repeat_ngram=0) == [
        int(order.indices[0])
    ]


def test_banned_tokens_are_never_drawn_and_the_logits_are_not_written() -> None:
    """`banned` (EOS when a budget must be written) and the n-gram bans go to -inf in one scatter
    on a copy: the caller's fp32 logits are unchanged; the likeliest token, banned, is never drawn."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 512, generator=gen)
    logits[:, 7] = 50.0  # token 7 would take nearly all the mass
    before = logits.clone()
    args = dict(top_p=0.9, top_k=0, no_repeat_ngram=3)
    histories = [[1, 2, 3, 1, 2], [], [4, 5]]  # row 0 also bans 3 ("1 2 3" would repeat)
    assert sample_rows(logits, histories, [0.0] * 3, temperature=0.0, **args) == [7, 7, 7]
    greedy = sample_rows(logits, histories, [0.0] * 3, temperature=0.0, banned=(7,), **args)
    masked = logits.clone()
    masked[:, 7] = float("-inf")
    masked[0, 3] = float("-inf")
    assert greedy == masked.argmax(dim=-1).tolist()
    for _ in range(20):
        u = torch.rand(3, generator=gen).tolist()
        drawn = sample_rows(logits, histories, u, temperature=1.0, banned=(7,), **args)
        assert 7 not in drawn and drawn[0] != 3
    assert torch.equal(logits, before)
