"""The small-batch CPU linear form computes what nn.Linear computes, and only where it applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pdt.model import cpu_linear


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (1, 3), (7,), (2, 4), (8,)])
def test_same_values_as_linear_for_few_rows(bias: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(48, 80, bias=bias)
    x = torch.randn(*shape, 48)
    expected = F.linear(x, layer.weight, layer.bias)
    cpu_linear.install(layer)
    with torch.no_grad():
        got = layer(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_many_rows_grad_and_other_dtypes_take_f_linear_exactly() -> None:
    torch.manual_seed(1)
    layer = nn.Linear(32, 16)
    cpu_linear.install(layer)
    calls = []
    original = torch.mm

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    torch.mm = spy
    try:
        with torch.no_grad():
            layer(torch.randn(9, 32))  # more than MAX_ROWS rows
        layer(torch.randn(2, 32))  # autograd on: training is untouched
        with torch.no_grad():
            layer(torch.randn(2, 32))  # the small-batch form
    finally:
        torch.mm = original
    assert calls == [torch.Size([16, 32])]  # only the last call used W · Xᵀ


def test_install_is_idempotent_and_uninstall_restores() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    cpu_linear.install(model)
    bound = model[0].forward
    cpu_linear.install(model)
    assert model[0].forward == bound
    cpu_linear.uninstall(model)
    assert "forward" not in vars(model[0]) and "forward" not in vars(model[2])
