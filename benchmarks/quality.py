"""The quality budget: the whole PEP8 pipeline at `configs/quality.yaml`'s budget, plus an MLE baseline pretrain
(same data, tokenizer recipe, model and token budget; `pretrain.objective=mle`) passed to evaluate as an extra
candidate, so the PHF comparison (conditional vs MLE) and every RL candidate are measured on the same prompts.

Each stage runs through the CLI (the same run path as `dvc repro`) into `--work` (default `artifacts-quality/`,
its own checkpoints and MLflow store), timed; then `benchmarks/results/quality.md` gets the table of every
candidate (violations/char with CI, zero-violation fraction, win rates tie-inclusive and non-tied with the
ceiling, KL, held-out loss), the reward model's accuracy, label's drop rates and the wall time per stage.

    make quality                                   # = python benchmarks/quality.py --params configs/quality.yaml
    python benchmarks/quality.py --only-report     # rewrite quality.md from an earlier run's --work
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TARGETS = ("a champion registered, guard passing, <= 0.5x the reference and <= 0.33x MLE; reward model >= 0.85; "
           "conditional (pretrain) <= 0.5x MLE violations/char (CI upper < 1) at held-out loss <= 1.05x MLE")


def targets(ev: dict, reward: dict, registered: dict) -> list[str]:
    """Issue 28's quality-budget targets, each with its figure and whether it holds."""
    cands, guard = ev["candidates"], ev.get("reward_hacking", {})
    ref = cands[ev["order"][0]]
    mle = cands.get("mle")
    held = lambda ok: "holds" if ok else "missed"  # noqa: E731
    lines = []
    champ = registered.get("candidate") if registered.get("champion_after") else None
    if champ and champ in cands:
        v = cands[champ]["violations_per_char"]
        ok_guard = "no reward hacking" in guard.get(champ, "no reward hacking")
        ratio_mle = v / mle["violations_per_char"] if mle else float("nan")
        lines.append(f"- champion `{champ}` (version {registered.get('champion_after')}): guard "
                     f"{'passes' if ok_guard else 'flags'}, {v / ref['violations_per_char']:.2f}x the reference, "
                     f"{f'{ratio_mle:.2f}x MLE' if mle else 'no MLE baseline'}: "
                     f"{held(ok_guard and v <= 0.5 * ref['violations_per_char'] and ratio_mle <= 0.33)}")
    else:
        lines.append(f"- no champion registered ({registered.get('gate', 'register did not run')}): missed")
    acc = reward.get("heldout_accuracy")
    lines.append(f"- reward model held-out accuracy {fmt(acc, 3)}: {held(acc is not None and acc >= 0.85)}")
    if mle:
        cond, m = ref, mle["violations_per_char"]
        loss = cond.get("heldout_nats_per_char", float("nan")) / mle.get("heldout_nats_per_char", float("nan"))
        upper = cond.get("violations_per_char_ci_high", float("nan")) / m
        ratio = cond["violations_per_char"] / m
        lines.append(f"- conditional {ratio:.2f}x MLE (upper {upper:.2f}) at held-out loss {loss:.3f}x MLE: "
                     f"{held(ratio <= 0.5 and upper < 1 and loss <= 1.05)}")
    return lines


def commands(params: str, w: Path) -> list[tuple[str, list[str]]]:
    """(name, argv) for each stage, in DAG order; every path inside the work dir."""
    ck = lambda stage: f"--set={stage}.checkpoint_dir={w}/checkpoints/{stage}"  # noqa: E731
    from alignpipe.stages import CANDIDATES

    # evaluate's candidates from the registry (the reference first), so a new trainer stage is compared here too
    models = [arg for stage, output in CANDIDATES for arg in (f"--{output.replace('_', '-')}", f"{w}/{stage}")]
    return [
        ("data", ["data", "build", "--out", f"{w}/data"]),
        ("validate", ["validate", "--corpus", f"{w}/data", "--out", f"{w}/validate"]),
        ("pretrain", ["pretrain", "--data", f"{w}/data", "--out", f"{w}/pretrain", ck("pretrain")]),
        ("mle", ["pretrain", "--data", f"{w}/data", "--out", f"{w}/mle", "--set=pretrain.objective=mle",
                 f"--set=pretrain.checkpoint_dir={w}/checkpoints/mle"]),
        ("label", ["label", "--data", f"{w}/data", "--policy", f"{w}/pretrain", "--out", f"{w}/label"]),
        ("reward", ["reward", "--prefs", f"{w}/label", "--policy", f"{w}/pretrain", "--out", f"{w}/reward",
                    ck("reward")]),
        ("dpo", ["dpo", "--data", f"{w}/data", "--policy", f"{w}/pretrain", "--prefs", f"{w}/label",
                 "--out", f"{w}/dpo", ck("dpo")]),
        ("orpo", ["orpo", "--data", f"{w}/data", "--policy", f"{w}/pretrain", "--prefs", f"{w}/label",
                  "--out", f"{w}/orpo", ck("orpo")]),
        ("ppo", ["ppo", "--data", f"{w}/data", "--policy", f"{w}/pretrain", "--reward-model", f"{w}/reward",
                 "--out", f"{w}/ppo", ck("ppo")]),
        ("grpo", ["grpo", "--data", f"{w}/data", "--policy", f"{w}/pretrain", "--reward-model", f"{w}/reward",
                  "--out", f"{w}/grpo", ck("grpo")]),
        ("evaluate", ["evaluate", "--data", f"{w}/data", *models, "--reward-model", f"{w}/reward",
                      "--out", f"{w}/evaluate", f"--set=evaluate.extra_candidates=[mle={w}/mle]"]),
        ("export", ["export", "--best", f"{w}/evaluate/best", "--reward-model", f"{w}/reward",
                    "--data", f"{w}/data", "--out", f"{w}/export"]),
        ("register", ["register", "--best", f"{w}/evaluate/best", "--reward-model", f"{w}/reward",
                      "--export", f"{w}/export", "--out", f"{w}/register"]),
    ]


