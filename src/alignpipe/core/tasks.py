"""The task a pipeline run aligns the policy for: `data.task` in params (`pep8`, the default, or `chat`).

A task says what a prompt is, how the policy is prompted, where a completion ends, how candidates are scored, which
metric picks evaluate's best candidate and gates register, and what the reward-hacking guard compares the optimised
reward with. The data stage records the task in MANIFEST.json; later stages read it from there (`task_of`), so the
choice is made once, where the data is built.

- pep8: a prompt is a string of Python code; the policy sees it raw (or between the control tokens of conditional
  training, `PolicyMeta`); a completion is one logical line; the pycodestyle oracle scores it (violations per
  character, lower is better); the guard compares the reward model's gain with the oracle's.
- chat: a prompt is a list of `{"role", "content"}` messages ending on a user turn; the policy sees it through its
  tokenizer's chat template with the generation prompt; a completion ends at the end of the assistant turn (EOS or
  the template's end-of-turn token); there is no oracle: candidates are scored by the reward model and by a judge
  that is not the optimised reward (an `llm` judge, `alignpipe.oracle.judges.LLMJudge`, or a second reward model).
  The gate reads the judge's win rate against the reference (higher is better); the guard compares the reward
  model's gain with the judge's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST_FILE = "MANIFEST.json"


@dataclass(frozen=True)
class Task:
    """What differs between tasks; every stage asks the task instead of assuming PEP8."""

    name: str
    prompt_form: str  # "text": a string; "messages": TRL's conversational form (a list of role/content messages)
    prompting: str  # "raw": the text (plus PolicyMeta's control tokens); "chat_template": the tokenizer's template
    completion_end: str  # "line": one logical line of code; "turn": the end of the assistant turn (EOS)
    scorer: str  # what scores a candidate's samples
    gate_metric: str  # evaluate's best candidate and register's gate (evaluate's report key per candidate)
    higher_is_better: bool  # direction of gate_metric
    guard_score: str  # the score, distinct from the optimised reward, that the reward-hacking guard compares with

    def format_prompt(self, prompt: Any, tok, meta=None) -> str:
        """The text the policy is conditioned on: a chat template with the generation prompt for messages, the
        policy's own formatting (`PolicyMeta.format_prompt`: control tokens) for text."""
        if self.prompting == "chat_template":
            check_messages(prompt, "prompt")
            if not getattr(tok, "chat_template", None):
                from alignpipe.core.errors import ConfigError

                raise ConfigError("data.task", "task chat needs a tokenizer with a chat template; this policy's "
                                  "tokenizer has none (set one, or use an instruct model)")
            return tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return meta.format_prompt(prompt) if meta is not None else prompt

    def stop_token_ids(self, tok) -> list[int]:
        """Token ids that end a completion besides the task's own rule: EOS, and for chat the template's
        end-of-turn token when the tokenizer defines one (`<|im_end|>`, `<|eot_id|>`, `<|end|>`)."""
        ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
        if self.completion_end == "turn":
            vocab = tok.get_vocab()
            ids += [vocab[t] for t in END_OF_TURN if t in vocab and vocab[t] not in ids]
        return ids

    def conversational(self) -> bool:
        """Whether a prompt is TRL's conversational form (a list of role/content messages) rather than a string: it
        is sampled through the chat template and its completion is one assistant turn."""
        return self.prompt_form == "messages"

    def has_oracle(self) -> bool:
        """Whether an exact scorer judges completions (the `oracle` reward term, the oracle evaluation of a trained
        policy); without one, an RL stage checks itself with its reward against the reference."""
        return self.completion_end == "line"


END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")

TASKS = {
    "pep8": Task("pep8", prompt_form="text", prompting="raw", completion_end="line",
                 scorer="pycodestyle oracle: violations per character (Korbak et al. 2023)",
                 gate_metric="violations_per_char", higher_is_better=False,
                 guard_score="oracle violations/char"),
    "chat": Task("chat", prompt_form="messages", prompting="chat_template", completion_end="turn",
                 scorer="reward model mean score and a judge's win rate against the reference (no oracle)",
                 gate_metric="judge_win_rate_vs_ref", higher_is_better=True,
                 guard_score="judge preference (an llm judge or a second reward model, never the optimised one)"),
}
DEFAULT_TASK = "pep8"


def get_task(name: str) -> Task:
    """The task called `name`; ConfigError naming the tasks otherwise."""
    if name not in TASKS:
        from alignpipe.core.errors import ConfigError

        raise ConfigError("data.task", f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]


def task_of(data_dir: str | Path | None) -> Task:
    """The task a data directory was built for (its MANIFEST.json's `task`; pep8 when absent: earlier builds)."""
    path = Path(data_dir) / MANIFEST_FILE if data_dir is not None else None
    if path is None or not path.is_file():
        return TASKS[DEFAULT_TASK]
    return get_task(json.loads(path.read_text(encoding="utf-8")).get("task", DEFAULT_TASK))


def is_messages(value: Any) -> bool:
    """Whether `value` is TRL's conversational form: a non-empty list of {"role", "content"} dicts."""
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def check_messages(value: Any, where: str) -> None:
    """A DataError unless `value` is a list of role/content messages."""
    if not is_messages(value):
        from alignpipe.core.errors import DataError

        raise DataError(where, "expected a list of {'role', 'content'} messages (TRL's conversational form)")
