"""The precision rule (`pdt.train.runtime.autocast_dtype`): what `auto` picks where."""

from __future__ import annotations

import pytest
import torch

from pdt.train import runtime as R

CPU = torch.device("cpu")


def test_explicit_precisions_are_obeyed_everywhere() -> None:
    assert R.autocast_dtype("fp32", CPU) is None
    assert R.autocast_dtype("bf16", CPU) is torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_a_cpu_takes_bf16_only_where_it_is_native(
    monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    monkeypatch.setattr(R, "cpu_has_native_bf16", lambda: native)
    assert R.autocast_dtype("auto", CPU) is (torch.bfloat16 if native else None)


def test_the_environment_switch_turns_cpu_bf16_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDT_CPU_BF16", "0")
    assert R.cpu_has_native_bf16() is False
    assert R.autocast_dtype("auto", CPU) is None
