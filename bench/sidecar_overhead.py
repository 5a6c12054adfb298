"""Sidecar overhead: a frozen-trunk training step and a K = 3 decode step, sidecars on vs off.

Both sides run in the same process on the same trunk, inputs and sizes:
- train step, on: teacher-forced forward with the notes windows + CE loss + backward into every
  sidecar; off: the plain trunk forward + CE loss + backward through the same top layers (the
  input of the lowest instrumented layer is made to require grad), so the only difference is the
  sidecars themselves;
- decode step, on: one batched token for K = 3 streams with their windows (the notes' keys/values
  projected once, as the decoder does once per round of τ tokens); off: the same step with the
  hooks inactive.
CPU: the `pretrain_tiny` trunk shape, fp32. GPU: the `pretrain_124m` shape, bf16 autocast, eager.
Writes bench/results/sidecar_overhead.json (or $OUT/...) with a `records` list; prints a table last.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pdt.bus import section_pos_round, teacher_windows  # noqa: E402
from pdt.kernels import kernel_mode  # noqa: E402
from pdt.model.decode import StreamDecoder  # noqa: E402
from pdt.model.instrument import SidecarContext, decoder_layers  # noqa: E402
from pdt.model.pdt_model import GROUPS, PDTModel  # noqa: E402
from pdt.model.trunk import build_trunk  # noqa: E402
from pdt.presets.loader import load_preset_file  # noqa: E402
from pdt.presets.schema import BusConfig, SidecarConfig  # noqa: E402

K = 3


def _timed_pair(
    on: Callable[[], Any], off: Callable[[], Any], device: torch.device, warmup: int, reps: int
) -> tuple[float, float]:
    """Median seconds per call of each, measured alternately so drift hits both sides alike."""
    for _ in range(warmup):
        on()
        off()
    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(reps):
        for side, fn in enumerate((on, off)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[side].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


# Sidecars sized for each trunk: the defaults target ~124M and up; the 5M CPU trunk gets a smaller set.
SIDECARS = {
    "pretrain_124m": SidecarConfig(num_streams=K),
    "pretrain_tiny": SidecarConfig(num_streams=K, d_notes=64, adapter_rank=16, plan_vocab=4096, d_plan=32),
}


def _model(preset: str, device: torch.device) -> PDTModel:
    p = load_preset_file(ROOT / "presets" / f"{preset}.json")
    vocab = (p.tokenizer.vocab_size or 100276) + 1
    trunk = build_trunk(p.trunk, vocab, p.train.seq_len, vocab - 1, seed=0).to(device)
    model = PDTModel(trunk, SIDECARS[preset])
    model.set_trainable(list(GROUPS))
    return model


def _teacher_batch(model: PDTModel, batch: int, seq: int, device: torch.device) -> tuple:
    """(ids [R, T + 1], stream ids [R], teacher-forced windows, sidecar positions [R, T]), R = batch·K:
    16-token prompts, then rounds of 32 tokens with their notes."""
    rows = batch * K
    ids = torch.randint(0, model.trunk.config.vocab_size, (rows, seq + 1), device=device)
    streams = torch.arange(rows, device=device) % K
    start = torch.full((rows,), 16, device=device)
    pos_round = section_pos_round(start, seq, 32)  # [R, T]
    rn = int(pos_round.max()) + 1
    notes = torch.randn(batch, K, rn, model.cfg.d_notes, device=device)
    snap = torch.randn(batch, model.cfg.d_notes, device=device)
    present = torch.ones(batch, K, rn, dtype=torch.bool, device=device)
    window = teacher_windows(snap, notes, present, pos_round, BusConfig(), model.cfg.max_rounds)
    positions = torch.arange(seq, device=device)[None, :] >= start[:, None]  # [R, T]
    return ids, streams, window, positions


def _train_fns(
    model: PDTModel,
    batch: int,
    seq: int,
    device: torch.device,
    dtype: torch.dtype | None,
    mark: Callable[[str], None] = lambda _phase: None,
):
    """(on, off): one training step each. `mark("forward")` is called once the forward has returned
    (bench/profile_sidecars.py times the phases with it)."""
    ids, streams, window, positions = _teacher_batch(model, batch, seq, device)
    first = decoder_layers(model.trunk)[model.layer_ids[0]]
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast(device.type, enabled=False)
    )

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))

    def on() -> None:
        with autocast:
            out = model.forward_teacher(ids[:, :-1], None, streams, window, sidecar_positions=positions)
        mark("forward")
        loss_of(out.logits).backward()
        model.zero_grad(set_to_none=True)

    def grad_from_here(_mod: Any, args: tuple, kwargs: dict) -> Any:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        hidden.requires_grad_(True)

    def off() -> None:
        handle = first.register_forward_pre_hook(grad_from_here, with_kwargs=True)
        try:
            with autocast:
                out = model.forward_base(ids[:, :-1])
            mark("forward")
            loss_of(out.logits).backward()
        finally:
            handle.remove()

    return on, off


def _decode_fns(model: PDTModel, device: torch.device, dtype: torch.dtype | None):
    decoder = StreamDecoder(model)
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast(device.type, enabled=False)
    )
    with autocast:
        state, _ = decoder.prefill(list(range(1, 65)), rows=K)
    n = 1 + K * 8
    ctx = SidecarContext(
        stream_ids=torch.arange(K, device=device),
        notes=torch.randn(K, n, model.cfg.d_notes, device=device),
        producer=torch.arange(n, device=device).remainder(K + 1).expand(K, n),
        rounds=torch.zeros(K, n, dtype=torch.long, device=device),
        visible=torch.ones(K, n, dtype=torch.bool, device=device),
        kv_cache={},  # one window for the whole measurement, as for the τ tokens of a round
    )
    tokens = torch.tensor([5, 6, 7], device=device)
    active = torch.ones(K, dtype=torch.bool, device=device)

    def step(context: SidecarContext | None) -> None:
        with autocast, torch.no_grad():
            decoder.step(state, tokens, active, context)
        decoder.rollback(state, 0, int(state.lengths[0]) - 1)  # keep the cache length steady
        decoder.rollback(state, 1, int(state.lengths[1]) - 1)
        decoder.rollback(state, 2, int(state.lengths[2]) - 1)

    return (lambda: step(ctx)), (lambda: step(None)), state


def measure(device: torch.device, batch: int, mode: str = "eager") -> dict[str, Any]:
    """Eager mode (torch.compile of the sidecar math was tried on the H100: no gain, 1.161 vs 1.156).

    `batch` examples → batch × K rows of `seq` tokens in the training step.
    """
    gpu = device.type == "cuda"
    preset, seq, dtype = ("pretrain_124m", 1024, torch.bfloat16) if gpu else ("pretrain_tiny", 128, None)
    model = _model(preset, device)
    # CPU: 30 pairs. On the shared 2-core machine the plain side's step time wanders by ±10%, and 12
    # pairs gave train ratios from 1.09 to 1.23 for the same code in one session.
    reps = 20 if gpu else 30
    on, off = _train_fns(model, batch, seq, device, dtype)
    t_on, t_off = _timed_pair(on, off, device, 3, reps)
    d_on, d_off, _state = _decode_fns(model, device, dtype)
    s_on, s_off = _timed_pair(d_on, d_off, device, 10, 200)
    report = model.parameter_report()
    return {
        "device": torch.cuda.get_device_name(device) if gpu else "cpu",
        "trunk": preset,
        "mode": mode,
        "kernels": kernel_mode(),
        "train_step_ratio": t_on / t_off,
        "decode_step_ratio": s_on / s_off,
        "train_step_on_s": t_on,
        "train_step_off_s": t_off,
        "decode_step_on_s": s_on,
        "decode_step_off_s": s_off,
        "rows": batch * K,
        "seq_len": seq,
        "precision": "bf16" if gpu else "fp32",
        "sidecar_params": report["sidecars"],
        "percent_of_trunk": report["percent_of_trunk"],
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main() -> None:
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # GPU: 12 and 24 rows of 1024 tokens (the 124M pretrain preset's micro-batch is 32 x 1024).
    fresh = [measure(device, batch) for batch in ((4, 8) if device.type == "cuda" else (2,))]
    out_dir = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "sidecar_overhead.json"
    existing = json.loads(path.read_text()) if path.is_file() else {"records": []}
    records = [r for r in existing.get("records", []) if r.get("device") != fresh[0]["device"]] + fresh
    path.write_text(json.dumps({"records": records}, indent=2))
    print(
        f"\n{'device':<24} {'trunk':<15} {'rows':>5} {'train on/off':>13} "
        f"{'decode on/off':>14} {'% trunk':>8}"
    )
    for r in records:
        print(
            f"{r['device']:<24} {r['trunk']:<15} {r['rows']:>5} "
            f"{r['train_step_ratio']:>13.3f} "
            f"{r['decode_step_ratio']:>14.3f} {r['percent_of_trunk']:>7.2f}%"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
