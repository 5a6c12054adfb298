"""The `pipeline` job: run a list of presets in order, in this process, as one run.

What it is: `run_pipeline(ctx)`, the `pipeline` row of `pdt.jobs.JOBS`. Every listed preset is
resolved up front from the presets folder (`PDT_PRESETS_DIR`, else ./presets; nested pipelines are
flattened, a cycle is refused), so a typo fails before an hour of training, not after. Then each
preset runs through its own job function with a `JobContext` of its own — its checkpoints under
`checkpoints/<name>` as `run_job` gives them, its per-run files under `<run>/<i>-<name>/` — sharing
the pipeline's emitter (one `events.jsonl`: the view following the pipeline sees every child's
progress, metrics and, last, the inference demo's events) and its stop flag (a stop ends the
current child at its next step boundary, checkpointed, and no further child starts).
A finished child is not retrained: each job already returns "finished" at once when its
checkpoint says so (pretrain, curriculum) or skips the units whose files exist (dataset), so a
rerun of the pipeline walks quickly to the first unfinished step.
What it is not: any job's logic, a scheduler (children run one after another), or a multi-process
runner — under torchrun it refuses, since the dataset build and the demo run in one process.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path

from pdt.infer.inbox import INBOX_FILE
from pdt.jobs import JOBS, JobContext, user_message
from pdt.presets.inference import InferencePreset, PipelinePreset
from pdt.presets.loader import PresetError, find_preset, presets_dir
from pdt.presets.schema import PresetBase
from pdt.runs import checkpoints_root
from pdt.telemetry.events import Progress

#: The `stage` of the pipeline's own Progress events: one bar, "children started / children",
#: among the stage bars of the run screen. Constant (not per child) so the stage bars hold one
#: pipeline row, and a valid Textual id (letters, digits, `-`, `_`) since the bars are keyed by it.
PIPELINE_STAGE = "pipeline"


class PipelineError(Exception):
    """The pipeline cannot run, or one of its presets failed; the message names which and why."""


@dataclass(frozen=True)
class Step:
    """One preset to run: the resolved preset and the pipeline chain that listed it."""

    preset: PresetBase
    via: tuple[str, ...]

    @property
    def label(self) -> str:
        """`stage1`, or `sub/stage1` when a nested pipeline `sub` listed it."""
        return "/".join((*self.via[1:], self.preset.name))


def resolve_steps(pipeline: PipelinePreset, folder: Path | None = None) -> list[Step]:
    """Every preset the pipeline will run, in order (nested pipelines flattened).

    Raises PipelineError listing every missing or invalid preset and any cycle; nothing has run.
    """
    folder = folder or presets_dir()
    steps: list[Step] = []
    problems: list[str] = []
    _collect(pipeline, (pipeline.name,), folder, steps, problems)
    if problems:
        raise PipelineError(
            f"pipeline {pipeline.name}: "
            + (
                "; ".join(problems)
                if len(problems) == 1
                else f"{len(problems)} problems: " + "; ".join(problems)
            )
            + f" (presets are looked up in {folder}; nothing was run)"
        )
    return steps


def _collect(
    pipeline: PipelinePreset, chain: tuple[str, ...], folder: Path, steps: list[Step], problems: list[str]
) -> None:
    # Top-level entries: `presets[1] 'x'`; a nested pipeline's: `sub: presets[0] 'y'`.
    where = "".join(f"{name}: " for name in chain[1:])
    for i, ref in enumerate(pipeline.presets):
        try:
            preset = find_preset(ref, folder)
        except PresetError as exc:
            problems.append(f"{where}presets[{i}] {ref!r}: {exc}")
            continue
        if isinstance(preset, PipelinePreset):
            if preset.name in chain:
                cycle = " -> ".join((*chain, preset.name))
                problems.append(f"{where}presets[{i}] {ref!r}: a pipeline cannot contain itself ({cycle})")
                continue
            _collect(preset, (*chain, preset.name), folder, steps, problems)
            continue
        if getattr(preset, "kind", None) not in JOBS:
            problems.append(f"{where}presets[{i}] {ref!r}: no job runs kind {getattr(preset, 'kind', '?')!r}")
            continue
        steps.append(Step(preset, chain))


def child_run_dir(run_dir: Path, index: int, count: int, name: str) -> Path:
    """`<run>/<index>-<name>` (index 1-based, zero-padded so the folders sort in run order)."""
    return run_dir / f"{index:0{len(str(count))}d}-{name}"


def run_pipeline(ctx: JobContext) -> str:
    """Run every listed preset in order; "finished", or "stopped" when a stop was requested."""
    pipeline = ctx.preset
    assert isinstance(pipeline, PipelinePreset)
    if ctx.world_size > 1:
        raise PipelineError(
            f"pipeline {pipeline.name} runs its presets one after another in one process and cannot "
            f"run under torchrun ({ctx.world_size} processes): start it with `python main.py`, or run "
            "each training preset with torchrun separately "
            "(PDT_PRESET=<name> torchrun --nproc_per_node=N main.py)"
        )
    steps = resolve_steps(pipeline)
    n = len(steps)
    ctx.log(f"pipeline {pipeline.name}: {n} presets: " + " -> ".join(s.label for s in steps))
    for i, step in enumerate(steps):
        if ctx.stop_requested():  # also after a child that finished anyway (the serving demo does)
            return _stopped(ctx, steps, i)
        status = _run_step(ctx, step, i, n)
        if status == "stopped":
            return _stopped(ctx, steps, i + 1)
        if status != "finished":
            raise PipelineError(f"{step.label} failed: its job ended with status {status!r}")
    ctx.emit(Progress(step=n, total=n, stage=PIPELINE_STAGE))
    ctx.log(f"pipeline {pipeline.name}: all {n} presets finished")
    return "finished"


def _run_step(ctx: JobContext, step: Step, i: int, n: int) -> str:
    """Run one child through its job with its own context; a failure becomes a PipelineError."""
    preset = step.preset
    kind = getattr(preset, "kind", "?")
    run_dir = child_run_dir(ctx.run_dir, i + 1, n, preset.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(preset, InferencePreset):
        _link_inbox(ctx, run_dir)
    ctx.emit(Progress(step=i, total=n, stage=PIPELINE_STAGE))
    ctx.log(f"pipeline {i + 1}/{n}: {step.label} ({kind}); its files go to {run_dir}")
    child = JobContext(
        preset=preset,
        run_dir=run_dir,
        checkpoints_dir=checkpoints_root() / preset.name,
        emit=ctx.emit,
        rank=ctx.rank,
        world_size=ctx.world_size,
        _stop=ctx._stop,  # one stop flag: the pipeline's signal handler stops the running child
    )
    try:
        return JOBS[kind](child)
    except Exception as exc:  # noqa: BLE001 - KeyboardInterrupt/SystemExit pass through untouched
        raise PipelineError(f"{step.label} failed: {_child_message(exc, run_dir)}") from exc


def _child_message(exc: Exception, run_dir: Path) -> str:
    """The child's own message for a user-facing failure; else a bug report with its traceback."""
    message = user_message(exc)
    if message is not None:
        return message
    (run_dir / "traceback.txt").write_text(traceback.format_exc(), encoding="utf-8")
    return (
        f"{type(exc).__name__}: {exc} — this is a bug in PDT Workbench, not in your preset; "
        f"the traceback is in {run_dir / 'traceback.txt'}"
    )


def _link_inbox(ctx: JobContext, run_dir: Path) -> None:
    """The TUI's prompt box appends to the followed run's inbox (the pipeline's folder); the demo
    reads its own folder's. A symlink makes them one file, so "ask again" reaches the demo."""
    link = run_dir / INBOX_FILE
    if link.is_symlink() or link.exists():
        return
    try:
        link.symlink_to(Path("..") / INBOX_FILE)
    except OSError as exc:
        ctx.log(
            f"prompts typed in the view will not reach {run_dir.name}: cannot link its inbox ({exc})",
            level="warning",
        )


def _stopped(ctx: JobContext, steps: list[Step], next_index: int) -> str:
    left = [s.label for s in steps[next_index:]]
    ctx.log(
        "pipeline stopped"
        + (f"; not started: {', '.join(left)}" if left else "")
        + "; run it again to resume where it stopped",
        level="warning",
    )
    return "stopped"
