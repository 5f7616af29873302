"""Evaluate a policy with the oracle on held-out prompts: sample one completion per prompt, score it, and compare
it with a reference policy (win rate, sampled KL) sampled on the same prompts with the same seed.

The one home of policy evaluation: the evaluate stage compares every candidate with it; pretrain, dpo and ppo
report their own policy with `evaluate_policy`. The pure statistics live in `alignpipe.oracle.metrics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from alignpipe.oracle.metrics import (kl_to_ref, sample_value, score_samples, summarize, win_rate,
                                      win_rate_ceiling, win_rate_nontied)
from alignpipe.oracle.scoring import CompletionScore


def load_prompts(path, limit: int | None = None) -> list[dict]:
    """Held-out prompts: `data/prompts.jsonl` (or any JSONL with `prompt`, a string or a list of chat messages;
    `context` defaults to the prompt)."""
    from alignpipe.core.errors import DataError
    from alignpipe.core.io import read_jsonl
    from alignpipe.core.io import is_messages

    path = Path(path)
    if path.is_dir():
        path = path / "prompts.jsonl"
    rows = read_jsonl(path)
    for i, row in enumerate(rows):
        prompt = row.get("prompt")
        if not is_messages(prompt) and (not isinstance(prompt, str) or not prompt.strip()):
            raise DataError(f"{path}:{i + 1}", "field 'prompt' must be a non-empty string or a list of messages")
        row.setdefault("context", row["prompt"])
    return rows[:limit] if limit else rows


def read_train_prompts(data_dir: str | Path) -> list[dict]:
    """Training prompt rows (`prompt`, `context`) of a data directory's `train_prompts.jsonl` (RL rollouts)."""
    from alignpipe.core.errors import DataError

    path = Path(data_dir) / "train_prompts.jsonl"
    if not path.is_file():
        raise DataError(str(path), "training prompts not found (rebuild the data with `alignpipe data build`)")
    return load_prompts(path)


@dataclass
class Draw:
    """One sampled completion per prompt, its oracle score and (given a reward model) its reward."""

    samples: list
    scores: list[CompletionScore]
    rewards: list[float] | None = field(default=None)

    def completions(self) -> list[str]:
        return [s.completion for s in self.samples]


def draw(policy, prompts: list[dict], sampling, seed: int, progress: str | None = None, reward=None, *,
         task, greedy: bool = False) -> Draw:
    """Sample `policy` = (model, tokenizer, meta) once per prompt with `seed` (`greedy`: decode greedily; ending each
    completion where `task`, an `alignpipe.tasks.Task`, says), score each completion with the task's oracle (after
    the prompt's context) and, given `reward` = (model, tokenizer), with the reward model."""
    from alignpipe.lm.policy import sample

    texts = [r["prompt"] for r in prompts]
    samples = sample(*policy, texts, sampling, seed=seed, greedy=greedy, progress=progress,
                     unit=task.completion_unit(), task=task)
    out = Draw(samples, score_samples([s.completion for s in samples], [r["context"] for r in prompts],
                                      task.oracle()))
    if reward is not None:
        out.rewards = reward_values(reward, texts, out.completions())
    return out


def reward_values(reward, prompts: list[str], completions: list[str]) -> list[float]:
    """Reward model scores (higher is better) of completions of `prompts`; `reward` = (model, tokenizer)."""
    from alignpipe.lm.reward_model import reward_scores

    return reward_scores(reward[0], reward[1], prompts, completions)


def sampled_logprobs(policy, samples, reference, texts: list,
                     max_prompt_tokens: int, task=None) -> tuple[list[float], list[float], bool]:
    """(log p_policy, log p_ref, same tokenizer?) of each sampled completion, the reference prompted as `task`
    formats prompts (a chat template). With different tokenizers the reference scores the completion text
    re-tokenized by its own tokenizer (a text-level estimate)."""
    from alignpipe.lm.policy import encode_prompts, sequence_logprobs

    model, tok, _ = policy
    ref_model, ref_tok, ref_meta = reference
    logp_policy = sequence_logprobs(model, [s.prompt_ids for s in samples], [s.completion_ids for s in samples])
    same_vocab = tok.get_vocab() == ref_tok.get_vocab()
    ref_completion_ids = ([s.completion_ids for s in samples] if same_vocab else
                          [ref_tok(s.completion, add_special_tokens=False)["input_ids"] for s in samples])
    logp_ref = sequence_logprobs(ref_model, encode_prompts(ref_tok, ref_meta, texts, max_prompt_tokens, task),
                                 ref_completion_ids)
    return logp_policy, logp_ref, same_vocab


