"""The Triton kernels against the references, run by Triton's CPU interpreter (fp32, odd shapes).

Not collected by the default run (no `test_` prefix): `test_triton_kernels.py` runs this file in a
child pytest with `TRITON_INTERPRET=1` and `PDT_KERNELS=triton`, because the interpreter is chosen
when `@triton.jit` runs — it must be set before triton is imported, which one shared test process
cannot promise. Shapes are tiny (the interpreter runs each program in numpy: about 0.1 s a launch).
Tolerance fp32 1e-5 (STYLE.md); `torch.testing.assert_close` prints the mismatch report.
"""

from __future__ import annotations

import os

import pytest
import torch

from pdt.kernels import reference
from pdt.kernels.row_adapter_triton import row_adapter_triton
from pdt.kernels.snc_attend_triton import snc_attend_triton

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="run by test_triton_kernels.py with TRITON_INTERPRET=1"
)
FP32 = {"atol": 1e-5, "rtol": 1e-5}


def assert_grads(names: str | list[str], ours: tuple, expect: tuple) -> None:
    """Every gradient close to the reference's: FP32, with the absolute tolerance also allowed to
    grow with the gradient's largest entry (1e-6 of it). A weight gradient sums over every position
    in an order the kernel and the CPU's BLAS choose differently: on an AMD EPYC CI machine, dw_down
    of the [2, 70, 100] adapter case (entries up to ~90) missed 1e-5 by 3e-6 on an entry of 0.012."""
    for name, a, b in zip(names, ours, expect, strict=True):
        assert torch.isfinite(a).all(), f"d{name} is not finite"
        atol = max(FP32["atol"], 1e-6 * float(b.abs().max())) if b.numel() else FP32["atol"]
        torch.testing.assert_close(a, b, atol=atol, rtol=FP32["rtol"], msg=lambda m, n=name: f"d{n}: {m}")


def attend_inputs(
    rows: int, heads: int, t: int, n: int, dh: int, seed: int = 0
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """q, k, v and a mask with an empty row, an empty position, a full one and a one-note one."""
    gen = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(rows, heads, length, dh, generator=gen) for length in (t, n, n)]
    mask = torch.rand(rows, t, n, generator=gen) < 0.4
    mask[1] = False  # a row that sees nothing at all
    mask[0, 1] = False  # a position that sees nothing
    mask[2, 0] = True  # a position that sees every note
    mask[2, 2] = False
    mask[2, 2, n - 1] = True  # a position that sees exactly one note (the last, a padded block's)
    return [x.requires_grad_() for x in qkv], mask


@pytest.mark.parametrize(
    ("shape", "block_n", "chunks"),
    [
        ((3, 2, 5, 7, 16), None, None),  # the brief's shape: one notes block, one T chunk
        ((3, 2, 37, 40, 24), 16, 2),  # dh = 24 padded to 32; 3 notes blocks and 2 T chunks: partial sums
        ((3, 1, 4, 1, 3), None, None),  # N = 1, dh = 3 padded to 16
    ],
    ids=["brief", "partials", "tiny"],
)
def test_snc_attend_forward_and_every_gradient(shape: tuple, block_n: int | None, chunks: int | None) -> None:
    (q, k, v), mask = attend_inputs(*shape)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    out = snc_attend_triton(q, k, v, mask, block_n=block_n, chunks=chunks)
    expect = reference.snc_attend(q, k, v, mask)
    torch.testing.assert_close(out, expect, **FP32)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    assert_grads("qkv", grads, torch.autograd.grad(expect, (q, k, v), grad))
    assert torch.equal(out[1], torch.zeros_like(out[1])) and not out[0, :, 1].any()  # exact zeros
    assert not grads[0][1].any() and not grads[1][1].any() and not grads[2][1].any()
    assert not grads[0][0, :, 1].any()  # the empty position's query gets no gradient


def test_snc_attend_all_masked_is_exact_zero() -> None:
    (q, k, v), mask = attend_inputs(3, 2, 5, 7, 16, seed=3)
    out = snc_attend_triton(q, k, v, torch.zeros_like(mask))
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() and not g.any() for g in grads)


