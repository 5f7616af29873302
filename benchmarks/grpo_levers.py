"""GRPO's levers against the PEP8 oracle at the default budget (issue 28): run the grpo stage on a finished default
run's inputs with `--set` overrides, then score the trained policy as evaluate does, against the reference's draw
that run's evaluate already made (same held-out prompts, sampling settings and seed), so the reference is not
sampled again: violations/char over the reference's with the candidate's 95% bootstrap interval, the sampled KL
to the reference, held-out nats/char (evaluate's perplexity text), mean completion length, the share of
completions with a triple quote (a docstring: string content pycodestyle does not check, so a policy can lower
violations/char by writing docstrings) and the reward-hacking guard's verdict (`alignpipe.oracle.guard`).
Each run appends one row to `--out` with the stage's wall time and the load average (the table is
benchmarks/results/grpo_levers.md).

    python benchmarks/grpo_levers.py --run artifacts --name lr5e-4 --set grpo.learning_rate=5e-4
    python benchmarks/grpo_levers.py --run artifacts --name ppo-oracle --stage ppo --set ppo.reward=oracle

`--run` holds the default run's stage outputs (data/ beside it or `--data`): pretrain (the reference), reward
(the guard's reward model) and evaluate (its samples.jsonl holds the reference's draw). The final figures of a
setting come from the evaluate stage itself; this script is for screening.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path


def train(stage: str, run: Path, data: Path, work: Path, sets: list[str]) -> float:
    """The stage through the CLI into `work/policy`; its wall seconds."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work.resolve()}/mlflow.db"}
    argv = [sys.executable, "-m", "alignpipe", stage, "--data", str(data), "--policy", str(run / "pretrain"),
            "--reward-model", str(run / "reward"), "--out", str(work / "policy"),
            f"--set={stage}.checkpoint_dir={work / 'checkpoints'}", *[f"--set={s}" for s in sets]]
    start = time.time()
    with open(work / "train.log", "w") as log:
        subprocess.run(argv, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    return time.time() - start


def score(policy_dir: Path, run: Path, data: Path) -> dict:
    """Evaluate's figures for one candidate against the reference's saved draw (same prompts, sampling, seed)."""
    import torch

    from alignpipe.core.config import load_params
    from alignpipe.lm.heldout import heldout_nll
    from alignpipe.lm.models import context_length
    from alignpipe.lm.policy import load_policy
    from alignpipe.lm.reward_model import load_reward_model
    from alignpipe.oracle.guard import guard, verdict_line
    from alignpipe.oracle.metrics import sample_value
    from alignpipe.oracle.policy_eval import compare, draw, load_prompts, sampled_logprobs
    from alignpipe.oracle.scoring import CompletionScore
    from alignpipe.stages.evaluate import REFERENCE, Config, heldout_text
    from alignpipe.tasks import task_of

    cfg = Config.from_dict(load_params("params.yaml").get("evaluate", {}))
    task = task_of(data)
    torch.manual_seed(cfg.seed)
    rows = load_prompts(data / "prompts.jsonl", limit=cfg.n_prompts or None)
    ref = [r for r in map(json.loads, open(run / "evaluate" / "samples.jsonl")) if r["candidate"] == REFERENCE]
    if [r["prompt"] for r in ref] != [r["prompt"] for r in rows]:
        raise SystemExit(f"{run}/evaluate/samples.jsonl: not evaluate's prompts at params.yaml's settings")
    ref_scores = [CompletionScore(r["violations"], r["chars"], False) for r in ref]
    sampling = cfg.sampling
    policy = load_policy(policy_dir)
    got = draw(policy, rows, sampling, cfg.seed, None, load_reward_model(run / "reward"), task=task)
    logp, logp_ref, _ = sampled_logprobs(policy, got.samples, load_policy(run / "pretrain"),
                                         [r["prompt"] for r in rows], sampling.max_prompt_tokens, task)
    m = compare(got.scores, ref_scores, logp, logp_ref, seed=cfg.seed)
    val_texts = heldout_text(data, cfg.ppl_max_chars)
    nll, _ = heldout_nll(policy[0], policy[1], val_texts, min(cfg.ppl_window, context_length(policy[0]) or
                                                              cfg.ppl_window))
    with open(policy_dir.parent / f"{policy_dir.name}.samples.jsonl", "w", encoding="utf-8") as f:
        for row, sample, s in zip(rows, got.samples, got.scores):
            f.write(json.dumps({"prompt": row["prompt"], "completion": sample.completion, "violations": s.violations,
                                "chars": s.chars}) + "\n")
    ref_values = [v for s in ref_scores if (v := sample_value(s)) is not None]
    ref_mean = sum(ref_values) / len(ref_values)
    g = guard(got.rewards, [r["reward"] for r in ref], [sample_value(s) for s in got.scores],
              [sample_value(s) for s in ref_scores], seed=cfg.seed)
    return {"ratio": m["violations_per_char"] / ref_mean, "ratio_ci_low": m["violations_per_char_ci_low"] / ref_mean,
            "ratio_ci_high": m["violations_per_char_ci_high"] / ref_mean, "kl_to_ref": m["kl_to_ref"],
            "empty_frac": m["empty_frac"], "mean_chars": sum(s.chars for s in got.scores) / len(got.scores),
            "ref_mean_chars": sum(s.chars for s in ref_scores) / len(ref_scores),
            "docstring_frac": sum('"""' in c for c in got.completions()) / len(rows),
            "ref_docstring_frac": sum('"""' in r["completion"] for r in ref) / len(ref),
            "heldout_nats_per_char": nll / max(sum(len(t) for t in val_texts), 1),
            "reward_hacking": g["reward_hacking"], "guard": verdict_line("candidate", g)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=Path("artifacts"), help="a finished default run's stage outputs")
    p.add_argument("--data", type=Path, default=None, help="its dataset (default: data/ beside --run)")
    p.add_argument("--stage", choices=("grpo", "ppo"), default="grpo")
    p.add_argument("--name", required=True, help="the row's name; outputs go to --work/NAME")
    p.add_argument("--policy", type=Path, default=None, help="score this trained policy instead of training one")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--work", type=Path, default=Path("tmp/grpo_levers"), help="one folder per row (git-ignored)")
    p.add_argument("--out", type=Path, default=Path("tmp/grpo_levers/rows.tsv"), help="rows appended here")
    args = p.parse_args(argv)
    data = args.data or args.run.parent / "data"
    work = args.work / args.name
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    seconds = math.nan if args.policy else train(args.stage, args.run, data, work, args.sets)
    load_end = os.getloadavg()[0]
    got = score(args.policy or work / "policy", args.run, data)
    (work / "score.json").write_text(json.dumps(got, indent=1))
    row = (f"{args.name}\t{args.stage} {' '.join(args.sets) or '(defaults)'}\t{got['ratio']:.3f} "
           f"[{got['ratio_ci_low']:.3f}, {got['ratio_ci_high']:.3f}]\t"
           f"{'flags' if got['reward_hacking'] else 'passes'}\t{got['kl_to_ref']:.2f}\t"
           f"{got['mean_chars']:.0f}/{got['ref_mean_chars']:.0f}\t"
           f"{got['docstring_frac']:.2f}/{got['ref_docstring_frac']:.2f}\t{got['heldout_nats_per_char']:.3f}\t"
           f"{seconds:.0f}\t{load_start:.1f}-{load_end:.1f}")
    print(row)
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(row + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
