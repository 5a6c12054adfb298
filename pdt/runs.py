"""Runs on disk: run folders under `logs/`, job child processes, and per-preset status.

What it is: the small core API the TUI (and tests) use to start a job as a child process
(`python main.py` unattended, or `torchrun` for several processes), to stop it politely, to
find runs to attach to or replay, and to read a preset's checkpoint status cheaply. What it is
not: the job itself (see `pdt.jobs`) nor a view. Imports neither torch nor textual.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MAIN_PY = REPO_ROOT / "main.py"


def logs_root() -> Path:
    return Path(os.environ.get("PDT_LOGS_DIR", "logs"))


def checkpoints_root() -> Path:
    return Path(os.environ.get("PDT_CHECKPOINTS_DIR", "checkpoints"))


def new_run_dir(preset_name: str) -> Path:
    """A fresh `logs/<preset>-<YYYYmmdd-HHMMSS>[-n]` folder (created)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = logs_root() / f"{preset_name}-{stamp}"
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")


@dataclass(frozen=True)
class RunInfo:
    """A run folder and what its last events say."""

    path: Path
    preset: str
    status: str  # running | finished | stopped | failed | unknown
    started: float

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"


def _tail_lines(path: Path, max_bytes: int = 65536) -> list[str]:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - max_bytes))
        return fh.read().decode("utf-8", errors="replace").splitlines()


def run_status(run_dir: Path) -> RunInfo | None:
    """Status of one run folder from its first and last events; None if it has no events."""
    events = run_dir / "events.jsonl"
    if not events.is_file():
        return None
    preset, started, status = run_dir.name, events.stat().st_mtime, "unknown"
    try:
        with open(events, encoding="utf-8") as fh:
            first = json.loads(fh.readline() or "{}")
        if first.get("kind") == "run_started":
            preset, started = first.get("preset", preset), float(first.get("t", started))
            pid = int(first.get("pid", 0))
            status = "running" if pid and _pid_alive(pid) else "unknown"
        for line in reversed(_tail_lines(events)):
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue
            if data.get("kind") == "done":
                status = str(data.get("status", "finished"))
                break
            if data.get("kind") == "error":
                status = "failed"
                break
    except (OSError, json.JSONDecodeError, ValueError):
        pass
    return RunInfo(run_dir, preset, status, started)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_runs(root: Path | None = None) -> list[RunInfo]:
    """Every run under `logs/`, newest first."""
    root = root or logs_root()
    if not root.is_dir():
        return []
    infos = [run_status(p) for p in root.iterdir() if p.is_dir()]
    return sorted((i for i in infos if i is not None), key=lambda i: i.started, reverse=True)


def data_root() -> Path:
    return Path(os.environ.get("PDT_DATA_DIR", "data"))


def preset_status(preset_name: str, kind: str = "") -> dict[str, object]:
    """Status of a preset. Training kinds: `checkpoints/<name>/current/state.json`; a dataset: whether
    `data/processed/<name>/export/manifest.json` (written last by the build) exists.

    Returns {"step": int | None, "finished": bool, "total_steps": int | None}. Cheap: no hashing.
    """
    if kind == "dataset":
        from pdt.data.build.layout import build_root  # light: no torch, no pyarrow

        built = (build_root(preset_name) / "export" / "manifest.json").is_file()
        return {"step": None, "finished": built, "total_steps": None}
    state_path = checkpoints_root() / preset_name / "current" / "state.json"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {"step": None, "finished": False, "total_steps": None}
    return {
        "step": state.get("step"),
        "finished": bool(state.get("finished", False)),
        "total_steps": state.get("total_steps"),
    }


def job_command(nproc: int = 1) -> list[str]:
    """The command line of a job child: the same main.py, unattended; torchrun for nproc > 1."""
    if nproc > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(MAIN_PY),
        ]
    return [sys.executable, str(MAIN_PY)]


def launch_job(
    preset_ref: str, run_dir: Path, nproc: int = 1, log_file: Path | None = None
) -> subprocess.Popen:
    """Start a job as a child process in its own process group, writing `run_dir/events.jsonl`.

    stdout/stderr go to `run_dir/console.log` so a crash's traceback is kept for the user.
    """
    env = dict(
        os.environ, PDT_PRESET=preset_ref, PDT_RUN_DIR=str(run_dir), PDT_HEADLESS="1", PYTHONUNBUFFERED="1"
    )
    env["PDT_INFER_SERVE"] = "1"  # an inference job (or a pipeline's demo) stays up for the prompt box
    log_file = log_file or run_dir / "console.log"
    out = open(log_file, "ab")
    try:
        return subprocess.Popen(
            job_command(nproc),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=os.getcwd(),
        )
    finally:
        out.close()


def stop_job(proc: subprocess.Popen, force: bool = False) -> None:
    """First call: SIGINT to the job's group (it checkpoints and exits). `force`: SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL if force else signal.SIGINT)
    except ProcessLookupError:
        pass