def test_snc_attend_strided_views_and_expanded_mask() -> None:
    """The sidecar's layout: q/k/v are transposed views, the decode mask is [R, N] expanded over T
    (stride 0), and the output goes through transpose + reshape."""
    rows, heads, t, n, dh = 3, 2, 5, 7, 16
    gen = torch.Generator().manual_seed(4)
    q_base = torch.randn(rows, t, heads * dh, generator=gen, requires_grad=True)
    kv_base = torch.randn(rows, n, 2 * heads * dh, generator=gen, requires_grad=True)
    q = q_base.reshape(rows, t, heads, dh).transpose(1, 2)  # [R, T, H·dh] → [R, H, T, dh] view
    k, v = kv_base.reshape(rows, n, 2, heads, dh).permute(2, 0, 3, 1, 4)  # 2 × [R, H, N, dh] views
    window = torch.rand(rows, n, generator=gen) < 0.5
    window[1] = False
    mask = window[:, None, :].expand(rows, t, n)  # [R, N] → [R, T, N], stride 0 on T
    assert mask.stride(1) == 0
    results = []
    for fn in (snc_attend_triton, reference.snc_attend):
        ctx = fn(q, k, v, mask).transpose(1, 2).reshape(rows, t, heads * dh)  # [R, T, H·dh]
        results.append((ctx, *torch.autograd.grad(ctx.square().sum(), (q_base, kv_base))))
    torch.testing.assert_close(results[0][0], results[1][0], **FP32)
    assert_grads(["q_base", "kv_base"], results[0][1:], results[1][1:])


def test_snc_attend_without_grad_matches() -> None:
    (q, k, v), mask = attend_inputs(3, 2, 5, 7, 16, seed=5)
    with torch.no_grad():
        out = snc_attend_triton(q, k, v, mask)
    torch.testing.assert_close(out, reference.snc_attend(q, k, v, mask).detach(), **FP32)


def test_snc_attend_rejects_what_it_cannot_run() -> None:
    (q, k, v), mask = attend_inputs(3, 2, 5, 7, 16)
    with pytest.raises(ValueError, match="mask"):
        snc_attend_triton(q, k, v, mask[:, :, :-1])
    with pytest.raises(ValueError, match="dtype"):
        snc_attend_triton(q, k.double(), v, mask)


