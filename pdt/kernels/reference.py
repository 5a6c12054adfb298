"""Plain PyTorch references of the sidecar ops: the ground truth every fast kernel is tested against.

What it is: `grouped_adapter` (a per-row, per-stream bottleneck MLP: rows of one batch belong to
different streams, each with its own weights) and `snc_attend` (scaled dot-product attention of
each position over its visible notes, with an exact zero for a position that sees no note). Both
are differentiable with ordinary autograd and run on any device.
What it is not: fast. No Triton, and `row_adapter`'s epilogue (gate, positions, residual) is plain
ops here, where the Triton kernels fuse it; `pdt.kernels` dispatches to either behind the same
signatures. Shapes are checked here, once, so a kernel launcher may assume them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _check_adapter_shapes(
    x: torch.Tensor,
    stream_ids: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
) -> None:
    if x.dim() != 2 or stream_ids.shape != (x.shape[0],):
        raise ValueError(
            f"grouped_adapter: x must be [N, D] and stream_ids [N]; got {tuple(x.shape)}, "
            f"{tuple(stream_ids.shape)}"
        )
    k, d, r = w_down.shape
    expected = {"w_down": (k, x.shape[1], r), "b_down": (k, r), "w_up": (k, r, d), "b_up": (k, d)}
    actual = {"w_down": w_down.shape, "b_down": b_down.shape, "w_up": w_up.shape, "b_up": b_up.shape}
    for name, shape in expected.items():
        if tuple(actual[name]) != shape:
            raise ValueError(f"grouped_adapter: {name} must be {shape}, got {tuple(actual[name])}")
    if stream_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"grouped_adapter: stream_ids must be an integer tensor, got {stream_ids.dtype}")


def grouped_adapter(
    x: torch.Tensor,
    stream_ids: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
) -> torch.Tensor:
    """Row n: `gelu(x[n] @ w_down[s] + b_down[s]) @ w_up[s] + b_up[s]` with s = stream_ids[n].

    x [N, D], stream_ids [N] (0-based, < K), w_down [K, D, r], b_down [K, r], w_up [K, r, D],
    b_up [K, D] → [N, D]. Rows are sorted by stream and each contiguous group does two dense
    matmuls (the grouped-GEMM layout a kernel mirrors). Gathering per-row weights instead would
    materialise N·D·r floats — 1.5 GB for 2048 rows at D=2880, r=64 — so it is not done.
    """
    _check_adapter_shapes(x, stream_ids, w_down, b_down, w_up, b_up)
    num_streams = w_down.shape[0]
    stream_ids = stream_ids.long()
    if stream_ids.numel() and (int(stream_ids.min()) < 0 or int(stream_ids.max()) >= num_streams):
        raise ValueError(
            f"grouped_adapter: stream ids must lie in [0, {num_streams}), got "
            f"[{int(stream_ids.min())}, {int(stream_ids.max())}]"
        )
    order = torch.argsort(stream_ids, stable=True)  # [N] rows grouped by stream
    counts = torch.bincount(stream_ids, minlength=num_streams).tolist()  # K group sizes
    groups = torch.split(x.index_select(0, order), counts)  # K tensors [N_k, D]
    outs = [
        F.gelu(xs @ w_down[s] + b_down[s]) @ w_up[s] + b_up[s]  # [N_k, r] → [N_k, D]
        for s, xs in enumerate(groups)
    ]
    sorted_out = torch.cat(outs, dim=0)  # [N, D] in stream order
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)  # [N] back to row order
    return sorted_out.index_select(0, inverse)


def snc_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of each position over its visible notes; a position that sees none gets exactly 0.

    q [R, H, T, dh], k and v [R, H, N, dh], mask [R, T, N] bool (True = visible) → [R, H, T, dh].
    Why not `softmax(masked_fill(-inf))`: a row of all −inf is NaN in the forward and poisons
    every gradient (SPEC §2b.2). Here fully masked rows score 0 (a harmless uniform softmax),
    then their probabilities are multiplied by 0, so the output is an exact zero and every
    gradient through that row is an exact zero too. Softmax runs in fp32 for bf16/fp16 inputs.
    """
    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"snc_attend: q must be [R, H, T, dh], k and v [R, H, N, dh]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    rows, _, t, dh = q.shape
    if mask.shape != (rows, t, k.shape[2]) or mask.dtype != torch.bool:
        raise ValueError(
            f"snc_attend: mask must be bool [R, T, N] = {(rows, t, k.shape[2])}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    # Scores are laid out [R, H, N, T] and normalised over dim −2: PyTorch's CPU softmax over a short
    # last dim (N = 13 notes) is ~18× slower than over a dim whose inner stride runs along T
    # (337 vs 19 µs forward at [6, 4, 128, 13], 2 cores; bench/sidecar_overhead.py). Same math.
    scores = (k @ q.transpose(-1, -2)).float() * (1.0 / math.sqrt(dh))  # [R, H, N, T]
    visible = mask.transpose(1, 2)[:, None]  # [R, T, N] → [R, 1, N, T] shared by every head
    any_visible = visible.any(dim=-2, keepdim=True)  # [R, 1, 1, T]
    # −inf off the window, except in a column that sees nothing: it stays finite (a harmless
    # uniform softmax), then its probabilities are multiplied by 0.
    scores = scores.masked_fill(~visible & any_visible, float("-inf"))
    probs = torch.softmax(scores, dim=-2) * any_visible  # [R, H, N, T], empty columns → 0
    return probs.transpose(-1, -2).to(v.dtype) @ v  # [R, H, T, N] @ [R, H, N, dh] → [R, H, T, dh]


def row_adapter(
    h: torch.Tensor,
    stream_ids: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    *,
    gate: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    residual: bool = False,
) -> torch.Tensor:
    """The adapter when every row is one stream (the PDT layout): h [R, T, D], stream_ids [R] → [R, T, D].

    Gathers each row's weights (R·D·r floats — rows, not tokens) and runs two batched matmuls: no
    sorting and no device→host sync, which the token-level `grouped_adapter` needs for its groups.
    Epilogue (what the sidecar wraps around it): `gate` [K] logits — the output times
    sigmoid(gate[s]); `positions` [R, T] bool — exactly 0 on the other tokens; `residual` — return
    `h + ...` instead of the adapter's output alone.
    """
    ids = stream_ids.long()
    dtype = h.dtype  # compute in the activations' dtype (bf16 on GPU); weights are cast, not x
    down = w_down.index_select(0, ids).to(dtype)  # [R, D, r]
    up = w_up.index_select(0, ids).to(dtype)  # [R, r, D]
    bias_down = b_down.index_select(0, ids)[:, None, :].to(dtype)  # [R, 1, r]
    z = F.gelu(torch.baddbmm(bias_down, h, down))  # [R, T, r]
    out = torch.baddbmm(b_up.index_select(0, ids)[:, None, :].to(dtype), z, up)  # [R, T, D]
    # The gate and the positions are one factor, and with the residual one `addcmul`: one pass over
    # [R, T, D] forward and two backward, where mul + where + add took three and four (CPU, ~0.3 ms
    # a layer at [6, 128, 256]). Off `positions` the factor is 0: exactly h (or 0), as out is finite.
    scale = None
    if gate is not None:
        scale = torch.sigmoid(gate).index_select(0, ids).to(dtype)[:, None, None]  # [R, 1, 1]
    if positions is not None:
        keep = positions[..., None].to(dtype)  # [R, T, 1]
        scale = keep if scale is None else scale * keep
    if scale is None:
        return h + out if residual else out
    return torch.addcmul(h, out, scale) if residual else out * scale


def picked_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logits [N, V], ids [N, C] int64 → [N, C] fp32: `log_softmax(logits.float())` read at `ids`.

    One log-sum-exp and one gather: no [N, V] log-softmax is kept (its backward is the gather's
    scatter plus the log-sum-exp's softmax)."""
    x = logits.float()
    return x.gather(1, ids) - torch.logsumexp(x, dim=-1, keepdim=True)


def snc_folded(
    base: torch.Tensor,
    hidden: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
    heads: int,
    eps: float,
    check: bool = True,
) -> torch.Tensor:
    """A decode step's SNC with the round's window and weights folded in: `base + Σ_h softmax_h · values`.

    base, hidden [R, T, D]; keys [R, D, H·N] (per head, scale · norm ⊙ (k_h W_q,h), transposed);
    values [R, H·N, D] (per head, v_h (λ·g·W_o,h)ᵀ, 0 for an empty window); bias [R, 1, H·N] (0 where
    visible, −inf elsewhere, all 0 for an empty window) — `NotesCrossAttention.fold_window`'s layout.
    Scores of row r, position t: `(hidden · keys) · rsqrt(mean(hidden²) + eps) + bias`, a softmax per
    head over its N notes. Returns [R, T, D] in base's dtype; exactly base where values are 0.
    `check=False` skips the shape checks (a CPU decode token, where a few µs of host work count).
    """
    if check:
        check_folded_shapes(base, hidden, keys, values, bias, heads)
    rows, t, _ = hidden.shape
    x = hidden if hidden.dtype == keys.dtype else hidden.to(keys.dtype)
    inv_rms = x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()  # [R, T, 1]
    scores = torch.addcmul(bias, torch.bmm(x, keys), inv_rms)  # [R, T, H·N]
    probs = torch.softmax(scores.view(rows, t, heads, -1), dim=-1).view(rows, t, -1)  # per head
    if probs.dtype != values.dtype:
        probs = probs.to(values.dtype)
    if base.dtype == values.dtype:
        return torch.baddbmm(base, probs, values)  # [R, T, D]
    return (base.float() + torch.bmm(probs, values).float()).to(base.dtype)


def check_folded_shapes(
    base: torch.Tensor,
    hidden: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
    heads: int,
) -> None:
    """`snc_folded`'s shapes: base = hidden [R, T, D], keys [R, D, H·N], values [R, H·N, D],
    bias [R, 1, H·N]."""
    if hidden.dim() != 3 or base.shape != hidden.shape:
        raise ValueError(
            "snc_folded: base and hidden must be one [R, T, D]; "
            f"got {tuple(base.shape)}, {tuple(hidden.shape)}"
        )
    rows, _, d = hidden.shape
    hn = keys.shape[-1] if keys.dim() == 3 else -1
    expected = {"keys": (rows, d, hn), "values": (rows, hn, d), "bias": (rows, 1, hn)}
    actual = {"keys": keys.shape, "values": values.shape, "bias": bias.shape}
    for name, shape in expected.items():
        if tuple(actual[name]) != shape:
            raise ValueError(f"snc_folded: {name} must be {shape}, got {tuple(actual[name])}")
    if heads < 1 or hn % heads:
        raise ValueError(f"snc_folded: {hn} folded notes do not split into {heads} heads")
