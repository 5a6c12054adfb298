"""The sidecar modules on their own: the SPEC §2b traps each module can cause, caught at the source.

Identity at init (exact), an empty window that contributes an exact zero with finite gradients,
notes / producers / the external gate that really change (or stop changing) the output, per-row
stream weights, a planner that costs O(V_p·d_plan), a snapshot 0 that ignores inactive slots,
stable salted plan ids, a deterministic padding-blind text embedder, padding-blind coverage, and
gradients that reach every parameter.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pdt.model.sidecars import (
    PAD_LOGIT,
    AgreementHead,
    CoverageHead,
    NotesCrossAttention,
    NotesHead,
    Planner,
    SpeculationHead,
    StreamAdapters,
    StreamClassifier,
    TextEmbedder,
    content_means,
    coverage_summary,
    plan_item_id,
)

D, DN, WIDTH, HEADS, K, ROUNDS, RANK = 16, 8, 8, 2, 3, 4, 5
R, T, N = 3, 5, 4
VP, S, DP = 512, 4, 8


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def open_module(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Simulate training: gates wide open, zero-initialised projections given random weights."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "gate":
                p.fill_(4.0)
            elif not p.any():
                p.copy_(torch.randn(p.shape, generator=gen(seed)) * 0.3)
    return module


# --------------------------------------------------------------------------- adapters


def test_adapters_are_an_exact_identity_at_init() -> None:
    adapters = StreamAdapters(D, RANK, K, gate_init=-4.0)
    hidden = torch.randn(R, T, D, generator=gen(0))
    ids = torch.tensor([2, 0, 1])
    assert torch.equal(adapters(hidden, ids), hidden)
    assert torch.equal(adapters(hidden[:, 0], ids), hidden[:, 0])  # [R, D] decode shape
    bf16 = hidden.bfloat16()
    out = adapters(bf16, ids)
    assert out.dtype == torch.bfloat16 and torch.equal(out, bf16)
    assert torch.allclose(adapters.gate_value(), torch.sigmoid(torch.tensor(-4.0)).expand(K))


def test_adapter_rows_use_their_own_streams_weights() -> None:
    adapters = open_module(StreamAdapters(D, RANK, K))
    hidden = torch.randn(R, T, D, generator=gen(2))
    out = adapters(hidden, torch.tensor([0, 1, 2]))
    for row, s in enumerate([0, 1, 2]):  # row `row` is stream `s`: stream-s weights, written out
        h = hidden[row]
        manual = F.gelu(h @ adapters.w_down[s] + adapters.b_down[s]) @ adapters.w_up[s] + adapters.b_up[s]
        torch.testing.assert_close(
            out[row], h + torch.sigmoid(adapters.gate[s]) * manual, atol=1e-5, rtol=1e-5
        )
    other = adapters(hidden, torch.tensor([0, 0, 2]))
    assert torch.equal(other[0], out[0]) and torch.equal(other[2], out[2])
    assert (other[1] - out[1]).abs().max() > 1e-3, "row 1 as stream 0 must differ from row 1 as stream 1"


def test_adapter_epilogue_matches_the_plain_formula() -> None:
    """The fused epilogue (gate, positions mask, residual add) gives what the plain
    `h + sigmoid(gate[s]) · positions · adapter_s(h)` gives, values and every gradient; off the
    positions the output is exactly h even with the gates open."""
    from pdt.kernels import reference

    adapters = open_module(StreamAdapters(D, RANK, K))
    hidden = torch.randn(R, T, D, generator=gen(6)).requires_grad_()
    ids = torch.tensor([2, 0, 2])
    positions = torch.arange(T)[None, :] >= torch.tensor([[1], [0], [T]])  # row 2: no position at all
    out = adapters(hidden, ids, positions)
    assert torch.equal(out[2], hidden[2]) and torch.equal(out[0, 0], hidden[0, 0])
    delta = reference.row_adapter(hidden, ids, adapters.w_down, adapters.b_down, adapters.w_up, adapters.b_up)
    scale = torch.sigmoid(adapters.gate)[ids][:, None, None] * positions[..., None]  # [R, T, 1]
    plain = hidden + scale * delta
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-6)
    leaves = [hidden, *adapters.parameters()]
    grad = torch.randn(R, T, D, generator=gen(7))
    for name, a, b in zip(
        ["hidden", *(n for n, _ in adapters.named_parameters())],
        torch.autograd.grad(out, leaves, grad),
        torch.autograd.grad(plain, leaves, grad),
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=lambda m, n=name: f"d{n}: {m}")
    decode = adapters(hidden[:, 1], ids, positions[:, 1])  # [R, D] with [R] positions
    torch.testing.assert_close(decode, out[:, 1])


def test_adapter_folded_rows_match_forward() -> None:
    """A decode round's folded rows (gate and GELU's 1/√2 in the weights, exact-erf GELU written
    out) give `forward`'s values for rows in any stream order, and exactly h at init."""
    hidden = torch.randn(R, T, D, generator=gen(8))
    for ids in (torch.tensor([0, 1, 2]), torch.tensor([2, 0, 2])):
        fresh = StreamAdapters(D, RANK, K)
        with torch.no_grad():
            assert torch.equal(fresh.add_folded(hidden, fresh.fold_rows(ids)), hidden)  # bit for bit
            adapters = open_module(StreamAdapters(D, RANK, K))
            folded = adapters.add_folded(hidden, adapters.fold_rows(ids))
            torch.testing.assert_close(folded, adapters(hidden, ids), atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- notes cross-attention


def snc_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = gen(seed)
    return {
        "hidden": torch.randn(R, T, D, generator=g),
        "notes": F.normalize(torch.randn(R, N, DN, generator=g), dim=-1),
        "producer": torch.tensor([[K, 0, 1, 2]] * R),  # [R, N], K = snapshot 0
        "rounds": torch.tensor([[0, 1, 1, 2]] * R),
        "visible": torch.ones(R, T, N, dtype=torch.bool),
    }


def make_snc(gate_init: float = -4.0) -> NotesCrossAttention:
    torch.manual_seed(0)
    return NotesCrossAttention(D, DN, WIDTH, HEADS, K, ROUNDS, gate_init)


def test_snc_is_an_exact_identity_at_init() -> None:
    snc = make_snc()
    x = snc_inputs()
    assert torch.equal(snc(**x), x["hidden"])
    assert snc.gate_value() == pytest.approx(float(torch.sigmoid(torch.tensor(-4.0))))


def test_snc_empty_window_gives_zero_delta_and_finite_gradients() -> None:
    snc = open_module(make_snc())
    x = snc_inputs()
    x["visible"][0] = False  # row 0 sees nothing
    x["visible"][1, 2] = False  # one position of row 1 sees nothing
    x["hidden"].requires_grad_()
    out = snc(**x)
    assert torch.equal(out[0], x["hidden"][0]) and torch.equal(out[1, 2], x["hidden"][1, 2])
    assert (out[2] - x["hidden"][2]).abs().max() > 1e-3  # the open rows do move
    out.square().sum().backward()
    assert torch.isfinite(x["hidden"].grad).all()
    assert all(torch.isfinite(p.grad).all() for p in snc.parameters())


def test_snc_reads_the_notes_and_their_producers() -> None:
    snc = open_module(make_snc())
    x = snc_inputs()
    base = snc(**x)
    changed = dict(x, notes=snc_inputs(seed=9)["notes"])
    assert (snc(**changed) - base).abs().max() > 1e-3, "other notes must change the output"
    same_round = dict(x, rounds=torch.zeros(R, N, dtype=torch.long))
    base_same = snc(**same_round)
    swapped = dict(same_round, notes=x["notes"][:, [0, 2, 1, 3]])  # producers 0 and 1 exchange notes
    assert (snc(**swapped) - base_same).abs().max() > 1e-3, "the producer embedding must matter"
    # Control: permuting whole entries (note + its tags) is a no-op, so the change above is the tags.
    perm = [3, 1, 0, 2]
    permuted = dict(same_round, notes=x["notes"][:, perm], producer=x["producer"][:, perm])
    torch.testing.assert_close(snc(**permuted), base_same, atol=1e-5, rtol=1e-5)


def test_snc_round_embedding_and_clipping() -> None:
    snc = open_module(make_snc())
    x = snc_inputs()
    later = dict(x, rounds=x["rounds"] + 1)
    assert (snc(**later) - snc(**x)).abs().max() > 1e-3, "the round embedding must matter"
    old = dict(x, rounds=torch.full((R, N), ROUNDS - 1))
    older = dict(x, rounds=torch.full((R, N), ROUNDS + 50))
    assert torch.equal(snc(**old), snc(**older)), "rounds past max_rounds share the last id"


def test_snc_external_gate_and_decode_window() -> None:
    snc = open_module(make_snc())
    x = snc_inputs()
    assert torch.equal(snc(**x, g=0.0), x["hidden"])
    per_row = snc(**x, g=torch.tensor([0.0, 1.0, 0.5]))
    full = snc(**x, g=1.0)
    assert torch.equal(per_row[0], x["hidden"][0]) and torch.allclose(per_row[1], full[1])
    torch.testing.assert_close(per_row[2] - x["hidden"][2], 0.5 * (full[2] - x["hidden"][2]))
    window = torch.tensor([[True, False, True, True]] * R)  # [R, N], same for every position
    decode = snc(**dict(x, visible=window))
    teacher = snc(**dict(x, visible=window[:, None, :].expand(R, T, N)))
    assert torch.equal(decode, teacher)


def test_snc_add_delta_matches_the_plain_formula() -> None:
    """Gate folded into W_o and the residual add fused into the output GEMM: the same values and
    gradients as `base + sigmoid(a) · g · C W_o`, for a float gate and a per-row one; an empty
    window still gives exactly base."""
    snc = open_module(make_snc())
    x = snc_inputs()
    x["visible"][1] = False  # row 1 sees nothing
    hidden = x.pop("hidden").requires_grad_()
    base = torch.randn(R, T, D, generator=gen(3)).requires_grad_()
    leaves = [base, hidden, *snc.parameters()]
    names = ["base", "hidden", *(n for n, _ in snc.named_parameters())]
    grad = torch.randn(R, T, D, generator=gen(4))
    for g in (1.0, 0.7, torch.tensor([0.5, 1.0, 0.0])):
        out = snc.add_delta(base, hidden, **x, g=g)
        c = snc.context(hidden, **x).view(R, T, WIDTH)  # [R·T, w] → [R, T, w]
        scale = torch.sigmoid(snc.gate) * (g[:, None, None] if torch.is_tensor(g) else g)
        plain = base + scale * (c @ snc.w_o.weight.t())
        torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-6)
        assert torch.equal(out[1], base[1])
        for name, a, b in zip(
            names,
            torch.autograd.grad(out, leaves, grad),
            torch.autograd.grad(plain, leaves, grad),
            strict=True,
        ):
            torch.testing.assert_close(
                a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=name, g=g: f"d{n}, g={g}: {m}"
            )
    assert snc.add_delta(base, hidden, **x, g=0.0) is base  # g = 0: no work at all


