"""Plan-item ids: a salted, stable hash from plan-item text into the plan vocabulary [0, V_p).

What it is: one pure-Python function shared by the dataset build (which writes plan ids), the
planner (which predicts them) and inference (which maps seed plan items to ids). Stable across
runs, processes and machines (blake2b, never Python's randomised `hash`). What it is not: a
tokenizer, nor a check that the salt matches a checkpoint (`pdt.model.pdt_model` refuses a
checkpoint saved with another salt or vocabulary). Imports no torch.
"""

from __future__ import annotations

import hashlib
import unicodedata


def normalise_plan_text(text: str) -> str:
    """NFC, stripped, lower-cased: "  Café " and "CAFÉ" (composed or not) are the same plan item."""
    return unicodedata.normalize("NFC", text).strip().lower()


def plan_item_id(text: str, salt: str, plan_vocab: int) -> int:
    """The plan id of `text` under `salt`, in [0, plan_vocab).

    The salt is length-prefixed so ("ab", "c") and ("a", "bc") cannot collide by concatenation.
    A 64-bit digest reduced mod V_p has a modulo bias below 2**-40 for V_p ≤ 2**24: negligible.
    """
    if not isinstance(text, str) or not isinstance(salt, str):
        raise TypeError("plan_item_id: text and salt must be str")
    if plan_vocab < 1:
        raise ValueError(f"plan_item_id: plan_vocab must be ≥ 1, got {plan_vocab}")
    salt_bytes = salt.encode("utf-8")
    digest = hashlib.blake2b(digest_size=8)
    digest.update(len(salt_bytes).to_bytes(4, "little") + salt_bytes)
    digest.update(normalise_plan_text(text).encode("utf-8"))
    return int.from_bytes(digest.digest(), "little") % plan_vocab
