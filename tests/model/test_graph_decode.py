"""The static-buffer decode engine gives exactly what the eager one gives; the CUDA graph replays it.

On the CPU the engine runs its static-buffer step eagerly (`graphs=False`): same cache slots, same
masks, same window buffers as the captured graph. The `gpu` tests capture and replay on CUDA.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import pdt.model.graph_decode as graph_decode
from pdt.infer.orchestrator import ParallelDecoder, make_decoder
from pdt.model.decode import StreamDecoder
from pdt.model.graph_decode import GraphStreamDecoder
from pdt.model.instrument import SidecarContext
from pdt.model.pdt_model import PDTModel
from tests.infer.test_orchestrator import PROMPT, CharTok, settings
from tests.model.test_pdt_model import CFG, K, Window, open_gates, tiny_trunk


def _model(model_type: str, device: str = "cpu") -> PDTModel:
    m = PDTModel(tiny_trunk(model_type), CFG)
    open_gates(m, snc=True, adapters=True)
    return m.to(device).eval()


def window_context(device: str = "cpu") -> SidecarContext:
    """A decode round's context: 4 notes a row, all visible."""
    w = Window(K, 4, 1, seed=5)
    return SidecarContext(
        stream_ids=torch.arange(K, device=device),
        notes=w.notes.to(device),
        producer=w.producer.to(device),
        rounds=w.rounds.to(device),
        visible=w.visible[:, 0].to(device),
    )


def _pair(
    model: PDTModel, graphs: bool, spans: bool | None = None, **over: object
) -> tuple[ParallelDecoder, ParallelDecoder]:
    eager = ParallelDecoder(model, CharTok(), settings(**{"fast_path": "eager", **over}))
    static = ParallelDecoder(model, CharTok(), settings(**over))
    static.decoder = GraphStreamDecoder(model, graphs=graphs, spans=spans)
    static.engine = static.decoder.engine
    return eager, static


def _same(a, b) -> None:  # noqa: ANN001
    assert [s.token_ids for s in a.streams] == [s.token_ids for s in b.streams]
    assert a.rollbacks == b.rollbacks
    assert a.state.tokens == b.state.tokens
    assert a.state.lengths.tolist() == b.state.lengths.tolist()


@pytest.fixture(autouse=True)
def _small_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Capacities in steps of 16 slots: the answers below outgrow their first buffers (growth is tested)."""
    monkeypatch.setattr(graph_decode, "_ROUND", 16)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "over",
    [
        dict(),
        dict(temperature=0.9, top_k=20),
        dict(gamma=1.0, max_retries=1, max_new_tokens=8),  # every block rolled back once, in a batch
    ],
)
def test_static_engine_equals_eager_engine_in_every_mode(model_type: str, over: dict) -> None:
    model = _model(model_type)
    eager, static = _pair(model, graphs=False, **over)
    for mode in ("pdt", "independent", "sequential"):
        a, b = eager.decode(PROMPT, mode), static.decode(PROMPT, mode)
        assert b.engine == "static" and a.engine == "eager"
        _same(a, b)
        assert b.steps == a.steps > 0
    rolled = eager.decode(PROMPT, "pdt")
    if over.get("gamma") == 1.0:
        assert rolled.rollbacks > 0  # the rollback case really rolls back


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_attention_spans_give_the_eager_engines_tokens(
    model_type: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The graphs' span logic run eagerly: each step attends over the first `span` slots (written
    ones and masked ones past them); every mode, rollbacks and buffer growth included, gives the eager
    engine's tokens, and every step kind has one run per span of its buffer."""
    monkeypatch.setattr(graph_decode, "SPAN", 8)
    model = _model(model_type)
    eager, static = _pair(model, graphs=False, spans=True, gamma=1.0, max_retries=1, max_new_tokens=10)
    seen: list[int] = []
    step = GraphStreamDecoder.step

    def spy(self, state, *args):  # noqa: ANN001, ANN202
        out = step(self, state, *args)
        seen.append(state.buffers.seen[0])
        return out

    monkeypatch.setattr(GraphStreamDecoder, "step", spy)
    outs = {mode: static.decode(PROMPT, mode) for mode in ("pdt", "independent", "sequential")}
    for mode, out in outs.items():
        _same(eager.decode(PROMPT, mode), out)
    pdt = outs["pdt"]
    end = len(pdt.prompt_ids) + max(len(s.prefix_ids) for s in pdt.streams)  # the prefixes' last slot + 1
    assert len(set(seen)) > 2 and all(n % 8 == 0 for n in seen)  # several spans, each of 8 slots
    for buf in static.decoder._buffers.values():
        steps = [key for key in buf.graphs if "extend" not in key]
        kinds = {key[:-1] for key in steps}
        assert {key[-1] for key in steps} == set(graph_decode.attention_spans(buf.capacity))
        assert len(steps) == len(kinds) * len(graph_decode.attention_spans(buf.capacity))
        prefixes = [key for key in buf.graphs if "extend" in key]  # one a kind: the prefixes' span only
        assert len(prefixes) == len({key[:-1] for key in prefixes}) and (len(prefixes) > 0) == (buf.rows == K)
        assert all(end <= k[-1] < end + 8 for k in prefixes)


