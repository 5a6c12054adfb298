"""The K-stream decoder: rounds of τ tokens, notes at block ends, commit or roll back, and baselines.

What it is: the decode protocol of SPEC §2 on top of `pdt.model.decode.StreamDecoder`:
1. the prompt is encoded once by the plain trunk and shared by every stream's cache; the planner
   (or the given plan items) and any seed texts give snapshot 0;
2. each stream reads its prefix ("Part n of K:", as in training), then rounds: every active stream
   decodes τ tokens, all streams in ONE batched forward per token, each row with its own cache
   length, reading its notes window (fixed for the round slot) at every token;
3. at a block end each stream's speculation head gives its note, the coverage head scores its
   plan items and the agreement head its readiness; readiness ≥ γ commits the block and its note
   (visible to the others after Δ rounds), otherwise the block is rolled back — its tokens leave the
   text AND the row's cache (`StreamDecoder.rollback`: the cache is truncated to the block start,
   never copied or re-prefilled) — and regenerated with the window of the next round slot, at most
   `max_retries` times, then committed anyway and recorded as forced;
4. a stream stops at EOS or its token budget; the answer is the committed sections in order.
Baselines in the same runtime, with the same sampler: `sequential` (the plain trunk writes the
whole answer alone: one row, K × the per-stream budget) and `independent` (K streams, sidecars
on but the bus off: g = 0, no notes, every block committed).

Timing of a round slot (global time T, 0-based): every stream reads the window of reader round T
— so a stream retrying block b at slot T > b sees the notes its siblings committed since — and
commits its block-b note tagged round b. Without rollbacks T equals the block index, exactly the
teacher-forced rule of training (SPEC §2b.7). The first token of block b is predicted at the last
position of block b − 1 (with that round's window), as in training, so a retry starts from the
logits saved at the commit point.

What it is not: the job (events to files, manifests, the ask-again loop: `pdt.infer.job`) or the
bus rule (`pdt.bus`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from pdt.bus import Counterfactual, NotesBus, WindowBatch
from pdt.data.plan_ids import plan_item_id
from pdt.infer.quality import headed_section_nlls, merged_answer_ids
from pdt.infer.sampling import sample_rows
from pdt.model.attention import decode_attention
from pdt.model.decode import DecodeState, StreamDecoder
from pdt.model.graph_decode import GraphCaptureError, GraphStreamDecoder
from pdt.model.graph_decode import unsupported as graph_unsupported
from pdt.model.instrument import SidecarContext
from pdt.model.pdt_model import PDTModel
from pdt.model.sidecars.blend import blend_logits
from pdt.model.sidecars.heads import coverage_summary
from pdt.model.sidecars.seed_text import masked_mean_pool
from pdt.presets.curriculum import CurriculumTrain
from pdt.presets.schema import BusConfig
from pdt.telemetry.events import (
    Coverage,
    Event,
    GateTrace,
    NoteSnapshot,
    Readiness,
    StreamDone,
    StreamRollback,
    StreamToken,
)

#: Plan-item texts are embedded from at most this many tokens, as the curriculum's `note_tokens`
#: default embeds them (items are a few tokens: the cap never cuts one in practice).
NOTE_TOKENS: int = CurriculumTrain.model_fields["note_tokens"].default

MODES = ("pdt", "sequential", "independent")
FAST_PATHS = ("auto", "eager", "static", "cuda_graph")
SECTION_SEPARATOR = "\n\n"  # between the sections of a merged answer
#: The stream prefixes ("Part n of K:") are fed in ONE batched forward (`StreamDecoder.extend`: each
#: row its own run, the same cache and logits as a token a step) rather than one step a token: ~7
#: forwards an answer that only PDT and `independent` pay (`sequential` has no prefix). CPU, tiny
#: pipeline, K = 3, 6 validation prompts, alternated 3 times in one run (2026-12-07,
#: PDT_BENCH_PREFIX_FORWARD; the same tokens both ways): PDT steps 200 / 207 / 205 → 189 / 189 / 194
#: ms an answer, e2e 1.72 / 1.75 / 1.68× → 1.82 / 1.90 / 1.81×. H100, random-weight 124M, K = 3,
#: alternated twice in one session: PDT steps 222 / 223 → 212 / 214 ms an answer, e2e 2.49 / 2.37×
#: → 2.57 / 2.47× (bench/results/decode_prefix_forward_ab.json).
PREFIX_ONE_FORWARD = True


def make_decoder(model: PDTModel, settings: DecodeSettings) -> tuple[StreamDecoder, str]:
    """The step engine `settings.fast_path` asks for, and a line saying why when "auto" fell back to
    eager. "auto": `cuda_graph` on CUDA, `static` (the same static buffers, no graph) elsewhere,
    each where it can run. An explicit engine that cannot run is an error naming the reason."""
    if settings.fast_path not in FAST_PATHS:
        raise ValueError(f"decode.fast_path {settings.fast_path!r}: one of {', '.join(FAST_PATHS)}")
    if settings.fast_path == "eager":
        return StreamDecoder(model), "eager (asked for)"
    on_cuda = next(model.trunk.parameters()).device.type == "cuda"
    graphs = settings.fast_path == "cuda_graph" or (settings.fast_path == "auto" and on_cuda)
    reason = graph_unsupported(model, graphs=graphs)
    if reason is None and settings.alpha < 1.0:
        reason = "alpha < 1 decodes a second, plain state beside each answer"
    if reason is None:
        decoder = GraphStreamDecoder(model, graphs=graphs)
        return decoder, decoder.engine
    if settings.fast_path != "auto":
        raise ValueError(
            f"decode.fast_path {settings.fast_path!r} cannot run here: {reason}; use 'auto' or 'eager'"
        )
    return StreamDecoder(model), f"eager ({reason})"


def plain_trunk(trunk: torch.nn.Module) -> contextlib.AbstractContextManager:
    """The trunk as pretrained: a stage-4 LoRA switched off (no-op without one)."""
    if not any("lora_" in name for name, _ in trunk.named_parameters()):
        return contextlib.nullcontext()
    from pdt.train.lora import lora_disabled

    return lora_disabled(trunk)


@dataclass(frozen=True)
class DecodeSettings:
    """Every knob of one answer, resolved (no None left)."""

    num_streams: int
    tau: int
    bus: BusConfig
    gamma: float = 0.5
    coverage_threshold: float = 0.5
    max_retries: int = 2
    g: float = 1.0
    alpha: float = 1.0
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    no_repeat_ngram: int = 3
    seed: int = 0
    max_new_tokens: int = 96
    prefixes: tuple[str, ...] = ()
    counterfactual: Counterfactual = field(default_factory=Counterfactual)
    ignore_eos: bool = False
    """Streams write exactly their budget (benchmarks: the same token count in every mode)."""
    fast_path: str = "auto"
    """The decode-step engine: "eager" (`StreamDecoder`), "static" (`GraphStreamDecoder` without
    graphs: static buffers, eager steps), "cuda_graph" (`GraphStreamDecoder`: one captured graph per
    step kind, replayed), or "auto" (cuda_graph on CUDA, static elsewhere, where it can run; else
    eager)."""
    own_snapshot0: bool = False
    """Stream k reads a snapshot 0 of its own plan (its plan items, or the planner's slots j with
    j mod K = k) instead of the whole plan's (`DecodeConfig.own_snapshot0`)."""

    def prefix(self, stream: int) -> str:
        if self.prefixes:
            return self.prefixes[stream]
        return f" Part {stream + 1} of {self.num_streams}:"

    def as_dict(self) -> dict[str, Any]:
        cf = self.counterfactual
        return {
            "num_streams": self.num_streams,
            "tau": self.tau,
            "lag": self.bus.lag,
            "window": self.bus.window,
            "topology": self.bus.topology,
            "gamma": self.gamma,
            "coverage_threshold": self.coverage_threshold,
            "max_retries": self.max_retries,
            "g": self.g,
            "alpha": self.alpha,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "no_repeat_ngram": self.no_repeat_ngram,
            "seed": self.seed,
            "max_new_tokens": self.max_new_tokens,
            "ignore_eos": self.ignore_eos,
            "fast_path": self.fast_path,
            "own_snapshot0": self.own_snapshot0,
            "prefixes": [self.prefix(k) for k in range(self.num_streams)],
            "counterfactual": {
                "ablate": sorted(cf.ablate),
                "freeze": sorted(cf.freeze),
                "freeze_round": cf.freeze_round,
                "swap": list(cf.swap) if cf.swap else None,
                "stale": {str(k): v for k, v in cf.stale.items()},
                "shuffle": cf.shuffle,
            },
        }


