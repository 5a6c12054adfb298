"""The PDT model over real (tiny) HF trunks of every supported architecture: the SPEC §2b traps.

Each test builds a tiny trunk from a config (no downloads) and checks behaviour that a broken
instrumentation would fail: identity at init, windows that really change logits, ablation, no
NaN on an empty window, only sidecars trainable, strict save/load, the parameter budget.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from pdt.model.instrument import ARCHITECTURES, SidecarContext, UnsupportedTrunkError
from pdt.model.pdt_model import GROUPS, PDTModel, SidecarLoadError
from pdt.presets.schema import SidecarConfig
from tests.conftest import TINY_ARCH_CONFIGS

TINY = TINY_ARCH_CONFIGS
ARCHS = sorted(TINY)
V, K, DN = 97, 3, 16
CFG = SidecarConfig(
    num_streams=K,
    n_layers=2,
    d_notes=DN,
    snc_heads=2,
    adapter_rank=8,
    plan_vocab=64,
    plan_slots=4,
    d_plan=8,
    max_rounds=8,
)


def tiny_trunk(model_type: str, seed: int = 0) -> torch.nn.Module:
    cfg = AutoConfig.for_model(
        model_type, vocab_size=V, bos_token_id=0, eos_token_id=0, pad_token_id=0, **TINY[model_type]
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).float().eval()


class Window:
    """A decode-style window: every position of a row sees the same notes."""

    def __init__(self, rows: int, n: int, t: int, seed: int = 0, visible: torch.Tensor | None = None):
        gen = torch.Generator().manual_seed(seed)
        self.notes = torch.randn(rows, n, DN, generator=gen)  # [R, N, d_n]
        self.producer = torch.arange(n).remainder(K + 1).expand(rows, n).clone()  # [R, N]
        self.rounds = torch.arange(n).expand(rows, n).clone()  # [R, N]
        self.visible = (visible if visible is not None else torch.ones(rows, n, dtype=torch.bool))[:, None, :]
        self.visible = self.visible.expand(rows, t, n).clone()  # [R, T, N]


def open_gates(model: PDTModel, snc: bool = True, adapters: bool = False, seed: int = 1) -> None:
    """Simulate trained sidecars: open the gates and give the zero-initialised outputs weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("trunk."):
                continue
            in_snc, in_adapter = name.startswith("snc."), name.startswith("adapters.")
            if (in_snc and snc) or (in_adapter and adapters):
                if p.dim() == 0 or p.numel() <= K:  # gate logits
                    p.fill_(4.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def batch(t: int = 6, rows: int = K) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, V, (rows, t), generator=torch.Generator().manual_seed(3))
    return ids, torch.arange(rows) % K


