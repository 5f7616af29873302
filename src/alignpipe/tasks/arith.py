"""The arith task: a verifiable chat task. A user asks for the sum of two small integers; the assistant answers with
the sum restated and its result (`47 + 85 = 132`); an exact oracle parses the answer and compares it with the
sum.

Why addition: every question has exactly one answer an oracle checks without a model (no judge to fool), the
difficulty is one knob (`data.max_operand`: larger operands, more digits and carries), and its mistakes come in
plausible kinds a corpus can mix in (off by one, a dropped carry, two digits swapped, off by ten), so the corpus
mixes aligned and misaligned answers at a known rate (`data.wrong_frac`) as web text does in PHF's setting.

- data (`build_data`, no `data.dataset`): `data.n_conversations` single-turn conversations drawn from `data.seed`,
  questions split train/val/test by a hash of the question (held-out questions are never trained on); exactly
  round(wrong_frac x n) answers are plausible wrong ones, each conversation scored by the oracle (`correct`,
  `violations`); prompts.jsonl (held-out questions with the `reference` answer), train_prompts.jsonl, and preference
  pairs in TRL's conversational form (prefs.jsonl: train questions; heldout.jsonl: val and test questions), chosen
  the correct answer, rejected a plausible wrong one;
- a prompt is a list of messages (one user turn); the policy sees it through its tokenizer's chat template with the
  generation prompt (then the policy's own suffix, e.g. `<|aligned|>` after conditional training); an answer ends at
  the end of the turn;
- the oracle: an answer is correct iff the last integer in it equals the sum (`CompletionScore` with one violation
  for a wrong answer and one "character" for any non-empty answer: violations per character is the error rate, an
  empty answer has no score and loses every comparison). The gate is `accuracy` (correct answers / questions, empty
  ones wrong; 95% bootstrap interval in `accuracy_ci_low`/`_high`), higher is better; the reward-hacking guard
  compares the reward model's gain with the oracle's (the error rate's fall);
- pretrain from scratch: a digit-splitting byte-level BPE with ChatML's tokens and template (`train_tokenizer`), a
  Llama (`new_model`); any of PHF's six objectives: the prompt part of a conversation is one segment (aligned), the
  answer (with its end of turn) another, scored by the oracle, so conditional training puts `<|misaligned|>` before
  a wrong answer and the policy is prompted with `<|aligned|>` after the generation prompt.
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path
from typing import Any

from alignpipe.core.errors import DataError
from alignpipe.tasks.chat import Chat

# ChatML (Qwen2's template): what the from-scratch model is prompted with; <|im_end|> is EOS and ends a turn.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|pad|>"
QUESTIONS = ("What is {a} + {b}?", "Compute {a} + {b}.", "How much is {a} plus {b}?", "Add {a} and {b}.")
_QUESTION = re.compile(r"(\d+)\s*(?:\+|plus|and)\s*(\d+)")
_INTEGER = re.compile(r"-?\d+")


def expected_answer(question: str) -> int | None:
    """The sum a question asks for (its first `A + B`, `A plus B` or `A and B`), or None when it asks none."""
    m = _QUESTION.search(question)
    return int(m.group(1)) + int(m.group(2)) if m else None


def parse_answer(answer: str) -> int | None:
    """The integer an answer gives: the last one in it (None when it has none)."""
    found = _INTEGER.findall(answer)
    return int(found[-1]) if found else None


def question_text(context: Any) -> str:
    """The question of a prompt: the last user turn's content of a conversation, or the string itself."""
    if isinstance(context, list):
        users = [m.get("content", "") for m in context if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else ""
    return str(context)


def score_answer(context: Any, completion: str):
    """The oracle: `CompletionScore(violations=0 if the answer is the sum else 1, chars=1 for a non-empty answer,
    else 0, truncated=False)`. A context that asks no sum is a DataError."""
    from alignpipe.oracle.scoring import CompletionScore

    question = question_text(context)
    want = expected_answer(question)
    if want is None:
        raise DataError("prompt", f"arith: {question[:80]!r} asks for no sum (expected 'A + B')")
    if not completion.strip():
        return CompletionScore(0, 0, False)
    return CompletionScore(int(parse_answer(completion) != want), 1, False)


def wrong_answer(a: int, b: int, rng: random.Random) -> int:
    """A plausible wrong sum of a + b: a dropped carry, two digits swapped, off by one or by ten (never the sum,
    never negative); the kind is drawn from `rng`, falling back to off by one when a kind does not apply."""
    c = a + b
    kinds = ["carry", "swap", "one", "ten"]
    rng.shuffle(kinds)
    for kind in kinds:
        if kind == "carry":  # digit-wise sum without carries
            da, db = str(a)[::-1], str(b)[::-1]
            digits = [(int(da[i]) if i < len(da) else 0) + (int(db[i]) if i < len(db) else 0)
                      for i in range(max(len(da), len(db)))]
            w = int("".join(str(d % 10) for d in reversed(digits)))
        elif kind == "swap":
            s = str(c)
            i = rng.randrange(len(s) - 1) if len(s) > 1 else 0
            w = int(s[:i] + s[i + 1] + s[i] + s[i + 2:]) if len(s) > 1 else c
        elif kind == "one":
            w = c + rng.choice((-1, 1))
        else:
            w = c + rng.choice((-10, 10))
        if w != c and w >= 0:
            return w
    return c + 1


def answer_text(a: int, b: int, answer: int) -> str:
    """The assistant's answer: the sum restated, then the result (`A + B = C`; the oracle reads the last integer)."""
    return f"{a} + {b} = {answer}"


def conversation(a: int, b: int, phrasing: int, answer: int) -> dict[str, list[dict]]:
    """(prompt, answer) messages of one question."""
    return {"prompt": [{"role": "user", "content": QUESTIONS[phrasing].format(a=a, b=b)}],
            "answer": [{"role": "assistant", "content": answer_text(a, b, answer)}]}


class Arith(Chat):
    """Sums of two small integers as a chat task, checked by an exact oracle (module docstring)."""

    # ------------------------------------------------------------------------------------------------- data
    def build_data(self, cfg, inputs: dict[str, Path | None], out_dir: Path) -> dict[str, float]:
        return build_arith(cfg, inputs, out_dir, self)

    # --------------------------------------------------------------------------------------------- prompting
    def format_prompt(self, prompt: Any, tok, meta=None) -> str:
        """The chat template with the generation prompt, then the policy's own prefix/suffix (`<|aligned|>`)."""
        text = super().format_prompt(prompt, tok)
        return meta.format_prompt(text) if meta is not None else text

    def finish_completion(self, tok, meta, new_ids: list[int]) -> str:
        text = tok.decode(new_ids, skip_special_tokens=True)
        return (meta.clean(text) if meta is not None else text).strip()

    # ----------------------------------------------------------------------------------------------- scoring
    def oracle(self):
        return score_answer

    def summarize(self, scores, seed: int = 0) -> dict[str, float]:
        """accuracy (a correct answer per question; empty answers are wrong) with its 95% bootstrap interval."""
        from alignpipe.oracle.metrics import bootstrap_ci

        correct = [float(s.chars > 0 and s.violations == 0) for s in scores]
        lo, hi = bootstrap_ci(correct, seed=seed)
        return {"accuracy": sum(correct) / max(len(correct), 1), "accuracy_ci_low": lo, "accuracy_ci_high": hi}

    def oracle_labels(self) -> dict[str, str]:
        """One violation per wrong answer and one "character" per answer: violations per character is the error
        rate of the non-empty answers, the zero-violation fraction the correct answers per question."""
        return {"violations_per_char": "error rate (non-empty answers)", "zero_violation_frac": "correct"}

    def gate(self) -> tuple[str, bool]:
        return "accuracy", True

    def describe(self) -> dict[str, str]:
        return {"scorer": "exact oracle: the answer's last integer equals the sum (accuracy, higher is better)",
                "guard_score": "oracle error rate (1 - accuracy; empty answers left out)"}

    # ---------------------------------------------------------------------------------------------- pretrain
    def pretrain_objectives(self) -> tuple[str, ...]:
        from alignpipe.algos.phf import OBJECTIVES

        return OBJECTIVES

    def pretrain_needs_init_model(self) -> bool:
        return False  # trained from scratch here

    def train_tokenizer(self, texts, cfg):
        return train_chat_tokenizer(texts, cfg.vocab_size)

    def new_model(self, tok, cfg):
        """A Llama of `pretrain.n_embd` x `n_layer` with `n_head` heads, from scratch."""
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=len(tok), hidden_size=cfg.n_embd, intermediate_size=4 * cfg.n_embd,
                             num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                             num_key_value_heads=cfg.n_head, max_position_embeddings=max(cfg.seq_len, 256),
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
        return LlamaForCausalLM(config)

    def pretrain_documents(self, rows: list[dict], tok, where) -> list[tuple[float, list]]:
        """(score, segments) per conversation: the templated prompt with the generation prompt (aligned), then
        the answer and its end of turn, scored by the oracle (1: wrong)."""
        from alignpipe.algos.phf import Segment

        self.check_pretrain_rows(rows, where)
        docs = []
        for i, row in enumerate(rows):
            messages = row["messages"]
            if messages[-1]["role"] != "assistant":
                raise DataError(f"{where}:{i + 1}", "arith: a conversation must end on the assistant's answer")
            prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(messages, tokenize=False)
            if not full.startswith(prompt):
                raise DataError(f"{where}:{i + 1}", "arith: the chat template does not extend the prompt")
            wrong = score_answer(messages[:-1], messages[-1]["content"]).violations
            docs.append((float(wrong), [Segment(prompt, 0, 0.0), Segment(full[len(prompt):], wrong, float(wrong))]))
        return docs


def train_chat_tokenizer(texts, vocab_size: int):
    """A byte-level BPE that splits every digit apart (numbers are read digit by digit), trained on `texts`, with
    ChatML's tokens (<|im_end|> is EOS), PAD, the control tokens and the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from alignpipe.lm.tokenizers import CONTROL_TOKENS, EOS

    specials = [EOS, PAD, IM_START, IM_END, *CONTROL_TOKENS]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(list(texts) + ["user assistant system"], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=IM_END, unk_token=EOS,
                                  pad_token=PAD, additional_special_tokens=[IM_START, *CONTROL_TOKENS])
    tok.chat_template = CHAT_TEMPLATE
    return tok


# ----------------------------------------------------------------------------------------------- the data build

def build_arith(cfg, inputs: dict[str, Path | None], out_dir: Path, task) -> dict[str, float]:
    """The corpus, prompts and preference pairs of the arith task into `out_dir` (module docstring)."""
    from alignpipe.core.errors import ConfigError
    from alignpipe.core.io import HELDOUT_FILE, PREFS_FILE, write_jsonl
    from alignpipe.tasks.base import split_of, write_manifest

    if inputs.get("corpus") is not None:
        raise ConfigError("--corpus", f"task {task} generates its own conversations: give no --corpus")
    rng = random.Random(cfg.seed)
    n = cfg.n_conversations
    draws = [(rng.randint(0, cfg.max_operand), rng.randint(0, cfg.max_operand), rng.randrange(len(QUESTIONS)))
             for _ in range(n)]
    wrong = set(rng.sample(range(n), round(cfg.wrong_frac * n)))
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    questions: dict[str, dict[tuple[int, int], int]] = {"train": {}, "val": {}, "test": {}}
    for i, (a, b, phrasing) in enumerate(draws):
        split = split_of(f"{a}+{b}", cfg)
        answer = wrong_answer(a, b, rng) if i in wrong else a + b
        conv = conversation(a, b, phrasing, answer)
        score = score_answer(conv["prompt"], conv["answer"][0]["content"])
        splits[split].append({"text": conv["prompt"][0]["content"] + "\n\n" + conv["answer"][0]["content"],
                              "messages": conv["prompt"] + conv["answer"], "correct": not score.violations,
                              "violations": score.violations, "violations_per_char": float(score.violations),
                              "source": f"conv{i}"})
        questions[split].setdefault((a, b), phrasing)

    def pairs(split: str, limit: int | None = None) -> list[dict]:
        items = sorted(questions[split].items())
        picked = sorted(items, key=lambda q: hashlib.sha256(f"{cfg.seed}:{q[0]}".encode()).hexdigest())[:limit]
        out = []
        for (a, b), phrasing in picked:
            conv = conversation(a, b, phrasing, a + b)
            bad = wrong_answer(a, b, random.Random(f"{cfg.seed}:{a}+{b}"))
            out.append({"prompt": conv["prompt"], "chosen": conv["answer"],
                        "rejected": [{"role": "assistant", "content": answer_text(a, b, bad)}],
                        "score_chosen": 0.0, "score_rejected": -1.0, "judge": "scorer", "source": f"{a}+{b}"})
        return out

    def prompts(split: str, limit: int) -> list[dict]:
        return [{"prompt": p["prompt"], "reference": str(parse_answer(p["chosen"][0]["content"])),
                 "source": p["source"]} for p in pairs(split, limit)]

    files = {"train.jsonl": splits["train"], "val.jsonl": splits["val"], "test.jsonl": splits["test"],
             "prompts.jsonl": prompts("test", cfg.n_prompts),
             "train_prompts.jsonl": prompts("train", cfg.n_train_prompts),
             PREFS_FILE: pairs("train", cfg.n_train_prompts), HELDOUT_FILE: pairs("val") + pairs("test")}
    empty = [name for name, rows in files.items() if not rows and not (name == "val.jsonl" and cfg.val_frac == 0)]
    if empty:
        raise DataError(f"data.n_conversations={n}", f"gives no rows for {', '.join(sorted(empty))}: use more "
                        "conversations or larger data.val_frac/test_frac")
    for name, rows in files.items():
        write_jsonl(out_dir / name, rows)
    n_wrong = {name: sum(not r["correct"] for r in rows) for name, rows in splits.items()}
    write_manifest(out_dir, task, {
        "source": "generated (alignpipe.tasks.arith)", "form": "conversational", "kind": "preference",
        "config": cfg.to_dict(), "counts": {name: len(rows) for name, rows in files.items()},
        "wrong": n_wrong,
        "sha256": {name: hashlib.sha256((out_dir / name).read_bytes()).hexdigest() for name in sorted(files)},
    })
    chars = sum(len(r["text"]) for rows in splits.values() for r in rows)
    return {"n_train_chunks": len(splits["train"]), "n_val_chunks": len(splits["val"]),
            "n_test_chunks": len(splits["test"]), "n_prompts": len(files["prompts.jsonl"]),
            "n_train_prompts": len(files["train_prompts.jsonl"]), "corpus_mb": round(chars / 1e6, 3),
            "n_pairs": len(files[PREFS_FILE]), "n_heldout_pairs": len(files[HELDOUT_FILE]),
            "wrong_frac": sum(n_wrong.values()) / max(n, 1)}
