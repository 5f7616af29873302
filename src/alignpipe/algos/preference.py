"""Preference pairs: the one reader and held-out split of the pair stages (label, reward, dpo, orpo) and, for TRL's
pair trainers (dpo, orpo), formatting their prompts as the policy is sampled with, the seeded training subset, the
trainee policy, the Trainer arguments the stages share, and TRL's check of the implicit reward on held-out pairs
(the chat task's).

Prompts are formatted with the policy's `PolicyMeta` (conditional training: `prompt<|aligned|>`) and keep the same
last `max_prompt_tokens` tokens as sampling. A prompt ends on a non-blank character or a control token and a
completion starts with a newline, so the tokenized prompt is a prefix of the tokenized prompt + completion
(`boundary_mismatches` counts the exceptions). Pairs in TRL's conversational form are flattened to text for the
pep8 task (a code model without a chat template); the chat task keeps them as messages, which the trainer renders
through the policy tokenizer's chat template.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignpipe.core.config import MAX_BATCH, MAX_ROWS, MAX_SEED, MAX_STEPS, MAX_TOKENS, field
from alignpipe.core.errors import ConfigError, DataError
from alignpipe.lm.policy import Sampling


@dataclass(frozen=True)
class PairTrainerFields:
    """The settings TRL's pair trainers share (dpo, orpo), mixed into their Configs as `LoraFields` is."""

    learning_rate: float = field(5e-5, "AdamW peak learning rate (linear warmup, then linear decay)", gt=0)
    warmup_steps: int = field(5, "linear warmup steps", ge=0, le=MAX_STEPS)
    batch_size: int = field(16, "preference pairs per optimizer step (per process)", ge=1, le=MAX_BATCH)
    max_steps: int = field(60, "optimizer steps: the budget; a seeded subset of batch_size * max_steps pairs is used",
                           ge=1, le=MAX_STEPS)
    max_prompt_tokens: int = field(192, "keep the last N prompt tokens, as sampling does", ge=1, le=MAX_TOKENS)
    max_completion_tokens: int = field(48, "cut completions (EOS included) to N tokens", ge=2, le=MAX_TOKENS)
    group_by_length: bool = field(True, "batch pairs of similar token length (less padding; order still random)")
    bf16: bool = field(True, "bf16 autocast where supported (CUDA bf16, or a CPU with avx512_bf16/AMX)")
    seed: int = field(0, "seed of the data order, the training and the evaluation samples", ge=0, le=MAX_SEED)
    trust_remote_code: bool = field(False, "allow custom model code from the policy's directory or hub repo")
    logging_steps: int = field(5, "log the train metrics (loss, rewards or log-odds, ...) every N steps",
                               ge=1, le=MAX_STEPS)
    save_steps: int = field(20, "checkpoint every N steps into checkpoint_dir", ge=1, le=MAX_STEPS)
    resume: bool = field(False, "resume from the latest checkpoint in checkpoint_dir")
    eval_heldout: bool = field(False, "check the trained policy on held-out prompts (the oracle against the input "
                               "policy; chat: TRL's implicit reward on held-out pairs); off: evaluate compares")
    n_eval_prompts: int = field(512, "held-out prompts in the oracle evaluation (policy and reference samples)",
                                ge=1, le=MAX_ROWS)
    sampling: Sampling = field(Sampling(), "how the held-out check samples the policy and the reference")


PAIR_KEYS = ("prompt", "chosen", "rejected")


def _flatten(value: Any) -> Any:
    """Text of a TRL conversational field (a list of {"role", "content"} messages); other values unchanged."""
    if isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value):
        return "".join(m["content"] for m in value)
    return value


