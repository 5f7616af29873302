"""Rewards for RL (ppo and grpo): the trained reward model, the task's oracle, a user's function, or a weighted sum.

A reward spec is a string, the same for every RL stage:

- `model`: the trained reward model's score r(x, y) (InstructGPT);
- `oracle`: the task's scorer on the completion in its context, as the evaluation scores it. For the PEP8 task
  that is minus pycodestyle violations per character of the completion's own lines (written after the prompt's
  longer code context when the data has one); an empty completion gets `-EMPTY_PENALTY` (the evaluation counts an
  empty sample as a loss against any non-empty one, so it must not be a free way out);
- `package.module:function`: a user's callable `f(prompts=[...], completions=[...], **kwargs) -> list[float]`
  (TRL's reward-function convention: keyword arguments, extra ones ignored by `**kwargs`);
- a weighted sum of those: `0.5*model + oracle`, `1.0*oracle + 0.2*mypkg.rewards:length_bonus`.

Every call checks that a term returned one finite float per completion and fails with one line naming the term.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from alignpipe.core.errors import ConfigError, DataError

EMPTY_PENALTY = 0.1  # oracle reward of an empty completion: worse than a line with one violation per 10 chars
BUILTIN = ("model", "oracle")
_TERM = re.compile(r"^\s*(?:(?P<w>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*\*\s*)?(?P<name>[\w.]+(?::\w+)?)\s*$")


@dataclass(frozen=True)
class RewardSpec:
    """A parsed reward spec: (weight, name) terms, summed."""

    terms: tuple[tuple[float, str], ...]

    @property
    def needs_model(self) -> bool:
        return any(name == "model" for _, name in self.terms)

    def __str__(self) -> str:
        if len(self.terms) == 1 and self.terms[0][0] == 1.0:
            return self.terms[0][1]
        return " + ".join(f"{w:g}*{n}" for w, n in self.terms)


def parse_reward(spec: str, key: str = "reward") -> RewardSpec:
    """`model`, `oracle`, `module:function` or a weighted sum of them (`0.5*model + oracle`)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(key, "must name a reward: model, oracle, module:function, or a weighted sum of them")
    terms = []
    for part in spec.split("+"):
        m = _TERM.match(part)
        if m is None:
            raise ConfigError(key, f"cannot read reward term {part.strip()!r} (expected WEIGHT*NAME, e.g. 0.5*model)")
        name, weight = m.group("name"), float(m.group("w") or 1.0)
        if name not in BUILTIN and ":" not in name:
            raise ConfigError(key, f"unknown reward {name!r}: use model, oracle or package.module:function")
        if not math.isfinite(weight):
            raise ConfigError(key, f"weight of {name!r} must be finite, got {weight}")
        terms.append((weight, name))
    return RewardSpec(tuple(terms))


def load_function(name: str, key: str = "reward") -> Callable[..., Sequence[float]]:
    """The user's `package.module:function`, imported now so a typo fails before any training."""
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(key, f"cannot import {module_name!r} for reward {name!r}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(key, f"{module_name!r} has no callable {attr!r} (reward {name!r})")
    try:
        inspect.signature(fn).bind(prompts=[], completions=[])
    except (TypeError, ValueError) as e:  # ValueError: a builtin without a signature, it cannot be checked
        raise ConfigError(key, f"reward {name!r} is not callable as f(prompts=[...], completions=[...], **kwargs) "
                          f"({e})") from None
    return fn


def oracle_rewards(completions: Sequence[str], contexts: Sequence, score: Callable) -> list[float]:
    """Minus violations per character of each completion written after its context, as `score(context,
    completion)` (the task's oracle, `alignpipe.tasks.Task.oracle()`) counts them; empty: -EMPTY_PENALTY."""
    out = []
    for completion, context in zip(completions, contexts, strict=True):
        result = score(context, completion)
        out.append(-EMPTY_PENALTY if result.chars == 0 else -result.per_char)
    return out


class Reward:
    """A callable reward: `reward(prompts, completions) -> list[float]`, plus each term's values of the last call
    (`last_terms`, for logging)."""

    def __init__(self, spec: RewardSpec, model_fn: Callable[[list[str], list[str]], list[float]] | None = None,
                 contexts: dict[str, str] | None = None, oracle: Callable | None = None):
        if spec.needs_model and model_fn is None:
            raise ConfigError("reward", f"{spec} needs a reward model (pass --reward-model)")
        if oracle is None and any(name == "oracle" for _, name in spec.terms):
            raise ConfigError("reward", f"{spec} uses the oracle, but the task has none: use model or a function")
        self.spec = spec
        self._contexts = contexts or {}
        self._fns: dict[str, Callable[[list[str], list[str]], Sequence[float]]] = {}
        for _, name in spec.terms:
            if name == "model":
                self._fns[name] = model_fn
            elif name == "oracle":
                self._fns[name] = lambda p, c: oracle_rewards(
                    c, [self._contexts.get(x, x) if isinstance(x, str) else x for x in p], oracle)
            else:
                user = load_function(name)
                self._fns[name] = lambda p, c, user=user: user(prompts=list(p), completions=list(c))
        self.last_terms: dict[str, list[float]] = {}

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        prompts, completions = list(prompts), list(completions)
        total = [0.0] * len(completions)
        self.last_terms = {}
        for weight, name in self.spec.terms:
            values = self._fns[name](prompts, completions)
            values = _checked(name, values, len(completions))
            self.last_terms[name] = values
            total = [t + weight * v for t, v in zip(total, values)]
        bad = next((i for i, t in enumerate(total) if not math.isfinite(t)), None)
        if bad is not None:  # finite terms whose weighted sum overflows a float
            raise DataError(f"reward {self.spec}", f"the weighted sum overflows to {total[bad]} for completion {bad}: "
                            "scale the terms or their weights down")
        return total


def _checked(name: str, values, n: int) -> list[float]:
    """One finite float per completion, or one line that says what the reward term returned instead."""
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise DataError(f"reward {name}", f"must return a list of {n} floats, got {type(values).__name__}") from None
    if len(out) != n:
        raise DataError(f"reward {name}", f"returned {len(out)} values for {n} completions")
    bad = [i for i, v in enumerate(out) if not math.isfinite(v)]
    if bad:
        raise DataError(f"reward {name}", f"returned a non-finite value ({out[bad[0]]}) for completion {bad[0]}")
    return out


def build_reward(spec: str, reward_model: str | Path | None, contexts: dict[str, str] | None = None,
                 probe: Sequence[str] = (), oracle: Callable | None = None) -> Reward:
    """The reward of `spec`; loads the reward model when a term needs it; the `oracle` term scores with `oracle`
    (the task's, `alignpipe.tasks.Task.oracle()`). `probe` prompts, when given, are scored once with an empty and a
    one-line completion so a broken user function fails before training starts."""
    parsed = parse_reward(spec)
    model_fn = None
    if parsed.needs_model:
        if reward_model is None:
            raise ConfigError("reward", f"{parsed} needs a reward model (pass --reward-model)")
        from alignpipe.lm.reward_model import load_reward_model, reward_scores

        rm, rm_tok = load_reward_model(reward_model)
        model_fn = lambda p, c: reward_scores(rm, rm_tok, p, c)  # noqa: E731
    reward = Reward(parsed, model_fn, contexts, oracle)
    if probe:
        prompts = list(probe)[:2]
        reward(prompts, ["\n", "\npass\n"][:len(prompts)])
    return reward
