"""Judges for RLAIF labelling: given pairs of completions of one prompt, say which is preferred.

Every judge has one method, `score(pairs) -> [(score_a, score_b), ...]`, where a HIGHER score is preferred; the
label stage turns the two scores into chosen/rejected (equal scores, within a threshold, are a tie):

- `ScorerJudge` — the task's oracle (pycodestyle violations per character, Korbak et al. 2023); its score is
  minus the violations per character, so that higher is better like every judge;
- `RewardModelJudge` — a trained reward model directory (`alignpipe.lm.reward_model`); its score is the reward;
- `LLMJudge` — any causal LM asked "which completion is better, A or B?"; its score is the probability it
  prefers each completion, from the log-probabilities of the answer strings, averaged over both orders of the
  pair so that a preference for a position cancels out (Zheng et al. 2023, "Judging LLM-as-a-judge", sec. 3.4).
  How often both orders pick the same completion is its position consistency (`position_consistency`, ibid.).
  On chat the prompt is the conversation as text (`conversation_text`) in `CHAT_LLM_TEMPLATE`, and the judge may be
  any causal LM with a chat template, or the policy itself.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from alignpipe.core.errors import ConfigError

# The default comparison prompt of the llm judge. The question comes last so that keeping the last tokens of a
# long prompt keeps it. Placeholders: {prompt} (the code), {a} and {b} (the completions, without their leading
# newline, indentation kept).
LLM_TEMPLATE = (
    "Below is a piece of Python code and two candidate next lines, A and B.\n\n"
    "### Code\n{prompt}\n\n### Next line A\n{a}\n\n### Next line B\n{b}\n\n"
    "### Question\nWhich next line follows the PEP 8 style guide better, A or B?\n\n### Answer:"
)
LLM_ANSWERS = (" A", " B")
# The default comparison prompt of the llm judge on chat: {prompt} is the conversation (`conversation_text`), {a}
# and {b} two answers to its last user turn.
CHAT_LLM_TEMPLATE = (
    "Below is a conversation and two candidate answers to its last user turn, A and B.\n\n"
    "### Conversation\n{prompt}\n\n### Answer A\n{a}\n\n### Answer B\n{b}\n\n"
    "### Question\nWhich answer is more helpful and correct, A or B?\n\n### Answer:"
)


def conversation_text(messages: Sequence[dict]) -> str:
    """A conversation (role/content messages) as the llm judge reads it: one `Role: content` paragraph a turn."""
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def position_consistency(orders: Sequence[tuple[float, float]]) -> float:
    """The fraction of pairs where the judge prefers the same completion in both orders: from `LLMJudge.orders`,
    (P(a | a shown first), P(a | a shown second)) both above or both below 1/2 (an exact 1/2 is no preference, so
    not consistent). 1.0 when there are no pairs."""
    if not orders:
        return 1.0
    return sum((p1 - 0.5) * (p2 - 0.5) > 0 for p1, p2 in orders) / len(orders)


def oracle_agreement(scores: Sequence[tuple[float, float]], oracles: Sequence[tuple[float, float]],
                     tie_threshold: float) -> tuple[float, float]:
    """(agreement, decided fraction) of a judge with the oracle: over the pairs the oracle decides (its two values
    differ; lower is better), the fraction where the judge's higher score is on the oracle's better answer (a judge
    tie, |score gap| <= `tie_threshold`, counts half; 0.5 when the oracle decides none), and the fraction of pairs
    the oracle decides."""
    agree, decided = 0.0, 0
    for (sa, sb), (oa, ob) in zip(scores, oracles, strict=True):
        if oa == ob:
            continue
        decided += 1
        agree += 0.5 if abs(sa - sb) <= tie_threshold else float((sa > sb) == (oa < ob))
    return (agree / decided if decided else 0.5), decided / max(len(scores), 1)


@dataclass(frozen=True)
class Pair:
    """Two completions of one prompt. `context` is the code the oracle scores them after (default: the prompt);
    `source` says where the prompt comes from (carried into the output rows)."""

    prompt: str
    a: str
    b: str
    context: str = ""
    source: str = ""


class Judge(Protocol):
    """Scores both completions of each pair; a higher score is preferred."""

    name: str

    def score(self, pairs: Sequence[Pair]) -> list[tuple[float, float]]:
        ...


@functools.lru_cache(maxsize=1 << 16)
def oracle_score(score: Callable[[str, str], Any], context: str, completion: str):
    """`score(context, completion)`: the task's oracle (`alignpipe.tasks.Task.oracle()`, e.g. a `CompletionScore`),
    cached: judges and the label stage share the work."""
    return score(context, completion)


def oracle(pairs: Sequence[Pair], score: Callable[[str, str], Any]) -> list[tuple[float, float]]:
    """The oracle `score`'s violations per character of (a, b) for each pair (LOWER is better), each completion
    scored after its context."""
    return [(oracle_score(score, p.context or p.prompt, p.a).per_char,
             oracle_score(score, p.context or p.prompt, p.b).per_char) for p in pairs]


class ScorerJudge:
    """The task's oracle as a judge: score = -(violations per character)."""

    name = "scorer"

    def __init__(self, score: Callable[[str, str], Any]):
        self.oracle = score  # the task's oracle

    def score(self, pairs: Sequence[Pair]) -> list[tuple[float, float]]:
        return [(0.0 - a, 0.0 - b) for a, b in oracle(pairs, self.oracle)]  # 0.0 - x: no -0.0 in the files


