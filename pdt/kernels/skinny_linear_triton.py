"""A Triton kernel for `F.linear` with a few rows: the decode step's LM head.

What it is: `skinny_linear_triton(x [N, D], weight [V, D], bias [V] | None) → [N, V]` for N ≤
MAX_ROWS rows, inference only, with `F.linear`'s semantics: products in x's dtype (the weight cast
to it on load), fp32 accumulation, the bias added in fp32, the output in x's dtype.
What it is not: the dispatch (`pdt.kernels.skinny_linear`) nor where it is used (the graph decode
engine's LM head, `pdt.model.graph_decode`).

Why: a decode step of K = 3 streams multiplies 3 rows by the [V, D] head. That product only has to
read the weight once (memory-bound), but cuBLAS picks a kernel for 3 rows that takes twice its
1-row time: on the H100 at the 124M shape ([3, 768] × [768, 50257], bf16, inside a CUDA graph)
64.0 µs against 32.5 µs for one row; rows padded to 8 or 16, the transposed product, or three
1-row products were all slower (81–107 µs; bench/decode_parts.py, 2026-12-06).
Design: one program per BLOCK_V vocabulary columns; it streams its [BLOCK_V, D] slice of the weight
in BLOCK_D chunks and multiplies all rows at once (rows padded to 16 for `tl.dot`, masked on load).
Every weight element is read once; the rows are tiny and stay in cache. Measured the same way:
28.4 µs at 3 rows and 28.0 µs at 1 row (cuBLAS gemv 32.6 µs) — the 77 MB weight at 2.7 TB/s; the
27 launch shapes swept (BLOCK_V 32–128, BLOCK_D 64–256, 4–8 warps, 3–4 stages) all gave 28.4–31.9 µs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdt.kernels.strides import unit_last

__all__ = ["skinny_linear_triton", "unsupported"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_ROWS = 16  # rows a launch multiplies (one tl.dot tile)
BLOCK_V = 64  # vocabulary columns a program writes
BLOCK_D = 128  # hidden chunk a loop iteration reads
NUM_WARPS = 4
NUM_STAGES = 4
FP32_DOT = "ieee"  # fp32 inputs: true fp32 products (tests at 1e-5); bf16/fp16 use the tensor cores


@triton.jit
def _skinny_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    n_rows,
    n_cols,
    d,
    sx,
    sw,
    so,
    HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    cols = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    acc = tl.zeros([ROWS, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(
            x_ptr + rows[:, None] * sx + ds[None, :],
            mask=(rows[:, None] < n_rows) & (ds[None, :] < d),
            other=0.0,
        )  # [ROWS, BLOCK_D]
        w = tl.load(
            w_ptr + cols[:, None] * sw + ds[None, :],
            mask=(cols[:, None] < n_cols) & (ds[None, :] < d),
            other=0.0,
        )  # [BLOCK_V, BLOCK_D]
        acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rows[:, None] * so + cols[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols),
    )


def unsupported(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> str | None:
    """Why this kernel cannot take these inputs (None: it can)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        return f"needs x [N, D] and weight [V, D]; got {tuple(x.shape)} and {tuple(weight.shape)}"
    if not 1 <= x.shape[0] <= MAX_ROWS:
        return f"takes 1 to {MAX_ROWS} rows, got {x.shape[0]}"
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        return f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}"
    if x.dtype not in DTYPES or weight.dtype not in DTYPES:
        return f"dtypes {x.dtype} / {weight.dtype} (supported: fp32, bf16, fp16)"
    if x.requires_grad and torch.is_grad_enabled() or weight.requires_grad and torch.is_grad_enabled():
        return "inference only (a gradient was asked for)"
    return None


def skinny_linear_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [N, D] @ weightᵀ (+ bias) → [N, V] in x's dtype, N ≤ MAX_ROWS."""
    x, weight = unit_last(x), unit_last(weight)
    n, d = x.shape
    v = weight.shape[0]
    out = torch.empty(n, v, device=x.device, dtype=x.dtype)
    _skinny_kernel[(triton.cdiv(v, BLOCK_V),)](
        x,
        weight,
        bias if bias is not None else x,  # not read without HAS_BIAS
        out,
        n,
        v,
        d,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        ROWS=MAX_ROWS,
        BLOCK_V=BLOCK_V,
        BLOCK_D=BLOCK_D,
        DOT_PRECISION=FP32_DOT if x.dtype == torch.float32 else "tf32",
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    return out
