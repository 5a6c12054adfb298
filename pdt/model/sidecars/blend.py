"""α: the blend of attended and base logits at decode time (SPEC §2, decode knobs).

What it is: one function. α = 1 uses the attended (sidecar) logits only; α = 0 the plain trunk's.
What it is not: the second, plain forward that produces the base logits (the decoder runs it).
"""

from __future__ import annotations

import torch


def blend_logits(attended: torch.Tensor, base: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·attended + (1 − α)·base, in logit space. [.., V] × [.., V] → [.., V]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha = {alpha}: must be within [0, 1] (1 = attended logits only)")
    if alpha == 1.0:
        return attended
    if alpha == 0.0:
        return base
    return alpha * attended + (1.0 - alpha) * base
