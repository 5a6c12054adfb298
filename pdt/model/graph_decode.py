"""The decode step on static buffers, captured once as a CUDA graph and replayed every token.

What it is: `GraphStreamDecoder`, a drop-in for `StreamDecoder` (same `prefill` / `step` /
`rollback`, same results) whose cache, inputs and sidecar window live in buffers allocated once
per row count and reused by every answer: the K/V of each layer are [R, H_kv, capacity, dh]
tensors written at one physical slot per step (all rows share the slot, as in `StreamDecoder`);
the attention mask is a view of the per-row validity bits; the notes window of a round is copied
into fixed buffers. With fixed addresses the whole trunk forward — the SNC and adapter hooks and
their Triton kernels included — is captured as one CUDA graph per (rows, sidecar setting,
attention span: `SPAN`) and a step is a replay: a small trunk decoding a token is paced by the
host launching ~20 kernels a layer (eager HF GPT-2 124M: ~10 ms a token on the H100 machine for
~1 ms of GPU work), which the graph removes. On the CPU (`graphs=False`) the same static-buffer
step runs eagerly; that is what the CPU tests check against `StreamDecoder`, and the GPU tests
check the captured graph.

What it is not: the orchestrator (`pdt.infer.orchestrator` picks this engine or the eager one:
`fast_path`), nor a general static cache — trunks with sliding-window layers, attention kernels
other than sdpa/eager, or a second state at once (α < 1) use `StreamDecoder` (`unsupported`).
"""

from __future__ import annotations

import contextlib
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from pdt import kernels
from pdt.model.attention import cache_arg, decode_attention, output_cache
from pdt.model.decode import DecodeState, StreamDecoder
from pdt.model.instrument import SidecarContext
from pdt.model.pdt_model import PDTModel
from pdt.model.sidecars.snc import FoldedWindow, gated_out_weights, project_notes_all

ENGINE = "cuda_graph"
#: The same static-buffer step run eagerly (no graph): the CPU's default engine. On the 2-core CPU
#: machine, tiny pipeline, K = 3, 10 validation prompts × 2 sampling seeds, against `StreamDecoder`
#: (whose HF cache concatenates every layer's K/V each token): PDT steps 584 / 577 → 508 / 503 ms an
#: answer, sequential 863 / 826 → 721 / 718 ms (2026-12-07, `bench/decode_speedup.py`).
STATIC = "static"
_ROUND = 256  # capacities are multiples of this: answers of similar length share buffers and graphs
#: Rows whose LM head runs `pdt.kernels.skinny_linear` (one read of the weight) rather than cuBLAS —
#: every decode mode alike, `sequential` included: H100, 124M head, inside a graph, 3 rows 28.4 µs
#: against cuBLAS's 64.0 µs, 1 row 28.0 µs against its gemv's 32.6 µs (bench/decode_parts.py).
LM_HEAD_KERNEL_ROWS = range(1, 17)
#: Rows whose decoder-block linear layers (attention and MLP projections) run `skinny_linear` too:
#: none. On the H100 at the 124M's shapes inside a graph, every such product costs ~3 µs either way
#: (768×768 and 2048×768: cuBLAS 3.2 µs at 1 and 3 rows, skinny_linear 3.0–3.6; 768×2048: cuBLAS
#: 4.8, skinny_linear 5.3–6.5), and K = 3 decode ran 2.71 / 2.65× with cuBLAS against 2.64 / 2.68×
#: with the kernel (alternated, one call; bench/results/decode_trunk_kernel_ab.json, 2026-12-07).
TRUNK_KERNEL_ROWS: range = range(0)


