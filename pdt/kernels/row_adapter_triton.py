"""Fused Triton kernels of `row_adapter`: the per-stream bottleneck MLP when each row is one stream.

What it is: kernels, launchers and `RowAdapterFunction` computing, for row i with s = stream_ids[i],
`gelu(h[i] @ w_down[s] + b_down[s]) @ w_up[s] + b_up[s]` (exact-erf GELU, as `F.gelu`), with
the semantics of `pdt.kernels.reference.row_adapter`: products in h's dtype (weights cast to it
on load, never gathered into a copy), fp32 accumulation, the output in h's dtype, weight gradients
in each weight's dtype, no gradient for the stream ids.
Optional epilogue (`Epilogue`), what the sidecar wraps around the adapter, fused so that it costs
no pass over [R, T, D] and no host-side op: the output scaled by sigmoid(gate[s]) (its gradient from
the up-projection's, `gate_grad`), zeroed off a [R, T] positions mask, plus the residual h.
What it is not: the dispatch (`pdt.kernels`), the adapter module (`pdt.model.sidecars.adapter`),
nor the token-level `grouped_adapter`, which stays on the reference.

Design (r ≤ 128, so the [BLOCK_T, r] bottleneck fits in registers):
- forward, one kernel: a program owns BLOCK_T tokens of one row; it accumulates z = h·W_down over
  D in BLOCK_D slices, adds b_down, applies GELU, then writes out = a·W_up + b_up slice by slice
  (with the epilogue: h + p·λ·(a·W_up + b_up), rounded once).
  With a gradient needed it also stores z (fp32, [R, T, r]: r/D = 1/12 of h at the 124M preset).
- backward, three kernels:
  1. per (token block, row): da = dO·W_upᵀ over D, dz = da ∘ gelu'(z), stores a = gelu(z) and dz
     (h's dtype, [R, T, r]), then dh = dz·W_downᵀ slice by slice (dO = p·λ·g with the epilogue,
     and dh += g for the residual);
  2. per (D slice, row): the row's weight-gradient partials a_iᵀ·dO_i, h_iᵀ·dz_i, Σ_t dO_i, Σ_t dz_i
     in fp32 into one [R, P] buffer (P = 2·D·r + D + r; 4.7 MB at 12 rows, D = 768, r = 64);
  3. per (slice of P, stream): sums the partials of that stream's rows in row order and writes
     the four gradients in their dtypes. No atomics: the result is deterministic, bit for bit,
     and a stream with no row gets an exact zero.
  Per-row partials rather than one program per stream: at 12 rows and K = 3 they give 12× more
  programs to the reduction over T (1024 tokens), the bulk of the backward's work.
Stream ids outside [0, K) are not checked (that needs a device→host sync); loads are masked so
such a row reads zeros instead of foreign memory. The reference's `index_select` raises instead.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from pdt.kernels.strides import unit_last

__all__ = [
    "Epilogue",
    "RowAdapterFunction",
    "gate_grad",
    "row_adapter_backward",
    "row_adapter_forward",
    "row_adapter_triton",
    "unsupported",
]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: How fp32 inputs are multiplied: "ieee" (true fp32 FMA, as the reference's matmul) or "tf32x3"
#: (three tf32 tensor-core products, about fp32 accuracy). Plain tf32 would miss the 1e-5 tolerance.
#: H100, 124M shape, fwd+bwd GPU time: 0.36 ms with "tf32x3", 0.54 ms with "ieee"; error 4e-6 vs 2e-6.
FP32_DOT = "tf32x3"
#: Launch shape of the token-block kernels. The H100 sweep (bench/kernels_sidecar.py --sweep, bf16
#: fwd+bwd at the 124M shape) spread 0.106–0.139 ms over BLOCK_T 32–128, 4–8 warps, 2–3 stages;
#: 64/4/3 (0.115 ms) keeps 2× more programs than 128 for short rows.
BLOCK_T = 64
NUM_WARPS = 4
NUM_STAGES = 3
#: A forward of at most DECODE_T positions a row with no gradient (a decode step) takes the two
#: decode kernels: D split into DECODE_SPLIT chunks for the down-projection, DECODE_BLOCK_O columns a
#: program for the up-projection (18 + 36 programs at 3 rows, D = 768). bench/decode_parts.py on the H100
#: (2026-12-06): 4.9–7.4 µs over splits 3/6/12 × 64/128/256 columns; 6 / 64 the fastest (128: 5.9 µs).
DECODE_T = 4
DECODE_SPLIT = 6
DECODE_BLOCK_O = 64
MAX_RANK = 128
INV_SQRT2 = tl.constexpr(0.7071067811865476)  # jit code may read module globals only as constexpr
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _tile(ptr, base, rows, cols, row_stride, n_rows, n_cols):
    """A [len(rows), len(cols)] tile at ptr + base (columns contiguous), zero outside the tensor."""
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + base + rows[:, None] * row_stride + cols[None, :], mask=inside, other=0.0)


@triton.jit
def _stream(ids_ptr, row, K, RANK):
    """(stream id as int64, r if it lies in [0, K) else 0): weight tiles of a bad id read nothing.

    An integer bound, not a scalar bool mask: the interpreter rejects scalar-bool & tensor masks."""
    s = tl.load(ids_ptr + row).to(tl.int64)
    return s, tl.where((s >= 0) & (s < K), RANK, 0)


@triton.jit
def _gelu_and_slope(z):
    """Exact-erf GELU and its derivative: Φ(z)·z and Φ(z) + z·φ(z)."""
    cdf = 0.5 * (1.0 + tl.erf(z * INV_SQRT2))
    pdf = tl.exp(-0.5 * z * z) * INV_SQRT_2PI
    return z * cdf, cdf + z * pdf


@triton.jit
def _kept(pos_ptr, row, offs_t, sp_r, sp_t, T):
    """[BLOCK_T] bool: the tokens the adapter acts on (uint8 view of the bool positions), False past T."""
    return tl.load(pos_ptr + row * sp_r + offs_t * sp_t, mask=offs_t < T, other=0) != 0


@triton.jit
def _row_gate(gate_ptr, s, K):
    """sigmoid(gate[s]) in fp32. A bad stream id reads gate[0]: its weight tiles read zeros anyway."""
    return tl.sigmoid(tl.load(gate_ptr + tl.minimum(tl.maximum(s, 0), K - 1)).to(tl.float32))


@triton.jit
def _adapter_fwd_kernel(
    h_ptr, ids_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, gate_ptr, pos_ptr, out_ptr, z_ptr,
    sh_r, sh_t, sp_r, sp_t, T, D, RANK, K,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, STORE_Z: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_POS: tl.constexpr, RESIDUAL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(1).to(tl.int64)
    s, rank_ok = _stream(ids_ptr, row, K, RANK)
    dtype = h_ptr.dtype.element_ty
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    if HAS_GATE:
        lam = _row_gate(gate_ptr, s, K)
    if HAS_POS:
        kept = _kept(pos_ptr, row, offs_t, sp_r, sp_t, T)
    offs_r = tl.arange(0, BLOCK_R)
    z = tl.zeros([BLOCK_T, BLOCK_R], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        h = _tile(h_ptr, row * sh_r, offs_t, offs_d, sh_t, T, D)
        w = _tile(wd_ptr, s * D * RANK, offs_d, offs_r, RANK, D, rank_ok).to(dtype)  # [BLOCK_D, BLOCK_R]
        z = tl.dot(h, w, z, input_precision=PRECISION)
    z += tl.load(bd_ptr + s * RANK + offs_r, mask=offs_r < rank_ok, other=0.0).to(dtype).to(tl.float32)
    inside_r = (offs_t[:, None] < T) & (offs_r[None, :] < RANK)
    if STORE_Z:
        tl.store(z_ptr + (row * T + offs_t[:, None]) * RANK + offs_r[None, :], z, mask=inside_r)
    a = _gelu_and_slope(z)[0].to(dtype)  # padded columns: z = 0 → a = 0, no contribution below
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        w = _tile(wu_ptr, s * RANK * D, offs_r, offs_d, D, rank_ok, D).to(dtype)  # [BLOCK_R, BLOCK_D]
        bias = tl.load(bu_ptr + s * D + offs_d, mask=offs_d < D * (rank_ok // RANK), other=0.0).to(dtype)
        out = tl.dot(a, w, input_precision=PRECISION) + bias.to(tl.float32)[None, :]
        if HAS_GATE:
            out = out * lam
        if HAS_POS:
            out = tl.where(kept[:, None], out, 0.0)  # off the stream's tokens: exactly 0 (then exactly h)
        if RESIDUAL:  # h + adapter(h), rounded once; h's slice is still in L2 from the first loop
            out += _tile(h_ptr, row * sh_r, offs_t, offs_d, sh_t, T, D).to(tl.float32)
        inside = (offs_t[:, None] < T) & (offs_d[None, :] < D)
        tl.store(out_ptr + (row * T + offs_t[:, None]) * D + offs_d[None, :], out.to(dtype), mask=inside)


@triton.jit
def _adapter_bwd_act_kernel(
    g_ptr, ids_ptr, wd_ptr, wu_ptr, gate_ptr, pos_ptr, z_ptr, a_ptr, dz_ptr, dh_ptr,
    sg_r, sg_t, sp_r, sp_t, T, D, RANK, K,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_DH: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_POS: tl.constexpr, RESIDUAL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(1).to(tl.int64)
    s, rank_ok = _stream(ids_ptr, row, K, RANK)
    dtype = g_ptr.dtype.element_ty
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, BLOCK_R)
    if HAS_GATE:
        lam = _row_gate(gate_ptr, s, K)
    if HAS_POS:
        kept = _kept(pos_ptr, row, offs_t, sp_r, sp_t, T)
    da = tl.zeros([BLOCK_T, BLOCK_R], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        g = _tile(g_ptr, row * sg_r, offs_t, offs_d, sg_t, T, D)  # the adapter's share: λ·g on its tokens
        if HAS_GATE:
            g = (g.to(tl.float32) * lam).to(dtype)
        if HAS_POS:
            g = tl.where(kept[:, None], g, 0.0).to(dtype)  # a token the adapter skipped passes no gradient
        w = _tile(wu_ptr, s * RANK * D, offs_r, offs_d, D, rank_ok, D).to(dtype)  # [BLOCK_R, BLOCK_D]
        da = tl.dot(g, tl.trans(w), da, input_precision=PRECISION)
    rt = (row * T + offs_t[:, None]) * RANK + offs_r[None, :]
    inside_r = (offs_t[:, None] < T) & (offs_r[None, :] < RANK)
    a, slope = _gelu_and_slope(tl.load(z_ptr + rt, mask=inside_r, other=0.0))
    dz = (da * slope).to(dtype)
    tl.store(a_ptr + rt, a.to(dtype), mask=inside_r)
    tl.store(dz_ptr + rt, dz, mask=inside_r)
    if WRITE_DH:
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            w = _tile(wd_ptr, s * D * RANK, offs_d, offs_r, RANK, D, rank_ok).to(dtype)  # [BLOCK_D, BLOCK_R]
            dh = tl.dot(dz, tl.trans(w), input_precision=PRECISION)
            if RESIDUAL:  # the identity path's gradient (g itself), added here rather than by autograd
                dh += _tile(g_ptr, row * sg_r, offs_t, offs_d, sg_t, T, D).to(tl.float32)
            inside = (offs_t[:, None] < T) & (offs_d[None, :] < D)
            tl.store(dh_ptr + (row * T + offs_t[:, None]) * D + offs_d[None, :], dh.to(dtype), mask=inside)


@triton.jit
def _adapter_bwd_weight_kernel(
    g_ptr, h_ptr, ids_ptr, gate_ptr, pos_ptr, a_ptr, dz_ptr, part_ptr,
    sg_r, sg_t, sh_r, sh_t, sp_r, sp_t, T, D, RANK, K,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_POS: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    dtype = g_ptr.dtype.element_ty
    if HAS_GATE:
        lam = _row_gate(gate_ptr, _stream(ids_ptr, row, K, RANK)[0], K)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    d_up = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    d_down = tl.zeros([BLOCK_D, BLOCK_R], tl.float32)
    d_bu = tl.zeros([BLOCK_D], tl.float32)
    d_bd = tl.zeros([BLOCK_R], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        g = _tile(g_ptr, row * sg_r, offs_t, offs_d, sg_t, T, D)  # as in the activation kernel: λ·g, masked
        if HAS_GATE:
            g = (g.to(tl.float32) * lam).to(dtype)
        if HAS_POS:
            g = tl.where(_kept(pos_ptr, row, offs_t, sp_r, sp_t, T)[:, None], g, 0.0).to(dtype)
        h = _tile(h_ptr, row * sh_r, offs_t, offs_d, sh_t, T, D)
        a = _tile(a_ptr, row * T * RANK, offs_t, offs_r, RANK, T, RANK)
        dz = _tile(dz_ptr, row * T * RANK, offs_t, offs_r, RANK, T, RANK)
        d_up = tl.dot(tl.trans(a), g, d_up, input_precision=PRECISION)
        d_down = tl.dot(tl.trans(h), dz, d_down, input_precision=PRECISION)
        d_bu += tl.sum(g.to(tl.float32), 0)
        d_bd += tl.sum(dz.to(tl.float32), 0)
    # Row layout of the partial buffer: [w_down D·r | b_down r | w_up r·D | b_up D].
    base = part_ptr + row * (2 * D * RANK + D + RANK)
    d_ok, r_ok = offs_d < D, offs_r < RANK
    tl.store(base + offs_d[:, None] * RANK + offs_r[None, :], d_down, mask=d_ok[:, None] & r_ok[None, :])
    first_slice = tl.where(pid_d == 0, RANK, 0)  # b_down's gradient: written by one D slice only
    tl.store(base + D * RANK + offs_r, d_bd, mask=offs_r < first_slice)
    tl.store(
        base + D * RANK + RANK + offs_r[:, None] * D + offs_d[None, :],
        d_up,
        mask=r_ok[:, None] & d_ok[None, :],
    )
    tl.store(base + 2 * D * RANK + RANK + offs_d, d_bu, mask=d_ok)


@triton.jit
def _adapter_reduce_kernel(
    part_ptr, ids_ptr, dwd_ptr, dbd_ptr, dwu_ptr, dbu_ptr, R, D, RANK, BLOCK: tl.constexpr
):  # fmt: skip
    s = tl.program_id(1)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    b1 = D * RANK  # segment ends in a partial row: w_down | b_down | w_up | b_up
    b2 = b1 + RANK
    b3 = b2 + RANK * D
    width = b3 + D
    acc = tl.zeros([BLOCK], tl.float32)
    for row in range(0, R):  # fixed row order: deterministic sums
        mine = tl.where(tl.load(ids_ptr + row) == s, width, 0)  # another stream's row: load nothing
        acc += tl.load(part_ptr + row * width + offs, mask=offs < mine, other=0.0)
    tl.store(dwd_ptr + s * b1 + offs, acc.to(dwd_ptr.dtype.element_ty), mask=offs < b1)
    tl.store(
        dbd_ptr + s * RANK + (offs - b1), acc.to(dbd_ptr.dtype.element_ty), mask=(offs >= b1) & (offs < b2)
    )
    tl.store(
        dwu_ptr + s * RANK * D + (offs - b2),
        acc.to(dwu_ptr.dtype.element_ty),
        mask=(offs >= b2) & (offs < b3),
    )
    tl.store(
        dbu_ptr + s * D + (offs - b3), acc.to(dbu_ptr.dtype.element_ty), mask=(offs >= b3) & (offs < width)
    )


class Epilogue(NamedTuple):
    """What the kernels apply around the adapter: `[h +] [positions ·] [sigmoid(gate[s]) ·] adapter(h)`."""

    gate: torch.Tensor | None = None  # [K] logits: the output scaled by sigmoid(gate[s]) of the row's stream
    positions: torch.Tensor | None = None  # [R, T] bool: the output is exactly 0 on the other tokens
    residual: bool = False  # add h: return h + ... instead of the adapter's output alone


NO_EPILOGUE = Epilogue()


@triton.jit
def _adapter_dec_down_kernel(
    h_ptr, ids_ptr, wd_ptr, zp_ptr, sh_r, sh_t, T, D, RANK, K, CHUNK,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Decode, no grad: program (position m, D chunk c) writes the partial
    z[m, c] = h[m, chunk] · W_down[s, chunk]."""
    m = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    row, t = m // T, m % T
    s, rank_ok = _stream(ids_ptr, row, K, RANK)
    offs_d = c * CHUNK + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    d_ok = (offs_d < D) & (offs_d < (c + 1) * CHUNK)
    h = tl.load(h_ptr + row * sh_r + t * sh_t + offs_d, mask=d_ok, other=0.0).to(tl.float32)  # [BLOCK_C]
    w = tl.load(
        wd_ptr + s * D * RANK + offs_d[:, None] * RANK + offs_r[None, :],
        mask=d_ok[:, None] & (offs_r[None, :] < rank_ok),
        other=0.0,
    ).to(tl.float32)  # [BLOCK_C, BLOCK_R]
    z = tl.sum(h[:, None] * w, axis=0)  # [BLOCK_R]
    tl.store(zp_ptr + (m * tl.num_programs(1) + c) * BLOCK_R + offs_r, z)