def test_every_table_row_has_a_tiny_config() -> None:
    assert set(TINY) - {"qwen3"} <= set(ARCHITECTURES) and set(ARCHITECTURES) - {"qwen3"} == set(TINY)


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_init(arch: str) -> None:
    model = PDTModel(tiny_trunk(arch), CFG)
    ids, streams = batch()
    with torch.no_grad():
        plain = model.forward_base(ids).logits
        pdt = model.forward_teacher(ids, None, streams, Window(K, 5, ids.shape[1])).logits
    assert torch.equal(pdt, plain), f"not bit-identical: {(pdt - plain).abs().max():.3e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_window_swap_and_ablation_change_logits(arch: str) -> None:
    model = PDTModel(tiny_trunk(arch), CFG)
    open_gates(model, snc=True, adapters=False)
    ids, streams = batch()
    t = ids.shape[1]
    with torch.no_grad():
        plain = model.forward_base(ids).logits
        a = model.forward_teacher(ids, None, streams, Window(K, 5, t, seed=0)).logits
        b = model.forward_teacher(ids, None, streams, Window(K, 5, t, seed=1)).logits
        swapped = Window(K, 5, t, seed=0)
        swapped.producer[:, [1, 2]] = swapped.producer[:, [2, 1]]  # same vectors, other producers
        c = model.forward_teacher(ids, None, streams, swapped).logits
        empty = Window(K, 5, t, visible=torch.zeros(K, 5, dtype=torch.bool))
        d = model.forward_teacher(ids, None, streams, empty).logits
        e = model.forward_teacher(ids, None, streams, Window(K, 5, t, seed=0), g=0.0).logits
    assert (a - b).abs().max() > 1e-4, "changing the window must change the logits"
    assert (a - c).abs().max() > 1e-4, "swapping producers must change the logits"
    assert torch.allclose(d, plain, atol=1e-6), "an ablated (empty) window must give the plain trunk"
    assert torch.allclose(e, plain, atol=1e-6), "g = 0 must disable cross-stream influence"
    assert (a - plain).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_only_sidecars_train_and_every_one_gets_a_gradient(arch: str) -> None:
    model = PDTModel(tiny_trunk(arch), CFG)
    params = model.set_trainable(list(GROUPS))
    assert all(not p.requires_grad for p in model.trunk.parameters())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params}
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable
    open_gates(model, snc=True, adapters=True)
    ids, streams = batch()
    visible = torch.ones(K, 5, dtype=torch.bool)
    visible[0] = False  # one row with an empty window: still finite gradients
    out = model.forward_teacher(ids, None, streams, Window(K, 5, ids.shape[1], visible=visible))
    hidden = out.hidden[:, -1]  # [R, D]
    notes = model.notes_head(hidden)
    spec = model.speculation_head(hidden)
    items = torch.randn(K, 4, DN)
    cov = model.coverage_head(hidden, items, torch.ones(K, 4, dtype=torch.bool))
    summary = torch.stack([cov.sigmoid().mean(-1), cov.sigmoid().max(-1).values], dim=-1)  # [R, 2]
    with torch.no_grad():  # trained: the content path (zero at init) given weights
        model.agreement_head.content.weight.normal_(0, 0.3)
    content = torch.stack([out.hidden.mean(1), out.hidden[:, -2:].mean(1)], dim=1)  # [R, 2, D]
    ready = model.agreement_head(hidden, notes.detach(), summary, notes, content)
    plan_logits, snapshot0 = model.planner(out.hidden, torch.ones(ids.shape, dtype=torch.bool))
    loss = (
        out.logits.logsumexp(-1).mean()
        + notes.square().mean()
        + spec.square().mean()
        + cov.mean()
        + ready.mean()
        + model.stream_classifier(hidden).logsumexp(-1).mean()
        + plan_logits.logsumexp(-1).mean()
        + snapshot0.sum()
    )
    loss.backward()
    assert all(p.grad is None for p in model.trunk.parameters())
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum())
    ]
    assert not missing, f"no gradient reached {missing}"
    assert all(torch.isfinite(p.grad).all() for p in params)


def test_groups_freeze_the_rest() -> None:
    model = PDTModel(tiny_trunk("llama"), CFG)
    model.set_trainable(["planner", "notes"])
    names = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"planner", "notes_head"}
    with pytest.raises(ValueError, match="unknown sidecar group"):
        model.set_trainable(["planer"])


def test_unsupported_architecture_is_named() -> None:
    trunk = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(
            "opt",
            vocab_size=V,
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
        )
    )
    with pytest.raises(UnsupportedTrunkError, match="opt"):
        PDTModel(trunk, CFG)


def test_save_load_round_trip_and_refusals(tmp_path) -> None:  # noqa: ANN001
    model = PDTModel(tiny_trunk("llama"), CFG)
    open_gates(model, snc=True, adapters=True, seed=5)
    model.save_sidecars(tmp_path / "sc")
    ids, streams = batch()
    window = Window(K, 5, ids.shape[1])
    fresh = PDTModel(tiny_trunk("llama"), CFG)
    fresh.load_sidecars(tmp_path / "sc")
    with torch.no_grad():
        assert torch.equal(
            model.forward_teacher(ids, None, streams, window).logits,
            fresh.forward_teacher(ids, None, streams, window).logits,
        )
    salted = PDTModel(tiny_trunk("llama"), CFG.model_copy(update={"plan_salt": "other"}))
    with pytest.raises(SidecarLoadError, match="plan_salt"):
        salted.load_sidecars(tmp_path / "sc")
    vocab = PDTModel(tiny_trunk("llama"), CFG.model_copy(update={"plan_vocab": 128}))
    with pytest.raises(SidecarLoadError, match="plan_vocab"):
        vocab.load_sidecars(tmp_path / "sc")
    other_trunk = PDTModel(tiny_trunk("llama", seed=9), CFG)
    with pytest.raises(SidecarLoadError, match="another trunk"):
        other_trunk.load_sidecars(tmp_path / "sc")
    other_cfg = PDTModel(tiny_trunk("llama"), CFG.model_copy(update={"adapter_rank": 4}))
    with pytest.raises(SidecarLoadError, match="adapter_rank"):
        other_cfg.load_sidecars(tmp_path / "sc")


