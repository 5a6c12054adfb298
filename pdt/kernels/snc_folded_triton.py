"""Fused Triton kernel of `snc_folded`: one decode step's SNC for one layer in a single launch.

What it is: the kernel and its launcher for `pdt.kernels.reference.snc_folded`, the SNC of a decode
round whose window and weights are folded together once a round (`NotesCrossAttention.fold_window`):
per position, the RMS of the hidden state, the scores against the folded keys, a softmax per head
over its notes, the weighted sum of the folded values and the residual add — the work that the
unfolded path spreads over four launches a layer (rms_norm, the W_q GEMM, `snc_attend`, the W_o
`addmm`). Inference only (no backward): nothing trains through a decode step.
What it is not: the fold itself (a few batched GEMMs a round, in PyTorch) nor the dispatch
(`pdt.kernels.snc_folded` picks this or the reference).

Why: at decode a step of a small trunk is a chain of tiny kernels (a CUDA graph replays ~20 a
layer), each costing a few microseconds whatever its size, so the sidecar's cost is its launch
count. Design: one program per (position, block of BLOCK_O output columns). A program reads its
position's hidden state twice (the sum of squares, then the scores per head, in BLOCK_D chunks),
all of its row's folded keys ([D, H·N]: H·N = 100 at the 124M preset's shape, ~150 KB in bf16,
shared through L2 by the row's programs) and its columns of the folded values. Scores and the
softmax are fp32; a padded or invisible note scores −inf; an empty window has bias 0 and values 0,
so the output is exactly base.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["snc_folded_triton", "unsupported"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_O = 256  # output columns a program writes: 3 programs a row at D = 768
BLOCK_D = 64  # hidden-state chunk of the score loop
MAX_N = 128  # notes a head: the [BLOCK_D, N] key tile stays in registers


@triton.jit
def _snc_folded_kernel(
    base_ptr,
    x_ptr,
    keys_ptr,
    values_ptr,
    bias_ptr,
    out_ptr,
    t_len,
    d_model,
    n_notes,
    eps,
    stride_base,
    stride_x,
    stride_out,
    HEADS: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    m = tl.program_id(0)  # position: row · T + t
    cols = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)  # [BLOCK_O] output columns
    r = m // t_len
    hn = HEADS * n_notes
    dd = tl.arange(0, BLOCK_D)
    notes = tl.arange(0, N_PAD)
    # 1 / rms of the position's hidden state
    squares = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, d_model, BLOCK_D):
        x = tl.load(x_ptr + m * stride_x + d0 + dd, mask=d0 + dd < d_model, other=0.0).to(tl.float32)
        squares += x * x
    inv_rms = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / d_model + eps)
    acc = tl.zeros([BLOCK_O], dtype=tl.float32)
    keys_row = keys_ptr + r.to(tl.int64) * d_model * hn
    values_row = values_ptr + r.to(tl.int64) * hn * d_model
    for h in tl.static_range(HEADS):
        col = h * n_notes + notes  # [N_PAD] this head's columns of the folded keys
        scores = tl.zeros([N_PAD], dtype=tl.float32)
        for d0 in range(0, d_model, BLOCK_D):
            d = d0 + dd
            x = tl.load(x_ptr + m * stride_x + d, mask=d < d_model, other=0.0).to(tl.float32)  # [BLOCK_D]
            k = tl.load(
                keys_row + d[:, None] * hn + col[None, :],
                mask=(d[:, None] < d_model) & (notes[None, :] < n_notes),
                other=0.0,
            ).to(tl.float32)  # [BLOCK_D, N_PAD]
            scores += tl.sum(x[:, None] * k, axis=0)
        bias = tl.load(bias_ptr + r * hn + col, mask=notes < n_notes, other=float("-inf")).to(tl.float32)
        scores = scores * inv_rms + bias
        probs = tl.exp(scores - tl.max(scores, axis=0))
        probs = probs / tl.sum(probs, axis=0)  # [N_PAD], 0 on padding and invisible notes
        v = tl.load(
            values_row + col[:, None] * d_model + cols[None, :],
            mask=(notes[:, None] < n_notes) & (cols[None, :] < d_model),
            other=0.0,
        ).to(tl.float32)  # [N_PAD, BLOCK_O]
        acc += tl.sum(probs[:, None] * v, axis=0)
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
    """As `reference.snc_folded` (shapes checked there): [R, T, D] in base's dtype, one launch."""
    rows, t, d = hidden.shape
    hn = keys.shape[-1]
    base2, x2 = base.reshape(rows * t, d), hidden.reshape(rows * t, d)
    if base2.stride(-1) != 1:
        base2 = base2.contiguous()
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    keys, values, bias = keys.contiguous(), values.contiguous(), bias.contiguous()
    out = torch.empty(rows * t, d, dtype=base.dtype, device=base.device)
    n = hn // heads
    grid = (rows * t, triton.cdiv(d, BLOCK_O))
    _snc_folded_kernel[grid](
        base2,
        x2,
        keys,
        values,
        bias,
        out,
        t,
        d,
        n,
        float(eps),
        base2.stride(0),
        x2.stride(0),
        out.stride(0),
        HEADS=heads,
        N_PAD=max(16, triton.next_power_of_2(n)),
        BLOCK_D=BLOCK_D,
        BLOCK_O=BLOCK_O,
    )
    return out.view(rows, t, d)