@dataclass
class PlanInfo:
    """Snapshot 0 and the coverage items of each stream."""

    source: str  # "plan_items" | "planner"
    slot_ids: list[int]
    items: list[list[str]]  # labels per stream
    item_ids: list[list[int]]  # plan ids per stream
    snapshot0: torch.Tensor  # [d_n], or [K, d_n]: each stream's own (`own_snapshot0`)
    seed_texts: list[str] = field(default_factory=list)


@dataclass
class Attempt:
    """One try at one block of one stream."""

    attempt: int
    slot: int  # the round slot (global time) it was decoded in
    tokens: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # when each was sampled, since the answer began
    text: str = ""
    readiness: float | None = None
    decision: str = ""  # commit | rollback | forced | "" (no bus: committed without a score)
    coverage: list[float] = field(default_factory=list)
    note_version: int | None = None


@dataclass
class StreamRecord:
    stream: int
    prefix: str
    prefix_ids: list[int]
    blocks: list[list[Attempt]] = field(default_factory=list)  # per round: its attempts
    token_ids: list[int] = field(default_factory=list)  # committed section tokens
    text: str = ""
    done_reason: str = ""

    @property
    def generated(self) -> int:
        """Every sampled token, rolled back ones included."""
        return sum(len(a.tokens) for block in self.blocks for a in block)


@dataclass
class DecodeResult:
    mode: str
    prompt: str
    prompt_ids: list[int]
    streams: list[StreamRecord]
    seconds: float
    steps: int  # batched trunk forwards after the prefill
    step_seconds: list[float]
    kv_cache_bytes: int
    plan: PlanInfo | None = None
    timeline: list[dict[str, Any]] = field(default_factory=list)
    windows: dict[int, dict[int, list[tuple[int, int]]]] = field(
        default_factory=dict
    )  # slot → stream → pairs
    recorded: dict[int, WindowBatch] = field(default_factory=dict)  # slot → the windows read
    gates: list[float] = field(default_factory=list)
    state: DecodeState | None = None
    prefix_steps: int = 0  # the first `prefix_steps` forwards fed the stream prefixes (no sampling)
    engine: str = "eager"  # the decode-step engine that ran it: eager | cuda_graph
    # where the wall-clock `seconds` went: prefill, plan, steps (the batched trunk forwards, prefixes
    # included), block_ends (notes, coverage, readiness, commit / rollback), capture (CUDA graphs
    # captured by this answer's steps: a step kind's first answer only); `other` is the rest —
    # sampling and the host's per-token work (detokenising, events)
    phase_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def sections(self) -> list[str]:
        return [s.text for s in self.streams]

    @property
    def merged(self) -> str:
        """The answer to show: the sections' texts, stripped, SECTION_SEPARATOR between them."""
        return SECTION_SEPARATOR.join(s.text.strip() for s in self.streams if s.text.strip())

    def merged_ids(self, tokenizer: Any) -> list[int]:
        """The merged answer as the token ids generated (what its NLL scores), SECTION_SEPARATOR's
        ids between the sections: `pdt.infer.quality.merged_answer_ids`."""
        return merged_answer_ids([s.token_ids for s in self.streams], tokenizer.encode(SECTION_SEPARATOR))

    def headed_nlls(self, trunk: torch.nn.Module, tokenizer: Any) -> torch.Tensor:
        """Per-token NLL under `trunk` alone of the sections' tokens, each section after its stream
        prefix (header) and SECTION_SEPARATOR between them: `pdt.infer.quality.headed_section_nlls`."""
        sections = [(s.prefix_ids, s.token_ids) for s in self.streams]
        return headed_section_nlls(trunk, self.prompt_ids, sections, tokenizer.encode(SECTION_SEPARATOR))

    @property
    def new_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.streams)

    @property
    def rollbacks(self) -> int:
        return sum(1 for s in self.streams for b in s.blocks for a in b if a.decision == "rollback")


