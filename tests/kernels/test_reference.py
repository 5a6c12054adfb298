"""The kernel references against naive per-row loops: forward and every gradient, odd shapes.

Why naive loops: a reference is only trustworthy if something simpler agrees with it. The loops
here are the definition written out (one row, one stream, one position at a time). Tolerances:
fp32 1e-5; bf16 1e-2 relative against an fp32 loop (STYLE.md). `torch.testing.assert_close`
prints the mismatch report (count, largest difference and where).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pdt.kernels import grouped_adapter, snc_attend

N, D, R, K = 7, 13, 5, 3
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 1e-2, "rtol": 1e-2}}


def adapter_inputs(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(N, D), (K, D, R), (K, R), (K, R, D), (K, D)]
    x, w_down, b_down, w_up, b_up = (torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes)
    return [x, w_down, b_down, w_up, b_up]


def naive_adapter(
    x: torch.Tensor,
    ids: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
) -> torch.Tensor:
    rows = []
    for n in range(x.shape[0]):
        s = int(ids[n])
        rows.append(F.gelu(x[n] @ w_down[s] + b_down[s]) @ w_up[s] + b_up[s])
    return torch.stack(rows)


STREAMS = torch.tensor([2, 0, 2, 1, 0, 2, 2])  # ragged groups, unsorted


@pytest.mark.parametrize("ids", [STREAMS, torch.full((N,), 1)], ids=["mixed", "one-stream"])
def test_grouped_adapter_forward_and_every_gradient(ids: torch.Tensor) -> None:
    ours = adapter_inputs()
    ref = [t.detach().clone().requires_grad_() for t in ours]
    x, w_down, b_down, w_up, b_up = ours
    out = grouped_adapter(x, ids, w_down, b_down, w_up, b_up)
    expect = naive_adapter(ref[0], ids, *ref[1:])
    torch.testing.assert_close(out, expect, **TOL[torch.float32])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    expect.backward(grad)
    for name, a, b in zip(["x", "w_down", "b_down", "w_up", "b_up"], ours, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad, **TOL[torch.float32], msg=lambda m, n=name: f"d{n}: {m}")
    unused = sorted(set(range(K)) - set(ids.tolist()))
    for s in unused:  # a stream with no rows gets an exact zero gradient
        assert not w_up.grad[s].any() and not b_up.grad[s].any()


def test_grouped_adapter_bf16_against_fp32_loop() -> None:
    ours = adapter_inputs(torch.bfloat16)
    out = grouped_adapter(ours[0], STREAMS, *ours[1:])
    assert out.dtype == torch.bfloat16
    expect = naive_adapter(ours[0].float(), STREAMS, *(t.float() for t in ours[1:]))
    scale = expect.abs().max()
    torch.testing.assert_close(out.float() / scale, expect / scale, **TOL[torch.bfloat16])


def test_grouped_adapter_rejects_bad_ids_and_shapes() -> None:
    x, w_down, b_down, w_up, b_up = adapter_inputs()
    with pytest.raises(ValueError, match="stream ids"):
        grouped_adapter(x, torch.full((N,), K), w_down, b_down, w_up, b_up)
    with pytest.raises(ValueError, match="w_up"):
        grouped_adapter(x, STREAMS, w_down, b_down, w_up[:, :-1], b_up)
    empty = grouped_adapter(x[:0], STREAMS[:0], w_down, b_down, w_up, b_up)
    assert empty.shape == (0, D)


RR, H, T, NN, DH = 3, 2, 5, 4, 3


def attend_inputs(seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(RR, H, T, DH, generator=gen).requires_grad_()
    k = torch.randn(RR, H, NN, DH, generator=gen).requires_grad_()
    v = torch.randn(RR, H, NN, DH, generator=gen).requires_grad_()
    mask = torch.rand(RR, T, NN, generator=gen) < 0.5
    mask[0, 1] = False  # one position that sees nothing
    mask[1] = False  # one row that sees nothing at all
    mask[2, 0] = True  # one position that sees everything
    mask[2, 2] = False
    mask[2, 2, 3] = True  # one position that sees exactly one note
    return [q, k, v], mask


def naive_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(q)
    for r in range(q.shape[0]):
        for t in range(q.shape[2]):
            idx = mask[r, t].nonzero().flatten()
            if idx.numel() == 0:
                continue
            for h in range(q.shape[1]):
                scores = k[r, h, idx] @ q[r, h, t] / math.sqrt(q.shape[-1])  # [n_visible]
                out[r, h, t] = torch.softmax(scores, dim=0) @ v[r, h, idx]
    return out


def test_snc_attend_forward_and_every_gradient() -> None:
    ours, mask = attend_inputs()
    ref = [t.detach().clone().requires_grad_() for t in ours]
    out = snc_attend(*ours, mask)
    expect = naive_attend(*ref, mask)
    torch.testing.assert_close(out, expect, **TOL[torch.float32])
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[0, :, 1], torch.zeros(H, DH))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    expect.backward(grad)
    for name, a, b in zip("qkv", ours, ref, strict=True):
        assert torch.isfinite(a.grad).all(), f"d{name} is not finite"
        torch.testing.assert_close(a.grad, b.grad, **TOL[torch.float32], msg=lambda m, n=name: f"d{n}: {m}")
    q, k, v = ours
    assert not q.grad[1].any() and not k.grad[1].any() and not v.grad[1].any()  # empty row: exact zeros


def test_snc_attend_all_masked_is_zero_and_finite() -> None:
    (q, k, v), mask = attend_inputs(seed=3)
    out = snc_attend(q, k, v, torch.zeros_like(mask))
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() and not t.grad.any() for t in (q, k, v))


def test_snc_attend_bf16_against_fp32_loop() -> None:
    (q, k, v), mask = attend_inputs(seed=5)
    out = snc_attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), naive_attend(q, k, v, mask).detach(), **TOL[torch.bfloat16])


def test_snc_attend_rejects_a_wrong_mask() -> None:
    (q, k, v), mask = attend_inputs()
    with pytest.raises(ValueError, match="mask"):
        snc_attend(q, k, v, mask.float())
    with pytest.raises(ValueError, match="mask"):
        snc_attend(q, k, v, mask[:, :, :-1])


def test_row_adapter_matches_grouped_adapter_forward_and_backward() -> None:
    """The per-row path (rows = streams) computes the token-level grouped adapter exactly."""
    from pdt.kernels.reference import grouped_adapter, row_adapter

    gen = torch.Generator().manual_seed(7)
    rows, t, d, r, k = 5, 7, 13, 5, 3
    ids = torch.tensor([2, 0, 1, 2, 0])
    h = torch.randn(rows, t, d, generator=gen, requires_grad=True)
    weights = [
        torch.randn(*shape, generator=gen, requires_grad=True)
        for shape in ((k, d, r), (k, r), (k, r, d), (k, d))
    ]
    out_rows = row_adapter(h, ids, *weights)
    grads_rows = torch.autograd.grad(out_rows.square().sum(), [h, *weights])
    out_tok = grouped_adapter(h.reshape(rows * t, d), ids.repeat_interleave(t), *weights).reshape(rows, t, d)
    grads_tok = torch.autograd.grad(out_tok.square().sum(), [h, *weights])
    assert torch.allclose(out_rows, out_tok, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_rows, grads_tok, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-5), (a - b).abs().max()


def test_picked_logprobs_is_log_softmax_at_the_ids() -> None:
    """Forward and gradient against the full log-softmax gathered, repeated ids included; bf16
    logits are read in fp32 (the result is fp32) and get a bf16 gradient."""
    from pdt.kernels import picked_logprobs

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(6, 29, generator=gen) * 4).to(dtype).requires_grad_()
        ids = torch.randint(0, 29, (6, 4), generator=gen)
        ids[0, 3] = ids[0, 0]
        weights = torch.randn(6, 4, generator=gen)
        ours = picked_logprobs(logits, ids)
        assert ours.dtype == torch.float32
        full = F.log_softmax(logits.float(), dim=-1).gather(1, ids)
        torch.testing.assert_close(ours, full, **TOL[torch.float32])
        (d_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
        (d_full,) = torch.autograd.grad((full * weights).sum(), logits)
        assert d_ours.dtype == dtype
        torch.testing.assert_close(d_ours, d_full, **TOL[dtype])