def adapter_inputs(rows: int, t: int, d: int, r: int, k: int, seed: int = 0) -> list[torch.Tensor]:
    """h and the weights at nn.Linear-like scales (1/sqrt(fan_in)), so outputs are O(1) and an
    absolute 1e-5 means what it says."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(rows, t, d), (k, d, r), (k, r), (k, r, d), (k, d)]
    scales = [1.0, d**-0.5, 1.0, r**-0.5, 1.0]
    return [(torch.randn(s, generator=gen) * c).requires_grad_() for s, c in zip(shapes, scales, strict=True)]


@pytest.mark.parametrize(
    ("shape", "ids"),
    [
        ((5, 7, 24, 8, 3), [2, 0, 2, 2, 0]),  # repeated ids, stream 1 unused, D and r padded
        ((2, 70, 100, 20, 2), [1, 1]),  # 2 T blocks, 2 D slices (the second partial), r = 20 → 32
    ],
    ids=["brief", "blocks"],
)
def test_row_adapter_forward_and_every_gradient(shape: tuple, ids: list[int]) -> None:
    h, *weights = adapter_inputs(*shape)
    stream_ids = torch.tensor(ids, dtype=torch.int32 if shape[0] == 2 else torch.int64)
    grad = torch.randn(h.shape, generator=torch.Generator().manual_seed(1))
    out = row_adapter_triton(h, stream_ids, *weights)
    expect = reference.row_adapter(h, stream_ids, *weights)
    torch.testing.assert_close(out, expect, **FP32)
    grads = torch.autograd.grad(out, (h, *weights), grad)
    names = ["h", "w_down", "b_down", "w_up", "b_up"]
    assert_grads(names, grads, torch.autograd.grad(expect, (h, *weights), grad))
    for s in sorted(set(range(shape[4])) - set(ids)):  # a stream with no row: exact zero gradients
        assert all(not g[s].any() for g in grads[1:])


@pytest.mark.parametrize(("gated", "residual"), [(False, False), (True, True)], ids=["mask", "sidecar"])
def test_row_adapter_epilogue_forward_and_every_gradient(gated: bool, residual: bool) -> None:
    """The fused epilogue — gate sigmoid(gate[s]), positions mask (a row with none, a 2D expanded
    one) and the residual add — against the reference's plain ops, forward and every gradient
    (the gate's too); masked tokens give exactly 0 (or exactly h) and pass no gradient on."""
    h, *weights = adapter_inputs(4, 70, 40, 8, 3, seed=3)  # 2 T blocks, one partial
    gate = torch.tensor([0.3, -1.2, 2.0], requires_grad=True) if gated else None
    ids = torch.tensor([2, 0, 2, 1])
    positions = torch.rand(4, 70, generator=torch.Generator().manual_seed(4)) < 0.6
    positions[1] = False  # a row the adapter never acts on
    positions[2, :5] = True
    grad = torch.randn(h.shape, generator=torch.Generator().manual_seed(5))
    kw = {"gate": gate, "positions": positions, "residual": residual}
    out = row_adapter_triton(h, ids, *weights, **kw)
    expect = reference.row_adapter(h, ids, *weights, **kw)
    torch.testing.assert_close(out, expect, **FP32)
    assert torch.equal(out[1], h[1] if residual else torch.zeros_like(h[1]))  # exact, not close
    leaves = (h, *weights, gate) if gated else (h, *weights)
    grads = torch.autograd.grad(out, leaves, grad)
    names = ["h", "w_down", "b_down", "w_up", "b_up", "gate"]
    assert_grads(names[: len(leaves)], grads, torch.autograd.grad(expect, leaves, grad))
    assert not grads[1][0].any() and not grads[4][0].any()  # stream 0's only row is masked out
    if gated:
        assert grads[5][0] == 0 and grads[5][1:].abs().min() > 0
    shared = dict(kw, positions=positions[2].expand(4, 70))  # stride-0 rows: read in place
    torch.testing.assert_close(
        row_adapter_triton(h, ids, *weights, **shared),
        reference.row_adapter(h, ids, *weights, **shared),
        **FP32,
    )


def test_row_adapter_rejects_bad_epilogue_inputs() -> None:
    h, *weights = adapter_inputs(3, 5, 24, 8, 3)
    ids = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="positions"):
        row_adapter_triton(h, ids, *weights, positions=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="positions"):
        row_adapter_triton(h, ids, *weights, positions=torch.ones(3, 5))
    with pytest.raises(ValueError, match="gate"):
        row_adapter_triton(h, ids, *weights, gate=torch.zeros(2))


def test_row_adapter_without_grad_and_frozen_weights() -> None:
    h, *weights = adapter_inputs(3, 1, 24, 8, 3, seed=2)
    ids = torch.tensor([0, 1, 2])
    with torch.no_grad():  # the decode path: no autograd Function, no saved activations
        torch.testing.assert_close(
            row_adapter_triton(h, ids, *weights), reference.row_adapter(h, ids, *weights)
        )
    frozen = [w.detach() for w in weights]  # only h needs a gradient: the weight kernels are skipped
    (dh,) = torch.autograd.grad(row_adapter_triton(h, ids, *frozen).sum(), h)
    torch.testing.assert_close(
        dh, torch.autograd.grad(reference.row_adapter(h, ids, *frozen).sum(), h)[0], **FP32
    )


