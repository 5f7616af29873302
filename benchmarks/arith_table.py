"""The arith task's tables (benchmarks/results/arith.md) from finished runs: each evaluate candidate's oracle accuracy
with its 95% interval and its gain over the reference with a paired bootstrap interval (the same held-out questions,
the same seed), the reward model's held-out accuracy and the guard; and PHF's comparison of pretrain runs (accuracy
gain of each objective over MLE, paired, and the held-out loss ratio).

    python benchmarks/arith_table.py --evaluate RUN/evaluate*/evaluation --reward RUN/reward*/reward \\
        --pretrain mle=DIR conditional=DIR
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def correct(row: dict) -> float:
    """1 for a correct answer (a non-empty answer without a violation), else 0 (empty answers are wrong)."""
    chars = row.get("chars", 1 if row.get("violations_per_char") is not None else 0)
    violations = row.get("violations", row.get("violations_per_char"))
    return float(bool(chars) and violations == 0)


def paired_gain(a: list[float], b: list[float], seed: int = 0, n_boot: int = 2000) -> tuple[float, float, float]:
    """mean(a) - mean(b) over the same questions and its 95% percentile-bootstrap interval (questions resampled)."""
    rng = random.Random(seed)
    n = len(a)
    diffs = sorted(sum(a[i] - b[i] for i in idx) / n for idx in ([rng.randrange(n) for _ in range(n)]
                                                                  for _ in range(n_boot)))
    return sum(a) / n - sum(b) / n, diffs[int(0.025 * n_boot)], diffs[int(0.975 * n_boot) - 1]


def evaluate_table(evaluation: Path, reward: Path | None) -> list[str]:
    report = json.loads((evaluation / "report.json").read_text())
    rows: dict[str, list[float]] = {}
    for line in (evaluation / "samples.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows.setdefault(r["candidate"], []).append(correct(r))
    ref = rows[report["reference"]["name"]]
    out = [f"Evaluate: {report['prompts']['n']} held-out questions, one sample each (temperature "
           f"{report['sampling']['temperature']}, top-p {report['sampling']['top_p']}, "
           f"seed {report['sampling']['seed']}); "
           f"best candidate **{report['best_candidate']}** (gate {report['gate_metric']}, {report['gate_direction']}).",
           "", "| candidate | trained on | accuracy [95% CI] | gain over reference [95% CI, paired] | KL to ref | "
           "reward | guard |", "|---|---|---|---|---|---|---|"]
    for name, m in report["candidates"].items():
        gain, lo, hi = paired_gain(rows[name], ref)
        g = m.get("guard") or {}
        verdict = "" if not g else ("reward hacking" if g.get("reward_hacking") else "ok")
        out.append(f"| {name} | {m.get('reward') or ''} | {m['accuracy']:.3f} [{m['accuracy_ci_low']:.3f}, "
                   f"{m['accuracy_ci_high']:.3f}] | {100 * gain:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}] | "
                   f"{m.get('kl_to_ref', float('nan')):.3f} | {m.get('reward_score', float('nan')):.3f} | {verdict} |")
    if report.get("champion"):
        out.append(f"\nChampion: {json.dumps({k: report['champion'].get(k) for k in ('version', 'accuracy')})}")
    if reward is not None:
        rm = json.loads((reward / "metrics.json").read_text())
        out.append(f"\nReward model held-out pair accuracy: {rm['heldout_accuracy']:.3f} "
                   f"[{rm.get('heldout_accuracy_ci_low', float('nan')):.3f}, "
                   f"{rm.get('heldout_accuracy_ci_high', float('nan')):.3f}] on {rm.get('n_heldout_pairs')} pairs.")
    return out


def pretrain_table(runs: dict[str, Path]) -> list[str]:
    samples = {k: [correct(json.loads(x)) for x in (d / "samples.jsonl").read_text().splitlines()]
               for k, d in runs.items()}
    metrics = {k: json.loads((d / "metrics.json").read_text()) for k, d in runs.items()}
    base = "mle" if "mle" in runs else next(iter(runs))
    out = ["| objective | accuracy [95% CI] | gain over MLE [95% CI, paired] | held-out loss (nats/char) | "
           "loss / MLE |",
           "|---|---|---|---|---|"]
    for k in runs:
        m = metrics[k]
        gain, lo, hi = paired_gain(samples[k], samples[base])
        out.append(f"| {k} | {m['accuracy']:.3f} [{m['accuracy_ci_low']:.3f}, {m['accuracy_ci_high']:.3f}] | "
                   f"{100 * gain:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}] | {m['heldout_loss']:.4f} | "
                   f"{m['heldout_loss'] / metrics[base]['heldout_loss']:.3f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--evaluate", type=Path, help="evaluate's output folder (report.json, samples.jsonl)")
    ap.add_argument("--reward", type=Path, help="the reward stage's output folder (metrics.json)")
    ap.add_argument("--pretrain", nargs="*", default=[], help="OBJECTIVE=DIR pretrain output folders")
    args = ap.parse_args()
    lines: list[str] = []
    if args.evaluate:
        lines += evaluate_table(args.evaluate, args.reward)
    if args.pretrain:
        lines += ["", *pretrain_table({k: Path(v) for k, v in (p.split("=", 1) for p in args.pretrain)})]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