#: Capture each round's window fold (`_prepare_round`) as a graph too: eagerly the fold is ~90
#: host-paced launches at a round's first step, a PDT-only cost (`independent` has no SNC to fold).
#: H100, random-weight 124M, K = 3, 128-slot spans, alternated in one machine's calls (2026-12-07):
#: step ratio 2.68× / 2.68× / 2.67× eager → 2.83× / 2.84× / 2.82× captured, e2e 2.27× / 2.25× /
#: 2.26× → 2.37× / 2.41× / 2.36×.
ROUND_GRAPH = True
#: Graph steps attend over the slots written so far rounded up to a span of this many, not over the
#: whole capacity: one graph a span, all of a step kind's spans captured together at its first step
#: (so no capture lands mid-answer later), at most MAX_SPANS a buffer (longer spans for longer
#: buffers). 0: every step attends over the whole capacity. The eager static step (CPU) attends
#: over exactly the slots written. Why: a decode step's attention runs one query a row against every
#: key it is handed, a latency-bound loop over key blocks, so its time follows the key count. H100,
#: random-weight 124M, K = 3, alternated in one call (2026-12-07): step ratio 2.58× / 2.59× over the
#: whole buffer (512 slots) → 2.72× / 2.72× with 128-slot spans, e2e 2.18× / 2.15× → 2.29× / 2.30×.
SPAN = 128
MAX_SPANS = 8
#: Every capture's warm-up runs on one side stream per device, not a new stream each: PyTorch keeps a
#: cuBLAS workspace (32 MiB on Hopper) per stream cuBLAS has run on, for the process's life, so a new
#: warm-up stream per graph held one more workspace per graph. H100, random-weight 124M, K = 3, 12
#: step graphs (2026-12-07, `PDT_BENCH_WARMUP_STREAM`): CUDA memory reserved 896 → 512 MiB, step
#: ratio 2.88× both.
SHARED_WARMUP_STREAM = True
_WARMUP_STREAMS: dict[int, Any] = {}


class GraphCaptureError(RuntimeError):
    """The step could not be captured as a CUDA graph (an op that syncs with the host, say)."""


def unsupported(model: PDTModel, graphs: bool = True) -> str | None:
    """Why this engine cannot run `model` (None: it can); `graphs=False`: the static-buffer step
    run eagerly (any device), without a captured graph."""
    trunk = model.trunk
    device = next(trunk.parameters()).device
    if graphs and device.type != "cuda":
        return f"CUDA graphs need a CUDA device (the trunk is on {device.type})"
    config = trunk.config
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r} (the static mask needs sdpa or eager)"
    if getattr(config, "sliding_window", None) or "sliding_attention" in (
        getattr(config, "layer_types", None) or ()
    ):
        return "sliding-window attention layers (their cache drops slots the static layout keeps)"
    return None


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph, or None when run eagerly
    run: Any  # the forward on the static buffers (what was captured)
    logits: torch.Tensor | None = None  # [R, 1, V] the captured output buffers
    hidden: torch.Tensor | None = None  # [R, 1, D]
    ctx: SidecarContext | None = None  # the context it reads (buffers), for the CPU's per-round folds


@dataclass
class _Inputs:
    """What a forward of L tokens a row reads, at fixed addresses (`extend`: L > 1)."""

    ids: torch.Tensor  # [R, L] long
    pos: torch.Tensor  # [R, L] long
    slots: torch.Tensor  # [L] long: the physical slots written
    mask: torch.Tensor  # [R, 1, L, capacity] bool (sdpa) or additive float (eager)


@dataclass
class _Buffers:
    """Everything a step reads or writes, at fixed addresses, for one row count."""

    rows: int
    capacity: int
    cache: Any  # transformers DynamicCache whose layers write into keys/values at `slot`
    keys: list[torch.Tensor]  # per layer [R, H_kv, capacity, dh]
    values: list[torch.Tensor]
    valid: torch.Tensor  # [R, capacity] bool
    logical: torch.Tensor  # [R, capacity] long (-1: never a token of the row)
    ids: torch.Tensor  # [R, 1] long
    pos: torch.Tensor  # [R, 1] long
    slot: torch.Tensor  # [1] long: the physical slot the step writes
    writes: list  # [slots]: the slots the cache writes this forward (`slot`, or an `extend`'s run)
    seen: list  # [n or None]: attention reads the first n slots (eager: those written; graphs: a span)
    mask: torch.Tensor  # [R, 1, 1, capacity]: a view of `valid` (sdpa) or an additive float buffer
    window: dict[str, torch.Tensor] = field(default_factory=dict)  # notes window buffers, by field
    runs: dict[int, _Inputs] = field(default_factory=dict)  # `extend`'s inputs, by run length
    graphs: dict[tuple, _Graph] = field(default_factory=dict)
    loaded: SidecarContext | None = None  # the context whose window the buffers hold
    loaded_key: tuple = ()  # the graph key of that context (window shapes, g, switches)
    generation: int = 0  # bumped by every prefill: a superseded state may not step


