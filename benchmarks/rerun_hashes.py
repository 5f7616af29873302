"""Bit-identical reruns: run the tiny DAG twice on this machine and compare every output file's sha256.

    python benchmarks/rerun_hashes.py [--params configs/tiny.yaml] [--out benchmarks/results/rerun_hashes.md]

The working tree is copied once into a scratch folder (as `same_results.py` does), then `data build` and every
`dvc.yaml` stage command run there with `--params` (the tiny overlay by default) and one MLflow store, through the
CLI's `main()`: all in one Python process per run (the ~10 s of imports per stage would take the two runs past 10
minutes on a loaded 2-core machine), or each in its own process with `--processes`; the outputs
(`data/`, `artifacts/`, `checkpoints/`) are moved to `run1/`, the store is removed, and the same commands run again
into `run2/`, in the same folder, so both runs see the same absolute paths. Every file of run1 and run2 is compared
by sha256. Not compared: the MLflow store itself (`mlflow.db`, `mlruns/`: run ids and start times are its job).

Timing/id-only differences: a stage's metrics files hold wall-clock figures (`seconds`, throughputs, latencies: the
rule of `same_results.py`), and export's onnx_models.json the identifiers MLflow gave its logged models
(`MLFLOW_ID_KEYS`, random per run, there so that register finds them). A JSON file whose bytes differ but which is
equal once those keys (at any depth) are left out, or the per-step curve of a timing metric, is counted as
"timing/id-only", listed with its keys, and does not count as a difference; any other byte difference does.
Exit status 1 when a file differs (or exists in one run only).
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
# Not compared: Great Expectations' rendered Data Docs site, whose page names and pages hold the clock time of each
# validation run (and a cache-busting time in the logo's URL). The validate stage's own results (report.json,
# report.html, metrics.json) are compared.
NOT_COMPARED = ("artifacts/validate/data_docs/",)
STORE = ("mlflow.db", "mlruns")
# Identifiers the MLflow store assigns at random per run (uuids), which export writes for register to find its
# logged models (export/onnx_models.json): a fresh store gives new ones every run.
MLFLOW_ID_KEYS = ("run_id", "model_id", "model_uri")
TIMING_KEYS = ("JSON or checkpoint keys (at any depth) ending in _per_s, tflops, _ms, _ms_ort, _ms_torch, "
               "_runtime, _per_second, step_time, or holding seconds / speedup / _per_s_, and the curves/<such key>.tsv "
               "files; "
               "MLflow identifiers: the keys "
               + ", ".join(MLFLOW_ID_KEYS))


# One process runs every stage in turn through the CLI's main(), as `alignpipe <stage> ...` would.
DRIVER = """import json, sys
from alignpipe.cli.main import main
for stage, argv in json.loads(sys.argv[1]):
    print(f"== {stage}", flush=True)
    code = main(argv)
    if code:
        sys.exit(f"{stage} failed (exit {code})")
"""


def run_dag(tree: Path, params: str, log, processes: bool) -> float:
    """`data build` and every dvc.yaml stage of `tree` with `params`, each in its own process (`processes`) or all
    in one; returns the wall time in seconds."""
    env = {**os.environ, "PYTHONPATH": f"{tree / 'src'}:{tree}", "MLFLOW_TRACKING_URI": f"sqlite:///{tree}/mlflow.db",
           "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0"}  # what `alignpipe` sets for itself (cli.main)
    commands = []
    for stage, command in stage_commands(tree):
        program, *args = command.split()
        assert program == "alignpipe", command
        commands.append((stage, [*args, "--params", params]))
    start = time.perf_counter()
    runs = [[c] for c in commands] if processes else [commands]
    for batch in runs:
        print("  " + ", ".join(stage for stage, _ in batch), flush=True)
        proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(batch)], cwd=tree, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            sys.exit(f"{batch[-1][0] if processes else 'a stage'} failed (exit {proc.returncode}): see {log.name}")
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
    """sha256 of every file under `root` by relative path, NOT_COMPARED left out."""
    return {rel: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and not (rel := p.relative_to(root).as_posix()).startswith(NOT_COMPARED)}


def is_clock(key: str) -> bool:
    """A wall-clock figure: `same_results.is_timing`, plus the names transformers' Trainer and TRL log
    (train_runtime, *_per_second, step_time) and export's latency tables (seconds_median)."""
    return is_timing(key) or key.endswith(("_runtime", "_per_second", "step_time")) or "seconds" in key


def excluded(key: str) -> bool:
    """A key whose value is a wall-clock figure or an identifier the MLflow store assigned."""
    return is_clock(key) or key in MLFLOW_ID_KEYS


