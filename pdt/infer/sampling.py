"""Token sampling: temperature, top-k, top-p, n-gram repetition blocking; a KV-cached plain loop.

What it is: `sample_next` and `generate` (one row: the periodic samples during pretraining) and
`sample_rows` (all rows of a decode step at once: the K-stream decoder and its baselines share
it, so they sample alike). What it is not: the PDT orchestrator (`pdt.infer.orchestrator`).
"""

from __future__ import annotations

from array import array

import torch

from pdt.model.attention import cache_arg, decode_attention, output_cache


def banned_by_ngram(history: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in `history` (n < 1: none), in order.

    With n = 3 and history [... a b c ... a b], token c is banned: "a b c" would repeat. The history
    is searched as bytes (8 per token: `bytes.find` runs in C, a match counts only at a token
    boundary), not compared slice by slice in Python: a decode step searches every row's whole
    history, so a long answer paid a cost growing with its length each token (2-core CPU, random
    histories, n = 3: 34 → 6–7 µs at 384 tokens, 200 → 29–34 µs at 2048).
    """
    if n < 1 or len(history) < n:
        return []
    if n == 1:
        return list(history)
    width = 8
    data = array("q", history).tobytes()
    limit = len(data) - (n - 1) * width  # a match must start before the history's own last n − 1
    suffix = data[limit:]
    banned = []
    at = data.find(suffix, 0, len(data) - width)
    while at != -1 and at < limit:
        if at % width == 0:
            banned.append(history[at // width + n - 1])
        at = data.find(suffix, at + 1, len(data) - width)
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
                result = model(input_ids=ids, use_cache=True, **{cache_arg(model): past})
            past = output_cache(result)
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


NUCLEUS_FLOORS = (3e-4, 3e-5)


def _sorted_head(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities sorted descending with their token ids — only as far as top-p can reach.

    On the CPU a full sort of the vocabulary dominates a decode step's host time (3 × 8192: ~1.3 ms,
    3 × 50257: ~6 ms on the 2-core CI machine), and so does a top-k head of it on a trained model's
    rows (top 256 of 3 × 8192: ~0.19 ms, top 1024: ~0.31 ms). Each row instead keeps the tokens
    whose probability is at least a floor, and sorts only those: when they hold ≥ top_p of the row's
    mass, every token below the floor comes after them in the sorted order and is cut by top-p, so
    the draw is the one the full sort gives (3 × 8192 of a trained tiny model at temperature 0.7:
    ~0.09 ms). The floors are tried in NUCLEUS_FLOORS order, then (1 − top_p) / V, which always
    holds ≥ top_p: what lies below it weighs < V · floor. Rows are padded with zero-probability
    entries, which the sampler never picks. top_p = 1, or on CUDA (where the selection would read
    the device back): the full sort.
    """
    if probs.device.type != "cpu" or top_p >= 1.0:
        return torch.sort(probs, dim=-1, descending=True)
    floors = (*NUCLEUS_FLOORS, (1.0 - top_p) / probs.shape[-1])
    heads: list[tuple[torch.Tensor, torch.Tensor]] = []
    for row in probs:
        for i, floor in enumerate(floors):
            ids = torch.nonzero(row >= floor).squeeze(1)
            kept = row.index_select(0, ids)
            # a margin for the sum's rounding against the sampler's cumulative sum; the last floor
            # always holds enough
            if i == len(floors) - 1 or float(kept.sum()) >= top_p + 1e-5:
                break
        sorted_kept, order = torch.sort(kept, descending=True)
        heads.append((sorted_kept, ids.index_select(0, order)))
    width = max(len(h[0]) for h in heads)
    out = probs.new_zeros(probs.shape[0], width)
    out_ids = torch.zeros(probs.shape[0], width, dtype=torch.long)
    for r, (p, ids) in enumerate(heads):
        out[r, : len(p)], out_ids[r, : len(ids)] = p, ids
    return out, out_ids


def sample_rows(
    logits: torch.Tensor,
    histories: list[list[int]],
    uniforms: list[float],
    *,
    temperature: float,
    top_p: float,
    top_k: int,
    no_repeat_ngram: int,
    banned: tuple[int, ...] = (),
) -> list[int]:
    """One token per row of `logits` [n, V], all rows at once (one device→host read).

    Row i bans `banned` (e.g. EOS when a budget must be written) and the tokens that would repeat an
    n-gram of `histories[i]`; it then takes the argmax (temperature 0) or samples by inverse CDF
    with its own uniform `uniforms[i]` ∈ [0, 1) — each stream draws from its own generator, so a
    stream's tokens do not depend on which other rows share the batch. top-k, then top-p (the token
    crossing top_p is kept) filter before sampling. `logits` is never written.
    """
    x = logits.float()
    rows, cols = [], []
    for i, history in enumerate(histories):
        for token in (*banned, *banned_by_ngram(history, no_repeat_ngram)):
            rows.append(i)
            cols.append(token)
    if rows:
        if x.data_ptr() == logits.data_ptr():  # fp32 logits: .float() is the same tensor
            x = x.clone()
        where = torch.tensor([rows, cols]).to(x.device)  # [2, bans]: one host→device copy
        x[where[0], where[1]] = float("-inf")  # [n, V], one scatter for every ban (a scalar: no copy)
    if temperature <= 0:
        return x.argmax(dim=-1).tolist()
    x = x / temperature
    if 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]  # [n, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs, order = _sorted_head(torch.softmax(x, dim=-1), top_p)  # [n, V] or [n, the longest head]
    if top_p < 1.0:
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    cum = probs.cumsum(dim=-1)  # [n, V]
    u = torch.tensor(uniforms, dtype=cum.dtype, device=cum.device)[:, None] * cum[:, -1:]  # [n, 1]
    # u < 1 keeps u · total < total in fp32, so the pick is a kept token (never a cut or padding one)
    pick = torch.searchsorted(cum, u, right=True).clamp(max=cum.shape[-1] - 1)  # [n, 1]
    return order.gather(1, pick).squeeze(1).tolist()
