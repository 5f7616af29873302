"""Reward/KL frontier: DPO over several betas and PPO over several KL coefficients, each trained by its stage's
`run` (params.yaml budgets otherwise) and evaluated by the oracle on the same held-out prompts and seed.
With `--rewards`: instead, DPO, PPO and GRPO each against the reward model and against the oracle (params.yaml
budgets), all compared by the evaluate stage in one run (KL, violations/char with CI, win rates with and without
ties, the reward-hacking guard); that table replaces the "RL against rewards" section of frontier.md.

Plots the oracle score (violations per character, lower is better, with its 95% bootstrap interval; and the win
rate against the reference, ties half) against the sampled KL to the reference (nats per completion), with the
reference itself at KL 0, to `benchmarks/results/frontier.png`, and writes the table to `frontier.md`.

    python benchmarks/frontier.py                     # defaults: artifacts/{pretrain,label,reward}, data/
    python benchmarks/frontier.py --dpo-betas 0.1 --ppo-kl-coefs 0.05 --n-eval-prompts 128   # a quick look
    python benchmarks/frontier.py --rewards           # reference, DPO, PPO/GRPO x reward model/oracle
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data")
    p.add_argument("--policy", default="artifacts/pretrain")
    p.add_argument("--prefs", default="artifacts/label")
    p.add_argument("--reward-model", default="artifacts/reward")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--dpo-betas", type=floats, default=[0.03, 0.1, 0.3, 1.0])
    p.add_argument("--ppo-kl-coefs", type=floats, default=[0.01, 0.05, 0.2])
    p.add_argument("--n-eval-prompts", type=int, default=0, help="0: the params.yaml value")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--rewards", action="store_true", help="compare the reward choices of ppo and grpo instead")
    args = p.parse_args(argv)
    if args.rewards:
        return rewards_table(args)

    os.environ.setdefault("TQDM_DISABLE", "1")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    import transformers

    from alignpipe.core.config import build_config, load_params
    from alignpipe.stages import dpo, ppo

    transformers.logging.set_verbosity_error()
    params = load_params(args.params)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("dpo", "beta", b) for b in args.dpo_betas] + [("ppo", "kl_coef", c) for c in args.ppo_kl_coefs]
        for stage, key, value in runs:
            module = dpo if stage == "dpo" else ppo
            base = build_config(module.Config, params).to_dict()
            overrides = {key: value, "checkpoint_dir": str(Path(tmp) / f"ckpt-{stage}-{value}"), "resume": False}
            if args.n_eval_prompts:
                overrides["n_eval_prompts"] = args.n_eval_prompts
            cfg = module.Config(**{**base, **overrides})
            inputs = ({"data": Path(args.data), "policy": Path(args.policy), "prefs": Path(args.prefs),
                       "human_prefs": None} if stage == "dpo" else
                      {"data": Path(args.data), "policy": Path(args.policy),
                       "reward_model": Path(args.reward_model)})
            out = Path(tmp) / f"{stage}-{value}"
            out.mkdir()
            start = time.perf_counter()
            metrics = module.run(cfg, inputs, out)
            metrics["seconds"] = time.perf_counter() - start
            rows.append({"stage": stage, "key": key, "value": value, **metrics})
            print(f"{stage} {key}={value}: KL {metrics['kl_to_ref']:.3f}, violations/char "
                  f"{metrics['violations_per_char']:.5f}, win rate {metrics['win_rate_vs_ref']:.3f}, "
                  f"{metrics['seconds']:.0f} s", flush=True)

    ref_vpc = rows[0]["ref_violations_per_char"]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for stage, color in (("dpo", "tab:blue"), ("ppo", "tab:orange")):
        sel = sorted((r for r in rows if r["stage"] == stage), key=lambda r: r["kl_to_ref"])
        if not sel:
            continue
        kl = [r["kl_to_ref"] for r in sel]
        vpc = [r["violations_per_char"] for r in sel]
        err = [[r["violations_per_char"] - r["violations_per_char_ci_low"] for r in sel],
               [r["violations_per_char_ci_high"] - r["violations_per_char"] for r in sel]]
        label = f"{stage.upper()} ({sel[0]['key']})"
        ax1.errorbar(kl, vpc, yerr=err, marker="o", color=color, capsize=3, label=label)
        ax2.plot(kl, [r["win_rate_vs_ref"] for r in sel], marker="o", color=color, label=label)
        for r in sel:
            ax1.annotate(f"{r['value']:g}", (r["kl_to_ref"], r["violations_per_char"]), textcoords="offset points",
                         xytext=(4, 4), fontsize=8)
            ax2.annotate(f"{r['value']:g}", (r["kl_to_ref"], r["win_rate_vs_ref"]), textcoords="offset points",
                         xytext=(4, 4), fontsize=8)
    ax1.scatter([0.0], [ref_vpc], marker="*", s=120, color="black", label="reference (pretrained)", zorder=3)
    ax2.scatter([0.0], [0.5], marker="*", s=120, color="black", label="reference (pretrained)", zorder=3)
    xlabel = "sampled KL to the reference (nats per completion)"
    ax1.set(xlabel=xlabel, ylabel="oracle violations per char (lower better)", title="Oracle score vs KL")
    ax2.set(xlabel=xlabel, ylabel="win rate vs reference (ties 1/2)", title="Win rate vs KL")
    ax2.axhline(0.75, color="grey", linestyle=":", linewidth=1)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "frontier.png", dpi=120)

    n_eval = rows[0]["n_samples"]
    lines = [
        "# Reward/KL frontier: DPO (beta) and PPO (KL coefficient)",
        "",
        f"`python benchmarks/frontier.py` on {os.cpu_count()} shared CPU cores, torch {torch.__version__}. Policy "
        f"`{args.policy}`, pairs `{args.prefs}`, reward model `{args.reward_model}`; every other setting from "
        f"`{args.params}`. Oracle evaluation: {int(n_eval)} held-out prompts, one sample each (temperature 0.7, "
        "top-p 0.9), the same seed for the policy and the reference. KL: mean over the policy's samples of "
        "log p_policy - log p_ref (nats per completion). Win rate: ties count 1/2, so it cannot exceed the "
        "ceiling 1 - P(reference sample is clean)/2.",
        "",
        f"Reference: {ref_vpc:.5f} violations/char.",
        "",
        "| stage | coefficient | KL to ref | violations/char [95% CI] | zero-violation frac | win rate | "
        "win / tie / loss | ceiling | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['key']}={r['value']:g} | {r['kl_to_ref']:.3f} | {r['violations_per_char']:.5f} "
            f"[{r['violations_per_char_ci_low']:.5f}, {r['violations_per_char_ci_high']:.5f}] | "
            f"{r['zero_violation_frac']:.3f} | {r['win_rate_vs_ref']:.3f} | {r['win_frac']:.2f} / "
            f"{r['tie_frac']:.2f} / {r['loss_frac']:.2f} | {r['win_rate_ceiling']:.3f} | {r['seconds']:.0f} |")
    lines += ["", "![frontier](frontier.png)"]
    text = "\n".join(lines) + "\n"
    (out_dir / "frontier.md").write_text(text)
    print(text)
    return 0


REWARD_RUNS = (("dpo", "dpo", None), ("ppo-model", "ppo", "model"), ("ppo-oracle", "ppo", "oracle"),
               ("grpo-model", "grpo", "model"), ("grpo-oracle", "grpo", "oracle"))
SECTION = "## RL against rewards"


def rewards_table(args) -> int:
    """Train each of REWARD_RUNS with params.yaml's budget, evaluate them together, write the table."""
    import importlib
    import math

    os.environ.setdefault("TQDM_DISABLE", "1")
    import transformers

    from alignpipe.core.config import build_config, load_params
    from alignpipe.reports import evaluation
    from alignpipe.stages import evaluate

    transformers.logging.set_verbosity_error()
    params = load_params(args.params)
    data, policy, rm = Path(args.data), Path(args.policy), Path(args.reward_model)
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        for name, stage, reward in REWARD_RUNS:
            module = importlib.import_module(f"alignpipe.stages.{stage}")
            overrides = {"checkpoint_dir": str(Path(tmp) / f"ckpt-{name}"), "resume": False}
            if reward is not None:
                overrides["reward"] = reward
            cfg = module.Config(**{**build_config(module.Config, params).to_dict(), **overrides})
            inputs = {"data": data, "policy": policy, "reward_model": rm, "prefs": Path(args.prefs),
                      "human_prefs": None}
            out = Path(tmp) / name
            out.mkdir()
            start = time.perf_counter()
            module.run(cfg, inputs, out)
            seconds[name] = time.perf_counter() - start
            print(f"{name}: trained in {seconds[name]:.0f} s", flush=True)
        ecfg = build_config(evaluate.Config, params).to_dict()
        ecfg.update(extra_candidates=[f"{n}={Path(tmp) / n}" for n, _, _ in REWARD_RUNS], compare_champion=False)
        if args.n_eval_prompts:
            ecfg["n_prompts"] = args.n_eval_prompts
        out = Path(tmp) / "evaluate"
        out.mkdir()
        start = time.perf_counter()
        evaluate.run(evaluate.Config(**ecfg), {"data": data, "policy": policy, "reward_model": rm}, out)
        eval_seconds = time.perf_counter() - start
        report = json.loads((out / "report.json").read_text())

    def f(v, d=5):
        return "-" if not isinstance(v, (int, float)) or not math.isfinite(v) else f"{v:.{d}f}"

    cands = report["candidates"]
    ref = cands["pretrain"]["violations_per_char"]
    lines = [SECTION, "",
             f"`python benchmarks/frontier.py --rewards` ({os.cpu_count()} CPU cores, load average at the end "
             f"{os.getloadavg()[0]:.1f}): policy `{args.policy}`, reward model `{args.reward_model}`, "
             f"params `{args.params}` budgets; all candidates evaluated together by the evaluate stage "
             f"({report['prompts']['n']} held-out prompts, seed {report['sampling']['seed']}, {eval_seconds:.0f} s). "
             "Ratio: violations/char over the reference's. Win rates: ties half (tie-inclusive) and over non-tied "
             "pairs. Guard: alignpipe.oracle.guard (reward-model reward up beyond its CI while the oracle gain is "
             "not above 0 beyond its CI = reward hacking).", "",
             "The evaluate stage's table of every candidate (its report.md), then each candidate's ratio to the "
             "reference and the guard's paired gains over the reference.", "",
             *evaluation.candidates_table(report), "",
             "| candidate | ratio to reference | RM gain [95% CI] | oracle gain [95% CI] (violations/char) | train s |",
             "|---|---|---|---|---|"]
    for name in report["order"]:
        m, g = cands[name], cands[name].get("guard") or {}
        gains = [f"{f(g.get(k), d)} [{f(g.get(k + '_ci_low'), d)}, {f(g.get(k + '_ci_high'), d)}]"
                 for k, d in (("rm_gain", 3), ("oracle_gain", 5))]
        lines.append(" | ".join(["", name, f(m["violations_per_char"] / ref, 2), *gains, f(seconds.get(name), 0), ""])
                     .strip())
    text = "\n".join(lines) + "\n"
    out_dir = Path(args.out_dir)
    md = out_dir / "frontier.md"
    old = md.read_text() if md.is_file() else ""
    md.write_text((old.split(SECTION)[0].rstrip() + "\n\n" if old else "") + text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
