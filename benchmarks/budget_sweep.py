"""The budget sweep (issue 28): the PEP8 pipeline at the default budget, twice it and the quality budget, each with
every candidate's violations/char as a ratio to the reference and the reward-hacking guard's verdict.

A budget is a params file: `default` is params.yaml, `2x` an overlay this script writes into the work dir with
every key of BUDGET_KEYS doubled (the training steps of each stage and label's prompts, so the reward model sees
twice the pairs at the same epochs), `quality` is configs/quality.yaml (`make quality`'s budget, ~40-80 min on 2 CPU
cores). Each budget runs data build, then pretrain .. evaluate through the CLI (the commands dvc.yaml runs, every
path inside `--work/<budget>/`, its own checkpoints and MLflow store); export and register add no ratio and are
left out. The table goes to `--out` with the command, the machine and the load; a budget not run says so.

    python benchmarks/budget_sweep.py --budgets default,2x           # run and write the table
    python benchmarks/budget_sweep.py --from default=artifacts        # report a finished run (dvc repro's outputs)
    python benchmarks/budget_sweep.py --only-report                   # rewrite the table from --work
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from alignpipe.core.config import load_params
from alignpipe.stages import OUTPUTS, load_stage

BUDGET_KEYS = ("pretrain.max_steps", "label.n_prompts", "dpo.max_steps", "orpo.max_steps", "ppo.max_steps",
               "grpo.max_steps")
BUDGETS = ("default", "2x", "quality")
STAGES = ("pretrain", "label", "reward", "dpo", "orpo", "ppo", "grpo", "evaluate")  # DAG order, data built first
PRODUCER = {output: stage for stage, output in OUTPUTS.items()}  # an input's name -> the stage that writes it


def params_file(budget: str, work: Path) -> Path:
    """The params file of `budget`; `2x` is written into `work` as an overlay of params.yaml."""
    if budget == "default":
        return Path("params.yaml")
    if budget == "quality":
        return Path("configs/quality.yaml")
    from alignpipe.stages import config_classes

    params = load_params("params.yaml")
    classes = config_classes()
    lines = [f"overlay: {os.path.relpath('params.yaml', work)}", ""]
    for key in BUDGET_KEYS:
        section, name = key.split(".")
        value = params.get(section, {}).get(name, getattr(classes[section](), name))
        lines += [f"{section}:", f"  {name}: {2 * value}"]
    work.mkdir(parents=True, exist_ok=True)
    path = work / "2x.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def stage_argv(name: str, w: Path, params: Path) -> list[str]:
    """`alignpipe <name>` with every input a stage of this sweep produces, all inside `w`."""
    stage = load_stage(name)
    argv = [name, "--params", str(params)]
    for spec in stage.INPUTS:
        producer = "data" if spec.name == "data" else PRODUCER.get(spec.name)
        if producer == "data" or producer in STAGES[:STAGES.index(name)]:
            argv += [f"--{spec.name.replace('_', '-')}", str(w / producer)]
    if "checkpoint_dir" in {f for f in stage.Config.__dataclass_fields__}:
        argv.append(f"--set={name}.checkpoint_dir={w / 'checkpoints' / name}")
    return argv + ["--out", str(w / name)]


def run_budget(budget: str, w: Path, resume: bool) -> None:
    """Data build and every stage of STAGES for `budget` into `w`; with `resume`, skip a stage whose output exists."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{w.resolve()}/mlflow.db", "DVC_NO_ANALYTICS": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    params = params_file(budget, w)
    w.mkdir(parents=True, exist_ok=True)
    steps = [("data", ["data", "build", "--params", str(params), "--out", str(w / "data")])]
    steps += [(name, stage_argv(name, w, params)) for name in STAGES]
    for name, argv in steps:
        if resume and (w / name / "metrics.json").is_file():
            print(f"== {budget} {name}: done earlier", flush=True)
            continue
        print(f"== {budget} {name}: alignpipe {' '.join(argv)}", flush=True)
        start = time.time()
        subprocess.run([sys.executable, "-m", "alignpipe", *argv], check=True, env=env)
        print(f"== {budget} {name}: {time.time() - start:.0f} s, load average {os.getloadavg()[0]:.1f}", flush=True)


def fmt(v, d: int = 5) -> str:
    return "n/a" if v is None or v != v else f"{v:.{d}f}"


