"""The home screen's model: every preset with its status, grouped by kind.

What it is: plain Python (no Textual), run on a worker thread because it reads files — the
preset listing, each preset's checkpoint status, the last run of each preset, and the key
settings shown in the details pane. What it is not: the preset schema or loader (see
`pdt.presets`), nor a widget.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdt.presets.loader import PresetError, PresetInfo, list_presets, load_preset_file
from pdt.runs import RunInfo, list_runs, preset_status

#: Display order of the kinds; a kind not listed comes after these, "invalid" always last.
KIND_ORDER = ("pipeline", "dataset", "pretrain", "curriculum", "inference")
INVALID = "invalid"
#: What each kind is, beside its group header on the home screen.
KIND_BLURB = {  # short: a header fits the list's 36 columns at 80×24
    "pipeline": "end to end",
    "dataset": "training data",
    "pretrain": "trunks",
    "curriculum": "sidecars",
    "inference": "parallel demo",
    INVALID: "fix with e",
}
#: The preset the home screen highlights and selects first.
QUICKSTART = "quickstart"

#: Per kind, the settings worth seeing before pressing Enter: dotted path (into the resolved
#: preset, defaults filled in) -> short label.
KEY_SETTINGS: dict[str, dict[str, str]] = {
    "pretrain": {
        "data.sources": "data",
        "trunk.source": "trunk",
        "trunk.model_type": "model type",
        "trunk.path": "trunk folder",
        "trunk.config.hidden_size": "hidden size",
        "trunk.config.num_hidden_layers": "layers",
        "trunk.config.num_attention_heads": "heads",
        "tokenizer.base": "tokenizer",
        "tokenizer.vocab_size": "vocab size",
        "train.token_budget": "token budget",
        "train.seq_len": "seq len",
        "train.micro_batch_size": "micro batch",
        "train.grad_accum": "grad accum",
        "train.lr": "peak lr",
        "train.precision": "precision",
        "checkpoint.every_steps": "ckpt every",
        "distributed.nproc_per_node": "processes",
    },
    "curriculum": {
        "stage": "stage",
        "trunk.preset": "trunk preset",
        "trunk.path": "trunk folder",
        "dataset": "dataset",
        "init_from": "starts from",
        "groups": "groups",
        "train.steps": "steps",
        "train.token_budget": "token budget",
        "train.micro_batch_size": "micro batch",
        "train.lr": "peak lr",
        "bus.lag": "lag Δ",
        "bus_mix_prob": "bus mixing",
        "plan_mix_prob": "plan mixing",
        "stream_dropout_prob": "stream dropout",
        "lora.rank": "LoRA rank",
        "distributed.nproc_per_node": "processes",
    },
    "inference": {
        "sidecars.preset": "sidecars of",
        "sidecars.path": "sidecars folder",
        "trunk.preset": "trunk preset",
        "trunk.path": "trunk folder",
        "prompt": "prompt",
        "decode.max_new_tokens": "tokens / stream",
        "decode.tau": "τ (None: trained)",
        "decode.gamma": "γ (None: calibrated)",
        "decode.temperature": "temperature",
        "decode.max_retries": "max retries",
        "baselines": "baselines",
        "device": "device",
    },
    "pipeline": {
        "presets": "runs, in order",
        "featured": "featured",
    },
}


@dataclass(frozen=True)
class PresetRow:
    """One preset as the home screen shows it."""

    info: PresetInfo
    checkpoint_step: int | None = None
    total_steps: int | None = None
    finished: bool = False
    last_run: RunInfo | None = None
    running: bool = False
    nproc: int = 1
    settings: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    featured: bool = False
    """A pipeline with `featured: true` (or the preset named quickstart): starred, listed first."""

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def starred(self) -> bool:
        return self.featured or self.name == QUICKSTART

    @property
    def group(self) -> str:
        return INVALID if self.info.error else self.info.kind

    @property
    def status(self) -> str:
        """'running' / 'finished' (a dataset: 'built') / 'step N/M' / 'not started' (or 'invalid')."""
        if self.info.error:
            return INVALID
        if self.running:
            return "running"
        if self.finished:
            return "built" if self.info.kind == "dataset" else "finished"
        if self.checkpoint_step is not None:
            total = f"/{self.total_steps}" if self.total_steps else ""
            return f"step {self.checkpoint_step}{total}"
        return "not started"

    @property
    def last_run_status(self) -> str | None:
        return self.last_run.status if self.last_run is not None else None


def group_order(kind: str) -> tuple[int, str]:
    if kind == INVALID:
        return (2, kind)
    return (0, f"{KIND_ORDER.index(kind):02d}") if kind in KIND_ORDER else (1, kind)


def flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """{"a": {"b": 1}, "c": [2]} -> [("a.b", 1), ("c", [2])]: lists of scalars stay whole."""
    if isinstance(data, dict):
        out: list[tuple[str, Any]] = []
        for key, value in data.items():
            out += flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(data, list) and any(isinstance(v, dict | list) for v in data):
        return [pair for i, value in enumerate(data) for pair in flatten(value, f"{prefix}[{i}]")]
    return [(prefix, data)]


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return ", ".join(value)  # preset names, baselines: plain words read better than JSON
    return json.dumps(value)


def resolved_settings(info: PresetInfo) -> dict[str, Any]:
    """The valid preset with `extends` merged and defaults filled, flattened to dotted keys."""
    if info.error is not None:
        return {}
    try:
        return dict(flatten(load_preset_file(info.path).model_dump(mode="json")))
    except PresetError:
        return {}


def key_settings(info: PresetInfo, resolved: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The settings the details pane lists: a curated set per kind (defaults filled in), or every
    key of the file for a kind without one. Invalid presets show the keys of their raw file."""
    if info.error is None and info.kind in KEY_SETTINGS and resolved:
        sources = [v for k, v in resolved.items() if k.startswith("data.sources[") and k.endswith(".type")]
        values = dict(resolved)
        if sources:
            values["data.sources"] = ", ".join(sources)
        return tuple(
            (label, _show(values[key]))
            for key, label in KEY_SETTINGS[info.kind].items()
            if values.get(key) is not None
        )
    try:
        raw = json.loads(info.path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return ()
    if not isinstance(raw, dict):
        return ()
    skip = {"name", "kind", "description"}
    return tuple((key, _show(value)) for key, value in flatten(raw) if key.split(".")[0] not in skip)


def _nproc(resolved: dict[str, Any]) -> int:
    value = resolved.get("distributed.nproc_per_node", 1)
    return value if isinstance(value, int) and value >= 1 else 1


def load_catalog(
    folder: Path | None = None, running_presets: frozenset[str] = frozenset()
) -> list[PresetRow]:
    """Every preset with its status, in display order (group, then quickstart first, then name).

    `running_presets` names presets whose job the app launched and is still running (a job that
    has not yet written its first event is not visible in `logs/` yet).
    """
    last_runs: dict[str, RunInfo] = {}
    for run in list_runs():  # newest first
        last_runs.setdefault(run.preset, run)
    rows = []
    for info in list_presets(folder):
        status = preset_status(info.name, info.kind) if info.error is None else {}
        last = last_runs.get(info.name)
        resolved = resolved_settings(info)
        rows.append(
            PresetRow(
                info=info,
                checkpoint_step=status.get("step"),  # type: ignore[arg-type]
                total_steps=status.get("total_steps"),  # type: ignore[arg-type]
                finished=bool(status.get("finished", False)),
                last_run=last,
                running=info.name in running_presets or (last is not None and last.status == "running"),
                nproc=_nproc(resolved),
                settings=key_settings(info, resolved),
                featured=bool((resolved or {}).get("featured", False)),
            )
        )
    rows.sort(key=lambda r: (group_order(r.group), not r.starred, r.name))
    return rows
