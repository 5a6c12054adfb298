"""The Triton path of the sidecar kernels: interpreter runs on CPU, the dispatch, and GPU checks.

- CPU (default run): `interpreted_cases.py` in a child pytest with `TRITON_INTERPRET=1` (the
  interpreter must be chosen before triton is imported, so not in this shared process): forward
  and every gradient against the reference at fp32 1e-5 on odd shapes, exact zeros for empty
  windows, an expanded (stride-0) mask. Plus the dispatch rules of `PDT_KERNELS`, and that
  `import pdt.kernels` neither imports triton nor needs it.
- GPU (`-m gpu`, on the device): bf16 at the training shapes against an fp32 reference, with the
  STYLE.md 1e-2 relative tolerance, the bf16 reference's own error as a yardstick, decode shapes,
  fp32 at 1e-5, and bitwise-deterministic weight gradients.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import pdt.kernels as kernels
from pdt.kernels import reference

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_triton
def test_kernels_in_the_triton_interpreter(tmp_path: Path) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PDT_KERNELS="triton", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "interpreted_cases.py")]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]


def _attend_args() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 16, generator=gen) for n in (3, 4, 4))
    return q, k, v, torch.rand(2, 3, 4, generator=gen) < 0.5


def test_auto_and_reference_modes_on_cpu_use_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    args = _attend_args()
    for mode in ("auto", "reference", ""):
        monkeypatch.setenv("PDT_KERNELS", mode)
        assert torch.equal(kernels.snc_attend(*args), reference.snc_attend(*args))


def test_forced_triton_names_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDT_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(kernels.KernelUnavailableError, match="snc_attend.*CUDA"):
        kernels.snc_attend(*_attend_args())
    h, ids = torch.randn(2, 3, 8), torch.tensor([0, 1])
    weights = (torch.randn(2, 8, 4), torch.randn(2, 4), torch.randn(2, 4, 8), torch.randn(2, 8))
    with pytest.raises(kernels.KernelUnavailableError, match="row_adapter.*CUDA"):
        kernels.row_adapter(h, ids, *weights)


def test_a_bad_mode_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDT_KERNELS", "fast")
    with pytest.raises(ValueError, match="PDT_KERNELS must be one of auto, reference, triton"):
        kernels.snc_attend(*_attend_args())


def test_import_is_lazy_and_works_without_triton() -> None:
    """`import pdt.kernels` does not import triton; with triton unimportable the sidecars still run
    on the reference and a forced Triton path says why it cannot."""
    script = (
        "import sys\n"
        "import pdt.kernels, pdt.model.sidecars\n"
        "assert 'triton' not in sys.modules, 'import pdt.kernels imported triton'\n"
        "sys.modules['triton'] = None  # from here on `import triton` fails\n"
        "import torch\n"
        "from pdt.kernels import KernelUnavailableError, snc_attend\n"
        "q = torch.randn(1, 1, 2, 16); m = torch.ones(1, 2, 3, dtype=torch.bool)\n"
        "k = torch.randn(1, 1, 3, 16)\n"
        "assert snc_attend(q, k, k, m).shape == (1, 1, 2, 16)\n"
        "import os; os.environ.update(PDT_KERNELS='triton', TRITON_INTERPRET='1')\n"
        "try:\n"
        "    snc_attend(q, k, k, m)\n"
        "except KernelUnavailableError as exc:\n"
        "    assert 'triton is not installed' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('forced triton without triton did not fail')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PDT_KERNELS", "TRITON_INTERPRET")}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]


# --- GPU ---------------------------------------------------------------------------------------


def assert_rel_close(name: str, ours: torch.Tensor, ref_bf16: torch.Tensor, truth: torch.Tensor) -> None:
    """Normalised by the largest |truth|: within 1e-2 (STYLE.md bf16), and no worse than twice the
    bf16 reference's own error (plus 1e-3) — the kernel must be as good as what it replaces."""
    scale = truth.abs().max().clamp_min(1e-6)
    torch.testing.assert_close(
        ours.float() / scale, truth / scale, atol=1e-2, rtol=1e-2, msg=lambda m: f"{name}: {m}"
    )
    ours_err = ((ours.float() - truth).abs().max() / scale).item()
    ref_err = ((ref_bf16.float() - truth).abs().max() / scale).item()
    assert ours_err <= 2 * ref_err + 1e-3, f"{name}: Triton error {ours_err:.2e} vs reference {ref_err:.2e}"