class _ContentSums:
    """The readiness head's content input at decode, as `heads.content_means` computes it in
    training: sums of each row's hidden states (the step that feeds a token gives its position's
    state) over the block being written and over the row's committed blocks. A rolled-back block's
    sums are dropped with it. A step only keeps a reference to its hidden states (the step's own
    copy); the block's are summed once, when they are read: a device op a step costs a launch on
    the step's clock, PDT's alone (a 124M step is ~2 ms on the H100, ~2 µs a kernel). The counts
    are host integers."""

    def __init__(self, rows: int, d_model: int, device: torch.device) -> None:
        self.sums = torch.zeros(rows, 2, d_model, device=device)  # [R, 2, D]: this block, committed
        self.counts = [[0, 0] for _ in range(rows)]  # per row: this block, committed
        self._steps: list[torch.Tensor] = []  # this block's steps not yet summed: [R, D] each
        self._live: list[list[bool]] = []  # their fed rows

    def add(self, hidden: torch.Tensor, live: list[bool]) -> None:
        """hidden [R, D] of one step (kept, not copied: the caller never writes it); `live` [R]: the
        rows it fed."""
        self._steps.append(hidden)
        self._live.append(list(live))
        for r, a in enumerate(live):
            self.counts[r][0] += int(a)

    def _sum_steps(self) -> None:
        if not self._steps:
            return
        steps = torch.stack(self._steps)  # [S, R, D]
        if not all(all(live) for live in self._live):
            fed = torch.tensor(self._live, device=steps.device)[..., None]  # [S, R, 1]
            steps = torch.where(fed, steps, torch.zeros((), dtype=steps.dtype, device=steps.device))
        self.sums[:, 0] += steps.sum(dim=0, dtype=torch.float32)
        self._steps, self._live = [], []

    def means(self) -> torch.Tensor:
        """[R, 2, D]: the mean over the block, and over the committed blocks and this one."""
        self._sum_steps()
        n = torch.tensor([[b, b + c] for b, c in self.counts], dtype=torch.float32).clamp_min(1)  # [R, 2]
        n = n.to(self.sums.device)
        block = self.sums[:, 0] / n[:, :1]
        section = self.sums.sum(dim=1) / n[:, 1:]
        return torch.stack([block, section], dim=1)

    def end_block(self, committed: list[int]) -> None:
        """Every row's block ended: the committed rows add it to their section; all start afresh."""
        self._sum_steps()
        if committed:
            idx = torch.tensor(committed, device=self.sums.device)
            self.sums[idx, 1] += self.sums[idx, 0]
        for r in committed:
            self.counts[r][1] += self.counts[r][0]
        for c in self.counts:
            c[0] = 0
        self.sums[:, 0] = 0.0


@dataclass
class _Launched:
    """A decode step queued by the orchestrator: when it started, the decoder's capture seconds
    then, and when the launch returned (on the CPU, when the step was done)."""

    start: float
    captured: float
    queued: float


