"""Train a reward model on preference pairs with TRL's RewardTrainer (Bradley-Terry loss, Ouyang et al. 2022).

The model is a sequence classifier with one output, initialised from the pretrained policy (as InstructGPT does:
the LM body plus a new scalar head) or from `reward.model` (any id or path); full fine-tuning or LoRA (peft, merged
into the weights before saving). Pairs come from the label stage: `prefs.jsonl` to train on, `heldout.jsonl` to
evaluate on; given a single JSONL file instead, its pairs are split by the label stage's rule (a hash of the
prompt, `reward.heldout_frac`).

Text format (`alignpipe.lm.reward_model`, shared with every consumer): raw prompt (or its last `prompt_lines` lines,
a setting saved in the model's config) + completion + EOS; pairs in TRL's conversational form (the chat task) go to
RewardTrainer as messages, which applies the tokenizer's chat template (a tokenizer without one is an error).
RewardTrainer DROPS (does not truncate) pairs longer than `max_length` tokens: they are counted (`n_dropped_too_long`).

Held-out evaluation scores every held-out pair through `alignpipe.lm.reward_model.reward_scores` (the path ppo,
evaluate and the reward_model judge use): accuracy (reward of chosen > rejected), mean margin, and a calibration
check: accuracy by bucket of |margin| (quantiles), against the Bradley-Terry probability sigmoid(|margin|), with
the expected calibration error over those buckets.

Outputs: `model.safetensors`, `config.json` and the tokenizer (loadable with AutoModelForSequenceClassification
and AutoTokenizer), `reward.json` (how it was trained), `calibration.json`, `heldout_scores.jsonl`. Checkpoints go
to `checkpoint_dir` (outside the output directory) and `--resume` continues from the latest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from alignpipe.algos.lora import LoraFields
from alignpipe.core.config import (MAX_BATCH, MAX_GPUS, MAX_LINES, MAX_REPEATS, MAX_SEED, MAX_STEPS, MAX_TOKENS,
                                   StageConfig, field)
from alignpipe.core.errors import DataError
from alignpipe.stages import Input

INPUTS = (
    Input("prefs", "artifacts/label", "label output directory (prefs.jsonl + heldout.jsonl) or one preference JSONL"),
    Input("policy", "artifacts/pretrain", "pretrained policy to initialise from (unless reward.model is set)",
          required=False),
)
# Input files checked by the validate stage's validators (the `validate` params section's limits) before any work.
CHECKED_INPUTS = {"prefs": "prefs"}
METRICS = ("heldout_accuracy", "mean_margin", "n_dropped_too_long", "seconds")
# The few metrics `dvc metrics show` lists (metrics_headline.json; fnmatch patterns); metrics.json has all.
HEADLINE = ("heldout_accuracy", "mean_margin", "seconds")
# transformers' SchedulerType values that run without lr_scheduler_kwargs (tests/test_config.py checks the names)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
REWARD_META = "reward.json"


@dataclass(frozen=True)
class Config(StageConfig, LoraFields):
    SECTION: ClassVar[str] = "reward"
    RENAMED: ClassVar[dict[str, str]] = {"lr_scheduler": "lr_scheduler_type", "epochs": "num_train_epochs",
                                         "grad_accum": "gradient_accumulation_steps",
                                         "center_rewards": "center_rewards_coefficient"}

    model: str = field("", "initial model: a model id or path (empty: the --policy directory)")
    max_length: int = field(256, "max tokens of prompt + completion; RewardTrainer drops longer pairs",
                            ge=8, le=MAX_TOKENS)
    prompt_lines: int = field(2, "last prompt lines the model reads (0: all); saved with the model, applied when "
                              "scoring", ge=0, le=MAX_LINES)
    num_train_epochs: float = field(2.0, "passes over the training pairs (ignored when max_steps > 0)",
                                    gt=0, le=MAX_REPEATS)
    max_steps: int = field(-1, "optimizer steps (-1: use num_train_epochs)", ge=1, le=MAX_STEPS, allow=(-1,))
    batch_size: int = field(16, "pairs per device per step", ge=1, le=MAX_BATCH)
    gradient_accumulation_steps: int = field(1, "gradient accumulation steps", ge=1, le=MAX_BATCH)
    learning_rate: float = field(3e-4, "peak AdamW learning rate", gt=0)
    weight_decay: float = field(0.0, "AdamW weight decay", ge=0)
    warmup_ratio: float = field(0.05, "fraction of steps of linear warm-up", ge=0, lt=1)
    lr_scheduler_type: str = field("linear", "transformers scheduler name (linear, cosine, constant, ...)",
                                   choices=LR_SCHEDULERS)
    center_rewards_coefficient: float = field(0.0, "weight of the mean-zero reward penalty (Eisenstein et al. 2023; "
                                              "0 = off)", ge=0)
    bf16: bool = field(False, "bf16 autocast (GPUs; on this CPU fp32 was faster for a 5M model)")
    heldout_frac: float = field(0.1, "held-out fraction when --prefs is a single file (split by prompt hash)",
                                gt=0, lt=1)
    calibration_buckets: int = field(4, "|margin| quantile buckets of the calibration check", ge=1, le=MAX_REPEATS)
    eval_batch_size: int = field(64, "pairs per forward pass in the held-out evaluation", ge=1, le=MAX_BATCH)
    logging_steps: int = field(10, "log training metrics every this many steps", ge=1, le=MAX_STEPS)
    save_steps: int = field(200, "checkpoint every this many steps (0: no checkpoints)", ge=0, le=MAX_STEPS)
    checkpoint_dir: str = field("checkpoints/reward", "checkpoint directory (kept outside the output directory)")
    resume: bool = field(False, "resume from the latest checkpoint in checkpoint_dir")
    gpus: int = field(1, "GPUs per run (several: launch under torchrun for DDP; ignored on CPU)", ge=0, le=MAX_GPUS)
    trust_remote_code: bool = field(False, "allow custom model code for a hub model")
    seed: int = field(0, "seed of the head initialisation, shuffling and dropout", ge=0, le=MAX_SEED)

    def __post_init__(self):
        super().__post_init__()
        self.check_lora()
        self.check(not self.resume or self.save_steps > 0, "resume", "needs save_steps > 0 (no checkpoints)")


def load_pairs(prefs: Path, heldout_frac: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) pairs (`alignpipe.algos.preference.read_pairs`, in the file's form): the label stage's two
    files, or one file split by the label stage's rule (`alignpipe.algos.preference.split_heldout`)."""
    from alignpipe.algos.preference import read_pairs, split_heldout
    from alignpipe.core.io import HELDOUT_FILE, PREFS_FILE

    def nonempty(path: Path) -> list[dict]:
        rows = read_pairs(path, messages=None)
        if not rows:
            raise DataError(str(path), "no preference pairs")
        return rows

    if prefs.is_dir():
        train, path = nonempty(prefs / PREFS_FILE), prefs / HELDOUT_FILE
        if not path.is_file() or path.stat().st_size == 0:
            raise DataError(str(path), "no held-out pairs: run label with heldout_frac > 0")
        return train, nonempty(path)
    rows = nonempty(prefs)
    train, heldout = split_heldout(rows, heldout_frac, seed)
    if not heldout or not train:
        raise DataError(str(prefs), f"splitting {len(rows)} pairs by prompt left {len(train)} to train and "
                        f"{len(heldout)} held out: give more pairs or change reward.heldout_frac")
    return train, heldout


