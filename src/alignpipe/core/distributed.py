"""Distributed-launch helpers: this process's rank and the world size (torchrun, accelerate, Kubeflow Trainer)."""

from __future__ import annotations

import os


def process_rank() -> int:
    """This process's global rank in a distributed launch (torchrun, accelerate launch, Kubeflow Trainer set
    RANK); 0 in a plain single-process run."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Processes of a distributed launch (torchrun, accelerate launch, Kubeflow Trainer set WORLD_SIZE); 1 in a
    plain single-process run."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True for rank 0, the only process of a distributed launch that records the stage."""
    return process_rank() == 0