def assert_fp32_close(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32 at 1e-5 relative to the largest |ref|: sums over hundreds of tokens in another order
    (cuBLAS vs the kernels' blocks) differ by ~1e-5 of an element of size ~1, not of the sum."""
    scale = ref.abs().max().clamp_min(1e-6)
    torch.testing.assert_close(ours / scale, ref / scale, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def _attend_case(rows: int, heads: int, t: int, n: int, dh: int, expand: bool) -> tuple:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(rows, heads, x, dh, device="cuda", generator=gen) for x in (t, n, n))
    if expand:
        mask = (torch.rand(rows, n, device="cuda", generator=gen) < 0.5)[:, None].expand(rows, t, n)
    else:
        mask = torch.rand(rows, t, n, device="cuda", generator=gen) < 0.5
    mask[0] = False  # an empty row (for the expanded mask: its one shared window)
    grad = torch.randn(rows, heads, t, dh, device="cuda", generator=gen)
    return (q, k, v), mask, grad


def _attend_with_grads(
    fn: Callable[..., torch.Tensor], qkv: tuple, mask: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype
) -> list:
    leaves = [x.to(dtype).requires_grad_() for x in qkv]
    out = fn(*leaves, mask)
    return [out, *torch.autograd.grad(out, leaves, grad.to(dtype))]


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "shape",
    [(12, 4, 1024, 40, 32, False), (12, 4, 1024, 97, 48, False), (3, 4, 1, 25, 48, True)],
    ids=["train-brief", "train-124m", "decode"],
)
def test_snc_attend_bf16_on_gpu(shape: tuple) -> None:
    from pdt.kernels.snc_attend_triton import snc_attend_triton

    qkv, mask, grad = _attend_case(*shape)
    rounded = [x.bfloat16().float() for x in qkv]  # the truth sees the same bf16 inputs
    truth = _attend_with_grads(reference.snc_attend, rounded, mask, grad.bfloat16(), torch.float32)
    ours = _attend_with_grads(snc_attend_triton, qkv, mask, grad, torch.bfloat16)
    ref = _attend_with_grads(reference.snc_attend, qkv, mask, grad, torch.bfloat16)
    for name, a, b, c in zip(["out", "dq", "dk", "dv"], ours, ref, truth, strict=True):
        assert a.dtype == torch.bfloat16 and torch.isfinite(a).all(), name
        assert_rel_close(name, a, b, c)
    assert not ours[0][0].any() and not ours[1][0].any() and not ours[2][0].any()  # the empty row


@gpu
@needs_cuda
def test_snc_attend_fp32_on_gpu() -> None:
    from pdt.kernels.snc_attend_triton import snc_attend_triton

    qkv, mask, grad = _attend_case(3, 4, 200, 70, 48, False)
    ours = _attend_with_grads(snc_attend_triton, qkv, mask, grad, torch.float32)
    ref = _attend_with_grads(reference.snc_attend, qkv, mask, grad, torch.float32)
    for name, a, b in zip(["out", "dq", "dk", "dv"], ours, ref, strict=True):
        assert_fp32_close(name, a, b)


def _adapter_case(rows: int, t: int, d: int, r: int, k: int) -> tuple:
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(rows, t, d, device="cuda", generator=gen)
    scales = [d**-0.5, 0.1, r**-0.5, 0.1]
    shapes = [(k, d, r), (k, r), (k, r, d), (k, d)]
    weights = [torch.randn(s, device="cuda", generator=gen) * c for s, c in zip(shapes, scales, strict=True)]
    ids = torch.arange(rows, device="cuda") % k
    return h, ids, weights, torch.randn(rows, t, d, device="cuda", generator=gen)


def _adapter_with_grads(
    fn: Callable[..., torch.Tensor], h: torch.Tensor, ids: torch.Tensor, weights: list, grad: torch.Tensor
) -> list:
    leaves = [h.requires_grad_(), *(w.requires_grad_() for w in weights)]
    out = fn(leaves[0], ids, *leaves[1:])
    return [out, *torch.autograd.grad(out, leaves, grad.to(out.dtype))]


@gpu
@needs_cuda
@pytest.mark.parametrize("shape", [(12, 1024, 768, 64, 3), (3, 1, 768, 64, 3)], ids=["train", "decode"])
def test_row_adapter_bf16_on_gpu(shape: tuple) -> None:
    """bf16 activations with fp32 weights (autocast training): products in bf16, grads in fp32."""
    from pdt.kernels.row_adapter_triton import row_adapter_triton

    h, ids, weights, grad = _adapter_case(*shape)
    hb, grad = h.bfloat16(), grad.bfloat16().float()  # the truth sees the same bf16 inputs
    fresh = [w.clone() for w in weights]
    truth = _adapter_with_grads(reference.row_adapter, hb.float(), ids, fresh, grad)
    ours = _adapter_with_grads(row_adapter_triton, hb.clone(), ids, [w.clone() for w in weights], grad)
    ref = _adapter_with_grads(reference.row_adapter, hb.clone(), ids, [w.clone() for w in weights], grad)
    names = ["out", "dh", "dw_down", "db_down", "dw_up", "db_up"]
    for name, a, b, c in zip(names, ours, ref, truth, strict=True):
        assert a.dtype == b.dtype, f"{name}: {a.dtype} vs the reference's {b.dtype}"
        assert_rel_close(name, a, b, c)


@gpu
@needs_cuda
def test_row_adapter_epilogue_bf16_on_gpu() -> None:
    """The sidecar's call at the training shape: gate, positions mask (16-token prompts) and residual
    add fused into the kernels, bf16 against the fp32 truth; masked tokens are exactly h. (The gate's
    gradient is checked in fp32 by the interpreter cases.)"""
    from pdt.kernels.row_adapter_triton import row_adapter_triton

    h, ids, weights, grad = _adapter_case(12, 1024, 768, 64, 3)
    gate = torch.tensor([-4.0, 0.5, 3.0], device="cuda")  # the init value, and two open gates
    positions = (
        torch.arange(1024, device="cuda")[None, :] >= 16 * (1 + torch.arange(12, device="cuda"))[:, None]
    )

    def epilogue(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        return lambda x, i, *w: fn(x, i, *w, gate=gate, positions=positions, residual=True)

    hb, grad = h.bfloat16(), grad.bfloat16().float()
    truth = _adapter_with_grads(
        epilogue(reference.row_adapter), hb.float(), ids, [w.clone() for w in weights], grad
    )
    ours = _adapter_with_grads(
        epilogue(row_adapter_triton), hb.clone(), ids, [w.clone() for w in weights], grad
    )
    ref = _adapter_with_grads(
        epilogue(reference.row_adapter), hb.clone(), ids, [w.clone() for w in weights], grad
    )
    names = ["out", "dh", "dw_down", "db_down", "dw_up", "db_up"]
    for name, a, b, c in zip(names, ours, ref, truth, strict=True):
        assert a.dtype == b.dtype, f"{name}: {a.dtype} vs the reference's {b.dtype}"
        assert_rel_close(name, a, b, c)
    assert torch.equal(ours[0][~positions], hb[~positions])  # the prompt: the trunk's values, bit for bit


@gpu
@needs_cuda
def test_row_adapter_fp32_on_gpu_and_deterministic() -> None:
    from pdt.kernels.row_adapter_triton import row_adapter_triton

    h, ids, weights, grad = _adapter_case(6, 300, 200, 40, 4)  # stream 3 unused → exact zero grads
    ids = torch.tensor([0, 2, 0, 1, 2, 0], device="cuda")
    runs = [_adapter_with_grads(row_adapter_triton, h.clone(), ids, [w.clone() for w in weights], grad)]
    runs.append(_adapter_with_grads(row_adapter_triton, h.clone(), ids, [w.clone() for w in weights], grad))
    ref = _adapter_with_grads(reference.row_adapter, h.clone(), ids, [w.clone() for w in weights], grad)
    names = ["out", "dh", "dw_down", "db_down", "dw_up", "db_up"]
    for name, a, b, again in zip(names, runs[0], ref, runs[1], strict=True):
        assert_fp32_close(name, a, b)
        assert torch.equal(a, again), f"{name} differs between two identical runs"
    assert all(not g[3].any() for g in runs[0][2:])


@gpu
@needs_cuda
def test_picked_logprobs_bf16_on_gpu() -> None:
    """The curriculum's shape (section tokens × the 124M vocabulary, target + top-32 ids) in bf16:
    values and the logits' gradient against the fp32 reference, no worse than the bf16 reference."""
    from pdt.kernels.picked_logprobs_triton import picked_logprobs_triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    truth_logits = torch.randn(4096, 50257, device="cuda", generator=gen) * 4
    ids = torch.randint(0, 50257, (4096, 33), device="cuda", generator=gen)
    ids[::3, 1] = ids[::3, 0]  # targets that are also teacher ids
    weights = torch.randn(4096, 33, device="cuda", generator=gen)
    logits = truth_logits.bfloat16()

    def run(fn: Callable, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().requires_grad_()
        out = fn(x, ids)
        (grad,) = torch.autograd.grad((out * weights).sum(), x)
        return out, grad

    truth = run(reference.picked_logprobs, logits.float())
    ref_bf16 = run(reference.picked_logprobs, logits)
    ours = run(picked_logprobs_triton, logits)
    assert ours[1].dtype == torch.bfloat16
    for name, a, b, t in zip(("values", "d logits"), ours, ref_bf16, truth, strict=True):
        assert_rel_close(name, a, b, t)


@gpu
@needs_cuda
def test_snc_folded_bf16_on_gpu() -> None:
    """The 124M preset's decode shape (3 rows, D 768, 4 heads × 25 notes) in bf16: within the bf16
    tolerance of the fp32 reference and no worse than the bf16 reference; an empty window is exact."""
    from pdt.kernels.snc_folded_triton import snc_folded_triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, d, heads, n = 3, 768, 4, 25
    base = torch.randn(rows, 1, d, device="cuda", generator=gen)
    hidden = torch.randn(rows, 1, d, device="cuda", generator=gen) * 8
    keys = torch.randn(rows, d, heads * n, device="cuda", generator=gen) * 0.02
    values = torch.randn(rows, heads * n, d, device="cuda", generator=gen)
    bias = torch.zeros(rows, 1, heads * n, device="cuda")
    bias[1, 0, torch.rand(heads * n, device="cuda", generator=gen) < 0.5] = float("-inf")
    values[0] = 0  # row 0: an empty window (fold_window's layout: values 0, bias 0)
    args = [x.bfloat16() for x in (base, hidden, keys, values, bias)]
    truth = reference.snc_folded(*[x.float() for x in args], heads, 1e-6)
    ref = reference.snc_folded(*args, heads, 1e-6)
    ours = snc_folded_triton(*args, heads, 1e-6)
    assert ours.dtype == torch.bfloat16 and torch.isfinite(ours).all()
    assert_rel_close("out", ours, ref, truth)
    assert torch.equal(ours[0], args[0][0])


@gpu
@needs_cuda
def test_row_adapter_decode_kernels_bf16_on_gpu() -> None:
    """A decode step (3 rows × 1 token, bf16, no grad: the two decode kernels) with the sidecar's
    epilogue against the fp32 reference, no worse than the bf16 reference."""
    from pdt.kernels.row_adapter_triton import row_adapter_triton

    h, ids, weights, _ = _adapter_case(3, 1, 768, 64, 3)
    hb = h.bfloat16()
    wb = [w.detach().bfloat16() for w in weights]
    gate = torch.tensor([0.3, -1.2, 2.0], device="cuda")
    kw = {"gate": gate, "residual": True}
    with torch.no_grad():
        truth = reference.row_adapter(hb.float(), ids, *[w.float() for w in wb], **kw)
        ref = reference.row_adapter(hb, ids, *wb, **kw)
        ours = row_adapter_triton(hb, ids, *wb, **kw)
    assert ours.dtype == torch.bfloat16
    assert_rel_close("out", ours, ref, truth)


def test_skinny_linear_on_cpu_is_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDT_KERNELS", "auto")
    gen = torch.Generator().manual_seed(0)
    x, w, b = (
        torch.randn(3, 24, generator=gen),
        torch.randn(50, 24, generator=gen),
        torch.randn(50, generator=gen),
    )
    assert torch.equal(kernels.skinny_linear(x, w, b), torch.nn.functional.linear(x, w, b))


@gpu
@needs_cuda
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_skinny_linear_bf16_on_gpu(rows: int) -> None:
    """The 124M LM head (vocabulary 50257, D 768) for a decode step's rows in bf16: within the bf16
    tolerance of the fp32 product and no worse than cuBLAS's bf16 `F.linear`."""
    from pdt.kernels.skinny_linear_triton import skinny_linear_triton

    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, 768, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(50257, 768, device="cuda", generator=gen) * 0.02).bfloat16()
    with torch.no_grad():
        truth = torch.nn.functional.linear(x.float(), w.float())
        ref = torch.nn.functional.linear(x, w)
        ours = skinny_linear_triton(x, w)
    assert ours.dtype == torch.bfloat16
    assert_rel_close("logits", ours, ref, truth)