def compare(scores, ref_scores, logp_policy: Sequence[float], logp_ref: Sequence[float],
            champion_scores=None, seed: int = 0) -> dict[str, float]:
    """A candidate's oracle metrics from its per-prompt scores: summary, win rate vs the reference (and the
    champion) and the sampled KL to the reference, all with the estimators of `alignpipe.oracle.metrics`."""
    metrics = summarize(scores, seed=seed)
    metrics["win_rate_vs_ref"] = win_rate(scores, ref_scores)
    metrics["win_rate_vs_ref_nontied"] = win_rate_nontied(scores, ref_scores)
    metrics["win_rate_ceiling"] = win_rate_ceiling(ref_scores)
    metrics["kl_to_ref"] = kl_to_ref(logp_policy, logp_ref)
    if champion_scores is not None:
        metrics["win_rate_vs_champion"] = win_rate(scores, champion_scores)
    return metrics


def evaluate_candidate(policy, prompts: list[dict], sampling, seed: int, reference, ref_draw: Draw,
                       champion: Draw | None = None, reward=None, progress: str | None = None, *,
                       task, greedy: bool = False) -> tuple[dict[str, Any], Draw]:
    """(metrics, draw) of one candidate against the reference (drawn once, `ref_draw`) and the champion: the
    oracle summary, win rates, the sampled KL (`kl_estimate`: token, or text with another tokenizer) and the mean
    reward score. The reference itself (`policy is reference`) reuses `ref_draw`."""
    texts = [r["prompt"] for r in prompts]
    if policy is reference:
        got = Draw(ref_draw.samples, ref_draw.scores)
        if reward is not None:
            got.rewards = reward_values(reward, texts, got.completions())
    else:
        got = draw(policy, prompts, sampling, seed, progress, reward, task=task, greedy=greedy)
    logp_policy, logp_ref, same_vocab = sampled_logprobs(policy, got.samples, reference, texts,
                                                         sampling.max_prompt_tokens, task)
    metrics = compare(got.scores, ref_draw.scores, logp_policy, logp_ref,
                      champion.scores if champion is not None else None, seed=seed)
    metrics.update(task.summarize(got.scores, seed))
    metrics["kl_estimate"] = "token" if same_vocab else "text"
    if got.rewards is not None:
        metrics["reward_score"] = sum(got.rewards) / len(got.rewards)
    return metrics, got


def evaluate_policy(policy, prompts: list[dict], sampling=None, seed: int = 0, reference=None,
                    progress: str | None = None, *, task) -> tuple[dict[str, float], dict]:
    """Sample one completion per prompt from `policy` = (model, tokenizer, meta), score it with the oracle and,
    given `reference` = (model, tokenizer, meta), add win_rate_vs_ref and kl_to_ref (ref samples use the same
    prompts and seed). Returns (metrics, details with the samples and per-sample scores)."""
    from alignpipe.lm.policy import Sampling

    sampling = sampling or Sampling()
    got = draw(policy, prompts, sampling, seed, progress, task=task)
    metrics = {**summarize(got.scores, seed=seed), **task.summarize(got.scores, seed)}
    details = {"completions": got.completions(), "scores": [sample_value(s) for s in got.scores]}
    if reference is not None:
        if reference[1].get_vocab() != policy[1].get_vocab():
            raise ValueError("policy and reference must share a tokenizer to compare log-probabilities")
        ref = draw(reference, prompts, sampling, seed, progress and f"{progress} (reference)", task=task)
        metrics["win_rate_vs_ref"] = win_rate(got.scores, ref.scores)
        metrics["win_rate_vs_ref_nontied"] = win_rate_nontied(got.scores, ref.scores)
        metrics["win_rate_ceiling"] = win_rate_ceiling(ref.scores)
        logp_policy, logp_ref, _ = sampled_logprobs(policy, got.samples, reference, [r["prompt"] for r in prompts],
                                                    sampling.max_prompt_tokens, task)
        metrics["kl_to_ref"] = kl_to_ref(logp_policy, logp_ref)
        metrics["ref_violations_per_char"] = summarize(ref.scores, seed=seed)["violations_per_char"]
        metrics.update({f"ref_{k}": v for k, v in task.summarize(ref.scores, seed).items() if not k.endswith(
            ("_ci_low", "_ci_high"))})
        details["ref_completions"] = ref.completions()
        details["ref_scores"] = [sample_value(s) for s in ref.scores]
    return metrics, details


