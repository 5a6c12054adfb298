"""Token sampling for a plain trunk: temperature, top-p, n-gram repetition blocking, KV-cached loop.

What it is: the sampler used for periodic training samples and (later) by the K-stream decoder's
per-row sampling. What it is not: the PDT orchestrator (no notes bus, no rollback here).
"""

from __future__ import annotations

import torch

from pdt.model.attention import decode_attention


def banned_by_ngram(history: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in `history` (n < 1: none).

    With n = 3 and history [... a b c ... a b], token c is banned: "a b c" would repeat.
    """
    if n < 1 or len(history) < n:
        return []
    prefix = tuple(history[len(history) - n + 1 :]) if n > 1 else ()
    banned = []
    for i in range(len(history) - n + 1):
        if tuple(history[i : i + n - 1]) == prefix:
            banned.append(history[i + n - 1])
    return banned


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tail of the distribution beyond cumulative probability `top_p`. [V] → [V]."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token that crosses top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(0, order, sorted_logits)


def sample_next(
    logits: torch.Tensor,
    history: list[int],
    *,
    temperature: float,
    top_p: float,
    no_repeat_ngram: int,
    generator: torch.Generator,
) -> int:
    """One token from a [V] logit row. temperature 0 → greedy (after n-gram blocking)."""
    logits = logits.float().clone()
    banned = banned_by_ngram(history, no_repeat_ngram)
    if banned:
        logits[banned] = float("-inf")
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = top_p_filter(logits / temperature, top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    eot_id: int | None,
    temperature: float = 0.8,
    top_p: float = 0.9,
    no_repeat_ngram: int = 3,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[int]:
    """Sample a continuation with the model's KV cache (prefill once, then one token per forward)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    history = list(prompt_ids) or ([eot_id] if eot_id is not None else [0])
    out: list[int] = []
    ids = torch.tensor([history], dtype=torch.long, device=device)  # [1, T]
    past = None
    try:
        for _ in range(max_new_tokens):
            with decode_attention():
                result = model(input_ids=ids, past_key_values=past, use_cache=True)
            past = result.past_key_values
            token = sample_next(
                result.logits[0, -1],
                history,
                temperature=temperature,
                top_p=top_p,
                no_repeat_ngram=no_repeat_ngram,
                generator=generator,
            )
            if eot_id is not None and token == eot_id:
                break
            out.append(token)
            history.append(token)
            ids = torch.tensor([[token]], dtype=torch.long, device=device)  # [1, 1]
    finally:
        model.train(was_training)
    return out