def test_snc_folded_window_matches_add_delta() -> None:
    """A decode round's folded window (W_q, the norm weight, the scale and λ·g·W_o folded into the
    keys and values) gives `add_delta`'s values for a float and a per-row gate; a row with an empty
    window, and every row at init, gives exactly base."""
    x = snc_inputs()
    hidden, base = x.pop("hidden"), torch.randn(R, T, D, generator=gen(9))
    window = torch.tensor([[True, False, True, True], [False] * N, [False, False, False, True]])  # [R, N]
    x["visible"] = window
    with torch.no_grad():
        fresh = make_snc()
        kv = fresh.project_notes(x["notes"], x["producer"], x["rounds"])
        folded = fresh.fold_window(kv, window, fresh.gated_out_weight(1.0, torch.float32))
        assert torch.equal(fresh.add_folded(base, hidden, folded), base)  # identity at init, bit for bit
        snc = open_module(make_snc())
        kv = snc.project_notes(x["notes"], x["producer"], x["rounds"])
        for g in (1.0, torch.tensor([0.5, 1.0, 0.25])):
            folded = snc.fold_window(kv, window, snc.gated_out_weight(g, torch.float32))
            out = snc.add_folded(base, hidden, folded)
            torch.testing.assert_close(out, snc.add_delta(base, hidden, **x, g=g), atol=1e-5, rtol=1e-5)
            assert torch.equal(out[1], base[1])  # row 1 sees nothing: exactly base
            assert torch.isfinite(out).all()