def test_sidecars_saved_before_the_readiness_content_path_load_and_score_the_same(tmp_path) -> None:  # noqa: ANN001
    """A checkpoint without the agreement head's content tensors (written before they existed)
    loads: they keep their fresh values, whose output layer is zero, so readiness is what the old
    head computed. Any other missing tensor is still refused."""
    from safetensors.torch import load_file, save_file

    from pdt.model.pdt_model import ADDED_KEYS, SIDECAR_WEIGHTS

    model = PDTModel(tiny_trunk("llama"), CFG)
    open_gates(model, snc=True, adapters=True, seed=5)
    with torch.no_grad():
        for p in model.agreement_head.parameters():
            p.normal_(0, 0.5)
        model.agreement_head.content.weight.zero_()  # what the old head computed
    model.save_sidecars(tmp_path / "old")
    weights = tmp_path / "old" / SIDECAR_WEIGHTS
    state = load_file(str(weights))
    save_file({k: v for k, v in state.items() if k not in ADDED_KEYS}, str(weights))
    fresh = PDTModel(tiny_trunk("llama"), CFG)
    fresh.load_sidecars(tmp_path / "old")
    d = model.d_model
    args = (torch.randn(2, d), torch.randn(2, DN), torch.rand(2, 2), torch.randn(2, DN), torch.randn(2, 2, d))
    with torch.no_grad():
        assert torch.equal(model.agreement_head(*args), fresh.agreement_head(*args))
        assert not fresh.agreement_head.content.weight.any()
    save_file({k: v for k, v in state.items() if k != "agreement_head.hidden.weight"}, str(weights))
    with pytest.raises(SidecarLoadError, match="missing"):
        PDTModel(tiny_trunk("llama"), CFG).load_sidecars(tmp_path / "old")


def test_prompt_positions_are_left_to_the_plain_trunk() -> None:
    model = PDTModel(tiny_trunk("llama"), CFG)
    open_gates(model, snc=True, adapters=True)
    ids, streams = batch(t=8)
    positions = torch.zeros(ids.shape, dtype=torch.bool)
    positions[:, 5:] = True  # a 5-token prompt, then the stream's own tokens
    with torch.no_grad():
        plain = model.forward_base(ids).logits
        out = model.forward_teacher(ids, None, streams, Window(K, 5, 8), sidecar_positions=positions).logits
    assert torch.allclose(out[:, :5], plain[:, :5], atol=1e-6)
    assert (out[:, 5:] - plain[:, 5:]).abs().max() > 1e-4


def test_shared_snc_state_lives_one_forward() -> None:
    """The SNC hooks share keys/values and gated weights within one forward, never across two: a
    weight changed between forwards is seen, and two graphs backpropagate independently."""
    model = PDTModel(tiny_trunk("llama"), CFG)
    open_gates(model, snc=True, adapters=True)
    ids, streams = batch(t=8)
    window = Window(K, 5, 8)
    first = model.forward_teacher(ids, None, streams, window)
    with torch.no_grad():
        model.snc[0].w_k.weight.mul_(2.0)  # the keys change: a stale state would not notice
        model.snc[1].gate.fill_(-1.0)  # the gated W_o changes
    second = model.forward_teacher(ids, None, streams, window)
    assert (first.logits - second.logits).abs().max() > 1e-4
    first.logits.square().mean().backward()
    second.logits.square().mean().backward()  # its own graph: no "backward through the graph twice"
    assert model.instrumentation.context is None and model.instrumentation._snc_state is None


def test_cpu_decode_folds_once_a_round_and_matches_the_unfolded_step() -> None:
    """A decode context (a `kv_cache`, no grad) on the CPU folds the sidecars' weights into its
    window on the first token and reuses them: the logits equal the unfolded hooks' (a context
    without a cache) within fp32 rounding, with an empty-window row and a per-row gate; at init
    they equal the plain trunk's bit for bit."""
    ids, streams = batch(t=1)
    visible = torch.tensor([[True, True, False, True, False], [False] * 5, [True] * 5])  # [R, N]
    window = Window(K, 5, 1, visible=visible)

    def context(cache: dict | None, g: float | torch.Tensor = 1.0) -> SidecarContext:
        return SidecarContext(
            streams, window.notes, window.producer, window.rounds, visible, g=g, kv_cache=cache
        )

    model = PDTModel(tiny_trunk("llama"), CFG)
    with torch.no_grad():
        plain = model.trunk(input_ids=ids).logits
        ctx = context({})
        with model.instrumentation.active(ctx):
            assert torch.equal(model.trunk(input_ids=ids).logits, plain)
        assert len(ctx._folded) == 1 + CFG.n_layers  # the SNC state + one adapter per layer
        open_gates(model, snc=True, adapters=True)
        for g in (1.0, torch.tensor([0.5, 1.0, 0.0])):
            folding = context({}, g)
            for _ in range(2):  # the second token reuses the folded state
                with model.instrumentation.active(folding):
                    folded = model.trunk(input_ids=ids).logits
                with model.instrumentation.active(context(None, g)):
                    unfolded = model.trunk(input_ids=ids).logits
                torch.testing.assert_close(folded, unfolded, atol=1e-5, rtol=1e-5)
            assert (folded - plain).abs().max() > 1e-4  # the sidecars really act
    # With grad enabled (training), the same context does not fold: the regular hooks run.
    training = context({})
    with model.instrumentation.active(training):
        model.trunk(input_ids=ids).logits.sum().backward()
    assert not training._folded


