"""Fused Triton kernels of `snc_attend`: each position attends over its visible notes window.

What it is: a forward kernel, a backward kernel, their launchers and `SNCAttendFunction`, with
exactly the semantics of `pdt.kernels.reference.snc_attend`: scores `q·k / sqrt(dh)` in fp32,
softmax over the notes the mask shows, a position that sees no note gets an exact 0 output and
exact 0 gradients, and no NaN ever. One launch replaces the reference's ~8 (matmul, fill, where,
softmax, multiply, cast, matmul) forward and its ~12 backward.
What it is not: the dispatch (`pdt.kernels` picks this or the reference) nor the projections of
the SNC sidecar (`pdt.model.sidecars.snc`).

Design (flash-attention style, specialised for a short notes axis):
- forward: one program per (block of BLOCK_T positions, row·head). It keeps its q tile in
  registers and loops over the notes in blocks of BLOCK_N (≤ 128, a power of two ≥ 16 padded by
  masking) with an online softmax, so any N ≥ 1 works. Masked scores are −inf, and the running
  max is replaced by 0 while nothing is visible, so exp never sees (−inf) − (−inf). It stores
  the output and, only when a gradient is needed, the log-sum-exp per position (0 where empty).
- backward: one program per (chunk of T, row·head, notes block). k/v of its notes block stay in
  registers; over its T chunk it recomputes p = exp(s − lse) (0 where masked), takes
  delta = rowsum(dO ∘ O), ds = p ∘ (dO·vᵀ − delta), and accumulates dk, dv. dq of its notes
  block is written per position. Several notes blocks write fp32 partials of dq, several T
  chunks fp32 partials of dk/dv, summed afterwards in a fixed order: deterministic, no atomics.
  T is chunked only to fill the GPU (training: R·H = 48 programs would leave 132 SMs idle).
- dh: any dh ≤ 128; tiles are padded to a power of two ≥ 16 and masked (dh = 48 for the 124M
  preset's 192-wide, 4-head SNC). Strides are passed, so the decode-time mask expanded over T
  (stride 0) and the transposed q/k/v views of the sidecar are read in place, never copied. The
  output is allocated [R, T, H, dh] and returned as a [R, H, T, dh] view, so the sidecar's
  `transpose(1, 2).reshape(R, T, width)` after it is free.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from pdt.kernels.strides import unit_last

__all__ = [
    "SNCAttendFunction",
    "snc_attend_backward",
    "snc_attend_forward",
    "snc_attend_triton",
    "unsupported",
]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: How fp32 inputs are multiplied: "ieee" (true fp32 FMA, as the reference's matmul) or "tf32x3"
#: (three tf32 tensor-core products, about fp32 accuracy). Plain tf32 would miss the 1e-5 tolerance.
FP32_DOT = "tf32x3"  # H100, 124M shape: 0.43 ms fwd+bwd vs 1.03 ms with "ieee"; error 1.7e-6 vs 9.5e-7
#: Software pipelining of the loops: 1 was fastest on the H100 (0.070 ms vs 0.082 at 3, bf16 fwd+bwd;
#: fp32 "ieee" at 2 took 6.8 ms). The loops are short (≤ 2 notes blocks, a few T blocks a chunk).
NUM_STAGES = 1
MAX_DH = 128  # fp32 at dh = 256 would need ~231 KB of shared memory in the backward (H100: 227)


@triton.jit
def _tile(ptr, base, rows, cols, row_stride, n_rows, n_cols):
    """A [len(rows), len(cols)] tile at ptr + base (columns contiguous), zero outside the tensor."""
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + base + rows[:, None] * row_stride + cols[None, :], mask=inside, other=0.0)


@triton.jit
def _visible(m_ptr, base, offs_t, offs_n, sm_t, sm_n, T, N):
    """[BLOCK_T, BLOCK_N] bool: the mask tile (uint8 view of the bool mask), False outside it."""
    inside = (offs_t[:, None] < T) & (offs_n[None, :] < N)
    seen = tl.load(m_ptr + base + offs_t[:, None] * sm_t + offs_n[None, :] * sm_n, mask=inside, other=0)
    return seen != 0


@triton.jit
def _snc_fwd_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, lse_ptr,
    sq_r, sq_h, sq_t, sk_r, sk_h, sk_n, sv_r, sv_h, sv_n, sm_r, sm_t, sm_n, so_r, so_h, so_t,
    H, T, N, DH, scale,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    STORE_LSE: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_rh = tl.program_id(1)
    r = (pid_rh // H).to(tl.int64)
    h = (pid_rh % H).to(tl.int64)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    q = _tile(q_ptr, r * sq_r + h * sq_h, offs_t, offs_d, sq_t, T, DH)
    m_i = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _tile(k_ptr, r * sk_r + h * sk_h, offs_n, offs_d, sk_n, N, DH)
        v = _tile(v_ptr, r * sv_r + h * sv_h, offs_n, offs_d, sv_n, N, DH)
        seen = _visible(m_ptr, r * sm_r, offs_t, offs_n, sm_t, sm_n, T, N)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet: no (−inf) − (−inf)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])  # exactly 0 where masked
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    any_seen = l_i > 0.0  # l ≥ 1 once a note is visible: the max term contributes exp(0)
    l_safe = tl.where(any_seen, l_i, 1.0)
    out = tl.where(any_seen[:, None], acc / l_safe[:, None], 0.0)
    inside = (offs_t[:, None] < T) & (offs_d[None, :] < DH)
    o_ptrs = o_ptr + r * so_r + h * so_h + offs_t[:, None] * so_t + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=inside)
    if STORE_LSE:
        lse = tl.where(any_seen, m_i + tl.log(l_safe), 0.0)
        tl.store(lse_ptr + pid_rh.to(tl.int64) * T + offs_t, lse, mask=offs_t < T)


@triton.jit
def _snc_bwd_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr,
    sq_r, sq_h, sq_t, sk_r, sk_h, sk_n, sv_r, sv_h, sv_n, sm_r, sm_t, sm_n,
    so_r, so_h, so_t, sdo_r, sdo_h, sdo_t,
    sdq_p, sdq_r, sdq_h, sdq_t, sdk_p, sdk_r, sdk_h, sdk_n,
    H, T, N, DH, scale, blocks_per_chunk,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    chunk, pid_rh, nb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r = (pid_rh // H).to(tl.int64)
    h = (pid_rh % H).to(tl.int64)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _tile(k_ptr, r * sk_r + h * sk_h, offs_n, offs_d, sk_n, N, DH)
    v = _tile(v_ptr, r * sv_r + h * sv_h, offs_n, offs_d, sv_n, N, DH)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    first = chunk * blocks_per_chunk
    last = tl.minimum(first + blocks_per_chunk, tl.cdiv(T, BLOCK_T))
    for tb in range(first, last):
        offs_t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        q = _tile(q_ptr, r * sq_r + h * sq_h, offs_t, offs_d, sq_t, T, DH)
        do = _tile(do_ptr, r * sdo_r + h * sdo_h, offs_t, offs_d, sdo_t, T, DH)
        o = _tile(o_ptr, r * so_r + h * so_h, offs_t, offs_d, so_t, T, DH)
        lse = tl.load(lse_ptr + pid_rh.to(tl.int64) * T + offs_t, mask=offs_t < T, other=0.0)
        seen = _visible(m_ptr, r * sm_r, offs_t, offs_n, sm_t, sm_n, T, N)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        p = tl.exp(tl.where(seen, s - lse[:, None], float("-inf")))  # exactly 0 where masked or empty
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # = Σ_n p·dp over all notes blocks
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
        dq_ptrs = dq_ptr + nb * sdq_p + r * sdq_r + h * sdq_h + offs_t[:, None] * sdq_t + offs_d[None, :]
        tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=(offs_t[:, None] < T) & (offs_d[None, :] < DH))
    inside = (offs_n[:, None] < N) & (offs_d[None, :] < DH)
    base = chunk * sdk_p + r * sdk_r + h * sdk_h + offs_n[:, None] * sdk_n + offs_d[None, :]
    tl.store(dk_ptr + base, (dk * scale).to(dk_ptr.dtype.element_ty), mask=inside)
    tl.store(dv_ptr + base, dv.to(dv_ptr.dtype.element_ty), mask=inside)


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> str | None:
    """Why these inputs cannot take the Triton path (None: they can). Device is the caller's concern."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or k.shape[:2] != q.shape[:2]:
        return f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} are not [R, H, T|N, dh]"
    if k.shape[3] != q.shape[3]:
        return f"q has dh = {q.shape[3]} but k has {k.shape[3]}"
    if mask.dtype != torch.bool or mask.shape != (q.shape[0], q.shape[2], k.shape[2]):
        expected = (q.shape[0], q.shape[2], k.shape[2])
        return f"mask must be bool [R, T, N] = {expected}, got {mask.dtype} {tuple(mask.shape)}"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        return f"q, k, v must share one dtype of fp32/bf16/fp16, got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.shape[3] > MAX_DH:
        return f"dh = {q.shape[3]} > {MAX_DH} (the tiles keep a whole head row in registers)"
    if len({q.device, k.device, v.device, mask.device}) != 1:
        return "q, k, v and mask are on different devices"
    return None