def run_all(params: str, w: Path, skip_done: bool) -> dict[str, float]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{w.resolve()}/mlflow.db", "DVC_NO_ANALYTICS": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    times_file = w / "seconds.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    w.mkdir(parents=True, exist_ok=True)
    for name, argv in commands(params, w):
        out = Path(argv[argv.index("--out") + 1])
        if skip_done and name in times and out.is_dir():
            print(f"== {name}: done earlier ({times[name]:.0f} s)", flush=True)
            continue
        command = [sys.executable, "-m", "alignpipe", *argv[:2 if name == "data" else 1], "--params", params, *argv[2 if name == "data" else 1:]]
        print(f"== {name}: {' '.join(command)}", flush=True)
        start = time.time()
        subprocess.run(command, check=True, env=env)
        times[name] = round(time.time() - start, 1)
        times_file.write_text(json.dumps(times, indent=1))
        print(f"== {name}: {times[name]:.0f} s, load average {os.getloadavg()[0]:.1f}", flush=True)
    return times


def fmt(v, d=5) -> str:
    return "n/a" if v is None or v != v else (f"{v:.{d}f}" if isinstance(v, float) else str(v))


def report(params: str, w: Path, out: Path, command: str) -> str:
    times = json.loads((w / "seconds.json").read_text())
    ev = json.loads((w / "evaluate" / "report.json").read_text())
    reward = json.loads((w / "reward" / "metrics.json").read_text())
    label = json.loads((w / "label" / "metrics.json").read_text())
    reg_file = w / "register" / "registered.json"
    registered = json.loads(reg_file.read_text()) if reg_file.is_file() else {}
    cands = ev["candidates"]
    mle = cands.get("mle", {}).get("violations_per_char")
    ref = cands[ev["order"][0]]["violations_per_char"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Quality budget: one full run (issues 15 and 28)", "",
        f"Command: `{command}` at commit {commit}, {os.cpu_count()} CPU cores; params `{params}` (an overlay of "
        f"params.yaml). Work dir `{w}`. Load average at the end: {os.getloadavg()[0]:.1f} (a loaded machine makes "
        "every second below longer; the idle target is 80 minutes in all).", "",
        f"Wall time: **{sum(times.values()) / 60:.1f} min** in all.", "",
        "| stage | seconds |", "|---|---|", *[f"| {k} | {v:.0f} |" for k, v in times.items()], "",
        f"## Candidates ({ev['prompts']['n']} held-out prompts, one sample each; reference "
        f"`{ev['order'][0]}`)", "",
        "| candidate | violations/char [95% CI] | x reference | x MLE | zero-violation | win vs ref (tie-incl.) | "
        "win vs ref (non-tied) | ceiling | KL to ref | held-out nats/char | guard |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    guard = ev.get("reward_hacking", {})
    for name in ev["order"]:
        m = cands[name]
        v = m["violations_per_char"]
        g = guard.get(name, "")
        g = "" if not g else ("ok" if "no reward hacking" in g else "**reward hacking**")
        lines.append(
            f"| {name} | {fmt(v)} [{fmt(m.get('violations_per_char_ci_low'))}, "
            f"{fmt(m.get('violations_per_char_ci_high'))}] | {v / ref:.2f} | "
            f"{fmt(v / mle, 2) if mle else 'n/a'} | {fmt(m.get('zero_violation_frac'), 3)} | "
            f"{fmt(m.get('win_rate_vs_ref'), 3)} | {fmt(m.get('win_rate_vs_ref_nontied'), 3)} | "
            f"{fmt(m.get('win_rate_ceiling'), 3)} | {fmt(m.get('kl_to_ref'), 2)} | "
            f"{fmt(m.get('heldout_nats_per_char'), 4)} | {g} |")
    keys = ("heldout_accuracy", "heldout_accuracy_ci_low", "heldout_accuracy_ci_high", "heldout_accuracy_clean_vs_dirty",
            "heldout_accuracy_both_dirty", "n_train_pairs", "n_heldout_pairs")
    lines += ["", "## Reward model and labels", "",
              "| metric | value |", "|---|---|",
              *[f"| reward {k} | {fmt(reward.get(k), 3)} |" for k in keys if k in reward],
              *[f"| label {k} | {fmt(v, 3)} |" for k, v in label.items() if k.startswith(("dropped", "n_", "capped"))],
              "", "## Targets (issue 28)", "", f"Targets: {TARGETS}.", "",
              *targets(ev, reward, registered), ""]
    text = "\n".join(lines)
    out.write_text(text, encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="configs/quality.yaml")
    p.add_argument("--work", default="artifacts-quality", help="work dir (created; every output goes inside)")
    p.add_argument("--out", default="benchmarks/results/quality.md")
    p.add_argument("--resume", action="store_true", help="skip the stages an earlier run of this --work finished")
    p.add_argument("--only-report", action="store_true", help="only rewrite --out from --work")
    args = p.parse_args(argv)
    w = Path(args.work)
    if not args.only_report:
        run_all(args.params, w, args.resume)
    print(report(args.params, w, Path(args.out), "python benchmarks/quality.py " + " ".join(argv or sys.argv[1:])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
