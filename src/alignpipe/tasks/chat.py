"""The chat task: answer conversations the way a preference dataset prefers.

- data: `data.dataset` only (TRL preference or prompt data in conversational form: a prompt is a list of
  `{"role", "content"}` messages ending on a user turn);
- the policy sees a prompt through its tokenizer's chat template with the generation prompt;
- a completion ends at the end of the assistant turn (EOS or the template's end-of-turn token);
- there is no oracle: candidates are scored by the reward model and by a judge that is not the optimised reward (an
  `llm` judge, `alignpipe.oracle.judges.LLMJudge`, or a second reward model). The gate reads the judge's win rate
  against the reference (higher is better); the guard compares the reward model's gain with the judge's.
"""

from __future__ import annotations

from typing import Any

from alignpipe.core.errors import ConfigError
from alignpipe.core.io import check_messages
from alignpipe.tasks.base import Task

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


class Chat(Task):
    """Conversations through the chat template, one assistant turn per completion, judged (no oracle)."""

    def conversational(self) -> bool:
        return True

    def format_prompt(self, prompt: Any, tok, meta=None) -> str:
        """The chat template with the generation prompt."""
        check_messages(prompt, "prompt")
        self.check_tokenizer(tok, "data.task")
        return tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

    def check_tokenizer(self, tok, where: str) -> None:
        if not getattr(tok, "chat_template", None):
            raise ConfigError(where, f"task {self} needs a tokenizer with a chat template; this policy's tokenizer "
                              "has none (set one, or use an instruct model)")

    def stop_token_ids(self, tok) -> list[int]:
        """EOS and the template's end-of-turn token when the tokenizer defines one (`<|im_end|>`, `<|eot_id|>`,
        `<|end|>`)."""
        ids = super().stop_token_ids(tok)
        vocab = tok.get_vocab()
        return ids + [vocab[t] for t in END_OF_TURN if t in vocab and vocab[t] not in ids]

    def oracle(self):
        return None

    def gate(self) -> tuple[str, bool]:
        return "judge_win_rate_vs_ref", True

    def describe(self) -> dict[str, str]:
        return {"scorer": "reward model mean score and a judge's win rate against the reference (no oracle)",
                "guard_score": "judge preference (an llm judge or a second reward model, never the optimised one)"}

    # ---------------------------------------------------------------------------------------------- pretrain
    def pretrain_objectives(self) -> tuple[str, ...]:
        """MLE only: supervised fine-tuning on the chosen conversations (no oracle scores segments)."""
        return ("mle",)

    def pretrain_needs_init_model(self) -> bool:
        return True

    def train_tokenizer(self, texts, cfg):
        raise ConfigError("pretrain.init_model", f"task {self} continues a chat model (a Hugging Face id or "
                          "directory whose tokenizer has a chat template); a GPT-2 from scratch has none")

    def new_model(self, tok, cfg):
        self.train_tokenizer([], cfg)

    def check_pretrain_rows(self, rows: list[dict], where) -> None:
        """Each row holds `messages`, a conversation."""
        for i, row in enumerate(rows):
            check_messages(row.get("messages"), f"{where}:{i + 1}: field 'messages'")

    def pretrain_documents(self, rows: list[dict], tok, where) -> list[tuple[float, list]]:
        """Each row's `messages` through the chat template, every line scored 0 (MLE ignores scores)."""
        from alignpipe.algos.phf import split_segments

        if not getattr(tok, "chat_template", None):
            raise ConfigError("pretrain.init_model", f"task {self} needs a tokenizer with a chat template")
        self.check_pretrain_rows(rows, where)
        docs = []
        for row in rows:
            text = tok.apply_chat_template(row["messages"], tokenize=False)
            docs.append((0.0, split_segments(text, [0] * len(text.splitlines()))))
        return docs
