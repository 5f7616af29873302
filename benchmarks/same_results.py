"""Same seed, same results: run the tiny pipeline at two commits and diff every non-timing metric.

    python benchmarks/same_results.py BEFORE [AFTER]   # AFTER defaults to the working tree
    python benchmarks/same_results.py --artifacts OLD_CLONE NEW_CLONE   # two finished `make run` checkouts

Each commit is exported (`git archive`) into a scratch folder and runs, with this environment's Python and its
own `src/` first on the path, `data build` and then that commit's own `dvc.yaml` stage commands in order (each
commit's CLI: its inputs, its candidates) with that commit's `configs/tiny.yaml`, in one MLflow store per tree. It then
compares every metric a stage wrote before (the union of its metrics*.json files) with the same key after and prints one line per difference.
Exit 0 when every non-timing metric is identical. Metrics measured with a clock (durations, throughputs,
latencies, speedups) are listed as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/tiny.yaml"
DATA = ("data", "alignpipe data build --out data")  # data/ is tracked by data.dvc, not a dvc.yaml stage


def stage_commands(tree: Path) -> list[tuple[str, str]]:
    """(stage, command) for `data build`, then every stage of the tree's dvc.yaml, in its order."""
    import yaml

    stages = yaml.safe_load((tree / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return [DATA, *((name, " ".join(stage["cmd"].split())) for name, stage in stages.items())]


def is_timing(key: str) -> bool:
    """Metrics measured with a clock: they differ run to run."""
    return key.endswith(("seconds", "_per_s", "tflops", "_ms", "_ms_ort", "_ms_torch")) or "speedup" in key \
        or "_per_s_" in key


def checkout(rev: str | None, dst: Path) -> Path:
    """`rev` exported into dst (None: the working tree's tracked and untracked files, as they are now)."""
    dst.mkdir(parents=True)
    if rev is None:
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               check=True, capture_output=True).stdout.split(b"\0")
        for f in filter(None, files):
            src = ROOT / f.decode()
            if src.is_file():
                (dst / f.decode()).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst / f.decode())
    else:
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)
    return dst


def run_pipeline(tree: Path) -> dict[str, dict[str, float]]:
    env = {**os.environ, "PYTHONPATH": f"{tree / 'src'}:{tree}", "MLFLOW_TRACKING_URI": f"sqlite:///{tree}/mlflow.db",
           "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    metrics: dict[str, dict[str, float]] = {}
    for stage, command in stage_commands(tree):
        program, *args = command.split()
        assert program == "alignpipe", command
        cmd = [sys.executable, "-m", "alignpipe", *args, "--params", TINY]
        print(f"[{tree.name}] {stage}", flush=True)
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{tree.name}: {stage} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        metrics[stage] = stage_metrics(tree / args[args.index("--out") + 1])
    return metrics


def stage_metrics(out: Path) -> dict[str, float]:
    """The union of a stage output's metrics*.json files (evaluate's best/ holds a copy of the chosen trainer's)."""
    metrics: dict[str, float] = {}
    for f in sorted(out.rglob("metrics*.json")):
        if "best" not in f.relative_to(out).parts[:-1]:
            metrics.update(json.loads(f.read_text()))
    return metrics


def finished_run(clone: Path) -> dict[str, dict[str, float]]:
    """Every stage's metrics in a checkout where `make run` finished: the stages of its own dvc.yaml."""
    return {stage: stage_metrics(clone / command.split("--out ")[1].split()[0])
            for stage, command in stage_commands(clone) if stage != "data"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", help="a commit (or, with --artifacts, a checkout where `make run` finished)")
    ap.add_argument("after", nargs="?", default=None, help="default: the working tree")
    ap.add_argument("--artifacts", action="store_true",
                    help="compare two finished default runs (BEFORE and AFTER are checkouts) instead of running tiny")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args()
    if args.artifacts:
        before, after = finished_run(Path(args.before)), finished_run(Path(args.after or ROOT))
    else:
        scratch = Path(tempfile.mkdtemp(prefix="same-results-",
                                        dir=ROOT / ".tmp" if (ROOT / ".tmp").is_dir() else None))
        try:
            before = run_pipeline(checkout(args.before, scratch / "before"))
            after = run_pipeline(checkout(args.after, scratch / "after"))
        finally:
            if not args.keep:
                shutil.rmtree(scratch, ignore_errors=True)
    diffs = compared = skipped = added = 0
    for stage in before:
        a, b = before[stage], after.get(stage, {})
        added += len(set(b) - set(a))
        for key in sorted(a):
            if is_timing(key):
                skipped += 1
                continue
            compared += 1
            if a.get(key) != b.get(key):
                diffs += 1
                print(f"DIFF {stage}.{key}: before={a.get(key)!r} after={b.get(key)!r}")
    only_after = sorted(set(after) - set(before))
    print(f"{compared} non-timing metrics compared over {len(before)} stages, {diffs} differ "
          f"({skipped} timing metrics skipped; {added} metrics only after; stages only after: "
          f"{', '.join(only_after) or 'none'})")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
