"""Stable hashing: the seeded, order-free splits and selections of data, label and reward; the content hashes of
weights and prompt sets that tie register's promotion to what evaluate measured."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def hash01(key: str, seed: int) -> float:
    """A stable number in [0, 1) from `key` and `seed` (sha256; the same on every machine and Python)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_heldout(prompt: str, frac: float, seed: int) -> bool:
    """Whether the preference pairs of `prompt` are held out (label splits its pairs with it; reward applies the same
    rule to a single file)."""
    return hash01("heldout:" + prompt, seed) < frac


def weights_sha256(model_dir: Path) -> str:
    """sha256 over a model directory's `*.safetensors` files (name and bytes, sorted by name): the identity of the
    weights that evaluate measured and register promotes. A directory without safetensors raises DataError."""
    from alignpipe.core.errors import DataError

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise DataError(str(model_dir), "no *.safetensors weights to hash")
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def prompts_sha256(prompts: list[str]) -> str:
    """sha256 of an exact, ordered prompt set (each prompt's JSON string, one per line)."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps(p).encode() + b"\n")
    return h.hexdigest()