@pytest.mark.parametrize("lag", [1, 2])
def test_teacher_forced_causality(lag: int) -> None:
    """SPEC §2b.7: perturbing the note of round r leaves every position in rounds < r + Δ unchanged."""
    from pdt.bus import section_pos_round, teacher_windows
    from pdt.presets.schema import BusConfig

    model = PDTModel(tiny_trunk("llama"), CFG)
    open_gates(model, snc=True, adapters=True)
    t, stride, rn = 16, 4, 4
    ids, streams = batch(t=t)
    start = torch.full((K,), 2)  # a 2-token prompt, then rounds of 4 tokens
    pos_round = section_pos_round(start, t, stride)  # [R, T]
    gen = torch.Generator().manual_seed(0)
    snapshot0 = torch.randn(1, DN, generator=gen)
    notes = torch.randn(1, K, rn, DN, generator=gen)
    present = torch.ones(1, K, rn, dtype=torch.bool)
    cfg = BusConfig(lag=lag, window=2)
    positions = torch.arange(t)[None, :] >= start[:, None]  # [R, T]

    def logits(note_tensor: torch.Tensor) -> torch.Tensor:
        window = teacher_windows(snapshot0, note_tensor, present, pos_round, cfg, CFG.max_rounds)
        with torch.no_grad():
            return model.forward_teacher(ids, None, streams, window, sidecar_positions=positions).logits

    base = logits(notes)
    r = 1
    perturbed = notes.clone()
    perturbed[0, 0, r] += 5.0  # producer 0's note of round 1
    changed = (logits(perturbed) - base).abs().amax(-1) > 1e-6  # [R, T]
    # Other streams: not before round r + Δ (and never before r + 1: a note exists once its round ends).
    others = pos_round[1:]
    earliest = r + max(lag, 1)
    assert not changed[1:][others < earliest].any()
    assert changed[1:][others >= earliest].any()
    # The producer always sees its own latest note: from round r + 1, whatever Δ is.
    assert not changed[0][pos_round[0] < r + 1].any()
    assert changed[0][pos_round[0] >= r + 1].any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_autocast_on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The training setting (CUDA, bf16 autocast, fused kernels): gates at init give the plain
    trunk's logits bit for bit, and with open gates the Triton path matches the reference path in
    logits and every sidecar gradient (bf16: within 3e-2 of the largest value)."""
    model = PDTModel(tiny_trunk("llama"), CFG).cuda()
    ids, streams = (x.cuda() for x in batch(t=40))
    cpu = Window(K, 5, 40)
    window = Window(K, 5, 40)
    for name in ("notes", "producer", "rounds", "visible"):
        setattr(window, name, getattr(cpu, name).cuda())
    positions = (torch.arange(40)[None, :] >= torch.tensor([[3], [7], [0]])).cuda()  # [R, T]

    def forward() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model.forward_teacher(ids, None, streams, window, sidecar_positions=positions).logits

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(forward(), model.forward_base(ids).logits)
    open_gates(model, snc=True, adapters=True)
    params = model.set_trainable(list(GROUPS))
    results = {}
    for mode in ("triton", "reference"):
        monkeypatch.setenv("PDT_KERNELS", mode)
        model.zero_grad(set_to_none=True)
        logits = forward().float()
        logits.square().mean().backward()
        results[mode] = [logits.detach()] + [p.grad.float() for p in params if p.grad is not None]
    assert len(results["triton"]) == len(results["reference"]) > 10
    for i, (a, b) in enumerate(zip(results["triton"], results["reference"], strict=True)):
        scale = b.abs().max().clamp_min(1e-12)
        assert ((a - b).abs().max() / scale) < 3e-2, f"tensor {i}: {(a - b).abs().max() / scale:.2e}"