def _blocks(n: int, dh: int, dtype: torch.dtype, block_n: int | None) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D): dh padded to a power of two ≥ 16 (tl.dot's minimum); notes blocks of ≤ 128
    with BLOCK_N·BLOCK_D ≤ 8192 (fp32: 4096) so the backward's fp32 dk/dv tiles fit on chip. On the
    H100 one block of 128 for N = 97 beat two of 64 by 1.4× (no dq partials to sum); fp32 at 8192
    would need 245 KB of shared memory (limit 227)."""
    block_d = max(16, triton.next_power_of_2(dh))
    if block_n is None:
        budget = 4096 if dtype == torch.float32 else 8192
        block_n = min(128, max(16, budget // block_d), max(16, triton.next_power_of_2(n)))
    return block_n, block_d


def _precision(dtype: torch.dtype) -> str:
    """The fp32 product mode (`FP32_DOT`); the setting is ignored for bf16/fp16."""
    return FP32_DOT if dtype == torch.float32 else "tf32"


def snc_attend_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    store_lse: bool,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward: (out [R, H, T, dh] in q's dtype, lse [R, H, T] fp32 or None)."""
    rows, heads, t, dh = q.shape
    n = k.shape[2]
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    out = torch.empty(rows, t, heads, dh, device=q.device, dtype=q.dtype)
    out = out.transpose(1, 2)  # [R, T, H, dh] → [R, H, T, dh] view: the sidecar's reshape after is free
    lse = torch.empty(rows, heads, t, device=q.device, dtype=torch.float32) if store_lse else None
    if out.numel() == 0:
        return out, lse
    block_n, block_d = _blocks(n, dh, q.dtype, block_n)
    block_t = max(16, min(64, triton.next_power_of_2(t)))  # decode: T = 1 → one 16-row tile
    m8 = mask.view(torch.uint8)  # same strides: a stride-0 expanded mask is read in place
    grid = (triton.cdiv(t, block_t), rows * heads)
    _snc_fwd_kernel[grid](
        q, k, v, m8, out, lse if lse is not None else out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), m8.stride(0), m8.stride(1), m8.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        heads, t, n, dh, 1.0 / math.sqrt(dh),
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_D=block_d, STORE_LSE=store_lse,
        PRECISION=_precision(q.dtype), num_warps=4, num_stages=NUM_STAGES,
    )  # fmt: skip
    return out, lse


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _chunks(t_blocks: int, programs: int, device: torch.device, chunks: int | None) -> int:
    """Split T only until about two programs per SM exist: each extra chunk costs a dk/dv partial."""
    if chunks is None:
        chunks = max(1, triton.cdiv(2 * _sm_count(device), programs))
    if t_blocks == 0:
        return 1
    chunks = max(1, min(chunks, t_blocks))
    return triton.cdiv(t_blocks, triton.cdiv(t_blocks, chunks))  # no empty trailing chunk


