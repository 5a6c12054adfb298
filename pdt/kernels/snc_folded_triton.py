"""Fused Triton kernels of `snc_folded`: one decode step's SNC for one layer in two launches.

What it is: the kernels and their launcher for `pdt.kernels.reference.snc_folded`, the SNC of a
decode round whose window and weights are folded together once a round
(`NotesCrossAttention.fold_window`): the RMS of the hidden state, the scores against the folded
keys and a softmax per head (`_snc_scores_kernel`), then the probabilities times the folded values
plus the residual (`_snc_out_kernel`) — the work the unfolded path spreads over four launches a
layer (rms_norm, the W_q GEMM, `snc_attend`, the W_o `addmm`). Inference only (no backward).
What it is not: the fold itself (a few batched GEMMs a round, in PyTorch) nor the dispatch
(`pdt.kernels.snc_folded` picks this or the reference).

Why two launches and not one: a decode step has 1–8 positions, so a kernel's time is the latency
of its programs' serial loads, not bandwidth. A first single-kernel version (one program per
position × 256 output columns, every program recomputing all scores over the whole [D, H·N] key
block) took 47 µs a layer on the H100 at 3 rows — slower than the four launches it replaced
(bench/profile_gpu.py, 2026-12-06). Split, each program has little to do: the scores kernel runs
one program per (position, head) over that head's [D, N] keys (38 KB at the 124M preset's shape),
the output kernel one per (position, 128 columns) over [H·N, 128] values. Scores and softmax are
fp32; a padded or invisible note scores −inf; an empty window has bias 0 and values 0, so the
output is exactly base.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdt.kernels.strides import unit_last

__all__ = ["snc_folded_triton", "unsupported"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Launch shape: bench/decode_parts.py on the H100 (2026-12-06, 124M shape, 3 rows, both launches in a
# graph) spread 5.9–14.3 µs over 15 settings; 256 / 128 / 64 was the fastest (5.9 µs; 32 / 128: 9.9).
BLOCK_D = 256  # hidden-state chunk of the score loop (3 iterations at D = 768)
BLOCK_N = 128  # folded notes a step of the output loop
BLOCK_O = 64  # output columns a program writes: 12 programs a position at D = 768
MAX_N = 128  # notes a head: the [BLOCK_D, N] key tile stays in registers


@triton.jit
def _snc_scores_kernel(
    x_ptr,
    keys_ptr,
    bias_ptr,
    probs_ptr,
    t_len,
    d_model,
    n_notes,
    eps,
    stride_x,
    HEADS: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (position m, head h): the head's softmax over its notes → probs[m, h·N : (h+1)·N]."""
    m = tl.program_id(0)  # position: row · T + t
    h = tl.program_id(1)
    r = m // t_len
    hn = HEADS * n_notes
    dd = tl.arange(0, BLOCK_D)
    notes = tl.arange(0, N_PAD)
    col = h * n_notes + notes  # [N_PAD] this head's columns of the folded keys
    keys_row = keys_ptr + r.to(tl.int64) * d_model * hn
    squares = tl.zeros([BLOCK_D], dtype=tl.float32)
    scores = tl.zeros([N_PAD], dtype=tl.float32)
    for d0 in range(0, d_model, BLOCK_D):
        d = d0 + dd
        x = tl.load(x_ptr + m * stride_x + d, mask=d < d_model, other=0.0).to(tl.float32)  # [BLOCK_D]
        k = tl.load(
            keys_row + d[:, None] * hn + col[None, :],
            mask=(d[:, None] < d_model) & (notes[None, :] < n_notes),
            other=0.0,
        ).to(tl.float32)  # [BLOCK_D, N_PAD]
        squares += x * x
        scores += tl.sum(x[:, None] * k, axis=0)
    inv_rms = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / d_model + eps)
    bias = tl.load(bias_ptr + r * hn + col, mask=notes < n_notes, other=float("-inf")).to(tl.float32)
    scores = scores * inv_rms + bias
    probs = tl.exp(scores - tl.max(scores, axis=0))
    probs = probs / tl.sum(probs, axis=0)  # 0 on padding and invisible notes
    tl.store(probs_ptr + m * hn + col, probs, mask=notes < n_notes)


@triton.jit
def _snc_out_kernel(
    base_ptr,
    probs_ptr,
    values_ptr,
    out_ptr,
    t_len,
    d_model,
    hn,
    stride_base,
    stride_out,
    BLOCK_N: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    """Program (position m, block of BLOCK_O columns): base + probs[m] · values[r] on those columns."""
    m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    r = m // t_len
    values_row = values_ptr + r.to(tl.int64) * hn * d_model
    acc = tl.zeros([BLOCK_O], dtype=tl.float32)
    for n0 in range(0, hn, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        p = tl.load(probs_ptr + m * hn + n, mask=n < hn, other=0.0)  # [BLOCK_N] fp32
        v = tl.load(
            values_row + n[:, None] * d_model + cols[None, :],
            mask=(n[:, None] < hn) & (cols[None, :] < d_model),
            other=0.0,
        ).to(tl.float32)  # [BLOCK_N, BLOCK_O]
        acc += tl.sum(p[:, None] * v, axis=0)
    base = tl.load(base_ptr + m * stride_base + cols, mask=cols < d_model, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_out + cols, (base + acc).to(out_ptr.dtype.element_ty), mask=cols < d_model)


def unsupported(
    base: torch.Tensor,
    hidden: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
    heads: int,
    eps: float,
) -> str | None:
    """Why the kernel cannot take these inputs (None: it can)."""
    if any(t.dtype not in DTYPES for t in (base, hidden, keys, values, bias)):
        found = "/".join(str(t.dtype) for t in (base, hidden, keys, values, bias))
        return f"dtypes {found} (supported: fp32, bf16, fp16)"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (base, hidden, keys, values)):
        return "a gradient is needed (the fused decode kernel is inference only)"
    rows, d, hn = keys.shape
    if hn % heads or hn // heads > MAX_N:
        return f"{hn} folded notes for {heads} heads (at most {MAX_N} a head)"
    return None


def snc_folded_triton(
    base: torch.Tensor,
    hidden: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
    heads: int,
    eps: float,
) -> torch.Tensor:
    """As `reference.snc_folded` (shapes checked by the dispatch): [R, T, D] in base's dtype, two launches."""
    rows, t, d = hidden.shape
    hn = keys.shape[-1]
    base2, x2 = unit_last(base.reshape(rows * t, d)), unit_last(hidden.reshape(rows * t, d))
    keys, values, bias = keys.contiguous(), values.contiguous(), bias.contiguous()
    out = torch.empty(rows * t, d, dtype=base.dtype, device=base.device)
    probs = torch.empty(rows * t, hn, dtype=torch.float32, device=base.device)
    n = hn // heads
    _snc_scores_kernel[(rows * t, heads)](
        x2,
        keys,
        bias,
        probs,
        t,
        d,
        n,
        float(eps),
        x2.stride(0),
        HEADS=heads,
        N_PAD=max(16, triton.next_power_of_2(n)),
        BLOCK_D=BLOCK_D,
    )
    _snc_out_kernel[(rows * t, triton.cdiv(d, BLOCK_O))](
        base2,
        probs,
        values,
        out,
        t,
        d,
        hn,
        base2.stride(0),
        out.stride(0),
        BLOCK_N=BLOCK_N,
        BLOCK_O=BLOCK_O,
    )
    return out.view(rows, t, d)