def test_buffers_grow_mid_answer_with_rollbacks_step_for_step() -> None:
    """Step by step against `StreamDecoder` (same tokens, same active rows, same rollbacks): the
    logits match while the static buffers grow twice (16 → 32 → 64 slots) under the live answer."""
    model = _model("llama")
    eager, static = StreamDecoder(model), GraphStreamDecoder(model, graphs=False)
    prompt = CharTok().encode(PROMPT)
    a, logits_a = eager.prefill(prompt, 3)
    b, logits_b = static.prefill(prompt, 3, steps=0)
    assert b.buffers.capacity == 32  # 23 prompt tokens + 1, rounded up to 16s
    gen = torch.Generator().manual_seed(0)
    for i in range(40):
        tokens = torch.randint(1, 96, (3,), generator=gen)
        active = torch.tensor([True, i % 3 != 1, i < 30])  # a waiting row, a row that is done
        la, ha = eager.step(a, tokens, active, None)
        lb, hb = static.step(b, tokens, active, None)
        torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hb, ha, rtol=1e-5, atol=1e-5)
        if i in (12, 25):  # roll row 0 back by 5 tokens
            length = int(a.lengths[0]) - 5
            eager.rollback(a, 0, length)
            static.rollback(b, 0, length)
    assert b.buffers.capacity == 64 and b.used == len(prompt) + 40
    assert a.tokens == b.tokens and a.lengths.tolist() == b.lengths.tolist()


def test_buffers_are_reused_across_answers() -> None:
    model = _model("llama")
    eager, static = _pair(model, graphs=False, max_new_tokens=20)
    first = static.decode(PROMPT, "pdt")
    _same(eager.decode(PROMPT, "pdt"), first)
    buf = static.decoder._buffers[K]
    again = static.decode("Tell me about Music.", "pdt")
    assert static.decoder._buffers[K] is buf  # same rows, enough room: the same buffers (and graphs)
    _same(eager.decode("Tell me about Music.", "pdt"), again)


def test_a_superseded_state_may_not_step() -> None:
    model = _model("llama")
    engine = GraphStreamDecoder(model, graphs=False)
    old, _ = engine.prefill([5, 6, 7], 2)
    engine.prefill([8, 9], 2)  # the same rows: the buffers now hold this prompt
    with pytest.raises(RuntimeError, match="superseded"):
        engine.step(old, torch.tensor([1, 2]), torch.tensor([True, True]), None)