class RewardModelJudge:
    """A reward model directory as a judge: score = its reward for prompt + completion."""

    name = "reward_model"

    def __init__(self, path: str, batch_size: int = 32, max_length: int = 512, trust_remote_code: bool = False):
        from alignpipe.lm.reward_model import load_reward_model

        self.model, self.tok = load_reward_model(path, trust_remote_code=trust_remote_code)
        self.batch_size, self.max_length = batch_size, max_length

    def score(self, pairs: Sequence[Pair]) -> list[tuple[float, float]]:
        from alignpipe.lm.reward_model import reward_scores

        prompts = [p.prompt for p in pairs]
        ra = reward_scores(self.model, self.tok, prompts, [p.a for p in pairs], self.batch_size, self.max_length)
        rb = reward_scores(self.model, self.tok, prompts, [p.b for p in pairs], self.batch_size, self.max_length)
        return list(zip(ra, rb))


TEMPLATE_FIELDS = ("prompt", "a", "b")  # what an llm judge template fills in, each exactly by name


def check_template(template: str, where: str = "label.llm_template") -> None:
    """A ConfigError unless `template` is a `str.format` template whose placeholders are exactly {prompt}, {a} and
    {b} (no other name, no index, attribute, conversion or format spec; literal braces doubled: `{{`)."""
    import string

    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as e:
        raise ConfigError(where, f"not a format template ({e}): write literal braces as {{{{ and }}}}") from None
    bad = next((name for name, spec, conv in fields if name not in TEMPLATE_FIELDS or spec or conv), None)
    if bad is not None:
        raise ConfigError(where, f"unknown placeholder {{{bad}}}: use only {{prompt}}, {{a}} and {{b}} (literal "
                          "braces as {{ and }})")
    missing = [name for name in TEMPLATE_FIELDS if name not in {f[0] for f in fields}]
    if missing:
        raise ConfigError(where, f"must contain {{{missing[0]}}}")


class LLMJudge:
    """A causal LM as a judge: P(prefers a) = mean of P("A" | a shown first) and P("B" | a shown second).

    P("A" | ...) is the softmax over the two answers' log-probabilities (each answer string may be several
    tokens: its log-probability is their sum). A judge that always answers the first position gives 0.5.
    """

    name = "llm"

    def __init__(self, path: str, template: str = LLM_TEMPLATE, answers: Sequence[str] = LLM_ANSWERS,
                 batch_size: int = 16, max_length: int = 1024, chat_template: bool = False,
                 trust_remote_code: bool = False, model=None, tok=None):
        if len(answers) != 2 or answers[0] == answers[1]:
            raise ConfigError("label.llm_answers", f"the llm judge needs two different answer strings, got "
                              f"{list(answers)!r}")
        check_template(template)
        if model is None:
            from alignpipe.lm.policy import load_policy

            model, tok, _ = load_policy(path, trust_remote_code=trust_remote_code)
        self.model, self.tok = model, tok
        self.template, self.answers = template, tuple(answers)
        self.batch_size, self.max_length, self.chat_template = batch_size, max_length, chat_template
        self.answer_ids = [tok(a, add_special_tokens=False)["input_ids"] for a in self.answers]
        if not all(self.answer_ids) or self.answer_ids[0] == self.answer_ids[1]:
            raise ConfigError("label.llm_answers", f"the llm judge answers {list(answers)!r} must tokenize to "
                              "different, non-empty ids")

    def question(self, prompt: str, first: str, second: str) -> str:
        """The comparison prompt showing `first` as A and `second` as B."""
        text = self.template.format(prompt=prompt, a=first.lstrip("\n"), b=second.lstrip("\n"))
        if self.chat_template and getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True)
        return text

    def answer_logprobs(self, questions: Sequence[str]) -> list[tuple[float, float]]:
        """(log p(answer A | question), log p(answer B | question)) for each question."""
        from alignpipe.lm.policy import sequence_logprobs

        limit = min(self.max_length, getattr(self.model.config, "max_position_embeddings", None) or self.max_length)
        keep = limit - max(len(a) for a in self.answer_ids)
        ids = [self.tok(q)["input_ids"][-keep:] for q in questions]
        out = []
        for k in range(2):
            out.append(sequence_logprobs(self.model, ids, [self.answer_ids[k]] * len(ids), self.batch_size))
        return list(zip(out[0], out[1]))

    def prefer_first(self, pairs: Sequence[Pair], swap: bool = False) -> list[float]:
        """P(the judge answers the position of `a`), showing a first (or second with `swap`)."""
        questions = [self.question(p.prompt, p.b, p.a) if swap else self.question(p.prompt, p.a, p.b)
                     for p in pairs]
        probs = []
        for lp_a, lp_b in self.answer_logprobs(questions):
            p_first = 1.0 / (1.0 + math.exp(lp_b - lp_a))  # softmax over the two answers
            probs.append(1.0 - p_first if swap else p_first)
        return probs

    def orders(self, pairs: Sequence[Pair]) -> list[tuple[float, float]]:
        """(P(prefers a | a shown first), P(prefers a | a shown second)) for each pair."""
        shown_first = self.prefer_first(pairs)
        shown_second = self.prefer_first(pairs, swap=True)
        return list(zip(shown_first, shown_second))

    @staticmethod
    def averaged(orders: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        """The scores (P(a), P(b)) of both orders averaged: a preference for a position cancels out."""
        return [((p1 + p2) / 2, 1 - (p1 + p2) / 2) for p1, p2 in orders]

    def score(self, pairs: Sequence[Pair]) -> list[tuple[float, float]]:
        return self.averaged(self.orders(pairs))