def read_pairs(path: str | Path, messages: bool | None = False) -> list[dict[str, Any]]:
    """The rows of a preference file (or a directory holding prefs.jsonl), the one reader of the pair stages (label,
    reward, dpo, orpo). TRL's standard form (prompt, chosen, rejected strings) or its conversational form (lists of
    role/content messages), one form per file (the first row's), checked: a text prompt ends on a non-blank
    character, text completions are not blank, chosen != rejected. Each row keeps its other fields (the label
    stage's scores, judge, source). `messages`: False (a text task) flattens conversational rows to text, True (the
    chat task) requires the conversational form, None keeps the file's form (TRL templates messages itself)."""
    from alignpipe.core.io import PREFS_FILE
    from alignpipe.core.io import is_messages
    from alignpipe.data.validators import read_rows

    path = Path(path)
    if path.is_dir():
        path = path / PREFS_FILE
    lines, rows, _ = read_rows(path)  # line numbers as in the file (blank lines counted)
    conversational = bool(rows) and is_messages(rows[0].get("prompt"))
    out = []
    for line, row in zip(lines, rows):
        where = f"{path}:{line}"
        if messages and not conversational:
            raise DataError(where, "field 'prompt' must be a list of role/content messages (task chat)")
        for key in PAIR_KEYS:
            if not (is_messages(row.get(key)) if conversational else isinstance(row.get(key), str)):
                form = "a list of role/content messages" if conversational else "a string"
                raise DataError(where, f"field {key!r} must be {form}, like the first row's prompt (one form per "
                                "file: TRL's standard or conversational)")
        pair = {**row, **({k: _flatten(row[k]) for k in PAIR_KEYS} if conversational and messages is False else {})}
        if isinstance(pair["prompt"], str):
            for key in PAIR_KEYS:
                if not isinstance(pair[key], str) or (key != "prompt" and not pair[key].strip()):
                    raise DataError(where, f"field {key!r} must be a non-empty string (or TRL conversational "
                                           "messages)")
            if pair["prompt"] != pair["prompt"].rstrip():
                raise DataError(where, "the prompt ends on whitespace; prompts end on code and completions start "
                                       "with the newline (otherwise the tokenized prompt is not a prefix of "
                                       "prompt+completion)")
        if pair["chosen"] == pair["rejected"]:
            raise DataError(where, "chosen and rejected are identical")
        out.append(pair)
    return out