def test_engine_choice_and_its_errors() -> None:
    model = _model("llama")
    decoder, note = make_decoder(model, settings(fast_path="auto"))
    assert isinstance(decoder, GraphStreamDecoder) and not decoder.graphs  # auto on the CPU: static buffers
    assert decoder.engine == note == "static"
    decoder, note = make_decoder(model, settings(fast_path="static"))
    assert isinstance(decoder, GraphStreamDecoder) and not decoder.graphs and note == "static"
    decoder, note = make_decoder(model, settings(fast_path="eager"))
    assert type(decoder) is StreamDecoder and note == "eager (asked for)"
    decoder, note = make_decoder(model, settings(fast_path="auto", alpha=0.5))
    assert type(decoder) is StreamDecoder and note.startswith("eager (alpha < 1")  # and it says why
    with pytest.raises(ValueError, match="'static' cannot run here: alpha < 1"):
        make_decoder(model, settings(fast_path="static", alpha=0.5))
    with pytest.raises(ValueError, match="cannot run here: CUDA graphs need a CUDA device"):
        make_decoder(model, settings(fast_path="cuda_graph"))
    with pytest.raises(ValueError, match="decode.fast_path 'turbo'"):
        make_decoder(model, settings(fast_path="turbo"))


@pytest.mark.parametrize("fast_path", ["auto", "cuda_graph"])
def test_a_step_that_cannot_be_captured(monkeypatch: pytest.MonkeyPatch, fast_path: str) -> None:
    """auto: the answer is decoded eagerly instead (same tokens) and the note says why; an explicit
    cuda_graph: a message naming the setting."""
    model = _model("llama")
    eager, static = _pair(model, graphs=False)
    static.s = dataclasses.replace(static.s, fast_path=fast_path)

    def refuse(*_args: object) -> None:
        raise graph_decode.GraphCaptureError("the decode step could not be captured as a CUDA graph: sync")

    monkeypatch.setattr(GraphStreamDecoder, "_capture", refuse)
    if fast_path == "cuda_graph":
        with pytest.raises(ValueError, match="decode.fast_path 'cuda_graph': the decode step could not"):
            static.decode(PROMPT, "pdt")
        return
    out = static.decode(PROMPT, "pdt")
    assert out.engine == static.engine == "eager" and "could not be captured" in static.engine_note
    _same(eager.decode(PROMPT, "pdt"), out)


def test_attention_spans_cover_the_capacity_in_at_most_max_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graph_decode, "SPAN", 128)
    assert graph_decode.attention_spans(512) == [128, 256, 384, 512]
    assert graph_decode.attention_spans(100) == [100]
    assert graph_decode.attention_spans(2048) == [256, 512, 768, 1024, 1280, 1536, 1792, 2048]
    assert graph_decode.attention_spans(1100) == [256, 512, 768, 1024, 1100]  # 138 a span → 256
    monkeypatch.setattr(graph_decode, "SPAN", 0)
    assert graph_decode.attention_spans(512) == [512]