def snc_attend_backward(
    grad_out: torch.Tensor,
    saved: tuple[torch.Tensor, ...],
    block_n: int | None = None,
    chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward: (dq, dk, dv), each in its input's dtype; saved = (q, k, v, mask, out, lse)."""
    q, k, v, mask, out, lse = saved
    rows, heads, t, dh = q.shape
    n = k.shape[2]
    block_n, block_d = _blocks(n, dh, q.dtype, block_n)
    block_t = max(16, min(32, triton.next_power_of_2(t)))
    t_blocks, n_blocks = triton.cdiv(t, block_t), triton.cdiv(n, block_n)
    n_chunks = _chunks(t_blocks, rows * heads * n_blocks, q.device, chunks)
    do = unit_last(grad_out.to(q.dtype))
    f32 = {"device": q.device, "dtype": torch.float32}
    # One notes block writes dq directly in q's layout; several write fp32 partials [nb, R, H, T, dh].
    dq = torch.empty_like(q) if n_blocks == 1 else torch.empty(n_blocks, rows, heads, t, dh, **f32)
    dkv_shape = (n_chunks, rows, heads, n, dh)  # fp32 partials per T chunk, or the result itself
    dk = torch.empty_like(k) if n_chunks == 1 else torch.empty(dkv_shape, **f32)
    dv = torch.empty_like(v) if n_chunks == 1 else torch.empty(dkv_shape, **f32)
    if q.numel() and k.numel():
        blocks = (block_t, block_n, block_d, n_chunks)
        _launch_backward(q, k, v, mask, out, do, lse, dq, dk, dv, blocks=blocks)
    elif not k.numel():
        dq.zero_()
    else:
        dk.zero_()
        dv.zero_()
    if n_blocks > 1:
        dq = dq.sum(0).to(q.dtype)  # fixed-order sum over notes blocks: deterministic
    if n_chunks > 1:
        dk, dv = dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)  # [C, R, H, N, dh] → [R, H, N, dh]
    return dq, dk, dv


