"""Evaluate a policy on the chat task, which has no oracle: sample one answer per held-out conversation through the
tokenizer's chat template (ending at the end of the assistant turn; greedy or sampled), then score the answers with
the reward model (mean reward) and with a judge against the reference's (and the champion's) answers on the same
prompts (win rate, ties count half), and estimate the sampled KL to the reference. The counterpart for tasks with an
oracle is `alignpipe.oracle.policy_eval`.

The judge is a reward-model directory (`evaluate.judge_model`): a second reward model, distinct from the one ppo and
grpo optimise, so that the reward-hacking guard (`alignpipe.oracle.guard`, with minus the judge's score in the
oracle's place) can tell a real gain from a gain on the optimised reward alone. Without one the reward model also
judges, and the guard is not run (it would compare the reward with itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from alignpipe.oracle.metrics import kl_to_ref


@dataclass
class ChatDraw:
    """One sampled answer per prompt: token ids (prompt as templated, answer up to and with its end-of-turn token),
    text, whether the turn ended within the budget, and the reward model's and the judge's scores."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completions: list[str]
    ended: list[bool]
    rewards: list[float] | None = field(default=None)
    judged: list[float] | None = field(default=None)


def sample_chat(policy, prompts: list[list[dict]], sampling, seed: int, task, greedy: bool = False) -> ChatDraw:
    """Sample `policy` = (model, tokenizer, meta) once per conversation, prompted with its chat template and the
    generation prompt (`greedy`: the most likely token each step, as the served model answers at temperature 0); an
    answer ends at EOS or the template's end-of-turn token (`task.stop_token_ids`)."""
    import torch

    from alignpipe.lm.policy import cache_kwargs

    model, tok, meta = policy
    stops = set(task.stop_token_ids(tok))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = next(model.parameters()).device
    out = ChatDraw([], [], [], [])
    torch.manual_seed(seed)
    for start in range(0, len(prompts), sampling.batch_size):
        ids = [tok(task.format_prompt(p, tok, meta),
                   add_special_tokens=False)["input_ids"][-sampling.max_prompt_tokens:]
               for p in prompts[start:start + sampling.batch_size]]
        width = max(len(x) for x in ids)  # left padding: every answer starts at column `width`
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        decoding = ({"do_sample": False} if greedy else
                    {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0})
        with torch.no_grad():
            gen = model.generate(input_ids=input_ids, attention_mask=attention, **decoding,
                                 max_new_tokens=sampling.max_new_tokens, eos_token_id=sorted(stops),
                                 pad_token_id=pad, **cache_kwargs(model, sampling.cache))
        for prompt, row in zip(ids, gen[:, width:].tolist()):
            end = next((i for i, t in enumerate(row) if t in stops), None)
            answer = row if end is None else row[:end + 1]
            out.prompt_ids.append(prompt)
            out.completion_ids.append(answer)
            out.completions.append(tok.decode(answer, skip_special_tokens=True).strip())
            out.ended.append(end is not None)
    return out


def chat_samples(policy, prompts: list[list[dict]], sampling, seed: int, task) -> list:
    """`sample_chat`'s answers as `alignpipe.lm.policy.Sample`s (what an RL stage's rollouts hold): the answer's ids
    up to and with its end-of-turn token; `capped` when the turn did not end within `max_new_tokens`."""
    from alignpipe.lm.policy import Sample

    got = sample_chat(policy, prompts, sampling, seed, task)
    return [Sample(p, text, pids, cids, capped=not ended) for p, text, pids, cids, ended in
            zip(prompts, got.completions, got.prompt_ids, got.completion_ids, got.ended)]


def judge_win_rate(candidate: list[float], reference: list[float]) -> float:
    """Fraction of prompts where the judge scores the candidate's answer above the reference's; ties count 1/2."""
    if len(candidate) != len(reference) or not candidate:
        raise ValueError("judge_win_rate needs two non-empty score lists of the same length (one per prompt)")
    return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(candidate, reference)) / len(candidate)


def score(got: ChatDraw, prompts: list[list[dict]], reward, judge) -> ChatDraw:
    """Fill the reward model's and the judge's scores (each (model, tokenizer) or None) of a draw's answers."""
    from alignpipe.lm.reward_model import reward_scores

    if reward is not None:
        got.rewards = reward_scores(reward[0], reward[1], prompts, got.completions)
    if judge is not None:
        got.judged = (got.rewards if judge is reward else
                      reward_scores(judge[0], judge[1], prompts, got.completions))
    return got


def reward_check(policy, reference, prompts: list[list[dict]], reward, sampling, seed: int, task) -> dict[str, float]:
    """An RL stage's own check where the task has no oracle: one answer per held-out conversation from `policy` and
    from `reference` (same seed), the mean reward of each (`reward(prompts, completions)`), the fraction of prompts
    where the policy's reward is higher (ties half) and the sampled KL (`chat_metrics`)."""
    got, ref = (sample_chat(p, prompts, sampling, seed, task) for p in (policy, reference))
    got.rewards, ref.rewards = reward(prompts, got.completions), reward(prompts, ref.completions)
    metrics = chat_metrics(policy, got, reference, ref, judge_distinct=False, seed=seed)
    metrics.pop("kl_estimate")
    return {**metrics, "reward_score_ref": sum(ref.rewards) / len(ref.rewards),
            "reward_win_rate_vs_ref": judge_win_rate(got.rewards, ref.rewards)}


def chat_metrics(policy, got: ChatDraw, reference, ref_draw: ChatDraw, judge_distinct: bool, seed: int,
                 champion: ChatDraw | None = None, other_tokenizer: bool = False) -> dict[str, Any]:
    """A candidate's chat metrics against the reference's draw on the same prompts (and the champion's, when given):
    mean reward, the judge's win rates, the sampled KL (token level: the same tokenizer is required, unless
    `other_tokenizer`, then no KL), answer length, ended fraction and, with a judge distinct from the reward model,
    the reward-hacking guard."""
    import math

    from alignpipe.core.errors import DataError
    from alignpipe.lm.policy import sequence_logprobs

    n = len(got.completions)
    metrics: dict[str, Any] = {"kl_to_ref": math.nan, "kl_estimate": "none"}
    if policy[1].get_vocab() == reference[1].get_vocab():
        logp = sequence_logprobs(policy[0], got.prompt_ids, got.completion_ids)
        logp_ref = sequence_logprobs(reference[0], got.prompt_ids, got.completion_ids)
        metrics.update(kl_to_ref=kl_to_ref(logp, logp_ref), kl_estimate="token")
    elif not other_tokenizer:
        raise DataError("evaluate", "chat candidates must share the reference's tokenizer (token-level KL)")
    metrics.update({"ended_frac": sum(got.ended) / n, "empty_frac": sum(not c for c in got.completions) / n,
                    "mean_answer_tokens": sum(len(c) for c in got.completion_ids) / n})
    if got.rewards is not None:
        metrics["reward_score"] = sum(got.rewards) / n
    if got.judged is not None:
        metrics["judge_win_rate_vs_ref"] = judge_win_rate(got.judged, ref_draw.judged)
        if champion is not None:
            metrics["judge_win_rate_vs_champion"] = judge_win_rate(got.judged, champion.judged)
    if judge_distinct and got.rewards is not None and got.judged is not None and policy is not reference:
        from alignpipe.oracle.guard import guard

        # the guard's oracle is "lower is better": minus the judge's score
        metrics["guard"] = {**guard(got.rewards, ref_draw.rewards, [-v for v in got.judged],
                                    [-v for v in ref_draw.judged], seed=seed), "judge": True}
    return metrics
