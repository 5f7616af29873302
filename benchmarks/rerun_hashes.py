"""Bit-identical reruns: run the tiny DAG twice on this machine and compare every output file's sha256.

    python benchmarks/rerun_hashes.py [--params configs/tiny.yaml] [--out benchmarks/results/rerun_hashes.md]

The working tree is copied once into a scratch folder (as `same_results.py` does), then `data build` and every
`dvc.yaml` stage command run there with `--params` (the tiny overlay by default) and one MLflow store; the outputs
(`data/`, `artifacts/`, `checkpoints/`) are moved to `run1/`, the store is removed, and the same commands run again
into `run2/`, in the same folder, so both runs see the same absolute paths. Every file of run1 and run2 is compared
by sha256. Not compared: the MLflow store itself (`mlflow.db`, `mlruns/`: run ids and start times are its job).

Timing-only differences: a stage's metrics files hold wall-clock figures (`seconds`, throughputs, latencies: the
keys `TIMING_KEYS` names, the same rule as `same_results.py`). A JSON file whose bytes differ but which is equal once
those keys are removed is counted as "timing-only", listed with its keys, and does not count as a difference; any
other byte difference does. Exit status 1 when a file differs (or exists in one run only).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py (scripts run with benchmarks/ on sys.path)
from same_results import checkout, is_timing, stage_commands

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("data", "artifacts", "checkpoints")  # what a run writes into the tree (the MLflow store aside)
STORE = ("mlflow.db", "mlruns")
TIMING_KEYS = "keys ending in seconds, _per_s, tflops, _ms, _ms_ort, _ms_torch, or holding speedup / _per_s_"


def run_dag(tree: Path, params: str, log) -> float:
    """`data build` and every dvc.yaml stage of `tree` with `params`; returns the wall time in seconds."""
    env = {**os.environ, "PYTHONPATH": f"{tree / 'src'}:{tree}", "MLFLOW_TRACKING_URI": f"sqlite:///{tree}/mlflow.db",
           "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    for stage, command in stage_commands(tree):
        program, *args = command.split()
        assert program == "alignpipe", command
        print(f"  {stage}", flush=True)
        proc = subprocess.run([sys.executable, "-m", "alignpipe", *args, "--params", params], cwd=tree, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            sys.exit(f"{stage} failed (exit {proc.returncode}): see {log.name}")
    return time.perf_counter() - start


def collect(tree: Path, dst: Path) -> None:
    """Move the run's outputs out of `tree` into `dst` and remove its MLflow store, so the next run starts bare."""
    dst.mkdir(parents=True)
    for name in OUTPUTS:
        if (tree / name).exists():
            (tree / name).rename(dst / name)
    for name in STORE:
        path = tree / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def timing_only(a: Path, b: Path) -> list[str] | None:
    """The timing keys that differ when two JSON files are equal without them; None when they differ otherwise."""
    if a.suffix != ".json":
        return None
    try:
        x, y = json.loads(a.read_text()), json.loads(b.read_text())
    except ValueError:
        return None
    if not (isinstance(x, dict) and isinstance(y, dict)) or set(x) != set(y):
        return None
    keys = [k for k in x if x[k] != y[k]]
    return keys if keys and all(is_timing(k) for k in keys) else None


def compare(run1: Path, run2: Path) -> tuple[list[str], list[str], int]:
    """(report lines, differing files, files compared)."""
    d1, d2 = digests(run1), digests(run2)
    lines, differ = [], []
    for rel in sorted(set(d1) | set(d2)):
        if rel not in d1 or rel not in d2:
            differ.append(rel)
            lines.append(f"ONLY IN {'run1' if rel in d1 else 'run2'}: {rel}")
        elif d1[rel] != d2[rel]:
            keys = timing_only(run1 / rel, run2 / rel)
            if keys is None:
                differ.append(rel)
                lines.append(f"DIFF {rel}: {d1[rel][:12]} vs {d2[rel][:12]}")
            else:
                lines.append(f"timing-only {rel}: {', '.join(keys)}")
    n_timing = sum(line.startswith("timing-only") for line in lines)
    lines.append(f"{len(set(d1) & set(d2))} files compared, {len(differ)} differ ({n_timing} differ only in timing "
                 f"keys: {TIMING_KEYS})")
    return lines, differ, len(set(d1) & set(d2))


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="configs/tiny.yaml", help="params file, relative to the repository")
    ap.add_argument("--out", type=Path, help="write the result as markdown here (e.g. benchmarks/results/...)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args()
    load_start = uptime()
    scratch = Path(tempfile.mkdtemp(prefix="rerun-hashes-", dir=ROOT / ".tmp" if (ROOT / ".tmp").is_dir() else None))
    try:
        tree = checkout(None, scratch / "tree")
        walls = []
        with (scratch / "log.txt").open("w") as log:
            for n in (1, 2):
                print(f"run {n}", flush=True)
                walls.append(run_dag(tree, args.params, log))
                collect(tree, scratch / f"run{n}")
        lines, differ, _ = compare(scratch / "run1", scratch / "run2")
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    print("\n".join(lines))
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        args.out.write_text(
            "# Bit-identical reruns: the tiny DAG twice on one machine, every output file's sha256\n\n"
            f"Command: `python benchmarks/rerun_hashes.py --params {args.params} --out {args.out}`\n\n"
            f"Commit: `{commit}`{' (plus uncommitted changes)' if dirty else ''}\n\n"
            f"Machine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
            f"run 1 {walls[0]:.0f} s, run 2 {walls[1]:.0f} s (loaded: other jobs share the CPU).\n\n"
            f"`uptime` at the start: `{load_start}`\n\n`uptime` at the end: `{uptime()}`\n\n"
            "Compared: every file under `data/`, `artifacts/` and `checkpoints/`; not compared: the MLflow store. "
            "Timing-only: a JSON file equal once its wall-clock keys are removed "
            f"({TIMING_KEYS}); that is the stages' metrics.json / metrics_headline.json `seconds` (and throughputs).\n\n"
            "```\n" + "\n".join(lines) + "\n```\n")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
