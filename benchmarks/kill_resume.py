"""Kill -9 survival: each training stage on configs/tiny.yaml runs once uninterrupted, then again killed with SIGKILL
three times in a row and resumed with --resume each time (the first two kills at a random moment after a checkpoint,
the third after the LAST checkpoint: during the evaluation or the publishing), then to its end. Prints the final
metrics of both runs side by side and whether they agree within the tolerance; checks after every kill that
nothing was published and that the next start ended the killed MLflow run as FAILED.

    .venv/bin/python benchmarks/kill_resume.py [--stages pretrain,reward,dpo,ppo,grpo] [--seed 0] [--work DIR]
        [--out benchmarks/results/kill_resume.md]

The prerequisites (data, a pretrained policy, preference pairs, a reward model) are built first, uninterrupted.
Exit status 1 when a metric differs beyond the tolerance or a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py (scripts run with benchmarks/ on sys.path)

PARAMS = "configs/tiny.yaml"
# Per stage: --set overrides that give several checkpoints, and the stage's inputs (from the prerequisites).
BUDGET = {
    "pretrain": ["pretrain.max_steps=24", "pretrain.save_steps=4"],
    "reward": ["reward.max_steps=24", "reward.save_steps=4"],
    "dpo": ["dpo.max_steps=16", "dpo.save_steps=4"],
    "ppo": ["ppo.max_steps=8", "ppo.save_steps=2"],
    "grpo": ["grpo.max_steps=8", "grpo.save_steps=2"],
}
MAX_STEPS = {"pretrain": 24, "reward": 24, "dpo": 16, "ppo": 8, "grpo": 8}
CHECKPOINT = re.compile(r"^(step|iter|checkpoint)-0*(\d+)$")
TOLERANCE = {"rel": 1e-4, "abs": 1e-6}  # same seed, same steps, same CPU: equal up to float summation order
# Wall-clock figures (and pretrain's train_tflops, derived from them), and where a run resumed from: not compared.
IGNORED = ("seconds", "tokens_per_s", "samples_per_s", "steps_per_s", "train_tflops", "resumed_from")


def cli(stage: str, out: Path, ckpt: Path, inputs: dict[str, Path], resume: bool = False) -> list[str]:
    sets = [*BUDGET[stage], f"{stage}.checkpoint_dir={ckpt}"] if stage in BUDGET else []
    argv = [sys.executable, "-m", "alignpipe", stage, "--params", PARAMS, "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    for name, path in inputs.items():
        argv += [f"--{name.replace('_', '-')}", str(path)]
    return argv + (["--resume"] if resume else [])


def run(argv: list[str], log: Path) -> None:
    with log.open("a") as f:
        code = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"kill_resume: {' '.join(argv[2:5])} failed (exit {code}); see {log}")


def steps_saved(ckpt: Path) -> list[int]:
    found = [CHECKPOINT.match(p.name) for p in ckpt.glob("*") if p.is_dir()] if ckpt.is_dir() else []
    return sorted(int(m.group(2)) for m in found if m)


def kill_after(argv: list[str], ckpt: Path, log: Path, wait_for: int, max_delay: float,
               rng: random.Random) -> tuple[str, bool]:
    """Start `argv`, wait until a checkpoint of step >= `wait_for` exists, then SIGKILL its process group after a
    random delay in [0, max_delay] s. Returns (what happened, whether the process was still running)."""
    with log.open("a") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    while proc.poll() is None and (steps_saved(ckpt) or [0])[-1] < wait_for:
        time.sleep(0.05)
    if proc.poll() is not None:
        sys.exit(f"kill_resume: the run ended (exit {proc.returncode}) before checkpoint {wait_for}; see {log}")
    delay = rng.uniform(0.0, max_delay)
    time.sleep(delay)
    alive = proc.poll() is None
    saved = steps_saved(ckpt)[-1]
    if alive:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"SIGKILL {delay:.2f}s after checkpoint {saved} was written", True
    return f"the run finished within {delay:.2f}s of checkpoint {saved}: not killed", False


def mlflow_status(stage: str, tracking: str) -> dict[str, int]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    exp = client.get_experiment_by_name("alignpipe")
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`alignpipe.stage` = '{stage}'")
    out: dict[str, int] = {}
    for r in found:
        out[r.info.status] = out.get(r.info.status, 0) + 1
    return out


def compare(a: dict, b: dict) -> list[tuple[str, object, object, bool]]:
    rows = []
    for key in sorted(set(a) | set(b)):
        if any(key.endswith(s) or s in key for s in IGNORED):
            continue
        va, vb = a.get(key), b.get(key)
        ok = (isinstance(va, (int, float)) and isinstance(vb, (int, float))
              and (math.isclose(va, vb, rel_tol=TOLERANCE["rel"], abs_tol=TOLERANCE["abs"])
                   or (math.isnan(va) and math.isnan(vb))))
        rows.append((key, va, vb, ok))
    return rows


def prerequisites(work: Path, log: Path) -> dict[str, Path]:
    data, policy, prefs, reward = work / "data", work / "pre-policy", work / "pre-prefs", work / "pre-reward"
    if not data.is_dir():
        run([sys.executable, "-m", "alignpipe", "data", "build", "--params", PARAMS, "--out", str(data)], log)
    if not policy.is_dir():
        run(cli("pretrain", policy, work / "ckpt-pre-policy", {"data": data}), log)
    if not prefs.is_dir():
        run(cli("label", prefs, work / "unused", {"data": data, "policy": policy}), log)
    if not reward.is_dir():
        run(cli("reward", reward, work / "ckpt-pre-reward", {"prefs": prefs, "policy": policy}), log)
    return {"data": data, "policy": policy, "prefs": prefs, "reward_model": reward}


def stage_inputs(stage: str, pre: dict[str, Path]) -> dict[str, Path]:
    wanted = {"pretrain": ("data",), "reward": ("prefs", "policy"), "dpo": ("data", "policy", "prefs"),
              "ppo": ("data", "policy", "reward_model"), "grpo": ("data", "policy", "reward_model")}[stage]
    return {k: pre[k] for k in wanted}


def one_stage(stage: str, pre: dict[str, Path], work: Path, log: Path, rng: random.Random,
              tracking: str) -> tuple[list, list[str], bool]:
    inputs = stage_inputs(stage, pre)
    final = MAX_STEPS[stage]
    a_out, b_out = work / f"{stage}-uninterrupted", work / f"{stage}-killed"
    a_ckpt, b_ckpt = work / f"ckpt-{stage}-a", work / f"ckpt-{stage}-b"
    for p in (a_out, b_out, a_ckpt, b_ckpt):
        shutil.rmtree(p, ignore_errors=True)
    run(cli(stage, a_out, a_ckpt, inputs), log)
    events, ok = [], True
    for i in range(3):
        # Kills 1 and 2: at a random moment after the next checkpoint; kill 3: after the last one (evaluation or
        # publishing). Each restart resumes from the newest checkpoint.
        past = (steps_saved(b_ckpt) or [0])[-1]
        wait_for, max_delay = (final, 0.3) if i == 2 else (past + 1, 0.5)
        what, killed = kill_after(cli(stage, b_out, b_ckpt, inputs, resume=i > 0), b_ckpt, log, wait_for,
                                  max_delay, rng)
        published = b_out.exists()
        ok &= killed and not published
        events.append(f"kill {i + 1}: {what}; published: {'YES' if published else 'nothing'}")
        if not killed:
            break
    run(cli(stage, b_out, b_ckpt, inputs, resume=True), log)
    status = mlflow_status(stage, tracking)
    ok &= status.get("RUNNING", 0) == 0
    events.append(f"MLflow runs of {stage} after the resumes: {status}")
    a = json.loads((a_out / "metrics.json").read_text())
    b = json.loads((b_out / "metrics.json").read_text())
    rows = compare(a, b)
    return rows, events, ok and all(r[3] for r in rows)


def commit() -> str:
    """HEAD's hash, with `+uncommitted changes` when the tracked files differ from it."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], capture_output=True).returncode != 0
    return (head or "unknown") + (" +uncommitted changes" if dirty else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="pretrain,reward,dpo,ppo,grpo")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill moments")
    parser.add_argument("--work", default=".tmp/kill_resume", help="scratch folder (outputs, checkpoints, log)")
    parser.add_argument("--out", default="", help="also write the report (command, commit, machine) to this .md")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    os.environ.update(MLFLOW_TRACKING_URI=tracking, MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1",
                      DVC_NO_ANALYTICS="1")
    log = work / "log.txt"
    rng = random.Random(args.seed)
    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    load_start, revision = os.getloadavg(), commit()  # as the run starts: later commits are not what ran
    say(f"kill_resume: {PARAMS}, kill seed {args.seed}, tolerance rel {TOLERANCE['rel']:g} / abs "
        f"{TOLERANCE['abs']:g} (wall-clock metrics {', '.join(IGNORED)} not compared); log {Path(args.work) / 'log.txt'}")
    pre = prerequisites(work, log)
    all_ok = True
    for stage in args.stages.split(","):
        start = time.perf_counter()
        rows, events, ok = one_stage(stage, pre, work, log, rng, tracking)
        all_ok &= ok
        say(f"\n== {stage} ({' '.join(BUDGET[stage])}): {'OK' if ok else 'MISMATCH'} "
            f"({time.perf_counter() - start:.0f} s)")
        for e in events:
            say(f"   {e}")
        say(f"   {'metric':<34} {'uninterrupted':>16} {'killed x3':>16}  same")
        for key, va, vb, same in rows:
            fa = f"{va:.8g}" if isinstance(va, float) else str(va)
            fb = f"{vb:.8g}" if isinstance(vb, float) else str(vb)
            say(f"   {key:<34} {fa:>16} {fb:>16}  {'yes' if same else 'NO'}")
    load_end = os.getloadavg()
    say(f"\nkill_resume: {'all stages agree' if all_ok else 'MISMATCHES above'}; load average "
        f"{load_end[0]:.2f}")
    if args.out:
        command = " ".join([".venv/bin/python", "benchmarks/kill_resume.py", *sys.argv[1:]])
        Path(args.out).write_text(
            "# Kill -9 survival: each training stage uninterrupted vs killed three times with SIGKILL and resumed\n\n"
            f"Command: `{command}`\n\nCommit: `{revision}`\n\nMachine: {cpu_name()}, {os.cpu_count()} cores "
            f"(shared with other jobs); load average (1/5/15 min) at the start "
            f"{' / '.join(f'{x:.2f}' for x in load_start)}, at the end {' / '.join(f'{x:.2f}' for x in load_end)}."
            "\n\n```\n" + "\n".join(lines) + "\n```\n")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
