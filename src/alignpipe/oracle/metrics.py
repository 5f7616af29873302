"""Oracle evaluation shared by every stage that reports it: per-sample scores, their summary with a bootstrap
interval, win rate against a reference (ties count half) and the sampled KL to a reference.

Conventions (../shared/METRICS.md): the score of a sample is its violations per character (lower is better);
an empty completion has no score: it is left out of means and loses every comparison against a non-empty one.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence

from alignpipe.oracle.scoring import CompletionScore, score_completion


def score_samples(completions: Sequence[str], contexts: Sequence[str]) -> list[CompletionScore]:
    """Oracle scores of completions, each written after its context (the prompt or a longer code prefix)."""
    return [score_completion(ctx, comp) for ctx, comp in zip(contexts, completions, strict=True)]


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


def kl_to_ref(policy_logprobs: Sequence[float], ref_logprobs: Sequence[float]) -> float:
    """Monte Carlo KL(policy || ref) in nats per sequence: mean of log p_policy(y) - log p_ref(y) over samples
    y drawn from the policy (each a sum over the completion's tokens)."""
    if len(policy_logprobs) != len(ref_logprobs) or not policy_logprobs:
        raise ValueError("kl_to_ref needs two non-empty log-probability lists of the same length")
    return sum(p - r for p, r in zip(policy_logprobs, ref_logprobs)) / len(policy_logprobs)


def load_prompts(path, limit: int | None = None) -> list[dict]:
    """Held-out prompts: `data/prompts.jsonl` (or any JSONL with `prompt`; `context` defaults to the prompt)."""
    from pathlib import Path

    from alignpipe.core.errors import DataError
    from alignpipe.core.io import read_jsonl

    path = Path(path)
    if path.is_dir():
        path = path / "prompts.jsonl"
    rows = read_jsonl(path)
    for i, row in enumerate(rows):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise DataError(f"{path}:{i + 1}", "field 'prompt' must be a non-empty string")
        row.setdefault("context", row["prompt"])
    return rows[:limit] if limit else rows


def evaluate_policy(policy, prompts: list[dict], sampling=None, seed: int = 0, reference=None,
                    progress: str | None = None) -> tuple[dict[str, float], dict]:
    """Sample one completion per prompt from `policy` = (model, tokenizer, meta), score it with the oracle and,
    given `reference` = (model, tokenizer, meta), add win_rate_vs_ref and kl_to_ref (ref samples use the same
    prompts and seed). Returns (metrics, details with the samples and per-sample scores)."""
    from alignpipe.lm.policy import Sampling, encode_prompts, sample, sequence_logprobs

    sampling = sampling or Sampling()
    model, tok, meta = policy
    texts = [r["prompt"] for r in prompts]
    contexts = [r["context"] for r in prompts]
    samples = sample(model, tok, meta, texts, sampling, seed=seed, progress=progress)
    scores = score_samples([s.completion for s in samples], contexts)
    metrics = summarize(scores, seed=seed)
    details = {"completions": [s.completion for s in samples], "scores": [sample_value(s) for s in scores]}
    if reference is not None:
        ref_model, ref_tok, ref_meta = reference
        if ref_tok.get_vocab() != tok.get_vocab():
            raise ValueError("policy and reference must share a tokenizer to compare log-probabilities")
        ref_samples = sample(ref_model, ref_tok, ref_meta, texts, sampling, seed=seed,
                             progress=progress and f"{progress} (reference)")
        ref_scores = score_samples([s.completion for s in ref_samples], contexts)
        metrics["win_rate_vs_ref"] = win_rate(scores, ref_scores)
        lp_pol = sequence_logprobs(model, [s.prompt_ids for s in samples], [s.completion_ids for s in samples])
        ref_prompt_ids = encode_prompts(ref_tok, ref_meta, texts, sampling.max_prompt_tokens)
        lp_ref = sequence_logprobs(ref_model, ref_prompt_ids, [s.completion_ids for s in samples])
        metrics["kl_to_ref"] = kl_to_ref(lp_pol, lp_ref)
        metrics["ref_violations_per_char"] = summarize(ref_scores, seed=seed)["violations_per_char"]
        details["ref_completions"] = [s.completion for s in ref_samples]
        details["ref_scores"] = [sample_value(s) for s in ref_scores]
    return metrics, details


def oracle_metrics(policy_dir: str | Path, reference, data_dir: str | Path, n_prompts: int, batch_size: int,
                   seed: int, out_dir: str | Path, progress: str) -> dict[str, float]:
    """The oracle evaluation of a saved policy on held-out prompts against `reference` = (model, tok, meta):
    `evaluate_policy`'s metrics plus win/tie/loss fractions and the win-rate ceiling. Writes the samples to
    `out_dir/samples.jsonl`."""
    from pathlib import Path

    from alignpipe.core.io import write_jsonl
    from alignpipe.lm.policy import Sampling, load_policy

    policy = load_policy(policy_dir)
    prompts = load_prompts(data_dir, n_prompts)
    metrics, details = evaluate_policy(policy, prompts, Sampling(batch_size=batch_size), seed=seed,
                                       reference=reference, progress=progress)
    wins = ties = 0
    for c, r in zip(details["scores"], details["ref_scores"]):
        if c is None or r is None:
            wins += c is not None and r is None
            ties += c is None and r is None
        else:
            wins += c < r
            ties += c == r
    n = len(prompts)
    # Ties count half, so no policy can beat a clean reference sample: the best reachable win rate.
    ceiling = sum(0.5 if r == 0 else 1.0 for r in details["ref_scores"]) / n
    metrics.update(win_frac=wins / n, tie_frac=ties / n, loss_frac=(n - wins - ties) / n, win_rate_ceiling=ceiling)
    write_jsonl(Path(out_dir) / "samples.jsonl", (
        {"prompt": p["prompt"], "completion": c, "score": s, "ref_completion": rc, "ref_score": rs}
        for p, c, s, rc, rs in zip(prompts, details["completions"], details["scores"], details["ref_completions"],
                                   details["ref_scores"])))
    return metrics
