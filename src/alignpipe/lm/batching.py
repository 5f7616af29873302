"""Padding: the one place a batch of token-id lists becomes a rectangular (ids, attention mask) pair."""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np


def pad(rows: Sequence[Sequence[int]], pad_id: int, side: Literal["left", "right"] = "right",
        min_width: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) int64 arrays [len(rows), width], width = max(longest row, min_width). `right` puts each row at
    column 0 (training, scoring at the last real token); `left` ends every row at the last column (generation)."""
    width = max(max((len(r) for r in rows), default=0), min_width)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        cols = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, cols] = r
        mask[i, cols] = 1
    return ids, mask


def pad_torch(rows: Sequence[Sequence[int]], pad_id: int, side: Literal["left", "right"] = "right",
              min_width: int = 0, device=None):
    """`pad` as torch long tensors on `device`."""
    import torch

    ids, mask = pad(rows, pad_id, side, min_width)
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
