"""Kernels of the PDT sidecars, behind stable dispatch functions.

What it is: the entry points the sidecars call — `grouped_adapter` (token-level per-stream
bottleneck MLP), `row_adapter` (the same when each row is one stream), `snc_attend` (attention
over the visible notes window, exact zero for an empty window) and `picked_logprobs` (log-softmax
over the vocabulary read at a few ids per row: the curriculum's LM CE and top-k KD), `snc_folded`
(a decode step's whole SNC layer with the round's window folded into its weights: two launches),
`skinny_linear` (`F.linear` for a few rows: the decode step's LM head) —
and the choice of implementation: the fused Triton kernels (`snc_attend_triton`,
`row_adapter_triton`, `picked_logprobs_triton`, `snc_folded_triton`, `skinny_linear_triton`:
kernel + launcher + autograd Function each, Liger-Kernel style) when the tensors are on CUDA,
triton imports and the kernel supports the input; otherwise the plain PyTorch references of
`pdt.kernels.reference` (for `skinny_linear`: `F.linear`), the ground truth both are tested
against. `grouped_adapter` always runs the reference.
`PDT_KERNELS` forces the choice: `auto` (default), `reference`, or `triton` (an input the Triton
path cannot take is then an error naming the reason, not a silent fallback; with
`TRITON_INTERPRET=1` CPU tensors are accepted and run in Triton's interpreter, which is how CI
tests the kernels). Triton is imported lazily, on the first CUDA call: `import pdt.kernels`
works where triton is missing.
What it is not: the sidecar modules (`pdt.model.sidecars`) nor their parameters.

The kernel modules carry a `_triton` suffix on purpose: a submodule named `snc_attend` would be
bound over the function `snc_attend` of this package by the import system on its first import.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

from pdt.kernels import reference

__all__ = [
    "KernelUnavailableError",
    "grouped_adapter",
    "kernel_mode",
    "picked_logprobs",
    "reference",
    "row_adapter",
    "skinny_linear",
    "snc_attend",
    "snc_folded",
]

MODES = ("auto", "reference", "triton")


class KernelUnavailableError(RuntimeError):
    """`PDT_KERNELS=triton` was asked for an input the Triton kernels cannot take."""


def kernel_mode() -> str:
    """The `PDT_KERNELS` setting, checked: auto | reference | triton. Read at every call (cheap),
    so a test or a session can switch it without reloading."""
    mode = os.environ.get("PDT_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"PDT_KERNELS must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def _device_reason(tensors: tuple[torch.Tensor, ...], mode: str) -> str | None:
    """Why the tensors' device rules the Triton path out (None: it does not)."""
    if all(t.is_cuda for t in tensors):
        return None
    if mode == "triton" and os.environ.get("TRITON_INTERPRET") == "1" and not any(t.is_cuda for t in tensors):
        return None  # the interpreter runs the kernels on CPU tensors (tests)
    devices = sorted({str(t.device) for t in tensors})
    return f"tensors on {', '.join(devices)}: the Triton kernels run on CUDA (or CPU with TRITON_INTERPRET=1)"


_MODULES: dict[str, ModuleType] = {}


def _kernel_module(name: str) -> tuple[ModuleType | None, str | None]:
    """(the Triton kernel module, None), or (None, why it cannot be imported)."""
    if name in _MODULES:
        return _MODULES[name], None
    if importlib.util.find_spec("triton") is None:
        return None, "triton is not installed"
    try:
        _MODULES[name] = importlib.import_module(f"pdt.kernels.{name}")
    except ImportError as exc:  # a triton too old or broken for the kernels
        return None, f"importing the kernels failed: {exc}"
    return _MODULES[name], None


def _triton_op(
    op: str, module: str, tensors: tuple[torch.Tensor, ...], args: tuple, kwargs: dict | None = None
) -> ModuleType | None:
    """The kernel module to run `op` on, or None for the reference; raises under PDT_KERNELS=triton.
    `args` and `kwargs` are what the kernel module's `unsupported` checks."""
    mode = kernel_mode()
    if mode == "reference":
        return None
    reason = _device_reason(tensors, mode)
    kernels = None
    if reason is None:
        kernels, reason = _kernel_module(module)
    if kernels is not None:
        reason = kernels.unsupported(*args, **(kwargs or {}))
    if reason is None:
        return kernels
    if mode == "triton":
        raise KernelUnavailableError(f"PDT_KERNELS=triton, but {op} cannot run on Triton: {reason}")
    return None