def budget_rows(budget: str, w: Path) -> list[str]:
    """One table row per candidate of the evaluate report in `w`; one row saying so when there is none."""
    report = w / "evaluate" / "report.json"
    if not report.is_file():
        return [f"| {budget} | not run (no {report}) | | | | | |"]
    ev = json.loads(report.read_text())
    cands, ref_name = ev["candidates"], ev["order"][0]
    ref = cands[ref_name]["violations_per_char"]
    verdicts = ev.get("reward_hacking") or {}
    seconds = sum(json.loads((w / s / "metrics.json").read_text()).get("seconds", 0.0)
                  for s in STAGES if (w / s / "metrics.json").is_file())
    reward = json.loads((w / "reward" / "metrics.json").read_text()) if (w / "reward" / "metrics.json").is_file() \
        else {}
    rows = []
    for name in ev["order"]:
        m = cands[name]
        line = verdicts.get(name, "")
        guard = "reference" if name == ref_name else ("n/a" if not line else
                                                       "passes" if "no reward hacking" in line else "**flags**")
        rows.append(
            f"| {budget} | {name} | {fmt(m['violations_per_char'])} [{fmt(m.get('violations_per_char_ci_low'))}, "
            f"{fmt(m.get('violations_per_char_ci_high'))}] | {m['violations_per_char'] / ref:.2f} "
            f"[{m.get('violations_per_char_ci_low', float('nan')) / ref:.2f}, "
            f"{m.get('violations_per_char_ci_high', float('nan')) / ref:.2f}] | {fmt(m.get('kl_to_ref'), 2)} | "
            f"{guard} | {'best' if name == ev['best_candidate'] else ''} |")
    rows.append(f"| {budget} | (reward model held-out accuracy {fmt(reward.get('heldout_accuracy'), 3)}; "
                f"stage seconds {seconds:.0f}, pretrain..evaluate) | | | | | |")
    return rows


def report(dirs: dict[str, Path], out: Path, command: str, note: str) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else \
        platform.processor()
    lines = [
        "# Budget sweep: every candidate against the reference at three budgets (issue 28)", "",
        f"Command: `{command}` at commit {commit}. Machine: {cpu}, {os.cpu_count()} CPU cores. Load average "
        f"when this page was written: {os.getloadavg()[0]:.1f}. Budgets: `default` = params.yaml, `2x` = every key "
        f"of {', '.join(BUDGET_KEYS)} doubled, `quality` = configs/quality.yaml.", "",
        "Each ratio is violations/char (evaluate's held-out prompts, one sample each, lower is better) over the "
        "reference's on the same prompts; its interval is the candidate's 95% bootstrap interval over the "
        "reference's mean. Guard: the reward-hacking guard's verdict (the reward model's gain over the reference "
        "against the oracle's). Stage seconds are from each stage's metrics.json (loaded machines make them longer).",
        "", *([note, ""] if note else []),
        "| budget | candidate | violations/char [95% CI] | x reference [CI] | KL to ref | guard | |",
        "|---|---|---|---|---|---|---|",
    ]
    for budget in BUDGETS:
        lines += budget_rows(budget, dirs[budget])
    text = "\n".join(lines) + "\n"
    out.write_text(text, encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="default,2x", help=f"comma-separated, of {', '.join(BUDGETS)}")
    p.add_argument("--work", default="artifacts-sweep", help="work dir: one folder per budget inside")
    p.add_argument("--from", dest="from_", action="append", default=[], metavar="BUDGET=DIR",
                   help="report BUDGET from a finished run's stage outputs in DIR (e.g. default=artifacts)")
    p.add_argument("--out", default="benchmarks/results/budget_sweep.md")
    p.add_argument("--note", default="", help="a line for the page (e.g. why a budget was not run)")
    p.add_argument("--resume", action="store_true", help="skip the stages whose outputs exist in the work dir")
    p.add_argument("--only-report", action="store_true", help="only rewrite --out from the work dirs")
    args = p.parse_args(argv)
    dirs = {b: Path(args.work) / b for b in BUDGETS}
    for item in args.from_:
        budget, _, path = item.partition("=")
        if budget not in BUDGETS or not path:
            p.error(f"--from expects BUDGET=DIR with BUDGET one of {', '.join(BUDGETS)}, got {item!r}")
        dirs[budget] = Path(path)
    budgets = [b for b in args.budgets.split(",") if b]
    unknown = [b for b in budgets if b not in BUDGETS]
    if unknown:
        p.error(f"unknown budget {unknown[0]!r}; budgets: {', '.join(BUDGETS)}")
    if not args.only_report:
        for budget in budgets:
            if budget not in {i.partition("=")[0] for i in args.from_}:
                run_budget(budget, dirs[budget], args.resume)
    given = list(argv if argv is not None else sys.argv[1:])
    shown = [a for i, a in enumerate(given) if not (a == "--note" or a.startswith("--note=")
                                                     or (i and given[i - 1] == "--note"))]
    command = "python benchmarks/budget_sweep.py " + " ".join(shown)
    print(report(dirs, Path(args.out), command, args.note))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
