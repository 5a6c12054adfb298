"""Job running: one preset → one run folder, its event sinks, stop signals and a clean exit code.

What it is: the registry from preset kind to job function, the `JobContext` a job receives
(emit, stop request, paths), SIGINT/SIGTERM handling (first signal: checkpoint at the next step
boundary and exit; second: die now) and the translation of user-facing failures into one
`error` event with a message saying what to do. What it is not: any training logic.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pdt.presets.schema import PresetBase
from pdt.runs import checkpoints_root
from pdt.telemetry.events import Done, Error, Event, Log, RunStarted
from pdt.telemetry.sinks import ConsolePrinter, Emitter, JsonlSink


@dataclass
class JobContext:
    """What a job may use: emit events, ask whether a stop was requested, where to write."""

    preset: PresetBase
    run_dir: Path
    checkpoints_dir: Path
    emit: Emitter
    rank: int = 0
    world_size: int = 1
    _stop: threading.Event = field(default_factory=threading.Event)

    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def request_stop(self) -> None:
        self._stop.set()

    def log(self, message: str, level: str = "info") -> None:
        self.emit(Log(level=level, message=message))


JobFn = Callable[[JobContext], str]


def _pretrain(ctx: JobContext) -> str:
    from pdt.train.pretrain import run_pretrain

    return run_pretrain(ctx)


def _dataset(ctx: JobContext) -> str:
    from pdt.data.build.pipeline import run_dataset

    return run_dataset(ctx)


def _curriculum(ctx: JobContext) -> str:
    from pdt.train.curriculum import run_curriculum

    return run_curriculum(ctx)


def _inference(ctx: JobContext) -> str:
    from pdt.infer.job import run_inference

    return run_inference(ctx)


def _pipeline(ctx: JobContext) -> str:
    from pdt.pipeline import run_pipeline

    return run_pipeline(ctx)


#: Preset kind → job.
JOBS: dict[str, JobFn] = {
    "pretrain": _pretrain,
    "dataset": _dataset,
    "curriculum": _curriculum,
    "inference": _inference,
    "pipeline": _pipeline,
}


class _SignalGuard:
    """First SIGINT/SIGTERM requests a graceful stop; the second one exits immediately."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.previous: dict[int, object] = {}
        self.first_signal, self.first_time = 0, 0.0

    def __enter__(self) -> _SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        if self.ctx.stop_requested():
            # torchrun relays a terminal's Ctrl-C to its workers as SIGTERM right after the SIGINT
            # they already got: that is the same stop, not a second one.
            relayed = signum != self.first_signal and time.monotonic() - self.first_time < 2.0
            if not relayed:
                os._exit(130)  # second stop: the last committed checkpoint is intact; leave now
            return
        self.first_signal, self.first_time = signum, time.monotonic()
        self.ctx.request_stop()
        self.ctx.log(
            f"received {signal.Signals(signum).name}: saving a checkpoint at the next step, "
            "then exiting (send it again to quit immediately)",
            level="warning",
        )

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def user_message(exc: BaseException) -> str | None:
    """A message for failures that are the user's to fix (bad data, preset, checkpoint, memory)."""
    from pdt.presets.loader import PresetError

    known: tuple[type[BaseException], ...] = (PresetError,)
    try:
        from pdt.data.sources import DataSourceError

        known += (DataSourceError,)
    except ImportError:
        pass
    for mod, name in (
        ("pdt.train.checkpoint", "CheckpointError"),
        ("pdt.model.trunk", "TrunkError"),
        ("pdt.data.tokenizer", "TokenizerError"),
        ("pdt.train.pretrain", "ResumeError"),
        ("pdt.train.distributed", "DistributedSetupError"),
        ("pdt.data.build.teacher_openai", "TeacherError"),
        ("pdt.train.curriculum", "CurriculumError"),
        ("pdt.train.curriculum_data", "CurriculumDataError"),
        ("pdt.train.lora", "LoraError"),
        ("pdt.model.pdt_model", "SidecarLoadError"),
        ("pdt.infer.job", "InferenceError"),
        ("pdt.pipeline", "PipelineError"),
    ):
        cls = getattr(sys.modules.get(mod), name, None)
        if isinstance(cls, type):
            known += (cls,)
    if isinstance(exc, known):
        return str(exc)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return oom_message(exc)
    return None


def oom_message(exc: BaseException) -> str:
    import torch

    lines = ["CUDA out of memory."]
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        gib = 1024**3
        lines.append(
            f"GPU: {total / gib:.1f} GiB total, {free / gib:.1f} GiB free; this process had "
            f"{torch.cuda.memory_allocated() / gib:.1f} GiB allocated, "
            f"{torch.cuda.max_memory_allocated() / gib:.1f} GiB at peak."
        )
    lines.append(
        "Training: lower train.micro_batch_size (raise train.grad_accum to keep the same batch), or "
        "train.seq_len / train.max_stream_tokens, then run again — it resumes from the last checkpoint. "
        "Inference: lower decode.max_new_tokens, or load the trunk in bf16 (trunk.dtype)."
    )
    return " ".join(lines)


def _failure_message(exc: BaseException, run_dir: Path, rank: int) -> str:
    """The user's message for a known failure; otherwise say it is a bug and keep the traceback."""
    message = user_message(exc)
    if message is not None:
        return message
    if rank == 0:
        (run_dir / "traceback.txt").write_text(traceback.format_exc(), encoding="utf-8")
    return (
        f"{type(exc).__name__}: {exc} — this is a bug in PDT Workbench, not in your preset; "
        f"the traceback is in {run_dir / 'traceback.txt'}"
    )


def run_job(
    preset: PresetBase,
    run_dir: Path,
    *,
    rank: int = 0,
    world_size: int = 1,
    console: bool = True,
    extra_sinks: list[Callable[[Event], None]] | None = None,
) -> int:
    """Run `preset` to completion. Returns the process exit code (0 ok, 1 failed, 130 stopped hard)."""
    emitter = Emitter(list(extra_sinks or []))
    jsonl = JsonlSink(run_dir / "events.jsonl") if rank == 0 else None
    if jsonl is not None:
        emitter.add(jsonl)
    if console and rank == 0:
        emitter.add(ConsolePrinter())
    ckpt_root = checkpoints_root() / preset.name
    ctx = JobContext(
        preset=preset,
        run_dir=run_dir,
        checkpoints_dir=ckpt_root,
        emit=emitter,
        rank=rank,
        world_size=world_size,
    )
    kind = getattr(preset, "kind", "?")
    emitter(
        RunStarted(
            run=run_dir.name, preset=preset.name, preset_kind=kind, pid=os.getpid(), world_size=world_size
        )
    )
    try:
        with _SignalGuard(ctx):
            status = JOBS[kind](ctx)
        emitter(Done(status=status))
        return 0
    except BaseException as exc:  # noqa: BLE001 - every failure must end in an error event
        message = _failure_message(exc, run_dir, rank)
        emitter(Error(message=message))
        if rank != 0:
            print(f"[rank {rank}] error: {message}", file=sys.stderr, flush=True)
        if isinstance(exc, KeyboardInterrupt):
            return 130
        return 1
    finally:
        if jsonl is not None:
            jsonl.close()