def oracle_metrics(policy_dir: str | Path, reference, data_dir: str | Path, n_prompts: int, sampling, seed: int,
                   out_dir: str | Path, progress: str, *, task) -> dict[str, float]:
    """The oracle evaluation of a saved policy on held-out prompts against `reference` = (model, tok, meta):
    `evaluate_policy`'s metrics (sampled with `sampling`, an `alignpipe.lm.policy.Sampling`: win rate with ties as
    half, its ceiling, and over non-tied prompts) plus
    win/tie/loss fractions. Writes the samples to `out_dir/samples.jsonl`."""

    from alignpipe.core.io import write_jsonl
    from alignpipe.lm.policy import load_policy

    policy = load_policy(policy_dir)
    prompts = load_prompts(data_dir, n_prompts)
    metrics, details = evaluate_policy(policy, prompts, sampling, seed=seed,
                                       reference=reference, progress=progress, task=task)
    wins = ties = 0
    for c, r in zip(details["scores"], details["ref_scores"]):
        if c is None or r is None:
            wins += c is not None and r is None
            ties += c is None and r is None
        else:
            wins += c < r
            ties += c == r
    n = len(prompts)
    metrics.update(win_frac=wins / n, tie_frac=ties / n, loss_frac=(n - wins - ties) / n)
    if math.isnan(metrics["win_rate_vs_ref_nontied"]):  # every prompt tied: no non-tied rate (metrics are finite)
        del metrics["win_rate_vs_ref_nontied"]
    write_jsonl(Path(out_dir) / "samples.jsonl", (
        {"prompt": p["prompt"], "completion": c, "score": s, "ref_completion": rc, "ref_score": rs}
        for p, c, s, rc, rs in zip(prompts, details["completions"], details["scores"], details["ref_completions"],
                                   details["ref_scores"])))
    return metrics


def heldout_check(policy_dir: str | Path, reference, data_dir: str | Path, task, n_prompts: int, sampling, seed: int,
                  out_dir: str | Path, progress: str, reward=None) -> dict[str, float]:
    """A training stage's own quick check of its saved policy on `n_prompts` held-out prompts against `reference`
    = (model, tok, meta), the one evaluation function of the training stages (each calls it only with its
    `eval_heldout` switch on: evaluate owns evaluation and compares every candidate). Where the task has an oracle:
    `oracle_metrics` (samples to `out_dir/samples.jsonl`); else, given the stage's `reward`, the reward against the
    reference on held-out conversations (`alignpipe.oracle.chat_eval.reward_check`). Both sample with `sampling`
    (an `alignpipe.lm.policy.Sampling`). It runs after training, so it draws on no training random state."""
    if task.has_oracle():
        return oracle_metrics(policy_dir, reference, data_dir, n_prompts, sampling, seed, out_dir, progress,
                              task=task)
    from alignpipe.core.errors import ConfigError
    from alignpipe.lm.policy import load_policy
    from alignpipe.oracle.chat_eval import reward_check

    if reward is None:
        raise ConfigError("eval_heldout", f"task {task} has no oracle: the held-out check needs the stage's reward")
    prompts = [r["prompt"] for r in load_prompts(data_dir, n_prompts)]
    return reward_check(load_policy(policy_dir), reference, prompts, reward, sampling, seed, task)
