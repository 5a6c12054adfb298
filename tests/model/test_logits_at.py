"""`logits_at`: the LM head on selected positions only equals the full forward's logits there."""

from __future__ import annotations

import pytest
import torch

from pdt.model.pdt_model import PDTModel
from pdt.presets.schema import SidecarConfig
from tests.conftest import TINY_ARCH_CONFIGS
from tests.model.test_pdt_model import tiny_trunk


@pytest.mark.parametrize("model_type", sorted(TINY_ARCH_CONFIGS))
def test_logits_at_selected_positions_equal_the_full_forward(model_type: str) -> None:
    model = PDTModel(
        tiny_trunk(model_type), SidecarConfig(num_streams=2, n_layers=2, d_notes=8, plan_vocab=64)
    )
    ids = torch.randint(0, model.trunk.config.vocab_size, (3, 11))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0  # a padded row
    at = torch.rand(3, 11) > 0.5
    full = model.forward_base(ids, mask)
    part = model.forward_base(ids, mask, logits_at=at)
    assert part.logits.shape == (int(at.sum()), full.logits.shape[-1])
    torch.testing.assert_close(part.logits, full.logits[at], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(part.hidden, full.hidden, atol=1e-5, rtol=1e-5)