def load_model(init: str, cfg: Config):
    """(model, tokenizer): a one-output sequence classifier from `init` (a causal LM gets a new score head)."""
    from transformers import AutoModelForSequenceClassification

    from alignpipe.algos.lora import quantization_config
    from alignpipe.lm.models import load_pretrained
    from alignpipe.lm.tokenizers import load_tokenizer
    from alignpipe.lm.reward_model import PROMPT_LINES_KEY

    tok = load_tokenizer(init, cfg.trust_remote_code)
    # A causal LM gains a new `score` head and leaves its LM head unused: the point here, not a mismatch.
    model = load_pretrained(AutoModelForSequenceClassification, init, "reward.init_model weights", tok,
                            new_head=("score.",), unused_head=True, num_labels=1, trust_remote_code=cfg.trust_remote_code,
                            **({"quantization_config": quantization_config(cfg)} if cfg.lora_4bit else {}))
    model.config.pad_token_id = tok.pad_token_id
    setattr(model.config, PROMPT_LINES_KEY, cfg.prompt_lines)  # reward_scores reads prompts as trained
    return model, tok


def build_trainer(cfg: Config, model, tok, train_rows: list[dict], callbacks=()):
    """A RewardTrainer on `train_rows` (prompt/chosen/rejected), checkpointing into cfg.checkpoint_dir."""
    import torch
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from alignpipe.algos.lora import lora_config

    peft_config = lora_config(cfg, model, "SEQ_CLS")
    args = RewardConfig(
        output_dir=cfg.checkpoint_dir, num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_ratio,
        lr_scheduler_type=cfg.lr_scheduler_type, max_length=cfg.max_length,
        center_rewards_coefficient=cfg.center_rewards_coefficient or None, bf16=cfg.bf16,
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=False,
        logging_steps=cfg.logging_steps, save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500, save_total_limit=2, report_to="none", seed=cfg.seed,
        data_seed=cfg.seed, dataloader_num_workers=0, disable_tqdm=False)
    from alignpipe.lm.reward_model import reward_prompt

    data = Dataset.from_list([{"prompt": r["prompt"] if isinstance(r["prompt"], list) else  # messages: TRL templates
                               reward_prompt(r["prompt"], cfg.prompt_lines), "chosen": r["chosen"],
                               "rejected": r["rejected"]} for r in train_rows])
    return RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                         peft_config=peft_config, callbacks=list(callbacks))