def test_sidecars_through_the_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """PDT_KERNELS=triton routes the sidecar modules through the kernels; values and parameter
    gradients equal the reference path's."""
    from pdt.kernels import row_adapter_triton as adapter_mod
    from pdt.kernels import snc_attend_triton as snc_mod
    from pdt.model.sidecars import NotesCrossAttention, StreamAdapters

    calls: list[str] = []
    for mod, name in ((snc_mod, "snc_attend_triton"), (adapter_mod, "row_adapter_triton")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _f=real, _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    torch.manual_seed(0)
    snc = NotesCrossAttention(d_model=24, d_notes=16, width=32, heads=2, num_streams=3, max_rounds=4)
    adapters = StreamAdapters(d_model=24, rank=8, num_streams=3)
    for p in (snc.w_o.weight, adapters.w_up, adapters.b_up):
        torch.nn.init.normal_(p)  # leave the identity init, so every parameter gets a gradient
    hidden = torch.randn(3, 5, 24)
    notes, visible = torch.randn(3, 6, 16), torch.rand(3, 5, 6) < 0.5
    producer, rounds = torch.randint(0, 4, (3, 6)), torch.randint(0, 4, (3, 6))
    positions = torch.arange(5)[None, :] >= torch.tensor([[1], [0], [3]])  # [R, T]: prompts of 1, 0, 3
    results = []
    for mode in ("triton", "reference"):
        monkeypatch.setenv("PDT_KERNELS", mode)
        mid = snc(hidden, notes, producer, rounds, visible, g=torch.tensor([1.0, 0.5, 0.0]))
        out = adapters(mid, torch.tensor([2, 0, 2]), positions)
        params = [*snc.parameters(), *adapters.parameters()]
        results.append((out, *torch.autograd.grad(out.square().sum(), params)))
    assert calls == ["snc_attend_triton", "row_adapter_triton"]
    torch.testing.assert_close(results[0][0], results[1][0], **FP32)
    names = [n for n, _ in (*snc.named_parameters(), *adapters.named_parameters())]
    assert_grads(names, results[0][1:], results[1][1:])


def picked_inputs(n: int, v: int, c: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits as a column slice of a wider tensor (a row stride ≠ V), ids with repeats in a row
    (the LM target also a teacher top-k id), and one row of huge logits (the max must be tracked)."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(n, v + 7, generator=gen) * 3
    wide[1] += 80.0
    wide[2, v // 2] = 60.0  # one dominant logit mid-vocabulary
    logits = wide[:, :v].requires_grad_()
    ids = torch.randint(0, v, (n, c), generator=gen)
    ids[0, 1] = ids[0, 0]
    ids[2, 0] = ids[2, 2] = v // 2
    ids[3, -1] = v - 1  # the last vocabulary entry (in the padded tail of the last chunk)
    return logits, ids


@pytest.mark.parametrize(("n", "v", "c"), [(5, 37, 3), (4, 4500, 5)], ids=["one-chunk", "three-chunks"])
def test_picked_logprobs_forward_and_gradient(n: int, v: int, c: int) -> None:
    from pdt.kernels.picked_logprobs_triton import picked_logprobs_triton

    logits, ids = picked_inputs(n, v, c)
    weights = torch.randn(n, c, generator=torch.Generator().manual_seed(1))
    ours = picked_logprobs_triton(logits, ids)
    expect = reference.picked_logprobs(logits, ids)
    torch.testing.assert_close(ours, expect, **FP32)
    (d_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    (d_expect,) = torch.autograd.grad((expect * weights).sum(), logits)
    assert_grads(["logits"], (d_ours,), (d_expect,))


def test_picked_logprobs_refuses_what_it_cannot_run() -> None:
    from pdt.kernels.picked_logprobs_triton import picked_logprobs_triton

    with pytest.raises(ValueError, match="int64"):
        picked_logprobs_triton(torch.randn(2, 5), torch.zeros(2, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        picked_logprobs_triton(torch.randn(2, 5), torch.zeros(3, 1, dtype=torch.long))


def _folded_case(rows: int, t: int, d: int, heads: int, n: int, seed: int = 0) -> tuple:
    """A real SNC layer (W_o and the gate given weights) folded over a window with an empty row and a
    partly visible one: (module, base, hidden, folded, the unfolded add_delta's output)."""
    from pdt.model.sidecars.snc import NotesCrossAttention

    gen = torch.Generator().manual_seed(seed)
    m = NotesCrossAttention(d, 16, 8 * heads, heads, num_streams=3, max_rounds=4)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    notes = torch.randn(rows, n, 16, generator=gen)
    producer = torch.randint(0, 4, (rows, n), generator=gen)
    rounds = torch.randint(0, 4, (rows, n), generator=gen)
    visible = torch.rand(rows, n, generator=gen) < 0.5
    visible[0] = False  # a row that sees nothing
    visible[1, :] = True
    base, hidden = torch.randn(rows, t, d, generator=gen), torch.randn(rows, t, d, generator=gen) * 4
    with torch.no_grad():
        kv = m.project_notes(notes, producer, rounds)
        w_out = m.gated_out_weight(0.7, torch.float32)
        folded = m.fold_window(kv, visible, w_out)
        unfolded = m.add_delta(base, hidden, notes, producer, rounds, visible, 0.7)
    return m, base, hidden, folded, unfolded


@pytest.mark.parametrize(("rows", "t", "d", "heads", "n"), [(3, 1, 70, 2, 5), (2, 3, 300, 4, 25)])
def test_snc_folded_matches_the_reference_and_the_unfolded_layer(
    rows: int, t: int, d: int, heads: int, n: int
) -> None:
    from pdt.kernels.snc_folded_triton import snc_folded_triton

    m, base, hidden, f, unfolded = _folded_case(rows, t, d, heads, n)
    with torch.no_grad():
        ours = snc_folded_triton(base, hidden, f.keys, f.values, f.bias, heads, m.norm.eps)
        expect = reference.snc_folded(base, hidden, f.keys, f.values, f.bias, heads, m.norm.eps)
    torch.testing.assert_close(ours, expect, **FP32)
    torch.testing.assert_close(ours, unfolded, atol=1e-4, rtol=1e-4)  # the products associate differently
    assert torch.equal(ours[0], base[0])  # an empty window: exactly base
    assert not torch.allclose(ours[1], base[1], atol=1e-3)  # a visible window moves the state


def test_snc_folded_refuses_what_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import pdt.kernels as kernels

    m, base, hidden, f, _ = _folded_case(2, 1, 40, 2, 3)
    with pytest.raises(kernels.KernelUnavailableError, match="gradient"):
        kernels.snc_folded(base, hidden.requires_grad_(), f.keys, f.values, f.bias, 2, 1e-6)
    with pytest.raises(ValueError, match="values must be"):
        kernels.snc_folded(base, hidden.detach(), f.keys, f.values[:, :-1], f.bias, 2, 1e-6)


@pytest.mark.parametrize(("t", "d"), [(1, 70), (3, 300)], ids=["one-token", "three-tokens"])
def test_row_adapter_decode_kernels_with_every_epilogue(t: int, d: int) -> None:
    """A forward of ≤ DECODE_T positions without grad takes the two decode kernels (D split into
    chunks, a partial last chunk, r padded): the same values as the reference with the gate, the
    positions mask (a row it never acts on) and the residual, a bad-free stream ids mix."""
    from pdt.kernels import row_adapter_triton as kern

    assert t <= kern.DECODE_T
    h, *weights = adapter_inputs(4, t, d, 20, 3, seed=7)
    ids = torch.tensor([2, 0, 2, 1])
    gate = torch.tensor([0.3, -1.2, 2.0])
    positions = torch.ones(4, t, dtype=torch.bool)
    positions[1] = False
    with torch.no_grad():
        for kw in ({}, {"gate": gate, "positions": positions, "residual": True}):
            out = row_adapter_triton(h, ids, *weights, **kw)
            torch.testing.assert_close(out, reference.row_adapter(h, ids, *weights, **kw), **FP32)
        assert torch.equal(out[1], h[1])  # masked row + residual: exactly h


@pytest.mark.parametrize(
    ("n", "bias"), [(1, False), (3, True), (16, True)], ids=["1-row", "3-rows-bias", "16-rows"]
)
def test_skinny_linear_matches_linear(n: int, bias: bool) -> None:
    """`F.linear` for a few rows: a vocabulary not a multiple of BLOCK_V, D not a multiple of
    BLOCK_D, a strided x (a row slice of a wider tensor), with and without a bias."""
    from pdt.kernels.skinny_linear_triton import BLOCK_D, BLOCK_V, skinny_linear_triton

    gen = torch.Generator().manual_seed(n)
    v, d = 2 * BLOCK_V + 22, BLOCK_D + 72
    x = torch.randn(n, d + 5, generator=gen)[:, :d]  # row stride d + 5
    w = torch.randn(v, d, generator=gen) * 0.1
    b = torch.randn(v, generator=gen) if bias else None
    with torch.no_grad():
        out = skinny_linear_triton(x, w, b)
    assert out.shape == (n, v) and out.dtype == x.dtype
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), **FP32)


def test_skinny_linear_refuses_what_it_cannot_run() -> None:
    import pdt.kernels as kernels

    w = torch.randn(40, 8)
    with pytest.raises(kernels.KernelUnavailableError, match="1 to 16 rows"):
        kernels.skinny_linear(torch.randn(17, 8), w)
    with pytest.raises(kernels.KernelUnavailableError, match="gradient"):
        kernels.skinny_linear(torch.randn(2, 8, requires_grad=True), w)


def _skinny_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Every `skinny_linear_triton` call from now on, as (x's shape, the weight's shape)."""
    import pdt.kernels.skinny_linear_triton as kern

    calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    real = kern.skinny_linear_triton

    def counted(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        calls.append((tuple(x.shape), tuple(w.shape)))
        return real(x, w, b)

    monkeypatch.setattr(kern, "skinny_linear_triton", counted)
    return calls


@pytest.mark.parametrize(("model_type", "cpu_linear"), [("gpt2", False), ("llama", True)])
def test_lm_head_kernel_inside_a_trunk_forward(
    model_type: str, cpu_linear: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The graph engine's LM-head swap: a trunk's decode forward of 3 rows computes its logits with
    `skinny_linear` (called once, [3, D] rows) and gets `F.linear`'s logits; afterwards the head's
    forward is what it was (the class's, or `pdt.model.cpu_linear`'s instance forward). 1 token a
    row (a decode step) and a prompt of 2 tokens a row."""
    from pdt.model import cpu_linear as small
    from pdt.model.graph_decode import lm_head_kernel
    from tests.model.test_pdt_model import tiny_trunk

    trunk = tiny_trunk(model_type)
    if cpu_linear:
        small.install(trunk)
    before = vars(trunk.get_output_embeddings()).get("forward")
    calls = _skinny_calls(monkeypatch)
    head = trunk.get_output_embeddings()
    for shape in ((3, 1), (3, 2)):
        ids = torch.randint(1, trunk.config.vocab_size, shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expect = trunk(input_ids=ids).logits
            with lm_head_kernel(trunk, rows=shape[0] * shape[1]):
                got = trunk(input_ids=ids).logits
        torch.testing.assert_close(got, expect, **FP32)
        assert vars(head).get("forward") is before  # the override is gone, an earlier one is back
    assert [x for x, _ in calls] == [(3, trunk.config.hidden_size), (6, trunk.config.hidden_size)]


def test_trunk_linears_run_skinny_linear_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """TRUNK_KERNEL_ROWS: a 3-row decode forward of a llama trunk computes every decoder-block
    projection (q/k/v/o, gate/up/down) and the head with `skinny_linear` and gets `F.linear`'s
    logits; at the default (empty) range only the head does; afterwards no forward is left patched."""
    from pdt.model import graph_decode
    from tests.model.test_pdt_model import tiny_trunk

    trunk = tiny_trunk("llama")
    linears = [m for m in trunk.modules() if type(m) is torch.nn.Linear]
    calls = _skinny_calls(monkeypatch)
    ids = torch.randint(1, trunk.config.vocab_size, (3, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expect = trunk(input_ids=ids).logits
        with graph_decode.lm_head_kernel(trunk, rows=3):
            trunk(input_ids=ids)
        assert len(calls) == 1  # the head only
        monkeypatch.setattr(graph_decode, "TRUNK_KERNEL_ROWS", range(1, 17))
        calls.clear()
        with graph_decode.lm_head_kernel(trunk, rows=3):
            got = trunk(input_ids=ids).logits
    torch.testing.assert_close(got, expect, **FP32)
    assert len(calls) == len(linears) and len(linears) > trunk.config.num_hidden_layers * 7
    assert all("forward" not in vars(m) for m in linears)