@dataclass
class GraphDecodeState(DecodeState):
    used: int = 0  # physical slots written so far (the next step writes slot `used`)
    buffers: _Buffers | None = None
    generation: int = 0


class GraphStreamDecoder(StreamDecoder):
    """`StreamDecoder` on static buffers; `graphs=True` (CUDA) captures each step kind once."""

    engine = ENGINE

    def __init__(self, model: PDTModel, graphs: bool | None = None, spans: bool | None = None) -> None:
        """`spans`: step over attention spans (`SPAN`) as the graphs do — by default with graphs
        only; `graphs=False, spans=True` runs the graphs' span logic eagerly (the CPU tests)."""
        super().__init__(model)
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.spans = self.graphs if spans is None else spans
        self.engine = ENGINE if self.graphs else STATIC
        self._buffers: dict[int, _Buffers] = {}
        self.captures = 0  # step graphs captured so far (tests, benchmarks)
        self.round_captures = 0  # round-fold graphs (ROUND_GRAPH)
        self.capture_seconds = 0.0  # their capture time, warm-ups included

    # ------------------------------------------------------------------ prefill

    @torch.no_grad()
    def prefill(self, prompt_ids: list[int], rows: int, steps: int = 0) -> tuple[DecodeState, torch.Tensor]:
        """As `StreamDecoder.prefill`; `steps` is how many decode steps the caller expects (the
        buffers are sized for prompt + steps, rounded up, and grow if the answer needs more)."""
        from transformers import DynamicCache

        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)  # [1, P]
        out = self.model.trunk(
            input_ids=ids,
            use_cache=True,
            output_hidden_states=True,
            **{cache_arg(self.model.trunk): DynamicCache()},
        )
        p, prompt_cache = len(prompt_ids), output_cache(out)
        prompt_kv = [(layer.keys, layer.values) for layer in prompt_cache.layers]  # [1, H, P, dh] each
        buf = self._buffers.get(rows)
        need = p + max(steps, 1)
        if buf is None or buf.capacity < need:
            buf = self._allocate(rows, _round_up(need), prompt_kv, prompt_cache, buf)
        for (k, v), bk, bv in zip(prompt_kv, buf.keys, buf.values, strict=True):
            bk[:, :, :p].copy_(k.expand(rows, -1, -1, -1))
            bv[:, :, :p].copy_(v.expand(rows, -1, -1, -1))
        buf.valid.zero_()
        buf.valid[:, :p] = True
        buf.logical.fill_(-1)
        buf.logical[:, :p] = torch.arange(p, device=self.device)
        buf.loaded = None
        buf.generation += 1
        state = GraphDecodeState(
            cache=buf.cache,
            valid=buf.valid,
            logical=buf.logical,
            lengths=torch.full((rows,), p, dtype=torch.long, device=self.device),
            prompt_len=p,
            tokens=[[] for _ in range(rows)],
            prompt_hidden=out.hidden_states[-1],
            used=p,
            buffers=buf,
            generation=buf.generation,
        )
        return state, out.logits[:, -1].expand(rows, -1)

    def _allocate(
        self, rows: int, capacity: int, prompt_kv: list, template: Any, old: _Buffers | None
    ) -> _Buffers:
        """Buffers for `rows` at `capacity` slots; `old` (smaller) is dropped with its graphs."""
        if old is not None:
            old.graphs.clear()
        keys = [
            torch.zeros(rows, k.shape[1], capacity, k.shape[3], dtype=k.dtype, device=self.device)
            for k, _ in prompt_kv
        ]
        values = [
            torch.zeros(rows, v.shape[1], capacity, v.shape[3], dtype=v.dtype, device=self.device)
            for _, v in prompt_kv
        ]
        slot = torch.zeros(1, dtype=torch.long, device=self.device)
        seen: list = [None]
        writes: list = [slot]
        cache = _slot_cache(template, keys, values, writes, seen)
        valid = torch.zeros(rows, capacity, dtype=torch.bool, device=self.device)
        impl = getattr(self.model.trunk.config, "_attn_implementation", None)
        if impl == "eager":
            dtype = self.model.trunk.get_input_embeddings().weight.dtype
            mask = torch.zeros(rows, 1, 1, capacity, dtype=dtype, device=self.device)
        else:
            mask = valid[:, None, None, :]  # a view: the validity bits ARE the sdpa mask
        buf = _Buffers(
            rows=rows,
            capacity=capacity,
            cache=cache,
            keys=keys,
            values=values,
            valid=valid,
            logical=torch.full((rows, capacity), -1, dtype=torch.long, device=self.device),
            ids=torch.zeros(rows, 1, dtype=torch.long, device=self.device),
            pos=torch.zeros(rows, 1, dtype=torch.long, device=self.device),
            slot=slot,
            writes=writes,
            seen=seen,
            mask=mask,
            generation=old.generation if old is not None else 0,
        )
        self._buffers[rows] = buf
        return buf

    def _grow(self, state: GraphDecodeState) -> None:
        """More slots for a live answer: copy what it has into buffers twice as long (graphs recaptured)."""
        old = state.buffers
        assert old is not None
        used = state.used
        kv = [(k[:1, :, :0], v[:1, :, :0]) for k, v in zip(old.keys, old.values, strict=True)]  # shapes only
        buf = self._allocate(old.rows, _round_up(2 * old.capacity), kv, old.cache, old)
        for src, dst in zip(old.keys + old.values, buf.keys + buf.values, strict=True):
            dst[:, :, :used].copy_(src[:, :, :used])
        buf.valid[:, :used] = old.valid[:, :used]
        buf.logical[:, :used] = old.logical[:, :used]
        buf.generation = state.generation
        state.buffers, state.cache, state.valid, state.logical = buf, buf.cache, buf.valid, buf.logical

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(
        self, state: DecodeState, tokens: torch.Tensor, active: torch.Tensor, context: SidecarContext | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        buf, slot = self._room(state, 1, "step"), state.used
        host_tokens, host_active = tokens.tolist(), active.tolist()  # before the replay: no wait on it
        active = active.to(self.device)
        position = state.lengths  # [R] the logical index of each row's new token
        buf.valid[:, slot] = active
        buf.logical[:, slot] = torch.where(active, position, torch.full_like(position, -1))
        buf.ids.copy_(tokens.to(self.device).view(-1, 1))
        buf.pos.copy_(position.view(-1, 1))
        buf.slot.fill_(slot)
        if buf.mask.dtype != torch.bool:  # eager attention: additive mask
            buf.mask.copy_(torch.where(buf.valid, 0.0, torch.finfo(buf.mask.dtype).min)[:, None, None, :])
        key = self._load(buf, context)
        if self.spans:  # attention over the written slots rounded up to a span: one graph a span
            spans = attention_spans(buf.capacity)
            key = (*key, next(s for s in spans if s > slot))
            if key not in buf.graphs:
                self._capture_spans(buf, context, key[:-1], spans)
            run = buf.graphs[key]
            buf.seen[0] = key[-1]  # what an eager run reads (a graph fixed its span at capture)
        else:  # eager steps: attention over the slots written so far, not the capacity
            buf.seen[0] = slot + 1
            run = buf.graphs.get(key)
            if run is None:
                run = buf.graphs[key] = self._capture(buf, context)
        logits, hidden = _outputs(run)
        state.lengths = state.lengths + active.long()
        state.used += 1
        for r, (token, live) in enumerate(zip(host_tokens, host_active, strict=True)):
            if live:
                state.tokens[r].append(int(token))
        # copies: the graph's output buffers are overwritten by the next replay
        return logits[:, -1].clone(), hidden[:, -1].clone()

    @torch.no_grad()
    def extend(
        self, state: DecodeState, tokens: list[list[int]], context: SidecarContext | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `StreamDecoder.extend`: each row's run of tokens in one forward over L new slots (the
        row's shorter runs padded with placeholders). With graphs, one graph per (rows, L, step kind,
        span), captured at its first use (a prompt's stream prefixes: once per answer shape)."""
        ids, live, position, counts = self._runs(state, tokens)
        length = ids.shape[1]
        buf, start = self._room(state, length, "extend"), state.used
        end = start + length
        buf.valid[:, start:end] = live
        buf.logical[:, start:end] = torch.where(live, position, torch.full_like(position, -1))
        run_of = buf.runs.get(length)
        if run_of is None:
            run_of = buf.runs[length] = self._run_inputs(buf, length)
        run_of.ids.copy_(ids)
        run_of.pos.copy_(position)
        run_of.slots.copy_(torch.arange(start, end, device=self.device))
        # query j of a row reads the row's valid slots up to its own: slot start + j
        upto = (
            torch.arange(buf.capacity, device=self.device)[None, :]
            <= (start + torch.arange(length, device=self.device))[:, None]
        )
        allowed = buf.valid[:, None, :] & upto  # [R, L, capacity]
        if run_of.mask.dtype == torch.bool:
            run_of.mask.copy_(allowed[:, None])
        else:
            run_of.mask.copy_(torch.where(allowed, 0.0, torch.finfo(run_of.mask.dtype).min)[:, None])
        key = (*self._load(buf, context), "extend", length)
        if self.spans:
            span = next(s for s in attention_spans(buf.capacity) if s >= end)
            key = (*key, span)
            buf.seen[0] = span
            if key not in buf.graphs:
                with self._timed_capture():
                    buf.graphs[key] = self._capture(buf, context, run_of)
        else:
            buf.seen[0] = end
            if key not in buf.graphs:
                buf.graphs[key] = self._capture(buf, context, run_of)
        run = buf.graphs[key]
        logits, hidden = _outputs(run)
        last = counts.to(self.device) - 1  # [R] each row's last token
        state.lengths = state.lengths + last + 1
        state.used = end
        for r, row_tokens in enumerate(tokens):
            state.tokens[r].extend(int(t) for t in row_tokens)
        rows = torch.arange(len(tokens), device=self.device)
        return logits[rows, last], hidden[rows, last]  # (gathers: copies of the graph's outputs)

    def _room(self, state: DecodeState, length: int, what: str) -> _Buffers:
        """`state`'s buffers, grown until `length` more slots fit; a state from another engine's
        prefill, or one a later prefill superseded, is refused."""
        if not isinstance(state, GraphDecodeState) or state.buffers is None:
            raise TypeError(f"GraphStreamDecoder.{what} needs a state from its own prefill")
        if state.generation != state.buffers.generation:
            raise RuntimeError("this decode state was superseded by a later prefill with the same rows")
        while state.used + length > state.buffers.capacity:
            self._grow(state)
        return state.buffers

    def _run_inputs(self, buf: _Buffers, length: int) -> _Inputs:
        mask_dtype = buf.mask.dtype
        return _Inputs(
            ids=torch.zeros(buf.rows, length, dtype=torch.long, device=self.device),
            pos=torch.zeros(buf.rows, length, dtype=torch.long, device=self.device),
            slots=torch.zeros(length, dtype=torch.long, device=self.device),
            mask=torch.zeros(buf.rows, 1, length, buf.capacity, dtype=mask_dtype, device=self.device),
        )

    def _load(self, buf: _Buffers, context: SidecarContext | None) -> tuple:
        """Copy a new round's window into the static buffers; the graph key for this context."""
        if context is None:
            return ("plain",)
        if context.positions is not None or context.visible.dim() != 2 or torch.is_tensor(context.g):
            raise ValueError(
                "the graph step takes a decode context: one window [R, N], no positions, a float g"
            )
        fields = {
            "stream_ids": context.stream_ids,
            "notes": context.notes,
            "producer": context.producer,
            "rounds": context.rounds,
            "visible": context.visible,
        }
        if buf.loaded is not context:  # a new round (the orchestrator makes one context per round)
            for name, t in fields.items():
                _hold(buf, name, t)
            self._prepare_round(buf, context)
            instrumentation = self.model.instrumentation
            for run in buf.graphs.values():  # CPU: the adapters' folds of the last round are stale now
                if run.ctx is not None:
                    snc = instrumentation.folded_of(run.ctx)  # the SNC folds live in buffers: kept
                    run.ctx._folded.clear()
                    if snc is not None:
                        run.ctx._folded[id(instrumentation)] = snc
            shapes = tuple((name, tuple(t.shape), t.dtype) for name, t in fields.items())
            buf.loaded, buf.loaded_key = (
                context,
                ("sidecars", float(context.g), context.snc, context.adapters, shapes),
            )
        return buf.loaded_key

    def _prepare_round(self, buf: _Buffers, context: SidecarContext) -> None:
        """What a round's window fixes for all its steps, computed here once rather than in every
        replay: each SNC layer's window folded into its weights (`fold_window`: keys, values, bias),
        into buffers the step reads — a token's SNC layer is then `snc_folded`'s two launches.
        With graphs and ROUND_GRAPH, the fold itself is captured once per (buffers, g) and a round
        replays it: one launch instead of ~90 host-paced ops (the graph reads the window buffers
        `_hold` fills and writes the folded buffers the step graphs read, all at fixed addresses; a
        new window shape drops it with the step graphs)."""
        if not context.snc or float(context.g) == 0.0:
            return  # no SNC in this forward (independent: g = 0)
        g = float(context.g)
        fold = buf.graphs.get(("fold", g))
        if fold is not None:
            fold.graph.replay()
            return
        self._fold(buf, g)  # eagerly: allocates the folded buffers on a round's first shape
        if self.graphs and ROUND_GRAPH:
            try:  # same shapes now: the captured fold writes in place
                with self._timed_capture():
                    graph, _ = capture_graph(lambda: self._fold(buf, g))
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - as the step's capture (`_capture`)
                raise GraphCaptureError(f"the round's window fold could not be captured: {exc}") from exc
            buf.graphs[("fold", g)] = _Graph(graph=graph, run=None)
            self.round_captures += 1

    def _fold(self, buf: _Buffers, g: float) -> None:
        layers = list(self.model.snc)
        w = buf.window
        kv = project_notes_all(layers, w["notes"], w["producer"], w["rounds"])
        w_out = gated_out_weights(layers, g, layers[0].w_q.weight.dtype)
        for i, (m, pair, o) in enumerate(zip(layers, kv, w_out, strict=True)):
            folded = m.fold_window(pair, w["visible"], o)
            _hold(buf, f"fk{i}", folded.keys)
            _hold(buf, f"fv{i}", folded.values)
            _hold(buf, f"fb{i}", folded.bias)

    def _capture_spans(
        self, buf: _Buffers, context: SidecarContext | None, key: tuple, spans: list[int]
    ) -> None:
        """One graph per attention span for this step kind, all now. Each capture's warm-up writes
        this step's K/V at `slot` (from attention over that span: wrong for a shorter one), and the
        replay that follows, of this step's span, writes them again from the right attention."""
        with self._timed_capture():
            for span in spans:
                buf.seen[0] = span
                buf.graphs[(*key, span)] = self._capture(buf, context)

    @contextlib.contextmanager
    def _timed_capture(self) -> Iterator[None]:
        """Adds the block's time, its queued GPU work done, to `capture_seconds` (graphs only)."""
        if not self.graphs:
            yield
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            torch.cuda.synchronize(self.device)
            self.capture_seconds += time.perf_counter() - t0

    def _capture(
        self, buf: _Buffers, context: SidecarContext | None, run_of: _Inputs | None = None
    ) -> _Graph:
        """The forward on `buf` (a step; `run_of`: an `extend`'s run), captured with graphs."""
        ctx = None
        if context is not None:
            w = buf.window
            ctx = SidecarContext(
                stream_ids=w["stream_ids"],
                notes=w["notes"],
                producer=w["producer"],
                rounds=w["rounds"],
                visible=w["visible"],
                g=float(context.g),
                snc=context.snc,
                adapters=context.adapters,
            )
            if "fk0" in w:  # the round's folded windows: buffers `_prepare_round` fills
                ctx.kv_cache = {}  # a decode round (no per-forward projection happens: folds below)
                folded = [
                    FoldedWindow(keys=w[f"fk{i}"], values=w[f"fv{i}"], bias=w[f"fb{i}"])
                    for i in range(len(self.model.snc))
                ]
                self.model.instrumentation.use_folded(ctx, folded)
        trunk, instrumentation = self.model.trunk, self.model.instrumentation
        inputs = run_of or _Inputs(ids=buf.ids, pos=buf.pos, slots=buf.slot, mask=buf.mask)
        kwargs = dict(
            input_ids=inputs.ids,
            **{cache_arg(trunk): buf.cache},
            attention_mask=inputs.mask,
            position_ids=inputs.pos,
            use_cache=True,
            output_hidden_states=True,
        )

        rows = inputs.ids.shape[0] * inputs.ids.shape[1]

        def run() -> tuple[torch.Tensor, torch.Tensor]:
            if buf.seen[0] is not None:  # the slots written so far, or a graph's span (`step`)
                kwargs["attention_mask"] = inputs.mask[..., : buf.seen[0]]
            buf.writes[0] = inputs.slots
            try:
                with decode_attention(), lm_head_kernel(trunk, rows):
                    if ctx is None:
                        out = trunk(**kwargs)
                    else:
                        with instrumentation.active(ctx):
                            out = trunk(**kwargs)
            finally:
                buf.writes[0] = buf.slot
            return out.logits, out.hidden_states[-1]

        if not self.graphs:
            return _Graph(graph=None, run=run, ctx=ctx)
        # Both the warm-up and the capture write this step's K/V at `slot` with this step's inputs:
        # the replay right after writes the same.
        try:
            graph, (logits, hidden) = capture_graph(run)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the trunk does that a capture cannot hold
            raise GraphCaptureError(f"the decode step could not be captured as a CUDA graph: {exc}") from exc
        self.captures += 1
        return _Graph(graph=graph, run=run, logits=logits, hidden=hidden, ctx=ctx)


@contextlib.contextmanager
def lm_head_kernel(trunk: torch.nn.Module, rows: int) -> Iterator[None]:
    """While active, the trunk's LM head (an `nn.Linear`) computes a step of `rows` tokens with
    `pdt.kernels.skinny_linear` — the same product, bias and dtype as `F.linear` — when the head is
    on CUDA (or `PDT_KERNELS=triton` forces the kernel: the interpreter tests) and `rows` is in
    LM_HEAD_KERNEL_ROWS; and so do the decoder blocks' own `nn.Linear` layers when `rows` is in
    TRUNK_KERNEL_ROWS. Otherwise nothing changes. Only the linear maps are replaced: what the model
    does around them (soft-capping, scaling) stays the model's own."""
    head = trunk.get_output_embeddings()
    layers: list[torch.nn.Linear] = []
    if type(head) is torch.nn.Linear and rows in LM_HEAD_KERNEL_ROWS:
        layers.append(head)
    if rows in TRUNK_KERNEL_ROWS:
        layers += [m for m in trunk.modules() if type(m) is torch.nn.Linear and m is not head]
    wanted = [m for m in layers if m.weight.is_cuda or kernels.kernel_mode() == "triton"]
    previous = [vars(m).get("forward") for m in wanted]  # instance forwards already there (cpu_linear)
    for m in wanted:
        m.forward = types.MethodType(_skinny_forward, m)  # shadows nn.Linear.forward until restored
    try:
        yield
    finally:
        for m, old in zip(wanted, previous, strict=True):
            if old is None:
                del m.forward
            else:
                m.forward = old


def _skinny_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    flat = kernels.skinny_linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
    return flat.view(*x.shape[:-1], flat.shape[-1])


def _outputs(run: _Graph) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, hidden) of one forward: the graph replayed into its output buffers, or run eagerly."""
    if run.graph is None:
        return run.run()
    run.graph.replay()
    assert run.logits is not None and run.hidden is not None
    return run.logits, run.hidden


def capture_graph(fn: Callable[[], Any], warmup: int = 2) -> tuple[Any, Any]:
    """(a CUDA graph of `fn`, the outputs of the captured call). `fn` runs `warmup` times on a side
    stream first (allocator, Triton autotune and JIT), as capture requires; the graph has a private
    memory pool, so graphs replay in any order."""
    side = _warmup_stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


def _warmup_stream() -> Any:
    """The side stream a capture's warm-up runs on (`SHARED_WARMUP_STREAM`)."""
    if not SHARED_WARMUP_STREAM:
        return torch.cuda.Stream()
    index = torch.cuda.current_device()
    if index not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[index] = torch.cuda.Stream()
    return _WARMUP_STREAMS[index]


def _hold(buf: _Buffers, name: str, value: torch.Tensor) -> None:
    """Copy `value` into the window buffer `name`; a new shape or dtype gets a new buffer, and the
    sidecar graphs that read the old one go (the plain graphs read no window)."""
    held = buf.window.get(name)
    if held is None or held.shape != value.shape or held.dtype != value.dtype:
        buf.graphs = {k: g for k, g in buf.graphs.items() if k[0] == "plain"}
        held = buf.window[name] = torch.empty_like(value)
    held.copy_(value)


def attention_spans(capacity: int) -> list[int]:
    """The key counts the graphs of a buffer of `capacity` slots attend over, ascending; the last is
    the capacity. SPAN-slot steps, longer (a multiple of SPAN) where MAX_SPANS would not cover it."""
    if SPAN <= 0:
        return [capacity]
    step = -(-max(SPAN, -(-capacity // MAX_SPANS)) // SPAN) * SPAN
    return [min(end, capacity) for end in range(step, capacity + step, step)]


def _round_up(n: int) -> int:
    return -(-n // _ROUND) * _ROUND


def _slot_cache(
    template: Any, keys: list[torch.Tensor], values: list[torch.Tensor], writes: list, seen: list
) -> Any:
    """A transformers DynamicCache (the class the trunk already decodes with) whose layers hold the
    static buffers and write each forward's K/V at the physical slots `writes[0]` (a device tensor,
    so the write is part of the graph: one slot a step, L for `extend`) — returning the whole
    buffer, or with `seen[0]` = n its first n slots (eager steps: those written; a graph: its span,
    fixed at capture): attention then costs what
    the answer has written, not the capacity (CPU, tiny pipeline, 10 K = 3 answers under cProfile:
    attention 0.63 → 0.37 s, the steps 5.53 → 5.26 s). The mask hides the slots a row does not own."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer_idx in range(len(keys)):
        layer = type(template.layers[layer_idx])()
        layer.keys, layer.values = keys[layer_idx], values[layer_idx]
        if hasattr(layer, "is_initialized"):
            layer.is_initialized = True
        if hasattr(layer, "dtype"):
            layer.dtype, layer.device = keys[layer_idx].dtype, keys[layer_idx].device

        def update(
            self: Any, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> Any:
            self.keys.index_copy_(2, writes[0], key_states)
            self.values.index_copy_(2, writes[0], value_states)
            n = seen[0]
            if n is None:
                return self.keys, self.values
            return self.keys[:, :, :n], self.values[:, :, :n]

        layer.update = types.MethodType(update, layer)
        cache.layers.append(layer)
    return cache