def calibration(margins: list[float], n_buckets: int) -> tuple[list[dict], float]:
    """Accuracy by |margin| quantile bucket against the Bradley-Terry probability sigmoid(|margin|) of the
    predicted side, and the expected calibration error (bucket-size-weighted |accuracy - mean probability|).

    A pair is "correct" when the margin r(chosen) - r(rejected) is positive; a calibrated model is right with
    probability sigmoid(|margin|), so accuracy should rise with |margin|.
    """
    order = sorted(range(len(margins)), key=lambda i: abs(margins[i]))
    buckets, ece = [], 0.0
    for b in range(n_buckets):
        idx = order[b * len(order) // n_buckets:(b + 1) * len(order) // n_buckets]
        if not idx:
            continue
        acc = sum(margins[i] > 0 for i in idx) / len(idx)
        prob = sum(1 / (1 + math.exp(-abs(margins[i]))) for i in idx) / len(idx)
        buckets.append({"bucket": b, "n": len(idx), "abs_margin_low": abs(margins[idx[0]]),
                        "abs_margin_high": abs(margins[idx[-1]]), "accuracy": acc, "bt_probability": prob})
        ece += len(idx) / len(margins) * abs(acc - prob)
    return buckets, ece


def evaluate(model, tok, rows: list[dict], cfg: Config) -> tuple[dict[str, float], list[float], list[float]]:
    """Held-out pair accuracy, mean margin and calibration of `model` on `rows`."""
    from alignpipe.oracle.metrics import bootstrap_ci
    from alignpipe.lm.reward_model import reward_scores

    model.eval()
    prompts = [r["prompt"] for r in rows]
    chosen = reward_scores(model, tok, prompts, [r["chosen"] for r in rows], cfg.eval_batch_size, cfg.max_length)
    rejected = reward_scores(model, tok, prompts, [r["rejected"] for r in rows], cfg.eval_batch_size,
                             cfg.max_length)
    margins = [c - r for c, r in zip(chosen, rejected)]
    correct = [float(m > 0) for m in margins]
    lo, hi = bootstrap_ci(correct, seed=cfg.seed)
    buckets, ece = calibration(margins, cfg.calibration_buckets)
    metrics = {"heldout_accuracy": sum(correct) / len(correct), "heldout_accuracy_ci_low": lo,
               "heldout_accuracy_ci_high": hi, "mean_margin": sum(margins) / len(margins),
               "calibration_ece": ece, "n_heldout_pairs": len(rows)}
    for b in buckets:
        metrics[f"calibration/bucket{b['bucket']}_accuracy"] = b["accuracy"]
    # where the label stage recorded the oracle: accuracy on clean-vs-dirty pairs and on pairs of two dirty lines
    for name, keep in (("clean_vs_dirty", lambda oc, orj: oc == 0 < orj), ("both_dirty", lambda oc, orj: oc > 0)):
        sub = [c for r, c in zip(rows, correct) if "oracle_chosen" in r and keep(r["oracle_chosen"],
                                                                                 r["oracle_rejected"])]
        if sub:
            metrics[f"heldout_accuracy_{name}"] = sum(sub) / len(sub)
            metrics[f"n_heldout_{name}"] = len(sub)
    return metrics, chosen, rejected


def run(cfg: Config, inputs: dict[str, Path | None], out_dir: Path) -> dict[str, float]:
    """Train the reward model, evaluate it on the held-out pairs, save it with its tokenizer into `out_dir`."""
    import torch
    from transformers import set_seed

    from alignpipe.tracking import runs
    from alignpipe.core import distributed
    from alignpipe.core.io import write_json, write_jsonl
    from alignpipe.lm.reward_model import reward_ids
    from alignpipe.algos.lora import check_4bit, merged
    from alignpipe.lm.training import log_at_checkpoints, logged_train_loss, resume_checkpoint, train_from

    init = cfg.model or (str(inputs["policy"]) if inputs.get("policy") is not None else "")
    if not init:
        raise DataError("--policy", "no initial model: give an existing --policy directory or set reward.model")
    check_4bit(cfg)
    train_rows, heldout_rows = load_pairs(inputs["prefs"], cfg.heldout_frac, cfg.seed)

    set_seed(cfg.seed)  # before the new head is initialised
    model, tok = load_model(init, cfg)
    conversational = isinstance(train_rows[0]["prompt"], list)
    if conversational and not getattr(tok, "chat_template", None):
        raise DataError(str(inputs["prefs"]), f"conversational pairs need a tokenizer with a chat template; {init}'s "
                        "has none (use an instruct model, or pairs in the standard form)")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and cfg.max_length > positions:
        raise DataError("reward.max_length", f"{cfg.max_length} is longer than the {positions} positions of {init}")
    too_long = sum(max(len(reward_ids(r["prompt"], r["chosen"], tok, cfg.prompt_lines)),
                       len(reward_ids(r["prompt"], r["rejected"], tok, cfg.prompt_lines))) > cfg.max_length
                   for r in train_rows)
    if too_long == len(train_rows):
        raise DataError("reward.max_length", f"all {len(train_rows)} training pairs are longer than "
                        f"{cfg.max_length} tokens: raise it")

    last = resume_checkpoint(cfg, cfg.checkpoint_dir, must_exist=False)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = build_trainer(cfg, model, tok, train_rows, callbacks=[runs.mlflow_callback(), log_at_checkpoints()])
    n_trained = len(trainer.train_dataset)
    if n_trained != len(train_rows) - too_long:
        raise RuntimeError(f"RewardTrainer kept {n_trained} of {len(train_rows)} pairs, but alignpipe.lm.reward_model "
                           f"counts {too_long} longer than {cfg.max_length}: the text formats disagree")
    result = train_from(trainer, last)

    if not distributed.is_main_process():  # rank 0 evaluates and saves the (identical) DDP-trained weights
        return {"n_train_pairs": n_trained}
    model = merged(trainer.model).float()
    changed = sum(not torch.equal(before[k], v.detach().cpu()) for k, v in model.state_dict().items()
                  if k in before)
    metrics, chosen, rejected = evaluate(model, tok, heldout_rows, cfg)
    train_loss = logged_train_loss(trainer.state.log_history)  # the whole run's, also after a resume

    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    buckets, _ = calibration([c - r for c, r in zip(chosen, rejected)], cfg.calibration_buckets)
    write_json(out_dir / "calibration.json", {"buckets": buckets, "ece": metrics["calibration_ece"]})
    write_jsonl(out_dir / "heldout_scores.jsonl", ({"prompt": r["prompt"], "reward_chosen": c, "reward_rejected": j,
                                                    "judge": r.get("judge", "")}
                                                   for r, c, j in zip(heldout_rows, chosen, rejected)))
    write_json(out_dir / REWARD_META, {
        "init": init, "format": ("chat template over prompt + completion messages (TRL RewardTrainer)" if conversational
                                 else "prompt (last prompt_lines lines) + completion + eos_token (TRL RewardTrainer)"),
        "max_length": cfg.max_length, "prompt_lines": cfg.prompt_lines, "lora_r": cfg.lora_r,
        "resumed_from": str(last or ""), "config": cfg.to_dict()})
    return {
        **metrics,
        "n_dropped_too_long": too_long, "n_train_pairs": n_trained,
        "train_steps": result.global_step, "n_changed_tensors": changed,
        **({"train_loss": train_loss} if math.isfinite(train_loss) else {}),  # absent when no window was logged
    }