def _partial_strides(x: torch.Tensor, partial: bool) -> tuple[int, ...]:
    """(partial index, r, h, t|n) strides; a direct output has no partial axis (stride 0)."""
    return tuple(x.stride()[:4]) if partial else (0, *x.stride()[:3])


def _launch_backward(*tensors: torch.Tensor, blocks: tuple[int, int, int, int]) -> None:
    """tensors = (q, k, v, mask, out, dO, lse, dq, dk, dv); blocks = (BLOCK_T, BLOCK_N, BLOCK_D, chunks)."""
    q, k, v, mask, out, do, lse, dq, dk, dv = tensors
    block_t, block_n, block_d, n_chunks = blocks
    rows, heads, t, dh = q.shape
    n = k.shape[2]
    t_blocks, n_blocks = triton.cdiv(t, block_t), triton.cdiv(n, block_n)
    m8 = mask.view(torch.uint8)
    grid = (n_chunks, rows * heads, n_blocks)
    _snc_bwd_kernel[grid](
        q, k, v, m8, out, do, lse, dq, dk, dv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), m8.stride(0), m8.stride(1), m8.stride(2),
        out.stride(0), out.stride(1), out.stride(2), do.stride(0), do.stride(1), do.stride(2),
        *_partial_strides(dq, n_blocks > 1), *_partial_strides(dk, n_chunks > 1),
        heads, t, n, dh, 1.0 / math.sqrt(dh), triton.cdiv(t_blocks, n_chunks),
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=_precision(q.dtype), num_warps=4,
        num_stages=NUM_STAGES,
    )  # fmt: skip


class SNCAttendFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, the mask, the output and the per-position log-sum-exp."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor,
        block_n: int | None,
        chunks: int | None,
    ) -> torch.Tensor:
        out, lse = snc_attend_forward(q, k, v, mask, store_lse=True, block_n=block_n)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.block_n, ctx.chunks = block_n, chunks
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple:
        dq, dk, dv = snc_attend_backward(grad_out, ctx.saved_tensors, ctx.block_n, ctx.chunks)
        return dq, dk, dv, None, None, None


def snc_attend_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    block_n: int | None = None,
    chunks: int | None = None,
) -> torch.Tensor:
    """`reference.snc_attend` on the Triton kernels; raises ValueError on inputs they do not support.

    `block_n` (notes per block) and `chunks` (T chunks of the backward) override the heuristics;
    tests use them to reach the multi-block and partial-sum paths on small shapes.
    """
    reason = unsupported(q, k, v, mask)
    if reason is not None:
        raise ValueError(f"snc_attend (Triton): {reason}")
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return SNCAttendFunction.apply(q, k, v, mask, block_n, chunks)
    return snc_attend_forward(q, k, v, mask, store_lse=False, block_n=block_n)[0]  # decode: no autograd