def grouped_adapter(
    x: torch.Tensor,
    stream_ids: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
) -> torch.Tensor:
    """x [N, D], stream_ids [N] → [N, D]: `gelu(x @ w_down[s] + b_down[s]) @ w_up[s] + b_up[s]` per row.

    Weights: w_down [K, D, r], b_down [K, r], w_up [K, r, D], b_up [K, D]. Always the reference
    (`pdt.kernels.reference.grouped_adapter`): the sidecars use `row_adapter`.
    """
    return reference.grouped_adapter(x, stream_ids, w_down, b_down, w_up, b_up)


def row_adapter(
    h: torch.Tensor,
    stream_ids: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    *,
    gate: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    residual: bool = False,
) -> torch.Tensor:
    """h [R, T, D], stream_ids [R] → [R, T, D]: the adapter when each row is one stream (no sync).

    Epilogue, fused into the Triton kernels: `gate` [K] logits scale the output by sigmoid(gate[s]),
    `positions` [R, T] bool zeroes it off those tokens, `residual` returns `h + ...`. See
    `pdt.kernels.reference.row_adapter`.
    """
    args = (h, stream_ids, w_down, b_down, w_up, b_up)
    epilogue = {"gate": gate, "positions": positions}
    extra = tuple(t for t in (gate, positions) if t is not None)
    kernels = _triton_op("row_adapter", "row_adapter_triton", (*args, *extra), args, epilogue)
    if kernels is not None:
        return kernels.row_adapter_triton(*args, **epilogue, residual=residual)
    return reference.row_adapter(*args, **epilogue, residual=residual)


def snc_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [R, H, T, dh], k/v [R, H, N, dh], mask [R, T, N] bool → [R, H, T, dh]; no visible note → 0.

    See `pdt.kernels.reference.snc_attend`. The Triton path may return a non-contiguous view
    (laid out [R, T, H, dh]); the values are the same.
    """
    kernels = _triton_op("snc_attend", "snc_attend_triton", (q, k, v, mask), (q, k, v, mask))
    if kernels is not None:
        return kernels.snc_attend_triton(q, k, v, mask)
    return reference.snc_attend(q, k, v, mask)


def picked_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logits [N, V], ids [N, C] int64 → [N, C] fp32: log_softmax(logits) at ids, differentiable.

    See `pdt.kernels.reference.picked_logprobs`; the Triton path reads the logits once forward and
    once backward in their own dtype (no fp32 [N, V] copy)."""
    kernels = _triton_op("picked_logprobs", "picked_logprobs_triton", (logits, ids), (logits, ids))
    if kernels is not None:
        return kernels.picked_logprobs_triton(logits, ids)
    return reference.picked_logprobs(logits, ids)


def snc_folded(
    base: torch.Tensor,
    hidden: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
    heads: int,
    eps: float,
) -> torch.Tensor:
    """base, hidden [R, T, D], a `FoldedWindow`'s keys [R, D, H·N], values [R, H·N, D], bias [R, 1, H·N]
    → base + the SNC delta, [R, T, D]. See `pdt.kernels.reference.snc_folded`; the Triton path is two
    launches a layer (inference only)."""
    args = (base, hidden, keys, values, bias, heads, eps)
    if not base.is_cuda and kernel_mode() != "triton":  # a CPU decode token: no dispatch work
        return reference.snc_folded(*args, check=False)  # the fold made these shapes
    reference.check_folded_shapes(base, hidden, keys, values, bias, heads)
    kernels = _triton_op("snc_folded", "snc_folded_triton", (base, hidden, keys, values, bias), args)
    if kernels is not None:
        return kernels.snc_folded_triton(*args)
    return reference.snc_folded(*args, check=False)  # checked above


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x [N, D] with N ≤ 16 rows (inference): on CUDA one Triton
    launch that reads the weight once (`skinny_linear_triton`), else `F.linear` itself."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    kernels = _triton_op("skinny_linear", "skinny_linear_triton", tensors, (x, weight, bias))
    if kernels is not None:
        return kernels.skinny_linear_triton(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)
