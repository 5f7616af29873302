"""TEMPORARY (grpo branch): stand-ins for the library homes colleagues are creating; replaced at merge."""
from __future__ import annotations

from pathlib import Path

from alignpipe.core.errors import DataError


def read_train_prompts(data_dir) -> list[dict]:
    from alignpipe.oracle.metrics import load_prompts

    path = Path(data_dir) / "train_prompts.jsonl"
    if not path.is_file():
        raise DataError(str(path), "training prompts not found (rebuild the data with `alignpipe data build`)")
    return load_prompts(path)


def oracle_metrics(*a, **k):
    from alignpipe.stages.dpo import oracle_metrics as f
    return f(*a, **k)