class _Detok:
    """Live text of one stream, one piece per token: a piece never splits a character (a token that
    ends mid-character waits for the next) and is decoded after a few previous tokens, so
    tokenizers that drop a leading space on a lone token (sentencepiece) still space words right.
    The record's text is always `decode(tokens)`; these pieces are for the live view."""

    CONTEXT = 4

    def __init__(self, tokenizer: Any, context: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.context = list(context or [])[-self.CONTEXT :]
        self.pending: list[int] = []

    def push(self, token: int) -> str:
        pending = [*self.pending, token]
        piece = self._piece(pending)
        if piece.endswith("\ufffd"):  # an incomplete character: wait for the next token
            self.pending = pending
            return ""
        self.context = (self.context + pending)[-self.CONTEXT :]
        self.pending = []
        return piece

    def flush(self) -> str:
        """The text held back at the end of a stream (tokens that ended mid-character, which no
        later token will complete): decoded as they are, so the pieces add up to the record's text."""
        if not self.pending:
            return ""
        piece = self._piece(self.pending)
        self.context, self.pending = (self.context + self.pending)[-self.CONTEXT :], []
        return piece

    def _piece(self, pending: list[int]) -> str:
        """The text `pending` adds after the context."""
        head = self.tokenizer.decode(self.context) if self.context else ""
        full = self.tokenizer.decode(self.context + pending)
        return full[len(head) :] if full.startswith(head) else self.tokenizer.decode(pending)

    def copy(self) -> _Detok:
        out = _Detok(self.tokenizer, self.context)
        out.pending = list(self.pending)
        return out


class ParallelDecoder:
    """Decodes prompts with one model; `decode(prompt, mode)` returns a `DecodeResult`."""

    def __init__(
        self,
        model: PDTModel,
        tokenizer: Any,
        settings: DecodeSettings,
        emit: Callable[[Event], None] | None = None,
        plan_names: dict[int, str] | None = None,
        coverage_text: bool = True,
        item_vectors: tuple[list[str], torch.Tensor] | None = None,
    ) -> None:
        """`plan_names`: plan id → the item text it stands for (the training set's, exported with
        the sidecars), so the planner's plan reads as words; ids without one show as "plan id N".
        `coverage_text`: the coverage head reads each item's text embedding (`coverage_keys`, how
        the curriculum trains it); False for sidecars trained on the plan-id embeddings alone.
        `item_vectors`: (texts, [n, d_n]) those embeddings already made (the export's
        `plan_item_vectors.safetensors`); other texts are embedded when a plan first names them."""
        if settings.num_streams != model.cfg.num_streams:
            raise ValueError(
                f"the sidecars were trained for K = {model.cfg.num_streams} streams, "
                f"not {settings.num_streams}"
            )
        if settings.prefixes and len(settings.prefixes) != settings.num_streams:
            raise ValueError(
                f"decode.stream_prefixes has {len(settings.prefixes)} entries "
                f"for {settings.num_streams} streams"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.s = settings
        self.emit = emit or (lambda _e: None)
        self.plan_names = dict(plan_names or {})
        self.coverage_text = coverage_text
        self.decoder, self.engine_note = make_decoder(model, settings)
        self.engine = self.decoder.engine
        self.device = self.decoder.device
        # plan-item text → its row of `_item_table` [n + 1, d_n] (the last row: zeros, for no text)
        self._item_rows: dict[str, int] = {}
        self._item_table = torch.zeros(1, model.cfg.d_notes, device=self.device)
        if item_vectors is not None:
            self._add_item_vectors(*item_vectors)
        self.eos = getattr(tokenizer, "eot_id", None)

    # ------------------------------------------------------------------ public

    @torch.no_grad()
    def decode(
        self,
        prompt: str,
        mode: str = "pdt",
        plan_items: list[list[str]] | None = None,
        seed_texts: list[str] | None = None,
        streams: list[int] | None = None,
        recorded: dict[int, WindowBatch] | None = None,
        emit_tokens: bool = True,
        total_tokens: int | None = None,
    ) -> DecodeResult:
        """One answer. `streams` (pdt/independent): decode only these streams (tests: a stream alone);
        `recorded`: read these windows (slot → a WindowBatch over all K streams) instead of the bus;
        `total_tokens` (sequential): write exactly this many tokens (EOS banned) — the same total as
        the PDT answer it is compared with; None: K × max_new_tokens, stopping at EOS."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
        prompt_ids = self.tokenizer.encode(prompt)
        if not prompt_ids:
            raise ValueError("the prompt encodes to no tokens")

        def run() -> DecodeResult:
            # every trunk pass of an answer, not only its steps: the prompt's prefill and the plan
            # items' embeddings have a new shape with each prompt, and cuDNN attention builds a plan
            # for each new shape (H100, 124M: 30–220 ms an answer in prefill and plan, e2e 1.62× →
            # 2.09× without it; `pdt.model.attention`)
            with decode_attention():
                if mode == "sequential":
                    with plain_trunk(self.model.trunk):
                        return self._sequential(prompt, prompt_ids, total_tokens)
                return self._parallel(
                    prompt, prompt_ids, mode, plan_items, seed_texts, streams, recorded, emit_tokens
                )

        try:
            return run()
        except GraphCaptureError as exc:
            if self.s.fast_path != "auto":
                raise ValueError(f"decode.fast_path 'cuda_graph': {exc}; use 'auto' or 'eager'") from exc
            # auto: this trunk cannot be captured here; decode eagerly from now on (the answer restarts:
            # a capture fails at the first step, before any token)
            self.decoder, self.engine = StreamDecoder(self.model), "eager"
            self.engine_note = f"eager ({exc})"
            return run()

    # ------------------------------------------------------------------ snapshot 0

    def plan(
        self, state: DecodeState, plan_items: list[list[str]] | None, seed_texts: list[str] | None
    ) -> PlanInfo:
        """Snapshot 0 from the given plan items (hashed like the dataset's) or the planner's argmax,
        mixed with the seed texts' embeddings when given (normalised mean). `own_snapshot0`: one per
        stream [K, d_n], from the stream's own items (the planner's slots j with j mod K = k, the
        order its targets are trained in); a stream that owns none reads the whole plan's."""
        cfg, k = self.model.cfg, self.s.num_streams
        planner = self.model.planner
        if plan_items is not None:
            if len(plan_items) != k:
                raise ValueError(f"plan_items has {len(plan_items)} lists for {k} streams")
            ids = [[plan_item_id(t, cfg.plan_salt, cfg.plan_vocab) for t in items] for items in plan_items]
            slots: list[int] = []
            for i in range(max((len(x) for x in ids), default=0)):  # round-robin, unique, ≤ S (as trained)
                for row in ids:
                    if i < len(row) and row[i] not in slots and len(slots) < cfg.plan_slots:
                        slots.append(row[i])
            owned = [list(dict.fromkeys(row))[: cfg.plan_slots] for row in ids]
            labels, source = [list(x) for x in plan_items], "plan_items"
        else:
            hidden = state.prompt_hidden  # [1, P, D]
            pooled = masked_mean_pool(hidden, None)  # [1, D]
            chosen, active = planner.own_plan(planner.logits_pooled(pooled))  # [1, S] each
            slots = chosen[0][active[0]].tolist()  # unique, in slot order
            picks = [(j, int(i)) for j, (i, a) in enumerate(zip(chosen[0], active[0], strict=True)) if a]
            owned = [[i for j, i in picks if j % k == stream] for stream in range(k)]
            ids = [list(slots) for _ in range(k)]
            names = [self.plan_names.get(i, f"plan id {i}") for i in slots]
            labels, source = [list(names) for _ in range(k)], "planner"

        def snapshot(plan_ids: list[int]) -> torch.Tensor:  # [d_n]
            if not plan_ids:
                return torch.zeros(cfg.d_notes, device=self.device)
            return planner.snapshot0(torch.tensor([plan_ids], device=self.device))[0]

        snap = snapshot(slots)  # [d_n]
        if self.s.own_snapshot0:
            snap = torch.stack([snapshot(x) if x else snap for x in owned])  # [K, d_n]
        seeds = [t for t in (seed_texts or []) if t.strip()]
        if seeds:
            vectors = []
            for text in seeds:
                tok = self.tokenizer.encode(text)
                ids_t = torch.tensor([tok], device=self.device)
                vectors.append(self.model.embed_texts(ids_t, torch.ones_like(ids_t))[0].to(snap.dtype))
            seeded = torch.stack(vectors).sum(dim=0)  # [d_n]
            n = len(vectors) + (1 if slots else 0)
            mixed = ((snap if slots else 0.0) + seeded) / n  # the mean: [d_n] or [K, d_n]
            snap = F.normalize(mixed, dim=-1, eps=1e-12)
        return PlanInfo(source, slots, labels, ids, snap.float(), seeds)

    # ------------------------------------------------------------------ the K-stream loop

    def _parallel(
        self,
        prompt: str,
        prompt_ids: list[int],
        mode: str,
        plan_items: list[list[str]] | None,
        seed_texts: list[str] | None,
        streams: list[int] | None,
        recorded: dict[int, WindowBatch] | None,
        emit_tokens: bool,
    ) -> DecodeResult:
        s, model = self.s, self.model
        use_bus = mode == "pdt"
        ids = list(range(s.num_streams)) if streams is None else list(streams)
        rows = len(ids)
        t0 = time.perf_counter()
        records = [StreamRecord(k, s.prefix(k), self.tokenizer.encode(s.prefix(k) + "\n")) for k in ids]
        # steps at most: the prefixes, then per block τ tokens for each try (a retry takes a new slot)
        blocks = -(-s.max_new_tokens // s.tau)
        steps = max(len(r.prefix_ids) for r in records) + blocks * s.tau * (s.max_retries + 1)
        state, last_logits = self.decoder.prefill(prompt_ids, rows, steps)
        base = self.decoder.prefill(prompt_ids, rows, steps) if s.alpha < 1.0 else None
        t_plan = self._sync_time()
        plan = self.plan(state, plan_items, seed_texts)
        bus = NotesBus(s.num_streams, model.cfg.d_notes, s.bus, model.cfg.max_rounds, s.counterfactual)
        bus.set_snapshot0(plan.snapshot0.to(self.device))
        if use_bus:
            self.emit(NoteSnapshot(stream=-1, round=0, version=bus.snapshot0_version, visible_from_round=0))
        stream_ids = torch.tensor(ids, device=self.device)
        self._gens = [torch.Generator().manual_seed(s.seed * 1009 + k) for k in ids]
        self._plan_labels = plan.items
        items, item_mask = self._items(plan, ids)
        result = DecodeResult(mode, prompt, prompt_ids, records, 0.0, 0, [], 0, plan, engine=self.engine)
        phases = result.phase_seconds
        phases["prefill"], phases["plan"] = t_plan - t0, self._sync_time() - t_plan
        phases["block_ends"] = phases["capture"] = 0.0
        next_logits = last_logits.clone()  # [R, V] the logits each row samples its next token from
        last_hidden = torch.zeros(rows, model.d_model, device=self.device)  # rebound by each step
        content: _ContentSums | None = None  # from the first sampled token on, with the bus

        def launch(tokens: list[int], active: list[bool], ctx: SidecarContext) -> _Launched:
            """Queue one step (CUDA: returns before the GPU has run it; CPU: runs it). `land` waits."""
            nonlocal next_logits, last_hidden
            t, captured = time.perf_counter(), self.decoder.capture_seconds
            # host tensors: the decoders read the token ids on the host without waiting for the GPU
            tok, live = torch.tensor(tokens), torch.tensor(active)
            logits, hidden = self.decoder.step(state, tok, live, ctx)
            if base is not None:
                base_logits, _ = self.decoder.step(base[0], tok, live, None)
                logits = blend_logits(logits, base_logits, s.alpha)
            if all(active):  # the step's outputs are its own copies: kept, not copied again
                next_logits, last_hidden = logits, hidden
            else:
                keep = live.to(self.device)[:, None]
                next_logits = torch.where(keep, logits, next_logits)
                last_hidden = torch.where(keep, hidden, last_hidden.to(hidden.dtype))
            if content is not None:
                content.add(hidden, active)
            return _Launched(t, captured, time.perf_counter())

        def land(step: _Launched) -> None:
            result.steps += 1
            result.step_seconds.append(self._step_done(step, phases))

        def prefixes(ctx: SidecarContext) -> None:
            """Every row's prefix in one forward (the rows' next logits: at their last prefix token)."""
            nonlocal next_logits, last_hidden
            t, captured = time.perf_counter(), self.decoder.capture_seconds
            runs = [r.prefix_ids for r in records]
            next_logits, last_hidden = self.decoder.extend(state, runs, ctx)
            if base is not None:
                base_logits, _ = self.decoder.extend(base[0], runs, None)
                next_logits = blend_logits(next_logits, base_logits, s.alpha)
            land(_Launched(t, captured, time.perf_counter()))

        # prefixes: round 0, snapshot 0 only (as in training, the prefix reads round 0's window)
        window0 = self._window(bus, recorded, ids, 0, use_bus)
        ctx0 = self._context(stream_ids, window0, use_bus)
        if PREFIX_ONE_FORWARD:
            prefixes(ctx0)
        else:
            for i in range(max(len(r.prefix_ids) for r in records)):
                active = [i < len(r.prefix_ids) for r in records]
                tokens = [r.prefix_ids[i] if a else 0 for r, a in zip(records, active, strict=True)]
                land(launch(tokens, active, ctx0))

        result.prefix_steps = result.steps
        if use_bus:
            content = _ContentSums(rows, model.d_model, self.device)
        detoks = [_Detok(self.tokenizer, r.prefix_ids) for r in records]
        committed_detoks = [d.copy() for d in detoks]
        commit_len = state.lengths.clone()  # [R] cache length at each row's last commit
        commit_logits = next_logits.clone()  # [R, V] the logits its next block starts from
        block = [0] * rows
        attempt = [0] * rows
        done = [False] * rows
        slot = 0
        while not all(done):
            window = self._window(bus, recorded, ids, slot, use_bus)
            if use_bus:
                result.windows[slot] = {k: window.pairs(r) for r, k in enumerate(ids)}
                result.recorded[slot] = window
            ctx = self._context(stream_ids, window, use_bus)
            current = [Attempt(attempt[r], slot) if not done[r] else None for r in range(rows)]
            for r, a in enumerate(current):
                if a is not None:
                    if attempt[r] == 0:
                        records[r].blocks.append([])
                    records[r].blocks[block[r]].append(a)
            ended = [""] * rows  # "eos" | "budget" when the block ended the stream
            for _ in range(s.tau):
                live = [
                    current[r] is not None and not ended[r] and len(current[r].tokens) < s.tau
                    for r in range(rows)
                ]
                if not any(live):
                    break
                picked = self._sample(next_logits, records, current, live)
                sampled = time.perf_counter() - t0
                feed, fed = [0] * rows, []
                for r in range(rows):
                    if not live[r]:
                        continue
                    token = picked[r]
                    if self.eos is not None and token == self.eos:
                        ended[r], live[r] = "eos", False
                        continue
                    current[r].tokens.append(token)  # type: ignore[union-attr]
                    feed[r] = token
                    fed.append(r)
                # the step is queued before the tokens' host work (live text, events), which then
                # runs while the GPU computes the step
                step = launch(feed, live, ctx) if any(live) else None
                for r in fed:
                    a, token = current[r], feed[r]
                    piece = detoks[r].push(token)
                    a.token_times.append(sampled)
                    if emit_tokens:
                        self.emit(
                            StreamToken(
                                stream=ids[r],
                                round=block[r],
                                token=token,
                                text=piece,
                                committed=not use_bus,
                                attempt=attempt[r],
                            )
                        )
                    if len(records[r].token_ids) + len(a.tokens) >= s.max_new_tokens:
                        ended[r] = "budget"
                if step is not None:
                    land(step)
            t_end = time.perf_counter()
            self._block_ends(
                bus,
                window,
                records,
                current,
                ended,
                block,
                attempt,
                done,
                slot,
                use_bus,
                state,
                base,
                commit_len,
                commit_logits,
                items,
                item_mask,
                ids,
                lambda: next_logits,
                last_hidden,
                content,
                detoks,
                committed_detoks,
            )
            phases["block_ends"] += self._sync_time() - t_end
            slot += 1
        result.seconds = time.perf_counter() - t0
        self._close_phases(result)
        result.kv_cache_bytes = state.kv_bytes() + (base[0].kv_bytes() if base is not None else 0)
        result.timeline = bus.timeline() if use_bus else []
        result.gates = model.gate_values()
        result.state = state
        if use_bus:
            self.emit(GateTrace(layers=list(model.layer_ids), values=result.gates, g=s.g))
        return result

    def _block_ends(
        self,
        bus: NotesBus,
        window: WindowBatch,
        records: list[StreamRecord],
        current: list[Attempt | None],
        ended: list[str],
        block: list[int],
        attempt: list[int],
        done: list[bool],
        slot: int,
        use_bus: bool,
        state: DecodeState,
        base: tuple[DecodeState, torch.Tensor] | None,
        commit_len: torch.Tensor,
        commit_logits: torch.Tensor,
        items: torch.Tensor,
        item_mask: torch.Tensor,
        ids: list[int],
        logits_now: Callable[[], torch.Tensor],
        last_hidden: torch.Tensor,
        content: _ContentSums | None,
        detoks: list[_Detok],
        committed_detoks: list[_Detok],
    ) -> None:
        """Notes, coverage and readiness of every block that ended in this slot; commit or roll back."""
        s, model = self.s, self.model
        rows = len(records)
        judged = [r for r in range(rows) if current[r] is not None and current[r].tokens]
        scores: dict[int, float] = {}
        notes = cov = None
        if use_bus and judged:
            state_vec = last_hidden.float()  # [R, D] the hidden state at each block's last token
            notes = model.speculation_head(state_vec)  # [R, d_n]
            cov_logits = model.coverage_head(state_vec, items, item_mask)  # [R, P]
            vis = window.mask.to(window.notes.dtype)[..., None]  # [R, W, 1]
            pooled = (window.notes * vis).sum(dim=1) / vis.sum(dim=1).clamp_min(1)  # [R, d_n]
            ready = model.agreement_head.score(
                state_vec, pooled, coverage_summary(cov_logits, item_mask), notes, content.means()
            )  # [R]
            scores = dict(zip(range(rows), ready.float().tolist(), strict=True))
            cov = torch.sigmoid(cov_logits.float()).tolist()
        logits_after = logits_now()
        committed: list[int] = []
        for r in range(rows):
            a = current[r]
            if a is None:
                continue
            rec, k = records[r], ids[r]
            a.text = self.tokenizer.decode(a.tokens) if a.tokens else ""
            if not a.tokens:  # EOS as the block's first token: nothing to judge, the stream ends
                rec.blocks[block[r]].pop()
                if not rec.blocks[block[r]]:
                    rec.blocks.pop()
                self._finish(rec, r, ended[r] or "eos", done, committed_detoks[r].flush())
                continue
            if use_bus:
                a.readiness = scores[r]
                a.coverage = [p for p, m in zip(cov[r], item_mask[r].tolist(), strict=True) if m]
                if a.readiness >= s.gamma:
                    a.decision = "commit"
                elif attempt[r] < s.max_retries:
                    a.decision = "rollback"
                else:
                    a.decision = "forced"
                self.emit(
                    Readiness(
                        stream=k,
                        round=block[r],
                        attempt=attempt[r],
                        score=a.readiness,
                        gamma=s.gamma,
                        decision=a.decision,
                    )
                )
                self.emit(Coverage(stream=k, round=block[r], items=self._labels(r, ids), probs=a.coverage))
            if a.decision == "rollback":
                self.decoder.rollback(state, r, int(commit_len[r]))
                if base is not None:
                    self.decoder.rollback(base[0], r, int(commit_len[r]))
                logits_after[r] = commit_logits[r]
                detoks[r] = committed_detoks[r].copy()
                bus.discard(k, block[r])
                self.emit(
                    StreamRollback(
                        stream=k,
                        round=block[r],
                        attempt=attempt[r],
                        removed=len(a.tokens),
                        text=a.text,
                        readiness=float(a.readiness or 0.0),
                    )
                )
                attempt[r] += 1
                continue
            rec.token_ids += a.tokens
            rec.text = self.tokenizer.decode(rec.token_ids)
            committed.append(r)
            committed_detoks[r] = detoks[r].copy()
            if use_bus:
                note = bus.commit(k, block[r], notes[r].float(), step=slot, forced=a.decision == "forced")
                a.note_version = note.version
                self.emit(
                    NoteSnapshot(
                        stream=k,
                        round=block[r],
                        version=note.version,
                        visible_from_round=bus.visible_from_round(block[r]),
                        forced=note.forced,
                    )
                )
            commit_len[r] = state.lengths[r]
            commit_logits[r] = logits_after[r]
            block[r] += 1
            attempt[r] = 0
            if ended[r]:
                self._finish(rec, r, ended[r], done, committed_detoks[r].flush())
        if content is not None:
            content.end_block(committed)

    def _sync_time(self) -> float:
        """perf_counter once the device's queued work is done (a phase's real end on CUDA)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @staticmethod
    def _close_phases(result: DecodeResult) -> None:
        phases = result.phase_seconds
        phases["steps"] = sum(result.step_seconds)
        phases["other"] = max(0.0, result.seconds - sum(phases.values()))

    def _step_done(self, step: _Launched, phases: dict[str, float]) -> float:
        """Seconds from the step's launch until its outputs exist: on CUDA the step's kernels are
        waited for (the sampler would wait for them next anyway), so a step's time is its real
        cost in every mode and engine, not the time to queue it — host work done between launch and
        this wait overlaps it and counts only where it outlasts the GPU. On the CPU the step ran
        inside the launch. Graphs the step captured (the decoder's `capture_seconds` past the
        launch's: a step kind's first step, once per session) are booked as the `capture` phase,
        not as the step's."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            end = time.perf_counter()
        else:
            end = step.queued
        capture = self.decoder.capture_seconds - step.captured
        phases["capture"] += capture
        return end - step.start - capture

    def _finish(self, rec: StreamRecord, r: int, reason: str, done: list[bool], tail: str = "") -> None:
        """`tail`: the live text still held back (a character cut off by the stream's end)."""
        rec.done_reason = reason
        done[r] = True
        self.emit(StreamDone(stream=rec.stream, reason=reason, tokens=len(rec.token_ids), tail=tail))

    def _sample(
        self,
        logits: torch.Tensor,
        records: list[StreamRecord],
        current: list[Attempt | None],
        live: list[bool],
    ) -> list[int]:
        rows = [r for r in range(len(records)) if live[r]]
        histories = [records[r].token_ids + current[r].tokens for r in rows]  # type: ignore[union-attr]
        uniforms = (
            [float(torch.rand((), generator=self._gens[r])) for r in rows] if self.s.temperature > 0 else []
        )
        picked = sample_rows(
            logits if len(rows) == len(records) else logits[torch.tensor(rows, device=logits.device)],
            histories,
            uniforms or [0.0] * len(rows),
            temperature=self.s.temperature,
            top_p=self.s.top_p,
            top_k=self.s.top_k,
            no_repeat_ngram=self.s.no_repeat_ngram,
            banned=self._no_eos(self.s.ignore_eos),
        )
        out = [0] * len(records)
        for r, token in zip(rows, picked, strict=True):
            out[r] = int(token)
        return out

    # ------------------------------------------------------------------ helpers

    def _no_eos(self, ban: bool) -> tuple[int, ...]:
        """The tokens every row bans: EOS when `ban` (and the tokenizer has one)."""
        return (self.eos,) if ban and self.eos is not None else ()

    def _window(
        self, bus: NotesBus, recorded: dict[int, WindowBatch] | None, ids: list[int], slot: int, use_bus: bool
    ) -> WindowBatch:
        if recorded is not None:
            full = recorded[slot]
            rows = torch.tensor(ids, device=full.notes.device)
            return WindowBatch(
                notes=full.notes[rows],
                mask=full.mask[rows],
                producer=full.producer[rows],
                rounds=full.rounds[rows],
                streams=full.streams[rows],
                reader_rounds=full.reader_rounds[rows],
            )
        return bus.windows(ids, slot)

    def _context(self, stream_ids: torch.Tensor, window: WindowBatch, use_bus: bool) -> SidecarContext:
        dtype = next(self.model.snc.parameters()).dtype
        return SidecarContext(
            stream_ids=stream_ids,
            notes=window.notes.to(dtype),
            producer=window.producer,
            rounds=window.rounds,
            visible=window.mask,
            g=self.s.g if use_bus else 0.0,
            kv_cache={},
        )

    def _items(self, plan: PlanInfo, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        per = [plan.item_ids[k] for k in ids]
        width = max(1, max(len(x) for x in per))
        item_ids = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.bool)
        for r, row in enumerate(per):
            item_ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[r, : len(row)] = True
        item_ids, mask = item_ids.to(self.device), mask.to(self.device)
        # [R, P, d_n], zero where no text is known; None: the plan-id embeddings alone
        texts = self._item_vectors(plan, ids, width) if self.coverage_text else None
        return self.model.coverage_keys(item_ids, texts), mask

    def _item_vectors(self, plan: PlanInfo, ids: list[int], width: int) -> torch.Tensor:
        """The frozen-trunk embedding of each stream's plan-item texts, as the curriculum embeds
        them (`coverage_keys`): the given plan items' own texts, or for the planner's ids the
        training text each stands for (`plan_names`); zero where there is none."""
        per = [
            list(plan.items[k])
            if plan.source == "plan_items"
            else [self.plan_names.get(i) for i in plan.item_ids[k]]
            for k in ids
        ]
        wanted = sorted({t for row in per for t in row if t and t not in self._item_rows})
        if wanted:
            from pdt.train.curriculum_data import embed_item_texts  # the curriculum's own embedding

            self._add_item_vectors(
                wanted, embed_item_texts(self.model, wanted, self.tokenizer, NOTE_TOKENS, self.device)
            )
        none = len(self._item_rows)  # the zero row
        index = [
            [self._item_rows[t] if t else none for t in row] + [none] * (width - len(row)) for row in per
        ]
        return self._item_table[torch.tensor(index, device=self.device)]  # [R, width, d_n]

    def _add_item_vectors(self, texts: list[str], vectors: torch.Tensor) -> None:
        """Append embedded plan-item texts to the table (the zero row stays last)."""
        new = [i for i, t in enumerate(texts) if t not in self._item_rows]
        if not new:
            return
        for t in (texts[i] for i in new):
            self._item_rows[t] = len(self._item_rows)
        rows = vectors[torch.tensor(new)].to(self._item_table)  # [m, d_n]
        self._item_table = torch.cat([self._item_table[:-1], rows, self._item_table[-1:]])

    def _labels(self, r: int, ids: list[int]) -> list[str]:
        return self._plan_labels[ids[r]]

    # ------------------------------------------------------------------ sequential baseline

    def _sequential(self, prompt: str, prompt_ids: list[int], total: int | None) -> DecodeResult:
        """The plain trunk alone writes the whole answer (same runtime, same sampler): `total` tokens
        with EOS banned, or K × max_new_tokens stopping at EOS."""
        s = self.s
        t0 = time.perf_counter()
        budget = total if total is not None else s.max_new_tokens * s.num_streams
        state, logits = self.decoder.prefill(prompt_ids, 1, budget)
        rec = StreamRecord(0, "", [])
        attempt = Attempt(0, 0)
        rec.blocks.append([attempt])
        result = DecodeResult("sequential", prompt, prompt_ids, [rec], 0.0, 0, [], 0, engine=self.engine)
        result.phase_seconds["prefill"] = self._sync_time() - t0
        result.phase_seconds["capture"] = 0.0
        gen = torch.Generator().manual_seed(s.seed * 1009 + 997)
        ban_eos = total is not None or s.ignore_eos
        live = torch.ones(1, dtype=torch.bool)
        detok = _Detok(self.tokenizer, prompt_ids)
        while len(attempt.tokens) < budget:
            uniform = [float(torch.rand((), generator=gen))] if s.temperature > 0 else [0.0]
            (token,) = sample_rows(
                logits,
                [attempt.tokens],
                uniform,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                no_repeat_ngram=s.no_repeat_ngram,
                banned=self._no_eos(ban_eos),
            )
            if self.eos is not None and token == self.eos:
                rec.done_reason = "eos"
                break
            attempt.tokens.append(token)
            sampled = time.perf_counter() - t0
            last = len(attempt.tokens) >= budget
            if not last:  # queued before the token's host work, as in _parallel
                t, captured = time.perf_counter(), self.decoder.capture_seconds
                logits, _ = self.decoder.step(state, torch.tensor([token]), live, None)
                step = _Launched(t, captured, time.perf_counter())
            detok.push(token)  # the same host work per token as a stream's live text
            attempt.token_times.append(sampled)
            if last:
                break
            result.steps += 1
            result.step_seconds.append(self._step_done(step, result.phase_seconds))
        rec.done_reason = rec.done_reason or "budget"
        attempt.decision = "commit"
        attempt.text = self.tokenizer.decode(attempt.tokens) if attempt.tokens else ""
        rec.token_ids, rec.text = list(attempt.tokens), attempt.text
        result.seconds = time.perf_counter() - t0
        self._close_phases(result)
        result.kv_cache_bytes = state.kv_bytes()
        result.state = state
        return result
