"""Bit-identical reruns on one machine: the numerical settings every stage runs under (docs/reproducibility.md).

A float reduction's result depends on how it is split: torch's intra-op thread count decides how matrix products
and reductions are cut, so one thread and two threads give different weights from the same inputs (measured on the
reward stage: benchmarks/results/rerun_hashes.md). torch's default count is not a property of the machine alone: it
follows OMP_NUM_THREADS/MKL_NUM_THREADS, the CPU affinity mask the process inherits (taskset, a container's
cpuset) and a launcher's choice (torchrun sets OMP_NUM_THREADS=1). `pin()` fixes it to `ALIGNPIPE_THREADS` or, by
default, the machine's physical core count, and asks torch for its deterministic kernels (on GPUs: cuBLAS with a
fixed workspace, cuDNN without autotuning). Across CPU models (Intel Xeon vs AMD EPYC) results still differ: MKL and
oneDNN choose kernels by instruction set, and so does ATen's own vectorised code.
"""

from __future__ import annotations

import os
import sys

THREADS_ENV = "ALIGNPIPE_THREADS"  # the intra-op thread count every stage runs with (default: physical cores)


def machine_threads() -> int:
    """The machine's physical core count (psutil; else the logical count): the same for every process on it,
    whatever its affinity mask or OMP_NUM_THREADS."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def threads() -> int:
    """The intra-op thread count of a stage: `ALIGNPIPE_THREADS`, else `machine_threads()`."""
    from alignpipe.core.errors import ConfigError

    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return machine_threads()
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(THREADS_ENV, f"must be a whole number >= 1, got {value!r}")
    return int(value)


def pin() -> dict[str, str]:
    """Fix the numerical settings of this process before a stage runs; returns them (logged as MLflow tags).

    In a distributed launch (WORLD_SIZE > 1) the launcher's per-process thread count is kept: several ranks share
    the machine's cores, and the launch itself fixes it."""
    import torch

    from alignpipe.core import distributed

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS is deterministic only with it (CUDA docs)
    if distributed.world_size() == 1:
        n = threads()
        if n != torch.get_num_threads() and os.environ.get("OMP_NUM_THREADS"):
            print(f"alignpipe: {n} torch threads ({THREADS_ENV} or the physical cores), not OMP_NUM_THREADS="
                  f"{os.environ['OMP_NUM_THREADS']}: set {THREADS_ENV} to choose", file=sys.stderr)
        torch.set_num_threads(n)
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn, not fail, where an op has no such kernel
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    return {"alignpipe.torch_threads": str(torch.get_num_threads()),
            "alignpipe.cpu_capability": torch.backends.cpu.get_cpu_capability()}