@triton.jit
def _adapter_dec_up_kernel(
    h_ptr, ids_ptr, bd_ptr, wu_ptr, bu_ptr, gate_ptr, pos_ptr, zp_ptr, out_ptr,
    sh_r, sh_t, sp_r, sp_t, T, D, RANK, K, SPLIT,
    BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_POS: tl.constexpr, RESIDUAL: tl.constexpr,
):  # fmt: skip
    """Decode, no grad: program (position m, block of BLOCK_O columns): z = Σ partials + b_down,
    out = gelu(z) · W_up[s, :, cols] + b_up[s, cols], then the epilogue, as `_adapter_fwd_kernel`."""
    m = tl.program_id(0).to(tl.int64)
    row, t = m // T, m % T
    s, rank_ok = _stream(ids_ptr, row, K, RANK)
    dtype = h_ptr.dtype.element_ty
    offs_r = tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    z = tl.zeros([BLOCK_R], tl.float32)
    for c in range(0, SPLIT):
        z += tl.load(zp_ptr + (m * SPLIT + c) * BLOCK_R + offs_r)
    z += tl.load(bd_ptr + s * RANK + offs_r, mask=offs_r < rank_ok, other=0.0).to(dtype).to(tl.float32)
    a = _gelu_and_slope(z)[0].to(dtype).to(tl.float32)  # rounded as the token-block kernel rounds it
    w = (
        tl.load(
            wu_ptr + s * RANK * D + offs_r[:, None] * D + cols[None, :],
            mask=(offs_r[:, None] < rank_ok) & (cols[None, :] < D),
            other=0.0,
        )
        .to(dtype)
        .to(tl.float32)
    )  # [BLOCK_R, BLOCK_O]
    bias = tl.load(bu_ptr + s * D + cols, mask=cols < D * (rank_ok // RANK), other=0.0).to(dtype)
    out = tl.sum(a[:, None] * w, axis=0) + bias.to(tl.float32)
    if HAS_GATE:
        out = out * _row_gate(gate_ptr, s, K)
    if HAS_POS:
        kept = tl.load(pos_ptr + row * sp_r + t * sp_t) != 0
        out = tl.where(kept, out, 0.0)
    if RESIDUAL:
        out += tl.load(h_ptr + row * sh_r + t * sh_t + cols, mask=cols < D, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * D + cols, out.to(dtype), mask=cols < D)


def unsupported(
    h: torch.Tensor,
    stream_ids: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    *,
    gate: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> str | None:
    """Why these inputs cannot take the Triton path (None: they can). Device is the caller's concern."""
    if h.dim() != 3 or stream_ids.shape != (h.shape[0],):
        return f"h must be [R, T, D] and stream_ids [R]; got {tuple(h.shape)}, {tuple(stream_ids.shape)}"
    if w_down.dim() != 3:
        return f"w_down must be [K, D, r], got {tuple(w_down.shape)}"
    k, d, r = w_down.shape
    if positions is not None and (positions.dtype != torch.bool or positions.shape != h.shape[:2]):
        got = f"{positions.dtype} {tuple(positions.shape)}"
        return f"positions must be bool [R, T] = {tuple(h.shape[:2])}, got {got}"
    expected = {
        "w_down": (k, h.shape[2], r),
        "b_down": (k, r),
        "w_up": (k, r, d),
        "b_up": (k, d),
        "gate": (k,),
    }
    named = (("w_down", w_down), ("b_down", b_down), ("w_up", w_up), ("b_up", b_up), ("gate", gate))
    for name, t in named:
        if t is not None and tuple(t.shape) != expected[name]:
            return f"{name} must be {expected[name]}, got {tuple(t.shape)}"
        if t is not None and t.dtype not in DTYPES:
            return f"{name} has dtype {t.dtype}; fp32/bf16/fp16 only"
    if h.dtype not in DTYPES:
        return f"h has dtype {h.dtype}; fp32/bf16/fp16 only"
    if stream_ids.dtype not in (torch.int32, torch.int64):
        return f"stream_ids must be int32/int64, got {stream_ids.dtype}"
    if r > MAX_RANK:
        return f"rank r = {r} > {MAX_RANK} (the [BLOCK_T, r] bottleneck tile lives in registers)"
    tensors = (h, stream_ids, w_down, b_down, w_up, b_up, gate, positions)
    if len({t.device for t in tensors if t is not None}) != 1:
        return "h, stream_ids, the weights, the gate and the positions are on different devices"
    return None


def _blocks(t: int, rank: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_R, BLOCK_D): T and r padded to powers of two ≥ 16 (tl.dot's minimum)."""
    return max(16, min(BLOCK_T, triton.next_power_of_2(t))), max(16, triton.next_power_of_2(rank)), 64


def _precision(dtype: torch.dtype) -> str:
    """The fp32 product mode (`FP32_DOT`); the setting is ignored for bf16/fp16."""
    return FP32_DOT if dtype == torch.float32 else "tf32"


def _epilogue_args(epilogue: Epilogue, like: torch.Tensor) -> tuple:
    """(gate, uint8 view of the positions, their row and token strides); `like` stands in for what is
    absent (never read: HAS_GATE / HAS_POS are off)."""
    gate = epilogue.gate if epilogue.gate is not None else like
    if epilogue.positions is None:
        return gate, like, 0, 0
    p8 = epilogue.positions.view(torch.uint8)  # same strides: an expanded mask is read in place
    return gate, p8, p8.stride(0), p8.stride(1)


def _flags(epilogue: Epilogue) -> dict[str, bool]:
    return {"HAS_GATE": epilogue.gate is not None, "HAS_POS": epilogue.positions is not None}


def row_adapter_forward(
    h: torch.Tensor,
    stream_ids: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    store_z: bool,
    epilogue: Epilogue = NO_EPILOGUE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward: (out [R, T, D] in h's dtype, z [R, T, r] fp32 or None); weights = (w_down,
    b_down, w_up, b_up), each contiguous."""
    w_down, b_down, w_up, b_up = weights
    rows, t, d = h.shape
    rank = w_down.shape[2]
    h = unit_last(h)
    out = torch.empty(rows, t, d, device=h.device, dtype=h.dtype)
    z = torch.empty(rows, t, rank, device=h.device, dtype=torch.float32) if store_z else None
    if out.numel() == 0:
        return out, z
    block_t, block_r, block_d = _blocks(t, rank)
    gate, p8, sp_r, sp_t = _epilogue_args(epilogue, h)
    if t <= DECODE_T and not store_z:
        _decode_forward(h, stream_ids, weights, gate, p8, sp_r, sp_t, out, epilogue, block_r)
        return out, z
    _adapter_fwd_kernel[(triton.cdiv(t, block_t), rows)](
        h, stream_ids, w_down, b_down, w_up, b_up, gate, p8, out, z if z is not None else out,
        h.stride(0), h.stride(1), sp_r, sp_t, t, d, rank, w_down.shape[0],
        BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_D=block_d, STORE_Z=store_z, **_flags(epilogue),
        RESIDUAL=epilogue.residual, PRECISION=_precision(h.dtype), num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    return out, z


def _decode_forward(
    h: torch.Tensor,
    stream_ids: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    gate: torch.Tensor,
    p8: torch.Tensor,
    sp_r: int,
    sp_t: int,
    out: torch.Tensor,
    epilogue: Epilogue,
    block_r: int,
) -> None:
    """The forward for a few positions (a decode step) without grad: two launches of many small
    programs — partial down-projections over D chunks, then the up-projection by column blocks —
    instead of one program a row looping over D twice (17.6 µs a layer at 3 rows on the H100, all
    load latency; bench/profile_gpu.py, 2026-12-06)."""
    w_down, b_down, w_up, b_up = weights
    rows, t, d = h.shape
    rank, k = w_down.shape[2], w_down.shape[0]
    chunk = triton.cdiv(d, DECODE_SPLIT)
    partial = torch.empty(rows * t, DECODE_SPLIT, block_r, device=h.device, dtype=torch.float32)
    _adapter_dec_down_kernel[(rows * t, DECODE_SPLIT)](
        h, stream_ids, w_down, partial, h.stride(0), h.stride(1), t, d, rank, k, chunk,
        BLOCK_R=block_r, BLOCK_C=triton.next_power_of_2(chunk),
    )  # fmt: skip
    _adapter_dec_up_kernel[(rows * t, triton.cdiv(d, DECODE_BLOCK_O))](
        h, stream_ids, b_down, w_up, b_up, gate, p8, partial, out,
        h.stride(0), h.stride(1), sp_r, sp_t, t, d, rank, k, DECODE_SPLIT,
        BLOCK_R=block_r, BLOCK_O=DECODE_BLOCK_O, **_flags(epilogue), RESIDUAL=epilogue.residual,
    )  # fmt: skip


def row_adapter_backward(
    grad_out: torch.Tensor,
    saved: tuple[torch.Tensor, ...],
    need_dh: bool = True,
    need_weights: bool = True,
    epilogue: Epilogue = NO_EPILOGUE,
) -> tuple[torch.Tensor | None, ...]:
    """Launch the backward: (dh, dw_down, db_down, dw_up, db_up), None for what is not needed;
    saved = (h, ids, w_down, b_down, w_up, b_up, z). The gate's gradient is `gate_grad`'s."""
    h, ids, w_down, b_down, w_up, b_up, z = saved
    rows, t, d = h.shape
    num_streams, _, rank = w_down.shape
    g = unit_last(grad_out.to(h.dtype))
    block_t, block_r, block_d = _blocks(t, rank)
    a = torch.empty(rows, t, rank, device=h.device, dtype=h.dtype)  # gelu(z), [R, T, r]
    dz = torch.empty_like(a)
    dh = torch.empty_like(h, memory_format=torch.contiguous_format) if need_dh else None
    grads = [torch.empty_like(w, memory_format=torch.contiguous_format) for w in (w_down, b_down, w_up, b_up)]
    if h.numel() == 0:
        return (dh, *(w.zero_() for w in grads))
    gate, p8, sp_r, sp_t = _epilogue_args(epilogue, h)
    _adapter_bwd_act_kernel[(triton.cdiv(t, block_t), rows)](
        g, ids, w_down, w_up, gate, p8, z, a, dz, dh if dh is not None else a,
        g.stride(0), g.stride(1), sp_r, sp_t, t, d, rank, num_streams,
        BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_D=block_d, WRITE_DH=need_dh, **_flags(epilogue),
        RESIDUAL=epilogue.residual, PRECISION=_precision(h.dtype), num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    if not need_weights:
        return (dh, None, None, None, None)
    width = 2 * d * rank + d + rank
    partial = torch.empty(rows, width, device=h.device, dtype=torch.float32)  # per-row weight grads
    _adapter_bwd_weight_kernel[(triton.cdiv(d, block_d), rows)](
        g, h, ids, gate, p8, a, dz, partial,
        g.stride(0), g.stride(1), h.stride(0), h.stride(1), sp_r, sp_t, t, d, rank, num_streams,
        BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_D=block_d, **_flags(epilogue),
        PRECISION=_precision(h.dtype), num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    block = 1024
    _adapter_reduce_kernel[(triton.cdiv(width, block), num_streams)](
        partial, ids, *grads, rows, d, rank, BLOCK=block, num_warps=4
    )
    return (dh, *grads)


def gate_grad(
    gate: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor, dw_up: torch.Tensor, db_up: torch.Tensor
) -> torch.Tensor:
    """d loss / d gate [K] from the up-projection's gradients: out = λ_s·(a·W_up + b_up) with λ = σ(gate)
    gives dL/dλ_s = (⟨dW_up, W_up⟩ + ⟨db_up, b_up⟩) / λ_s (dW_up already carries λ_s), and
    σ' = λ(1 − λ), so dL/dgate_s = (1 − λ_s)·(⟨dW_up, W_up⟩ + ⟨db_up, b_up⟩): no division by λ."""
    inner = (dw_up.float() * w_up.float()).sum((1, 2)) + (db_up.float() * b_up.float()).sum(1)  # [K]
    return ((1.0 - torch.sigmoid(gate.float())) * inner).to(gate.dtype)


class RowAdapterFunction(torch.autograd.Function):
    """Autograd wrapper: saves h, the ids, the weights, the fp32 pre-activation z and the epilogue."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        h: torch.Tensor,
        stream_ids: torch.Tensor,
        w_down: torch.Tensor,
        b_down: torch.Tensor,
        w_up: torch.Tensor,
        b_up: torch.Tensor,
        gate: torch.Tensor | None,
        positions: torch.Tensor | None,
        residual: bool,
    ) -> torch.Tensor:
        weights = tuple(w.contiguous() for w in (w_down, b_down, w_up, b_up))
        epilogue = Epilogue(gate, positions, residual)
        out, z = row_adapter_forward(h, stream_ids, weights, True, epilogue)
        ctx.save_for_backward(h, stream_ids, *weights, z, gate, positions)
        ctx.residual = residual
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple:
        needs = ctx.needs_input_grad
        *saved, gate, positions = ctx.saved_tensors
        epilogue = Epilogue(gate, positions, ctx.residual)
        dh, *grads = row_adapter_backward(grad_out, tuple(saved), needs[0], any(needs[2:7]), epilogue)
        dgate = gate_grad(gate, saved[4], saved[5], grads[2], grads[3]) if needs[6] else None
        return (dh, None, *grads, dgate, None, None)


def row_adapter_triton(
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
    """`reference.row_adapter` on the Triton kernels; raises ValueError on inputs they do not support."""
    epilogue = Epilogue(gate, positions, residual)
    reason = unsupported(h, stream_ids, w_down, b_down, w_up, b_up, gate=gate, positions=positions)
    if reason is not None:
        raise ValueError(f"row_adapter (Triton): {reason}")
    weights = (w_down, b_down, w_up, b_up)
    trainable = (*weights, gate) if gate is not None else weights
    if torch.is_grad_enabled() and (h.requires_grad or any(w.requires_grad for w in trainable)):
        return RowAdapterFunction.apply(h, stream_ids, *weights, gate, positions, residual)
    weights = tuple(w.contiguous() for w in weights)
    return row_adapter_forward(h, stream_ids, weights, False, epilogue)[0]  # decode: no autograd
