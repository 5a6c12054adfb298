"""Sampling: n-gram blocking, top-p, and the KV-cached loop against a full recompute."""

from __future__ import annotations

import torch

from pdt.infer.sampling import banned_by_ngram, generate, top_p_filter
from pdt.model.trunk import build_trunk
from pdt.presets.schema import TrunkConfig


def test_ngram_blocking() -> None:
    assert banned_by_ngram([1, 2, 3, 9, 1, 2], 3) == [3]
    assert banned_by_ngram([1, 2, 3, 1, 2, 4, 1, 2], 3) == [3, 4]
    assert banned_by_ngram([5, 6], 3) == []
    assert banned_by_ngram([5, 6, 5], 1) == [5, 6, 5]
    assert banned_by_ngram([1, 2, 1], 0) == []


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
    """sample_rows with the top-k shortcuts == with the full vocabulary sorted: peaked rows (the top
    256 hold ≥ top_p), middling rows (only the top 1024 do) and flat rows (neither: the full sort)."""
    import pdt.infer.sampling as sampling

    gen = torch.Generator().manual_seed(0)
    peaked = torch.randn(4, 8192, generator=gen) * 4
    middling = torch.randn(3, 8192, generator=gen) * 2
    flat = torch.randn(2, 8192, generator=gen) * 0.1
    calls: list[int] = []
    real_topk = torch.topk

    def spy(x, k, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(k)
        return real_topk(x, k, *args, **kwargs)

    def head_mass(x: torch.Tensor, k: int) -> torch.Tensor:
        return torch.topk(torch.softmax(x / 0.8, -1), k, -1).values.sum(-1)

    assert bool((head_mass(peaked, 256) >= 0.9).all())
    assert bool((head_mass(middling, 256) < 0.9).all()) and bool((head_mass(middling, 1024) >= 0.9).all())
    assert bool((head_mass(flat, 1024) < 0.9).all())
    for logits in (peaked, middling, flat):
        uniforms = torch.rand(logits.shape[0], generator=gen).tolist()
        args = dict(temperature=0.8, top_p=0.9, top_k=0, no_repeat_ngram=0)
        monkeypatch.setattr(torch, "topk", spy)
        fast = sampling.sample_rows(logits, [[]] * logits.shape[0], uniforms, **args)
        monkeypatch.setattr(torch, "topk", real_topk)
        monkeypatch.setattr(sampling, "NUCLEUS_HEADS", ())  # no shortcut: always the full sort
        full = sampling.sample_rows(logits, [[]] * logits.shape[0], uniforms, **args)
        monkeypatch.setattr(sampling, "NUCLEUS_HEADS", (256, 1024))
        assert fast == full
    assert calls == [256, 256, 1024, 256, 1024]  # peaked: one head; middling: two; flat: both, then the sort
