"""The entry point behind `python main.py`: the TUI with a terminal, unattended otherwise.

What it is: mode selection (TTY → Textual app; no TTY, `PDT_HEADLESS=1` or torchrun →
unattended), preset choice for unattended runs (`PDT_PRESET`; else a `questionary` prompt on
rank 0 with a TTY; else the default preset; a torchrun restart reuses the recorded preset), the
rank-0 broadcast of that choice, and exit codes. What it is not: a flag parser — there are none.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

#: Unattended runs with no PDT_PRESET and no TTY use the first of these that exists.
DEFAULT_PRESETS = ("quickstart", "pretrain_tiny")


def _headless() -> bool:
    if os.environ.get("PDT_HEADLESS", "").strip() in ("1", "true", "yes"):
        return True
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return True
    return not (sys.stdin.isatty() and sys.stdout.isatty())


def main() -> int:
    if not _headless():
        from pdt.tui.app import run_tui

        return run_tui()
    return run_unattended()


def _restart_record() -> Path | None:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id:
        return None
    from pdt.runs import logs_root

    return logs_root() / f".torchrun-{run_id}.json"


def _choose_preset_ref() -> str:
    """Rank 0 only. Which preset to run, by name or path."""
    env = os.environ.get("PDT_PRESET", "").strip()
    if env:
        return env
    record = _restart_record()
    if record is not None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and record.is_file():
        return json.loads(record.read_text())["preset"]
    from pdt.presets.loader import list_presets

    infos = [i for i in list_presets() if i.error is None]
    if sys.stdin.isatty() and sys.stdout.isatty() and infos:
        import questionary

        choice = questionary.select(
            "Which preset?",
            choices=[questionary.Choice(f"{i.name}  ({i.kind}) {i.description}", i.name) for i in infos],
        ).ask()
        if choice is None:
            raise KeyboardInterrupt
        return str(choice)
    names = {i.name for i in infos}
    return next((n for n in DEFAULT_PRESETS if n in names), DEFAULT_PRESETS[-1])


def _resolve_on_rank0() -> dict[str, Any]:
    """{"preset": resolved dict, "run_dir": str} or {"error": message}."""
    from pdt.presets.loader import PresetError, find_preset
    from pdt.runs import new_run_dir

    try:
        ref = _choose_preset_ref()
        preset = find_preset(ref)
    except PresetError as exc:
        return {"error": str(exc)}
    except KeyboardInterrupt:
        return {"error": "no preset chosen"}
    run_dir = os.environ.get("PDT_RUN_DIR") or str(new_run_dir(preset.name))
    record = _restart_record()
    if record is not None:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"preset": ref, "run_dir": run_dir}))
    return {"preset": preset.model_dump(mode="json"), "run_dir": run_dir}


def run_unattended() -> int:
    from pdt.train.distributed import DistributedSetupError, broadcast_object, setup, teardown, under_torchrun

    try:
        dist = setup() if under_torchrun() else None
    except DistributedSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        choice = _resolve_on_rank0() if dist is None or dist.is_main else None
        if dist is not None:
            choice = broadcast_object(choice, dist)
        assert choice is not None
        if "error" in choice:
            if dist is None or dist.is_main:
                print(f"error: {choice['error']}", file=sys.stderr)
            return 2
        from pdt.jobs import run_job
        from pdt.presets.loader import validate_preset

        preset = validate_preset(choice["preset"], source="(broadcast preset)")
        run_dir = Path(choice["run_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        rank = dist.rank if dist is not None else 0
        world = dist.world_size if dist is not None else 1
        return run_job(preset, run_dir, rank=rank, world_size=world)
    finally:
        teardown()
