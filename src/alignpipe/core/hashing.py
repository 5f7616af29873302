"""Stable hashing: the seeded, order-free splits and selections of data, label and reward."""

from __future__ import annotations

import hashlib


def hash01(key: str, seed: int) -> float:
    """A stable number in [0, 1) from `key` and `seed` (sha256; the same on every machine and Python)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_heldout(prompt: str, frac: float, seed: int) -> bool:
    """Whether the preference pairs of `prompt` are held out (label splits its pairs with it; reward applies the same
    rule to a single file)."""
    return hash01("heldout:" + prompt, seed) < frac