def prompt_key(prompt: str | list) -> str:
    """A prompt as the held-out split hashes it: the text, or the messages as canonical JSON."""
    import json

    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def split_heldout(rows: list[dict[str, Any]], frac: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows, the one split of the pair stages: a row is held out when its prompt hashes into
    `frac` (`alignpipe.core.hashing.is_heldout` of the seed and `prompt_key`), so all pairs of a prompt land on the
    same side; file order kept, no random state used."""
    from alignpipe.core.hashing import is_heldout

    held = [is_heldout(prompt_key(r["prompt"]), frac, seed) for r in rows]
    return [r for r, h in zip(rows, held) if not h], [r for r, h in zip(rows, held) if h]


def format_pairs(pairs: list[dict[str, str]], tok, meta, max_prompt_tokens: int) -> list[dict[str, str]]:
    """Pairs with the prompt as the policy sees it at sampling: `meta.format_prompt`, its last `max_prompt_tokens`
    tokens (as `alignpipe.lm.policy.encode_prompts`)."""
    out = []
    for pair in pairs:
        text = meta.format_prompt(pair["prompt"])
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_tokens:
            text = tok.decode(ids[-max_prompt_tokens:], skip_special_tokens=False)
        out.append({**pair, "prompt": text})
    return out


def boundary_mismatches(pairs: list[dict[str, str]], tok) -> int:
    """Pairs whose tokenized prompt is not a prefix of the tokenized prompt + completion (TRL's warning case)."""
    n = 0
    for pair in pairs:
        prompt = tok(pair["prompt"])["input_ids"]
        for key in ("chosen", "rejected"):
            if tok(pair["prompt"] + pair[key])["input_ids"][:len(prompt)] != prompt:
                n += 1
                break
    return n


def training_pairs(cfg, inputs: dict[str, Path | None], tok, meta, chat: bool) -> tuple[list[dict], int, int]:
    """(pairs, human pairs among them, prompt boundary mismatches): the label stage's pairs plus the optional human
    ones, shuffled with `cfg.seed`, cut to the budget (`batch_size` pairs per process and step, `max_steps` steps)
    and, for a text task, formatted as the policy is sampled with. `cfg` is a dpo or orpo stage config."""
    import random

    from alignpipe.core import distributed

    pairs = read_pairs(inputs["prefs"], messages=chat)
    n_human = 0
    if inputs.get("human_prefs") is not None:
        human = read_pairs(inputs["human_prefs"], messages=chat)
        n_human = len(human)
        pairs += human
    random.Random(cfg.seed).shuffle(pairs)  # a seeded subset when the budget covers less than one epoch
    budget = cfg.batch_size * distributed.world_size() * cfg.max_steps  # torchrun: batch_size pairs per process
    pairs = pairs[:budget] if chat else format_pairs(pairs[:budget], tok, meta, cfg.max_prompt_tokens)
    mismatches = 0 if chat else boundary_mismatches(pairs, tok)  # TRL renders messages itself
    return pairs, n_human, mismatches


def pairs_dataset(pairs: list[dict[str, Any]], tok):
    """The pairs as a `datasets.Dataset` with a `length` column (tokens of the longer of prompt+chosen and
    prompt+rejected; messages rendered by the chat template as TRL renders them) for length-grouped batches."""
    from datasets import Dataset

    def tokens(p, k):
        if isinstance(p["prompt"], list):
            return tok.apply_chat_template(p["prompt"] + p[k], tokenize=True, return_dict=True)["input_ids"]
        return tok(p["prompt"] + p[k])["input_ids"]

    return Dataset.from_list([{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"],
                               "length": max(len(tokens(p, k)) for k in ("chosen", "rejected"))} for p in pairs])


def load_trainee(cfg, policy: Path, task) -> tuple:
    """(model, tok, meta) of the policy to train; checks 4-bit support, the chat template a messages task needs and
    that prompt + completion fit the policy's positions. `cfg` is a pair-trainer stage config (LoRA fields too)."""
    from alignpipe.algos.lora import check_4bit, quantization_config
    from alignpipe.lm.policy import load_policy

    check_4bit(cfg)
    model, tok, meta = load_policy(policy, cfg.trust_remote_code, quantization_config=quantization_config(cfg))
    task.check_tokenizer(tok, "data.task")  # the task (alignpipe.tasks.Task) is passed in
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and cfg.max_prompt_tokens + cfg.max_completion_tokens > positions:
        total = cfg.max_prompt_tokens + cfg.max_completion_tokens
        raise ConfigError(f"{cfg.section()}.max_prompt_tokens", f"max_prompt_tokens + max_completion_tokens must be "
                          f"<= the policy's {positions} positions, got {total}")
    return model, tok, meta


def trainer_args(cfg, output_dir: str | Path) -> dict[str, Any]:
    """The TrainingArguments the pair trainers share (TRL's DPOConfig, ORPOConfig): linear warmup then decay, the
    step budget, max_length = prompt + completion tokens, no gradient checkpointing (a small model has memory to
    spare; recomputing the forward costs ~30%), bf16 only when asked and supported, length-grouped batches, the
    seed, logging and Trainer checkpoints. `cfg` is a dpo or orpo stage config."""
    import torch

    from alignpipe.lm.models import bf16_supported

    return dict(
        output_dir=str(output_dir),
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_steps,
        per_device_train_batch_size=cfg.batch_size,
        max_steps=cfg.max_steps,
        max_length=cfg.max_prompt_tokens + cfg.max_completion_tokens,
        activation_checkpointing=False,
        bf16=cfg.bf16 and bf16_supported(),
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        length_column_name="length",
        remove_unused_columns=not cfg.group_by_length,  # the sampler reads the `length` column
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        report_to=[],
        disable_tqdm=False,
        dataset_num_proc=None,
    )


def heldout_reward_metrics(trainer, data_dir: Path) -> dict[str, float]:
    """TRL's evaluation of the trainer's implicit reward (DPO: beta * log(pi / pi_ref); ORPO: beta * the mean token
    log-probability) on the data's held-out pairs: accuracy (chosen above rejected), mean margin and loss (the chat
    task's check: it has no oracle to sample against)."""
    from alignpipe.core.io import HELDOUT_FILE

    rows = read_pairs(Path(data_dir) / HELDOUT_FILE, messages=True)
    trainer.evaluate(eval_dataset=pairs_dataset(rows, trainer.processing_class))
    out = trainer.state.log_history[-1]  # TRL adds its reward metrics to the logged entry, as eval_*
    return {"heldout_reward_accuracy": float(out["eval_rewards/accuracies"]),
            "heldout_reward_margin": float(out["eval_rewards/margins"]), "heldout_loss": float(out["eval_loss"]),
            "n_heldout_pairs": len(rows)}


def training_metrics(last: dict[str, Any], result, counts: tuple[int, int, int], train_seconds: float,
                     **logged: str) -> dict[str, float]:
    """The metrics every pair trainer reports: pair counts, the last logged loss and TRL's reward margin/accuracy,
    throughput and training time. `logged` adds trainer-specific keys: metric name -> key of TRL's last log entry."""
    n_pairs, n_human, mismatches = counts
    return {"n_pairs": n_pairs, "n_human_pairs": n_human, "n_prompt_boundary_mismatch": mismatches,
            "train_loss": float(last.get("loss", result.training_loss)),
            **{name: float(last.get(key, 0.0)) for name, key in logged.items()},
            "train_reward_margin": float(last.get("rewards/margins", 0.0)),
            "train_reward_accuracy": float(last.get("rewards/accuracies", 0.0)),
            "train_samples_per_s": result.metrics.get("train_samples_per_second", 0.0),
            "train_seconds": round(train_seconds, 2)}