def _timing_diffs(x, y, path: str = "") -> list[str] | None:
    """The dotted paths of the excluded keys where two JSON values (or torch.load'ed checkpoints) differ; None when
    something else differs."""
    import torch

    if torch.is_tensor(x) or torch.is_tensor(y):
        same = torch.is_tensor(x) and torch.is_tensor(y) and x.dtype == y.dtype and x.shape == y.shape \
            and torch.equal(x, y)
        return [] if same else None
    if isinstance(x, dict) and isinstance(y, dict):
        if set(x) != set(y):
            return None
        found: list[str] = []
        for k in x:
            if excluded(str(k)):
                found += [] if _timing_diffs(x[k], y[k]) == [] else [f"{path}{k}"]
                continue
            sub = _timing_diffs(x[k], y[k], f"{path}{k}.")
            if sub is None:
                return None
            found += sub
        return found
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        if len(x) != len(y):
            return None
        found = []
        for i, (a, b) in enumerate(zip(x, y)):
            sub = _timing_diffs(a, b, f"{path}{i}.")
            if sub is None:
                return None
            found += sub
        return found
    return [] if type(x) is type(y) and x == y else None


def timing_only(a: Path, b: Path) -> list[str] | None:
    """What differs between two files when it is only wall-clock figures: the timing keys of two JSON documents
    (at any depth), or a per-step curve of a timing metric (curves/<metric>.tsv); None when anything else differs."""
    if a.parent.name == "curves" and a.suffix == ".tsv" and is_clock(a.stem):
        return [a.stem]
    try:
        if a.suffix == ".json":
            x, y = json.loads(a.read_text()), json.loads(b.read_text())
        elif a.suffix == ".pt":  # a training checkpoint's state (ppo's holds its per-iteration metrics)
            import torch

            x, y = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
        else:
            return None
    except (ValueError, RuntimeError):
        return None
    keys = _timing_diffs(x, y)
    return sorted(set(keys)) if keys else None


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
                lines.append(f"timing/id-only {rel}: {', '.join(keys)}")
    n_timing = sum(line.startswith("timing/id-only") for line in lines)
    skipped = sum(1 for p in run1.rglob("*") if p.is_file() and p.relative_to(run1).as_posix().startswith(NOT_COMPARED))
    lines.append(f"{len(set(d1) & set(d2))} files compared, {len(differ)} differ ({n_timing} differ only in excluded "
                 f"keys: {TIMING_KEYS}; {skipped} files not compared: {', '.join(NOT_COMPARED)})")
    return lines, differ, len(set(d1) & set(d2))


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="configs/tiny.yaml", help="params file, relative to the repository")
    ap.add_argument("--out", type=Path, help="write the result as markdown here (e.g. benchmarks/results/...)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--processes", action="store_true",
                    help="each stage in its own Python process, as DVC runs them (default: one process per run, "
                         "which saves the ~10 s of imports per stage)")
    args = ap.parse_args()
    load_start = uptime()
    scratch = Path(tempfile.mkdtemp(prefix="rerun-hashes-", dir=ROOT / ".tmp" if (ROOT / ".tmp").is_dir() else None))
    try:
        tree = checkout(None, scratch / "tree")
        walls = []
        with (scratch / "log.txt").open("w") as log:
            for n in (1, 2):
                print(f"run {n}", flush=True)
                walls.append(run_dag(tree, args.params, log, args.processes))
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
            f"Command: `python benchmarks/rerun_hashes.py --params {args.params} --out {args.out}"
            f"{' --processes' if args.processes else ''}`\n\n"
            f"Stages: `data build` and every dvc.yaml stage, "
            f"{'each in its own process' if args.processes else 'all in one Python process per run'}, "
            "with PYTHONHASHSEED=0 (what the `alignpipe` command sets for itself).\n\n"
            f"Commit: `{commit}`{' (plus uncommitted changes)' if dirty else ''}\n\n"
            f"Machine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
            f"run 1 {walls[0]:.0f} s, run 2 {walls[1]:.0f} s (loaded: other jobs share the CPU).\n\n"
            f"`uptime` at the start: `{load_start}`\n\n`uptime` at the end: `{uptime()}`\n\n"
            "Compared: every file under `data/`, `artifacts/` and `checkpoints/`; not compared: the MLflow store. "
            "Timing/id-only: a file equal once its wall-clock figures and MLflow identifiers are left out "
            f"({TIMING_KEYS}).\n\n"
            "```\n" + "\n".join(lines) + "\n```\n")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
