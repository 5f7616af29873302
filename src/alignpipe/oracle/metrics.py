"""Oracle statistics shared by every stage that reports them: per-sample scores, their summary with a bootstrap
interval, win rate against a reference (ties count half) and the sampled KL to a reference. Sampling a policy and
comparing it with a reference is `alignpipe.oracle.policy_eval`.

Conventions (docs/METRICS.md): the score of a sample is its violations per character (lower is better);
an empty completion has no score: it is left out of means and loses every comparison against a non-empty one.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence

from alignpipe.oracle.scoring import CompletionScore, score_completion


def score_samples(completions: Sequence[str], contexts: Sequence[str],
                  oracle: Callable[[str, str], CompletionScore] = score_completion) -> list[CompletionScore]:
    """Oracle scores of completions, each written after its context (the prompt or a longer code prefix); `oracle`
    is the task's (`Task.oracle()`; the PEP8 oracle by default)."""
    return [oracle(ctx, comp) for ctx, comp in zip(contexts, completions, strict=True)]


def sample_value(score: CompletionScore) -> float | None:
    """Violations per char of one sample; None when the completion is empty."""
    return None if score.chars == 0 else score.per_char


def bootstrap_ci(values: Sequence[float], stat: Callable[[Sequence[float]], float] | None = None,
                 n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval of `stat` (default: the mean) over `values`."""
    if not values:
        return (math.nan, math.nan)
    stat = stat or (lambda v: sum(v) / len(v))
    rng = random.Random(seed)
    stats = sorted(stat([values[rng.randrange(len(values))] for _ in values]) for _ in range(n_boot))
    return stats[int(alpha / 2 * n_boot)], stats[min(int((1 - alpha / 2) * n_boot), n_boot - 1)]


def ratio_ci(num: Sequence[float], den: Sequence[float], n_boot: int = 1000, seed: int = 0,
             alpha: float = 0.05) -> tuple[float, float, float]:
    """mean(num) / mean(den) and its percentile bootstrap interval (the two samples resampled independently)."""
    rng = random.Random(seed)

    def mean(v):
        return sum(v) / len(v)

    ratios = []
    for _ in range(n_boot):
        a = [num[rng.randrange(len(num))] for _ in num]
        b = [den[rng.randrange(len(den))] for _ in den]
        ratios.append(mean(a) / mean(b) if mean(b) > 0 else math.inf)
    ratios.sort()
    point = mean(num) / mean(den) if mean(den) > 0 else math.inf
    return point, ratios[int(alpha / 2 * n_boot)], ratios[min(int((1 - alpha / 2) * n_boot), n_boot - 1)]


def summarize(scores: Sequence[CompletionScore], seed: int = 0) -> dict[str, float]:
    """violations_per_char (mean over non-empty samples) with its 95% bootstrap interval, zero_violation_frac,
    and the fractions of empty and truncated samples."""
    values = [v for s in scores if (v := sample_value(s)) is not None]
    lo, hi = bootstrap_ci(values, seed=seed)
    n = max(len(scores), 1)
    return {
        "violations_per_char": sum(values) / len(values) if values else math.nan,
        "violations_per_char_ci_low": lo,
        "violations_per_char_ci_high": hi,
        "zero_violation_frac": sum(v == 0 for v in values) / n,
        "empty_frac": sum(s.chars == 0 for s in scores) / n,
        "truncated_frac": sum(s.truncated for s in scores) / n,
        "n_samples": len(scores),
    }


def win_rate(candidate: Sequence[CompletionScore], reference: Sequence[CompletionScore]) -> float:
    """Fraction of prompts where the candidate's sample scores better (lower) than the reference's; ties 1/2."""
    if len(candidate) != len(reference) or not candidate:
        raise ValueError("win_rate needs two non-empty score lists of the same length (one per prompt)")
    total = 0.0
    for c, r in zip(candidate, reference):
        cv, rv = sample_value(c), sample_value(r)
        if cv is None or rv is None:
            total += 0.5 if cv is None and rv is None else (0.0 if cv is None else 1.0)
        else:
            total += 1.0 if cv < rv else 0.5 if cv == rv else 0.0
    return total / len(candidate)


def win_rate_nontied(candidate: Sequence[CompletionScore], reference: Sequence[CompletionScore]) -> float:
    """Wins / (wins + losses) against the reference, ties (equal scores, or both samples empty) left out; NaN when
    every pair ties. `win_rate` counts ties as half; this is the rate among pairs the oracle separates."""
    wins = losses = 0
    for c, r in zip(candidate, reference, strict=True):
        cv, rv = sample_value(c), sample_value(r)
        if cv is None and rv is None or cv == rv:
            continue
        if rv is None or (cv is not None and cv < rv):
            wins += 1
        else:
            losses += 1
    return wins / (wins + losses) if wins + losses else math.nan


def win_rate_ceiling(reference: Sequence[CompletionScore]) -> float:
    """The best `win_rate` any candidate can reach against these reference samples: a clean one (0 violations)
    can only be tied (1/2), any other beaten (1). The non-tied rate's ceiling is 1."""
    if not reference:
        raise ValueError("win_rate_ceiling needs a non-empty score list")
    return sum(0.5 if sample_value(r) == 0 else 1.0 for r in reference) / len(reference)


def kl_to_ref(policy_logprobs: Sequence[float], ref_logprobs: Sequence[float]) -> float:
    """Monte Carlo KL(policy || ref) in nats per sequence: mean of log p_policy(y) - log p_ref(y) over samples
    y drawn from the policy (each a sum over the completion's tokens)."""
    if len(policy_logprobs) != len(ref_logprobs) or not policy_logprobs:
        raise ValueError("kl_to_ref needs two non-empty log-probability lists of the same length")
    return sum(p - r for p, r in zip(policy_logprobs, ref_logprobs)) / len(policy_logprobs)
