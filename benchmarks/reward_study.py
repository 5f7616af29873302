"""Reward-model investigation (issue 15): one labelled pair set, one held-out split, the reward stage run once per
variant (base model, pair count, prompt context, training length), each through the CLI as `dvc repro` runs it.
Reports held-out accuracy with its 95% CI, accuracy by pair type (clean-vs-dirty: one completion has no oracle
violation; both dirty) and calibration (accuracy per |margin| quartile, ECE), and writes the table with every
command to `--out`.

    python benchmarks/reward_study.py --prefs artifacts-quality/label --base artifacts-quality/pretrain \\
        --other-base mle=artifacts-quality/mle --other-base default=artifacts/pretrain
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def variants(base: str, others: dict[str, str], n_train: int) -> list[tuple[str, str, list[str], int]]:
    """(name, base policy dir, --set overrides, training pairs kept (0: all))."""
    rows = [("default config", base, [], 0)]
    rows += [(f"base: {name}", path, [], 0) for name, path in others.items()]
    rows += [(f"pairs: {frac:.0%}", base, [], int(n_train * frac)) for frac in (0.25, 0.5)]
    rows += [(f"prompt_lines={n}", base, [f"reward.prompt_lines={n}"], 0) for n in (1, 4, 0)]
    rows += [(f"epochs={e}", base, [f"reward.num_train_epochs={e}"], 0) for e in (1, 4)]
    return rows


def subset(prefs: Path, n: int, work: Path) -> Path:
    """A label directory with the first `n` training pairs and every held-out pair."""
    out = work / f"prefs-{n}"
    out.mkdir(parents=True, exist_ok=True)
    lines = (prefs / "prefs.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (out / "prefs.jsonl").write_text("".join(lines[:n]), encoding="utf-8")
    (out / "heldout.jsonl").write_text((prefs / "heldout.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefs", required=True, help="label output directory (prefs.jsonl, heldout.jsonl)")
    p.add_argument("--base", required=True, help="policy directory the default variant starts from")
    p.add_argument("--other-base", action="append", default=[], metavar="NAME=DIR", help="more base models")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--work", default=".tmp/reward_study")
    p.add_argument("--out", default="benchmarks/results/reward_study.md")
    p.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    args = p.parse_args(argv)
    prefs, work = Path(args.prefs), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    others = dict(item.split("=", 1) for item in args.other_base)
    n_train = len((prefs / "prefs.jsonl").read_text(encoding="utf-8").splitlines())
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work.resolve()}/mlflow.db", "TQDM_DISABLE": "1",
           "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    for i, (name, base, sets, n) in enumerate(variants(args.base, others, n_train)):
        if (only and name not in only) or name in results:
            continue
        data = subset(prefs, n, work) if n else prefs
        out = work / f"run{i}"
        command = ["alignpipe", "reward", "--params", args.params, "--prefs", str(data), "--policy", base,
                   "--out", str(out), f"--set=reward.checkpoint_dir={work}/ckpt{i}", *[f"--set={s}" for s in sets]]
        print("==", name, ":", " ".join(command), flush=True)
        start = time.time()
        subprocess.run([sys.executable, "-m", "alignpipe", *command[1:]], check=True, env=env)
        metrics = json.loads((out / "metrics.json").read_text())
        results[name] = {"command": " ".join(command), "seconds": round(time.time() - start),
                         "load": round(os.getloadavg()[0], 1), **metrics}
        results_file.write_text(json.dumps(results, indent=1))
    write_table(results, args, n_train)
    return 0


def write_table(results: dict, args, n_train: int) -> None:
    def f(m, k, d=3):
        v = m.get(k)
        return "n/a" if v is None else f"{v:.{d}f}"

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = ["# Reward model investigation (issue 15)", "",
             f"`python benchmarks/reward_study.py {' '.join(sys.argv[1:])}` at commit {commit}: labelled pairs "
             f"`{args.prefs}` ({n_train} training pairs; the same held-out pairs for every row), base `{args.base}` "
             "unless the row names another. Accuracy by pair type: clean-vs-dirty = one completion has no oracle "
             "violation; calibration: accuracy in the lowest and highest |margin| quartile, and the expected "
             "calibration error of sigmoid(margin). Seconds were measured on a shared 2-core machine (load in the "
             "last column).", "",
             "| variant | train pairs | held-out acc. [95% CI] | clean-vs-dirty | both dirty | acc. lowest / highest "
             "|margin| quartile | ECE | seconds | load |", "|---|---|---|---|---|---|---|---|---|"]
    for name, m in results.items():
        lines.append(f"| {name} | {m.get('n_train_pairs', 'n/a')} | {f(m, 'heldout_accuracy')} "
                     f"[{f(m, 'heldout_accuracy_ci_low')}, {f(m, 'heldout_accuracy_ci_high')}] | "
                     f"{f(m, 'heldout_accuracy_clean_vs_dirty')} | {f(m, 'heldout_accuracy_both_dirty')} | "
                     f"{f(m, 'calibration/bucket0_accuracy')} / {f(m, 'calibration/bucket3_accuracy')} | "
                     f"{f(m, 'calibration_ece')} | {m['seconds']} | {m['load']} |")
    lines += ["", "Commands:", "", *[f"    {m['command']}" for m in results.values()], ""]
    Path(args.out).write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
