"""Triton kernels of `picked_logprobs`: log-softmax read at a few ids per row, over a vocabulary.

What it is: `picked_logprobs_triton(logits [N, V], ids [N, C]) -> [N, C]` fp32, with exactly the
semantics of `pdt.kernels.reference.picked_logprobs` (`log_softmax(logits.float())` gathered at
`ids`), and its autograd Function. The curriculum step reads the LM target and the cached KD
teacher's top-k ids this way (C = 1 + k), at every section token of the batch: N ≈ 10⁴ rows of a
50k vocabulary on the 124M preset, the largest tensor of the step.
What it is not: a general softmax, nor the losses built on the picked values (`pdt.train`).

Why: the reference runs `logits.float()` (a full fp32 copy), then log-sum-exp's max, subtract,
exp and sum, each a pass over [N, V] in fp32; its backward subtracts, exponentiates, multiplies
and scatters the gather's gradient into a zero [N, V] fp32 buffer before adding and casting back
— about fifteen fp32 passes over the biggest tensor of the step. Here:
- forward: one program per row streams its logits (any float dtype, read once) in BLOCK_V chunks
  with an online max / sum in fp32 lanes and stores the row's log-sum-exp [N]; the picked values
  are `logits.gather(ids) - lse` (C per row, negligible).
- backward: for grad g [N, C], d logits[n, j] = Σ_c g[n, c]·[ids[n, c] = j] − S_n·softmax(x)[n, j]
  with S_n = Σ_c g[n, c]. One program per row writes −S_n·exp(x − lse) in the logits' dtype
  (one read, one write); then the C picked entries of each row are overwritten by their exact
  fp32 value — the softmax term plus the g of every c naming that id (a target that is also a
  teacher top-k id gets both) — cast once, as the reference's final cast does.
Non-contiguous rows are read through their stride; the vocabulary axis must be unit-stride.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdt.kernels.strides import unit_last

__all__ = ["PickedLogProbsFunction", "picked_logprobs_triton", "unsupported"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_V = 2048  # a chunk of the vocabulary per loop step (fp32 lanes: 8 KiB of registers/warp group)


@triton.jit
def _lse_kernel(x_ptr, lse_ptr, V, stride_row, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)  # per-lane running max
    s = tl.zeros([BLOCK], tl.float32)  # per-lane running sum of exp(x - m)
    for start in range(0, V, BLOCK):
        idx = start + offs
        x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        new_m = tl.maximum(m, x)
        # lanes still at -inf (nothing seen yet) keep s = 0 without computing (-inf) - (-inf)
        safe = tl.where(new_m == float("-inf"), 0.0, new_m)
        s = s * tl.exp(m - safe) + tl.exp(x - safe)
        m = new_m
    top = tl.max(m, axis=0)
    total = tl.sum(s * tl.exp(m - top), axis=0)
    tl.store(lse_ptr + row, top + tl.log(total))


@triton.jit
def _scaled_softmax_kernel(
    x_ptr, lse_ptr, scale_ptr, out_ptr, V, stride_row, out_stride, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride_row
    out = out_ptr + row.to(tl.int64) * out_stride
    lse = tl.load(lse_ptr + row)
    scale = tl.load(scale_ptr + row)
    offs = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        idx = start + offs
        keep = idx < V
        x = tl.load(base + idx, mask=keep, other=0.0).to(tl.float32)
        y = scale * tl.exp(x - lse)
        tl.store(out + idx, y.to(out_ptr.dtype.element_ty), mask=keep)


def unsupported(logits: torch.Tensor, ids: torch.Tensor) -> str | None:
    """Why these inputs cannot take the Triton path (None: they can). Device is the caller's concern."""
    if logits.dim() != 2 or ids.dim() != 2 or ids.shape[0] != logits.shape[0]:
        return f"shapes logits {tuple(logits.shape)}, ids {tuple(ids.shape)} are not [N, V], [N, C]"
    if logits.dtype not in DTYPES:
        return f"logits must be fp32/bf16/fp16, got {logits.dtype}"
    if ids.dtype != torch.long:
        return f"ids must be int64, got {ids.dtype}"
    if logits.shape[1] == 0:
        return "an empty vocabulary"
    if logits.device != ids.device:
        return "logits and ids are on different devices"
    return None


def row_lse(logits: torch.Tensor) -> torch.Tensor:
    """[N, V] → [N] fp32 log-sum-exp of each row."""
    x = unit_last(logits)
    n, v = x.shape
    lse = torch.empty(n, dtype=torch.float32, device=x.device)
    if n:
        _lse_kernel[(n,)](x, lse, v, x.stride(0), BLOCK=min(BLOCK_V, triton.next_power_of_2(v)))
    return lse


def _scaled_softmax(logits: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """scale[n] · softmax(logits)[n, :] in the logits' dtype, [N, V]."""
    x = unit_last(logits)
    n, v = x.shape
    out = torch.empty((n, v), dtype=logits.dtype, device=x.device)
    if n:
        block = min(BLOCK_V, triton.next_power_of_2(v))
        _scaled_softmax_kernel[(n,)](
            x, lse, scale.contiguous(), out, v, x.stride(0), out.stride(0), BLOCK=block
        )
    return out


class PickedLogProbsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, logits: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        lse = row_lse(logits)
        picked = logits.gather(1, ids).float() - lse[:, None]  # [N, C]
        ctx.save_for_backward(logits, ids, lse)
        return picked

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
        logits, ids, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        g = grad.float()  # [N, C]
        total = g.sum(dim=1)  # [N]
        out = _scaled_softmax(logits, lse, -total)  # −S·softmax, everywhere
        # the picked entries, exactly: −S·softmax there plus the g of every c naming that id
        same = (ids[:, :, None] == ids[:, None, :]).to(g.dtype)  # [N, C, C]
        hits = torch.bmm(same, g[:, :, None]).squeeze(2)  # [N, C]
        soft = torch.exp(logits.gather(1, ids).float() - lse[:, None])
        out.scatter_(1, ids, (hits - total[:, None] * soft).to(out.dtype))
        return out, None


def picked_logprobs_triton(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logits [N, V], ids [N, C] int64 → [N, C] fp32: log_softmax(logits) at ids (differentiable)."""
    reason = unsupported(logits, ids)
    if reason is not None:
        raise ValueError(f"picked_logprobs_triton: {reason}")
    return PickedLogProbsFunction.apply(logits, ids)
