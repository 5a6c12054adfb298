"""The decode-step API: K streams as the rows of ONE batched trunk forward per token.

What it is: a shared prompt prefilled once and broadcast to every row's cache; then per-token
steps where each row (stream) has its own logical length and position ids; inactive rows (done,
or waiting for a shorter prefix) take a masked placeholder slot; `rollback(row, length)` resets a
row to an earlier commit point by masking its later cache slots — no cache copy, no re-prefill
(SPEC §2b.3). Rows share physical cache slots; a per-row validity mask hides each row's holes,
and explicit position ids keep every row's positions contiguous, so a row conditions exactly on
its own committed tokens. What it is not: the orchestrator (rounds, commit/rollback policy,
sampling) — that lives in `pdt.infer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pdt.model import cpu_linear
from pdt.model.attention import cache_arg, decode_attention, output_cache
from pdt.model.instrument import SidecarContext
from pdt.model.pdt_model import PDTModel


@dataclass
class DecodeState:
    """The batched cache and the per-row bookkeeping that makes it R independent caches."""

    cache: object  # transformers Cache, batch R
    valid: torch.Tensor  # [R, P] bool: physical slot p holds a live token of row r
    logical: torch.Tensor  # [R, P] long: that token's logical index in row r (-1: placeholder)
    lengths: torch.Tensor  # [R] long: tokens row r conditions on (prompt + its own tokens)
    prompt_len: int = 0
    tokens: list[list[int]] = field(default_factory=list)  # each row's own tokens after the prompt
    prompt_hidden: torch.Tensor | None = None  # [1, P, D] the prompt's last hidden states (planner, seeds)

    @property
    def rows(self) -> int:
        return int(self.lengths.numel())

    def kv_bytes(self) -> int:
        """Real bytes held by the KV cache (all layers, keys and values)."""
        total = 0
        for layer in getattr(self.cache, "layers", []):
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total


class StreamDecoder:
    """Prefill once, then step all rows together; sidecars read the window given per step."""

    engine = "eager"
    #: Seconds spent capturing CUDA graphs so far (a one-time cost the orchestrator books apart from
    #: its steps: `GraphStreamDecoder`); an eager decoder captures nothing.
    capture_seconds = 0.0

    def __init__(self, model: PDTModel) -> None:
        self.model = model
        self.device = next(model.trunk.parameters()).device
        if self.device.type == "cpu":
            cpu_linear.install(model.trunk)  # few-row products in the form MKL runs fast

    @torch.no_grad()
    def prefill(self, prompt_ids: list[int], rows: int, steps: int = 0) -> tuple[DecodeState, torch.Tensor]:
        """Encode the prompt once (plain trunk: it is shared, so no stream-specific sidecar touches it)
        and give every row that cache. Returns the state and the last prompt position's logits [R, V].
        `steps` (the decode steps expected) sizes static engines' buffers; this cache grows as it goes."""
        from transformers import DynamicCache

        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)  # [1, P]
        cache = DynamicCache()
        out = self.model.trunk(
            input_ids=ids, use_cache=True, output_hidden_states=True, **{cache_arg(self.model.trunk): cache}
        )
        cache = output_cache(out)
        cache.batch_repeat_interleave(rows)  # the prefix's K/V, once per row
        p = len(prompt_ids)
        state = DecodeState(
            cache=cache,
            valid=torch.ones(rows, p, dtype=torch.bool, device=self.device),
            logical=torch.arange(p, device=self.device).expand(rows, p).clone(),  # [R, P]
            lengths=torch.full((rows,), p, dtype=torch.long, device=self.device),
            prompt_len=p,
            tokens=[[] for _ in range(rows)],
            prompt_hidden=out.hidden_states[-1],
        )
        return state, out.logits[:, -1].expand(rows, -1)

    @torch.no_grad()
    def step(
        self, state: DecodeState, tokens: torch.Tensor, active: torch.Tensor, context: SidecarContext | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one token per row. tokens [R] long; active [R] bool (inactive rows: placeholder slot);
        host tensors spare a device sync (the ids are kept on the host too).

        Returns (logits [R, V], last hidden [R, D]) at the new position of each row.
        """
        host_tokens, host_active = tokens.tolist(), active.tolist()  # (a sync only for device tensors)
        active = active.to(self.device)
        position = state.lengths.clone()  # [R] the logical index of the new token
        mask = torch.cat([state.valid, active[:, None]], dim=1)  # [R, P+1]
        logical = torch.cat([state.logical, position[:, None]], dim=1)  # [R, P+1]
        ids = tokens.to(self.device)[:, None]  # [R, 1]
        kwargs = dict(
            input_ids=ids,
            **{cache_arg(self.model.trunk): state.cache},
            attention_mask=self._mask(mask[:, None, :], logical, position[:, None]),
            position_ids=position[:, None],
            use_cache=True,
            output_hidden_states=True,
        )
        out = self._forward(kwargs, context)
        state.cache = output_cache(out)
        state.valid = mask
        new_logical = torch.where(active, position, torch.full_like(position, -1))
        state.logical = torch.cat([state.logical, new_logical[:, None]], dim=1)  # [R, P+1]
        state.lengths = state.lengths + active.long()
        for r, (token, live) in enumerate(zip(host_tokens, host_active, strict=True)):
            if live:
                state.tokens[r].append(int(token))
        return out.logits[:, -1], out.hidden_states[-1][:, -1]

    @torch.no_grad()
    def extend(
        self, state: DecodeState, tokens: list[list[int]], context: SidecarContext | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed each row its own run of tokens (at least one) in ONE forward: the same cache, lengths
        and outputs as `step` fed them a token at a time, the row's shorter runs padded with
        placeholder slots at the end (masked for good, as an inactive row's step slot). The stream
        prefixes take one forward this way instead of one step a token (SPEC §2b.3).

        Returns (logits [R, V], last hidden [R, D]) at each row's last token.
        """
        ids, live, position, counts = self._runs(state, tokens)
        length = ids.shape[1]
        mask = torch.cat([state.valid, live], dim=1)  # [R, P+L]
        new_logical = torch.where(live, position, torch.full_like(position, -1))
        logical = torch.cat([state.logical, position], dim=1)  # [R, P+L] (the queries' own keys)
        causal = torch.ones(length, length, dtype=torch.bool, device=self.device).tril()
        allowed = torch.cat(  # [R, L, P+L]: the row's valid slots, and its new tokens up to the query
            [state.valid[:, None, :].expand(-1, length, -1), live[:, None, :] & causal], dim=2
        )
        kwargs = dict(
            input_ids=ids,
            **{cache_arg(self.model.trunk): state.cache},
            attention_mask=self._mask(allowed, logical, position),
            position_ids=position,
            use_cache=True,
            output_hidden_states=True,
        )
        out = self._forward(kwargs, context)
        state.cache = output_cache(out)
        state.valid = mask
        state.logical = torch.cat([state.logical, new_logical], dim=1)
        last = counts.to(self.device) - 1  # [R] each row's last token
        state.lengths = state.lengths + last + 1
        for r, run in enumerate(tokens):
            state.tokens[r].extend(int(t) for t in run)
        rows = torch.arange(len(tokens), device=self.device)
        return out.logits[rows, last], out.hidden_states[-1][rows, last]

    def _forward(self, kwargs: dict, context: SidecarContext | None) -> Any:
        """The trunk's forward on the decode backends, under `context`'s sidecars (None: plain)."""
        with decode_attention():
            if context is None:
                return self.model.trunk(**kwargs)
            with self.model.instrumentation.active(context):
                return self.model.trunk(**kwargs)

    def _runs(
        self, state: DecodeState, tokens: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`extend`'s inputs: ids [R, L] (placeholders 0), live [R, L], positions [R, L], counts [R]."""
        if len(tokens) != state.rows or any(not run for run in tokens):
            raise ValueError(f"extend takes one non-empty run of tokens for each of the {state.rows} rows")
        length = max(len(run) for run in tokens)
        counts = torch.tensor([len(run) for run in tokens])
        ids = torch.tensor([run + [0] * (length - len(run)) for run in tokens], device=self.device)
        steps = torch.arange(length)
        live = (steps[None, :] < counts[:, None]).to(self.device)  # [R, L]
        position = state.lengths[:, None] + steps.to(self.device)[None, :]  # [R, L]
        return ids, live, position, counts

    def _mask(self, allowed: torch.Tensor, logical: torch.Tensor, position: torch.Tensor) -> object:
        """The attention mask of L query positions a row, prepared as 4D so HF does not rebuild it.

        allowed [R, L, S]: the keys each query may read; logical [R, S]: each key's logical index;
        position [R, L]: each query's. Sliding-window layers get their own mask counted in each
        row's logical tokens: HF's window counts physical cache slots, and our rows have holes
        (placeholders, rolled-back blocks). sdpa takes a bool mask (True = attend); eager takes an
        additive float mask.
        """
        config = self.model.trunk.config
        impl = getattr(config, "_attn_implementation", None)
        if impl not in ("sdpa", "eager"):
            if allowed.shape[1] != 1:
                raise ValueError(f"a multi-token decode forward needs sdpa or eager attention, not {impl!r}")
            return allowed[:, 0].long()  # other kernels build their own masks from a 2D padding mask
        dtype = self.model.trunk.get_input_embeddings().weight.dtype

        def prepared(keep: torch.Tensor) -> torch.Tensor:  # [R, L, S] → [R, 1, L, S]
            if impl == "sdpa":
                return keep[:, None]
            zeros = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
            return zeros.masked_fill(~keep, torch.finfo(dtype).min)[:, None]

        layer_types = getattr(config, "layer_types", None)
        window = getattr(config, "sliding_window", None)
        if not window or (layer_types and "sliding_attention" not in layer_types):
            return prepared(allowed)
        # HF keeps keys with kv > q - window
        in_window = logical[:, None, :] > (position[:, :, None] - window)  # [R, L, S]
        if not layer_types:  # one window for every layer (Mistral)
            return prepared(allowed & in_window)
        masks = {"full_attention": prepared(allowed), "sliding_attention": prepared(allowed & in_window)}
        return {t: masks[t] for t in set(layer_types)}

    def rollback(self, state: DecodeState, row: int, length: int) -> None:
        """Truncate row `row` to `length` tokens (prompt included): its later slots are masked for good."""
        if not state.prompt_len <= length <= int(state.lengths[row]):
            raise ValueError(
                f"rollback of row {row} to {length}: must be within "
                f"[{state.prompt_len}, {int(state.lengths[row])}]"
            )
        state.valid[row] &= state.logical[row] < length
        state.lengths[row] = length
        del state.tokens[row][length - state.prompt_len :]