def test_snc_keeps_the_bases_dtype_and_identity() -> None:
    """A bf16 attention output with fp32 sidecars (no autocast): the sum stays bf16, the delta is
    rounded once into it, and at init the output is base bit for bit."""
    x = snc_inputs()
    base = torch.randn(R, T, D, generator=gen(5)).bfloat16()
    hidden = x.pop("hidden")
    assert torch.equal(make_snc().add_delta(base, hidden, **x), base)
    snc = open_module(make_snc())
    out = snc.add_delta(base, hidden, **x)
    assert out.dtype == torch.bfloat16
    expect = base.float() + snc.add_delta(torch.zeros(R, T, D), hidden, **x)
    torch.testing.assert_close(out.float(), expect, atol=2e-2, rtol=1e-2)


def test_project_notes_all_equals_each_layer_alone() -> None:
    """The batched keys/values of several layers (one concatenated table, one batched GEMM) equal
    each layer's own `(notes + producer_emb[p] + round_emb[r]) · W_{k,v}ᵀ`, values and gradients;
    rounds past max_rounds share the last id."""
    from pdt.model.sidecars.snc import project_notes_all

    layers = []
    for seed in range(3):
        torch.manual_seed(seed)
        layers.append(NotesCrossAttention(D, DN, WIDTH, HEADS, K, ROUNDS))
    x = snc_inputs()
    rounds = torch.tensor([[0, 1, 3, 9]] * R)  # 9 > max_rounds - 1
    batched = project_notes_all(layers, x["notes"], x["producer"], rounds)
    grad = [torch.randn(R, HEADS, N, WIDTH // HEADS, generator=gen(i)) for i in range(2)]
    for layer, (k, v) in zip(layers, batched, strict=True):
        kv_in = x["notes"] + layer.producer_emb(x["producer"]) + layer.round_emb(rounds.clamp(0, ROUNDS - 1))
        heads = [(kv_in @ w.weight.t()).view(R, N, HEADS, -1).transpose(1, 2) for w in (layer.w_k, layer.w_v)]
        torch.testing.assert_close(k, heads[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(v, heads[1], atol=1e-6, rtol=1e-6)
        params = [layer.producer_emb.weight, layer.round_emb.weight, layer.w_k.weight, layer.w_v.weight]
        ours = torch.autograd.grad((k, v), params, grad, retain_graph=True)  # one graph for all layers
        plain = torch.autograd.grad(heads, params, grad)
        for a, b in zip(ours, plain, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gated_out_weights_of_several_layers() -> None:
    from pdt.model.sidecars.snc import gated_out_weights

    layers = [open_module(make_snc(), seed=s) for s in (1, 2)]
    with torch.no_grad():
        layers[1].gate.fill_(-1.0)
    g_rows = torch.tensor([0.5, 1.0, 0.0])
    for layer, scalar, per_row in zip(
        layers,
        gated_out_weights(layers, 0.7, torch.float32),
        gated_out_weights(layers, g_rows, torch.bfloat16),
        strict=True,
    ):
        lam = torch.sigmoid(layer.gate)
        torch.testing.assert_close(scalar, 0.7 * lam * layer.w_o.weight.t())
        assert per_row.dtype == torch.bfloat16 and per_row.shape == (R, WIDTH, D)
        expect = (g_rows[:, None, None] * lam * layer.w_o.weight.t()).bfloat16()
        torch.testing.assert_close(per_row, expect)


def test_context_builds_the_snc_mask_once() -> None:
    from pdt.model.instrument import SidecarContext

    visible = torch.rand(R, T, N, generator=gen(8)) < 0.5
    positions = torch.arange(T)[None, :] >= torch.tensor([[0], [2], [T]])
    ctx = SidecarContext(
        torch.arange(R), torch.zeros(R, N, DN), torch.zeros(R, N), torch.zeros(R, N), visible
    )
    assert ctx.snc_mask() is visible  # no positions: the window as given
    ctx = SidecarContext(
        torch.arange(R),
        torch.zeros(R, N, DN),
        torch.zeros(R, N),
        torch.zeros(R, N),
        visible,
        positions=positions,
    )
    mask = ctx.snc_mask()
    assert ctx.snc_mask() is mask and torch.equal(mask, visible & positions[..., None])
    decode = SidecarContext(
        torch.arange(R),
        torch.zeros(R, N, DN),
        torch.zeros(R, N),
        torch.zeros(R, N),
        visible[:, 0],
        positions=positions,
    )
    assert torch.equal(decode.snc_mask(), visible[:, :1] & positions[..., None])  # [R, N] → [R, T, N]


# --------------------------------------------------------------------------- planner and plan ids


def test_planner_shapes_and_parameter_count() -> None:
    planner = Planner(D, DN, VP, S, DP)
    hidden, mask = torch.randn(2, T, D, generator=gen(0)), torch.ones(2, T, dtype=torch.bool)
    logits, snapshot = planner(hidden, mask)
    assert logits.shape == (2, S, VP) and snapshot.shape == (2, DN)
    torch.testing.assert_close(snapshot, planner.snapshot0(logits.argmax(-1)))
    count = sum(p.numel() for p in planner.parameters())
    assert count == 2 * D + (D + 2) * S * DP + VP * DP + DP * DN
    assert count < 2 * VP * DP + 2 * D + (D + 2) * S * DP + DP * DN
    assert count < 2 * VP * DP + 1024 and count < D * S * VP / 4  # far below a dense D × S·V_p head


def test_planner_pool_ignores_padding() -> None:
    planner = Planner(D, DN, VP, S, DP)
    hidden = torch.randn(2, T, D, generator=gen(1))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    noisy = hidden.clone()
    noisy[0, 3:] = float("nan")
    assert torch.equal(planner.logits(hidden, mask), planner.logits(noisy, mask))


def test_snapshot0_is_unit_norm_and_ignores_inactive_slots() -> None:
    planner = Planner(D, DN, VP, S, DP)
    ids = torch.tensor([[3, 7, 11, 13], [5, 5, 9, 2]])
    active = torch.tensor([[True, True, False, False], [True, True, True, True]])
    snap = planner.snapshot0(ids, active)
    torch.testing.assert_close(snap.norm(dim=-1), torch.ones(2))
    other = ids.clone()
    other[0, 2:] = torch.tensor([-100, 400])  # padding ids, even invalid ones, change nothing
    assert torch.equal(planner.snapshot0(other, active)[0], snap[0])
    assert (planner.snapshot0(ids)[0] - snap[0]).abs().max() > 1e-4  # ...but the slots count when active
    none = planner.snapshot0(ids, torch.zeros_like(active))
    assert torch.equal(none, torch.zeros_like(none))


GOLDEN = ("The causes of the war", "pdt-plan-v1", 16384, 2561)  # pinned: ids must never drift


def test_plan_item_id_is_stable_normalised_and_salted() -> None:
    text, salt, vocab, expect = GOLDEN
    assert plan_item_id(text, salt, vocab) == expect
    assert plan_item_id("  the CAUSES of the war \n", salt, vocab) == expect
    assert plan_item_id("Caf\u00e9", salt, vocab) == plan_item_id("CAFE\u0301", salt, vocab)  # NFC
    items = [f"plan item {i}" for i in range(50)]
    ids = [plan_item_id(t, salt, vocab) for t in items]
    salted = [plan_item_id(t, "another-salt", vocab) for t in items]
    assert sum(a != b for a, b in zip(ids, salted, strict=True)) >= 45
    assert all(0 <= i < vocab for i in ids) and len(set(ids)) >= 45
    with pytest.raises(ValueError):
        plan_item_id(text, salt, 0)


def test_plan_item_id_across_processes_without_torch() -> None:
    code = (
        "import sys; from pdt.data.plan_ids import plan_item_id; "
        f"print(plan_item_id({GOLDEN[0]!r}, {GOLDEN[1]!r}, {GOLDEN[2]})); print('torch' in sys.modules)"
    )
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
        )
        assert out.stdout.split() == [str(GOLDEN[3]), "False"]


# --------------------------------------------------------------------------- text embedder


@pytest.mark.parametrize("d_model", [DN, DN - 3, 3 * DN + 1], ids=["identity", "pad", "project"])
def test_text_embedder_is_fixed_deterministic_unit_norm_and_padding_blind(d_model: int) -> None:
    a, b = TextEmbedder(d_model, DN, seed=7), TextEmbedder(d_model, DN, seed=7)
    assert not list(a.parameters()) and torch.equal(a.proj, b.proj)
    eye = a.proj.t() @ a.proj if d_model > DN else a.proj @ a.proj.t()
    torch.testing.assert_close(eye, torch.eye(min(d_model, DN)))  # isometric: identity / pad / orthonormal
    hidden = torch.randn(2, T, d_model, generator=gen(3))
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    out = a(hidden, mask)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
    assert torch.equal(out, b(hidden, mask))
    noisy = hidden.clone()
    noisy[0, 2:] = float("nan")
    assert torch.equal(a(noisy, mask), out)
    pooled = F.normalize(hidden[0, :2].mean(0), dim=-1)
    if d_model == DN:
        torch.testing.assert_close(out[0], pooled)
    if d_model < DN:
        torch.testing.assert_close(out[0, :d_model], pooled)
        assert not out[0, d_model:].any()


def test_text_embedder_subtracts_its_centre_before_projecting() -> None:
    emb = TextEmbedder(DN, DN, seed=7)  # identity projection: the output is the normalised pool
    hidden = torch.randn(3, T, DN, generator=gen(4)) + 5.0  # a large shared direction
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    pooled = emb.pooled(hidden, mask)
    raw = emb(hidden, mask)
    with torch.no_grad():
        emb.center.copy_(pooled[:2].mean(dim=0))
    out = emb(hidden, mask)
    torch.testing.assert_close(out[:2], F.normalize(pooled[:2] - emb.center, dim=-1))
    assert not out[2].any()  # a text with no token stays the zero vector
    assert float(raw[0] @ raw[1]) > 0.9 and float(out[0] @ out[1]) < 0.0  # two around their mean: opposite
    assert "center" in emb.state_dict()  # saved with the sidecars


def test_text_embedder_seed_matters_and_builds_on_meta() -> None:
    assert not torch.equal(TextEmbedder(40, DN, seed=1).proj, TextEmbedder(40, DN, seed=2).proj)
    with torch.device("meta"):
        TextEmbedder(40, DN, seed=1)


# --------------------------------------------------------------------------- heads


def test_coverage_head_ignores_padded_items() -> None:
    head = CoverageHead(D, DN)
    state = torch.randn(2, D, generator=gen(0))
    items = torch.randn(2, 5, DN, generator=gen(1))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    logits = head(state, items, mask)
    assert logits.shape == (2, 5) and torch.equal(logits[0, 3:], torch.full((2,), PAD_LOGIT))
    changed = items.clone().requires_grad_()
    with torch.no_grad():
        changed[0, 3] = torch.randn(DN, generator=gen(2)) * 100
        changed[0, 4] = float("nan")
    again = head(state, changed, mask)
    assert torch.equal(again, logits)
    again.sum().backward()
    assert torch.isfinite(changed.grad).all() and not changed.grad[0, 3:].any()
    summary = coverage_summary(logits, mask)
    probs = torch.sigmoid(logits[0, :3])
    torch.testing.assert_close(summary[0], torch.stack([probs.mean(), probs.max()]))


def test_agreement_score_is_a_probability() -> None:
    head = open_module(AgreementHead(D, DN, coverage_dim=2))
    args = (
        torch.randn(4, D, generator=gen(0)) * 50,
        torch.randn(4, DN, generator=gen(1)),
        torch.rand(4, 2, generator=gen(2)),
        torch.randn(4, DN, generator=gen(3)),
        torch.randn(4, 2, D, generator=gen(4)),
    )
    logit, score = head(*args), head.score(*args)
    assert logit.shape == (4,) and score.shape == (4,)
    assert ((score >= 0) & (score <= 1)).all()
    torch.testing.assert_close(score, torch.sigmoid(logit))


def test_agreement_content_path_starts_silent_then_reads_the_content() -> None:
    """At init the content path adds nothing (a head saved before it existed scores the same);
    once trained, the block and section means change the score."""
    head = AgreementHead(D, DN, coverage_dim=2)
    base = (
        torch.randn(3, D, generator=gen(0)),
        torch.randn(3, DN, generator=gen(1)),
        torch.rand(3, 2, generator=gen(2)),
        torch.randn(3, DN, generator=gen(3)),
    )
    one, two = torch.randn(3, 2, D, generator=gen(4)), torch.randn(3, 2, D, generator=gen(5))
    assert torch.equal(head(*base, one), head(*base, two))
    open_module(head)
    assert head.content.weight.any()
    a, b = head(*base, one), head(*base, two)
    assert not torch.allclose(a, b)
    swapped = torch.stack([one[:, 1], one[:, 0]], dim=1)  # block and section means: not interchangeable
    assert not torch.allclose(head(*base, swapped), a)


def test_content_means_average_the_written_positions_of_the_block_and_the_section() -> None:
    hidden = torch.randn(2, 9, D, generator=gen(0))
    written = torch.zeros(2, 9, dtype=torch.bool)
    written[0, 2:8] = True
    written[1, 1:9] = True
    written[1, 4] = False  # a position inside the span that the stream did not write
    row, start, end = torch.tensor([0, 0, 1, 1]), torch.tensor([2, 5, 1, 0]), torch.tensor([4, 7, 6, 3])
    got = content_means(hidden, written, row, start, end)
    assert got.shape == (4, 2, D)
    for i in range(4):
        r, s, e = int(row[i]), int(start[i]), int(end[i])
        block = [t for t in range(s, e + 1) if written[r, t]]
        section = [t for t in range(e + 1) if written[r, t]]
        torch.testing.assert_close(got[i, 0], hidden[r, block].mean(0))
        torch.testing.assert_close(got[i, 1], hidden[r, section].mean(0))
    nothing = content_means(hidden, torch.zeros(2, 9, dtype=torch.bool), row, start, end)
    assert torch.equal(nothing, torch.zeros_like(nothing))  # no written position: zeros, not NaN


def test_note_heads_and_classifier_shapes() -> None:
    notes, spec = NotesHead(D, DN), SpeculationHead(D, DN)
    hidden = torch.randn(2, T, D, generator=gen(0))
    assert notes(hidden).shape == (2, T, DN) and spec(hidden).shape == (2, T, DN)
    assert not torch.equal(notes.inp.weight, spec.inp.weight)  # separate weights
    assert StreamClassifier(D, K)(hidden).shape == (2, T, K)


# --------------------------------------------------------------------------- gradients everywhere


def test_backward_reaches_every_parameter_of_every_module() -> None:
    torch.manual_seed(0)
    snc, adapters = open_module(make_snc()), open_module(StreamAdapters(D, RANK, K))
    planner, embed = Planner(D, DN, VP, S, DP), TextEmbedder(D + 4, DN, seed=0)
    heads = [
        NotesHead(D, DN),
        SpeculationHead(D, DN),
        CoverageHead(D, DN),
        open_module(AgreementHead(D, DN, 2)),
        StreamClassifier(D, K),
    ]
    x = snc_inputs()
    x["visible"][0] = False  # an empty window must not block or poison the gradients
    h = adapters(snc(**x), torch.tensor([0, 1, 2]))  # [R, T, D]
    mask = torch.ones(R, T, dtype=torch.bool)
    logits, snapshot = planner(h, mask)
    state = h[:, -1]  # [R, D]
    note = heads[0](state)
    items = embed(torch.randn(R * 2, T, D + 4, generator=gen(5))).reshape(
        R, 2, DN
    )  # [R·2, d_n] → [R, 2, d_n]
    items_mask = torch.tensor([[True, True], [True, False], [True, True]])
    cov = heads[2](state, items, items_mask)
    content = torch.stack([h.mean(1), h[:, -2:].mean(1)], dim=1)  # [R, 2, D] section and block means
    ready = heads[3](state, snapshot, coverage_summary(cov, items_mask), note, content)
    loss = (
        logits.logsumexp(-1).mean()
        + snapshot.sum()
        + note.square().mean()
        + heads[1](state).square().mean()
        + (cov * items_mask).sum()
        + ready.sum()
        + heads[4](h).logsumexp(-1).mean()
    )
    loss.backward()
    for module in [snc, adapters, planner, *heads]:
        for name, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (
                f"{type(module).__name__}.{name}: no gradient"
            )
            assert torch.isfinite(p.grad).all(), f"{type(module).__name__}.{name}: non-finite gradient"


def test_alpha_blend() -> None:
    from pdt.model.sidecars.blend import blend_logits

    attended, base = torch.randn(3, 11), torch.randn(3, 11)
    assert blend_logits(attended, base, 1.0) is attended
    assert blend_logits(attended, base, 0.0) is base
    assert torch.allclose(blend_logits(attended, base, 0.25), 0.25 * attended + 0.75 * base)
    with pytest.raises(ValueError, match="alpha"):
        blend_logits(attended, base, 1.5)
