"""The PDT model: a frozen Hugging Face trunk plus its sidecars, as one object.

What it is: composition — it builds the sidecars for a trunk (sized from `SidecarConfig`),
freezes the trunk, attaches the hooks (`pdt.model.instrument`), and offers the teacher-forced
forward (all K streams of a batch in one trunk forward; rows = (example, stream); per-position
note visibility), the plain-trunk forward (sidecars off: the KD teacher and the baselines),
trainable groups for the curriculum, a parameter report and strict sidecar save/load.
What it is not: the bus rules (`pdt.bus`), the decode loop (`pdt.model.decode`), or training.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pdt.model.instrument import Instrumentation, SidecarContext, arch_spec, decoder_layers
from pdt.model.sidecars.adapter import StreamAdapters
from pdt.model.sidecars.heads import AgreementHead, CoverageHead, NotesHead, SpeculationHead, StreamClassifier
from pdt.model.sidecars.planner import Planner
from pdt.model.sidecars.seed_text import TextEmbedder
from pdt.model.sidecars.snc import NotesCrossAttention
from pdt.presets.schema import SidecarConfig

SIDECAR_WEIGHTS = "sidecars.safetensors"
SIDECAR_META = "sidecars.json"
PLAN_NAMES = "plan_items.json"  # beside them: plan id → the training item text it stands for
PLAN_VECTORS = "plan_item_vectors.safetensors"  # and those texts' coverage-key embeddings
FORMAT_VERSION = 1

#: Curriculum groups → sidecar attributes (SPEC §2 "Stages freeze/unfreeze groups").
GROUPS: dict[str, tuple[str, ...]] = {
    "planner": ("planner",),
    "notes": ("notes_head",),
    "adapters": ("adapters",),
    "snc": ("snc",),
    "stream_classifier": ("stream_classifier",),
    "speculation": ("speculation_head",),
    "coverage": ("coverage_head",),
    "agreement": ("agreement_head",),
}

#: Sidecar tensors added after checkpoints of this format were first written, whose freshly
#: initialised values make the model compute exactly what it did without them: a checkpoint that
#: lacks them loads with them as initialised (the readiness head's content path, whose output
#: layer starts at zero: `AgreementHead`; the text embedder's centre, zero: none). Anything else
#: missing is still refused.
ADDED_KEYS = ("agreement_head.content.weight", "text_embedder.center")

#: Coverage summary fed to the agreement head: (mean, max) of the coverage probabilities.
COVERAGE_SUMMARY_DIM = 2


#: What an export's training.json says under `coverage_keys` when its coverage head was trained on
#: `PDTModel.coverage_keys` (plan items by their text embedding); older exports say nothing.
COVERAGE_KEYS = "item_text"


class SidecarLoadError(Exception):
    """Saved sidecars do not fit this trunk or configuration; the message says what differs."""


@dataclass
class PDTOutput:
    logits: torch.Tensor  # [R, T, V], or [N, V] at the positions asked for
    hidden: torch.Tensor  # [R, T, D] last hidden states (after the trunk's final norm)


def model_dims(trunk: nn.Module) -> tuple[int, int]:
    """(d_model, number of decoder layers) of a trunk."""
    return trunk.get_input_embeddings().embedding_dim, len(decoder_layers(trunk))


def default_snc_width(d_model: int, heads: int) -> int:
    """min(d/4, 512) rounded down to a multiple of the heads: SPEC §2 asks ≤ d/4 by default."""
    width = min(d_model // 4, 512)
    return max(heads, width - width % heads)


def trunk_identity(trunk: nn.Module) -> dict[str, Any]:
    """What a sidecar checkpoint must match: shape facts plus a fingerprint of the embedding weights.

    The fingerprint hashes the first 4096 embedding values rounded to bf16, so the same trunk loaded
    in fp32 or bf16 matches, while another trunk of the same shape (another pretrain run) does not.
    """
    d_model, n_layers = model_dims(trunk)
    weight = trunk.get_input_embeddings().weight.detach().reshape(-1)[:4096]
    rounded = weight.to(torch.bfloat16).to(torch.float32).cpu().numpy().tobytes()
    return {
        "model_type": str(trunk.config.model_type),
        "d_model": d_model,
        "num_layers": n_layers,
        "vocab_size": int(trunk.get_input_embeddings().num_embeddings),
        "fingerprint": hashlib.sha256(rounded).hexdigest()[:16],
    }


class PDTModel(nn.Module):
    """Frozen trunk + sidecars. Only sidecar parameters require grad."""

    def __init__(self, trunk: nn.Module, cfg: SidecarConfig) -> None:
        super().__init__()
        arch_spec(trunk)  # refuse an unsupported architecture before building anything
        self.cfg = cfg
        self.trunk = trunk
        for p in self.trunk.parameters():
            p.requires_grad_(False)
        d_model, n_layers = model_dims(trunk)
        self.d_model = d_model
        self.layer_ids = list(range(max(0, n_layers - cfg.n_layers), n_layers))
        width = cfg.snc_width or default_snc_width(d_model, cfg.snc_heads)
        k = cfg.num_streams
        self.snc = nn.ModuleList(
            NotesCrossAttention(d_model, cfg.d_notes, width, cfg.snc_heads, k, cfg.max_rounds, cfg.gate_init)
            for _ in self.layer_ids
        )
        self.adapters = nn.ModuleList(
            StreamAdapters(d_model, cfg.adapter_rank, k, cfg.gate_init) for _ in self.layer_ids
        )
        self.planner = Planner(d_model, cfg.d_notes, cfg.plan_vocab, cfg.plan_slots, cfg.d_plan)
        self.notes_head = NotesHead(d_model, cfg.d_notes)
        self.speculation_head = SpeculationHead(d_model, cfg.d_notes)
        self.coverage_head = CoverageHead(d_model, cfg.d_notes)
        self.agreement_head = AgreementHead(d_model, cfg.d_notes, COVERAGE_SUMMARY_DIM)
        self.stream_classifier = StreamClassifier(d_model, k)
        self.text_embedder = TextEmbedder(d_model, cfg.d_notes, seed=_salt_seed(cfg.plan_salt))
        self.instrumentation = Instrumentation(trunk, self.layer_ids, self.snc, self.adapters)
        self.to(next(trunk.parameters()).device)

    # ------------------------------------------------------------------ forwards

    def forward_teacher(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        stream_ids: torch.Tensor,
        window: Any,
        g: float | torch.Tensor = 1.0,
        sidecar_positions: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> PDTOutput:
        """All rows in one trunk forward; rows = (example, stream).

        `window` has notes [R, N, d_n], producer/rounds [R, N] and visible [R, T, N] (per position, by
        round: `pdt.bus.teacher_windows`). `sidecar_positions` [R, T] marks the stream's own positions
        (prefix + section); the prompt is left to the plain trunk, exactly as at inference.
        `logits_at` [R, T] bool, or [N] flat indices row·T + t: compute logits only there (→ [N, V]).
        """
        ctx = SidecarContext(
            stream_ids=stream_ids,
            notes=window.notes,
            producer=window.producer,
            rounds=window.rounds,
            visible=window.visible,
            g=g,
            positions=sidecar_positions,
        )
        with self.instrumentation.active(ctx):
            return self._run(input_ids, attention_mask, logits_at)

    def forward_base(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> PDTOutput:
        """The plain trunk (hooks inactive): the KD teacher and the `sequential` baseline."""
        return self._run(input_ids, attention_mask, logits_at)

    def _run(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, logits_at: torch.Tensor | None
    ) -> PDTOutput:
        """The trunk's forward. With `logits_at`, the base model gives the final (normed) hidden states
        and the LM head runs only at the selected positions: a training step needs logits on section
        tokens alone, and the vocabulary-sized work (head, softmax, their backward) is the largest
        part of a small trunk's step."""
        if logits_at is None:
            out = self.trunk(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True
            )
            return PDTOutput(logits=out.logits, hidden=out.hidden_states[-1])
        hidden = self.trunk.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
        if logits_at.dtype == torch.bool:
            picked = hidden[logits_at]  # [N, D]
        else:  # flat indices row·T + t: no boolean mask, so no device sync on a GPU
            picked = hidden.flatten(0, 1).index_select(0, logits_at)  # [R·T, D] → [N, D]
        logits = self.trunk.get_output_embeddings()(picked)  # [N, V]
        return PDTOutput(logits=logits, hidden=hidden)

    def coverage_keys(self, item_ids: torch.Tensor, item_text: torch.Tensor | None = None) -> torch.Tensor:
        """The plan items as the coverage head reads them: item_ids [..., P] → [..., P, d_n] unit vectors.

        An item with a text is its frozen-trunk text embedding (`embed_texts`, never centred: on the
        tiny pipeline centred keys cost the coverage AUC ~0.025; item_text [..., P, d_n],
        a zero row where the text is unknown); otherwise the planner's learned embedding of its id.
        Why the text: plan items are article entities, mostly rare — 63% of the tiny dataset's
        validation items never occur in its training split — so a learned per-id vector is an
        untrained one for them, and the coverage head was at chance (validation AUC 0.52); a text
        embedding places an unseen item by what it says."""
        learned = self.planner.item_embeddings(item_ids)  # [..., P, d_n]
        if item_text is None:
            return learned
        text = item_text.to(learned.dtype)
        known = text.abs().sum(dim=-1, keepdim=True) > 0  # [..., P, 1]
        return torch.where(known, F.normalize(text, dim=-1, eps=1e-12), learned)

    @torch.no_grad()
    def embed_texts(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, centred: bool = True
    ) -> torch.Tensor:
        """Seed texts / note targets (centred) and coverage keys (`centred=False`): frozen-trunk
        mean-pooled last hidden states → [B, d_n], unit norm (`TextEmbedder`)."""
        hidden = self.forward_base(input_ids, attention_mask).hidden  # [B, T, D]
        return self.text_embedder(hidden, attention_mask, centred)

    @torch.no_grad()
    def pooled_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The frozen trunk's mean-pooled last hidden states [B, D] fp32, before centre and projection."""
        hidden = self.forward_base(input_ids, attention_mask).hidden  # [B, T, D]
        return self.text_embedder.pooled(hidden, attention_mask)

    # ------------------------------------------------------------------ groups and reports

    def sidecar_modules(self) -> dict[str, nn.Module]:
        return {name: getattr(self, attr) for name, attrs in GROUPS.items() for attr in attrs}

    def set_trainable(self, groups: list[str]) -> list[nn.Parameter]:
        """Make exactly these groups trainable (everything else frozen); return their parameters."""
        unknown = sorted(set(groups) - set(GROUPS))
        if unknown:
            raise ValueError(f"unknown sidecar group(s) {unknown}; groups: {', '.join(GROUPS)}")
        for p in self.parameters():
            p.requires_grad_(False)
        params: list[nn.Parameter] = []
        for name in groups:
            for attr in GROUPS[name]:
                for p in getattr(self, attr).parameters():
                    p.requires_grad_(True)
                    params.append(p)
        return params

    def gate_values(self) -> list[float]:
        """λ_l of each instrumented layer (the gate trace)."""
        return [float(m.gate_value()) for m in self.snc]

    def parameter_report(self) -> dict[str, Any]:
        trunk = sum(p.numel() for p in self.trunk.parameters())
        groups = {
            name: sum(p.numel() for p in mod.parameters()) for name, mod in self.sidecar_modules().items()
        }
        total = sum(groups.values())
        return {
            "trunk": trunk,
            "sidecars": total,
            "percent_of_trunk": 100.0 * total / max(1, trunk),
            "groups": groups,
            "layers": self.layer_ids,
        }

    # ------------------------------------------------------------------ save / load

    def sidecar_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().contiguous() for k, v in self.state_dict().items() if not k.startswith("trunk.")
        }

    def sidecar_meta(self) -> dict[str, Any]:
        """What a sidecar checkpoint records to be loaded strictly: format, configuration, trunk identity."""
        return {
            "format_version": FORMAT_VERSION,
            "sidecar_config": self.cfg.model_dump(mode="json"),
            "trunk": trunk_identity(self.trunk),
        }

    def save_sidecars(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.sidecar_state_dict(), str(folder / SIDECAR_WEIGHTS))
        meta = self.sidecar_meta()
        (folder / SIDECAR_META).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
        return folder

    def load_sidecars(self, folder: str | Path) -> None:
        """Strict: refuses another trunk, sidecar configuration, plan salt or plan vocabulary."""
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            meta = json.loads((folder / SIDECAR_META).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise SidecarLoadError(f"{folder / SIDECAR_META}: cannot read ({exc})") from None
        self.load_sidecar_state(load_file(str(folder / SIDECAR_WEIGHTS)), meta, str(folder))

    def load_sidecar_state(self, state: dict[str, torch.Tensor], meta: dict, where: str) -> None:
        """Strict load of a sidecar state dict whose `sidecar_meta()` was saved beside it."""
        _check_meta(meta, self.cfg, trunk_identity(self.trunk), where)
        own = self.sidecar_state_dict()
        state = {**{k: own[k] for k in ADDED_KEYS if k in own and k not in state}, **state}
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            raise SidecarLoadError(
                f"{where}: sidecar keys differ — missing {missing[:5]}, unexpected {extra[:5]}"
            )
        shapes = {
            k: (tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if state[k].shape != v.shape
        }
        if shapes:
            name, (saved, now) = next(iter(shapes.items()))
            raise SidecarLoadError(
                f"{where}: {len(shapes)} sidecar tensor(s) have other shapes, e.g. {name} saved {saved}, "
                f"now {now} — saved by another version of the sidecars; train the stages again"
            )
        for attr in {key.split(".", 1)[0] for key in own}:  # each sidecar module strictly, never the trunk
            prefix = attr + "."
            sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            getattr(self, attr).load_state_dict(sub, strict=True)


def _salt_seed(salt: str) -> int:
    return int.from_bytes(hashlib.sha256(salt.encode()).digest()[:4], "little")


def _check_meta(meta: dict, cfg: SidecarConfig, identity: dict, folder: str) -> None:
    saved_cfg = meta.get("sidecar_config", {})
    for key in ("plan_salt", "plan_vocab"):
        if saved_cfg.get(key) != getattr(cfg, key):
            raise SidecarLoadError(
                f"{folder}: saved with {key} = {saved_cfg.get(key)!r}, "
                f"this model uses {getattr(cfg, key)!r}; "
                "plan ids would silently mean other plan items — use the saved value or retrain the planner"
            )
    diff = {k: (v, getattr(cfg, k)) for k, v in saved_cfg.items() if getattr(cfg, k, v) != v}
    if diff:
        raise SidecarLoadError(f"{folder}: sidecar configuration differs (saved, now): {diff}")
    saved_trunk = meta.get("trunk", {})
    tdiff = {k: (saved_trunk.get(k), v) for k, v in identity.items() if saved_trunk.get(k) != v}
    if tdiff:
        raise SidecarLoadError(f"{folder}: trained on another trunk (saved, now): {tdiff}")