@pytest.mark.gpu
@pytest.mark.parametrize(("round_graph", "span"), [(False, 0), (True, 0), (False, 8)])
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_captured_graphs_replay_exactly_what_the_eager_engine_computes(
    model_type: str, round_graph: bool, span: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every mode, rollbacks included, token for token; with ROUND_GRAPH each round's window fold is
    a replay too (one capture per buffer set, reused by later rounds and answers); with 8-slot
    attention spans, the steps cross spans (each span's graph attends over its first slots)."""
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need CUDA")
    monkeypatch.setattr(graph_decode, "ROUND_GRAPH", round_graph)
    monkeypatch.setattr(graph_decode, "SPAN", span)
    model = _model(model_type, "cuda")
    over = dict(gamma=1.0, max_retries=1, max_new_tokens=10)
    eager, static = _pair(model, graphs=True, **over)
    for mode in ("pdt", "independent", "sequential"):
        out = static.decode(PROMPT, mode)
        _same(eager.decode(PROMPT, mode), out)
        # a first answer captures: booked as its own phase, not as steps
        assert out.phase_seconds["capture"] > 0.0 and out.phase_seconds["steps"] == sum(out.step_seconds)
    captures, folds = static.decoder.captures, static.decoder.round_captures
    captured = static.decoder.capture_seconds
    for buf in static.decoder._buffers.values():  # every step kind has a graph for each span
        steps = [key for key in buf.graphs if key[0] != "fold" and "extend" not in key]
        kinds = {key[:-1] for key in steps}
        assert 0 < len(kinds) <= 8  # one graph per step kind and window shape (and span), not per token
        assert sorted(steps, key=str) == sorted(
            [(*kind, s) for kind in kinds for s in graph_decode.attention_spans(buf.capacity)], key=str
        )
        assert (len(graph_decode.attention_spans(buf.capacity)) > 1) == (span > 0)
    assert (folds > 0) == round_graph and folds <= captures
    again = static.decode(PROMPT, "pdt")
    _same(eager.decode(PROMPT, "pdt"), again)
    assert static.decoder.captures == captures  # a second answer replays: nothing captured
    assert static.decoder.round_captures == folds
    assert static.decoder.capture_seconds == captured and again.phase_seconds["capture"] == 0.0
    auto = ParallelDecoder(model, CharTok(), dataclasses.replace(settings(**over), fast_path="auto"))
    assert auto.engine == "cuda_graph"


@pytest.mark.parametrize(
    ("spans", "graphs"), [(False, False), (True, False), pytest.param(True, True, marks=pytest.mark.gpu)]
)
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_extend_matches_the_eager_engine_then_steps_on(
    model_type: str, spans: bool, graphs: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ragged runs in one forward on the static buffers (a window on, a run that makes the buffers
    grow, eager attention's additive mask for gpt2), then steps and a rollback: the eager engine's
    logits throughout; with spans, the run's graph attends over the span that holds it; with graphs
    (CUDA), the run is a captured graph's replay."""
    if graphs and not torch.cuda.is_available():
        pytest.fail("the gpu tests need CUDA")
    monkeypatch.setattr(graph_decode, "SPAN", 8)
    device = "cuda" if graphs else "cpu"
    model = _model(model_type, device)
    eager, static = StreamDecoder(model), GraphStreamDecoder(model, graphs=graphs, spans=spans)
    prompt = CharTok().encode(PROMPT)
    ctx = window_context(device)
    tol = 1e-4 if graphs else 1e-5  # CUDA's kernels differ between the two engines' shapes
    a, _ = eager.prefill(prompt, K)
    b, _ = static.prefill(prompt, K, steps=2)
    assert b.buffers.capacity == 32
    runs = [[5, 6, 7], [8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]  # 23 + 10 slots: the buffers grow
    la, ha = eager.extend(a, runs, ctx)
    lb, hb = static.extend(b, runs, ctx)
    torch.testing.assert_close(lb, la, rtol=tol, atol=tol)
    torch.testing.assert_close(hb, ha, rtol=tol, atol=tol)
    assert b.buffers.capacity == 64 and b.used == len(prompt) + 10 and b.tokens == a.tokens == runs
    assert b.lengths.tolist() == a.lengths.tolist() == [len(prompt) + len(r) for r in runs]
    extends = [key for key in b.buffers.graphs if "extend" in key]
    assert len(extends) == 1 and (extends[0][-1] == 40 if spans else extends[0][-1] == 10)
    live = torch.ones(K, dtype=torch.bool)
    for i in range(4):
        tokens = torch.tensor([20 + i, 30 + i, 40 + i])
        la, _ = eager.step(a, tokens, live, ctx)
        lb, _ = static.step(b, tokens, live, ctx)
        torch.testing.assert_close(lb, la, rtol=tol, atol=tol)
    for state, decoder in ((a, eager), (b, static)):
        decoder.rollback(state, 1, len(prompt) + 1)
    la, _ = eager.extend(a, [[50], [51, 52], [53]], ctx)
    lb, _ = static.extend(b, [[50], [51, 52], [53]], ctx)
    torch.testing.assert_close(lb, la, rtol=tol, atol=tol)
    assert a.tokens[1] == b.tokens[1] == [8, 51, 52]
