"""Odds-ratio preference optimisation of the pretrained policy on the label stage's pairs (TRL ORPOTrainer).

ORPO (Hong et al. 2024, https://arxiv.org/abs/2403.07691) needs no reference model: one loss adds to the NLL of the
chosen sequence an odds-ratio term that pushes the chosen completion's odds above the rejected one's,

    L = L_NLL - beta * log sigmoid(log odds(y_w|x) - log odds(y_l|x)),   odds(y|x) = P(y|x) / (1 - P(y|x)),

where P(y|x) is the mean token probability of the completion (exp of its mean token log-probability) and `beta` is
the paper's lambda. As TRL (and the authors' code by default), L_NLL is the mean token NLL of prompt + chosen; the
paper writes it over the chosen completion only. The same (prompt, chosen, rejected) pairs as dpo, read, subset and
formatted by `alignpipe.algos.preference` (the policy's `PolicyMeta`, the last `max_prompt_tokens` prompt tokens);
TRL would prepend the tokenizer's BOS to every prompt, which sampling never does, so the trainer drops it
(`ORPOOnSampledPrompts`) and ORPO trains on exactly the prompt tokens the policy is sampled with, as dpo does.

Chosen: the cheapest preference trainer TRL ships that reuses dpo's pairs as they are (one model, no reference
forward; KTO would need a reference and unpaired labels). TRL 1.16 ships it in `trl.experimental` (pinned in
pyproject; tests/test_orpo.py checks the loss against a hand computation, so an API change shows there).

The chat task: pairs stay TRL conversational messages and the trainer applies the policy tokenizer's chat template.
The stage reports training metrics (evaluate compares every candidate); with `eval_heldout` it also checks itself,
as dpo: on chat on the data's held-out pairs (ORPO's implicit reward beta * mean log-probability: accuracy, margin,
loss), on pep8 with the oracle against the pretrained policy. Output: the trained policy (same files, PolicyMeta and
tokenizer as its parent; LoRA adapters merged), a candidate like dpo's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from alignpipe.algos.lora import LoraFields
from alignpipe.algos.preference import PairTrainerFields
from alignpipe.core.config import StageConfig, field
from alignpipe.stages import Input

INPUTS = (
    Input("data", "data", "dataset directory; its held-out prompts.jsonl feed the oracle evaluation"),
    Input("policy", "artifacts/pretrain", "pretrained policy directory: the initial policy (and the evaluation's "
          "reference)"),
    Input("prefs", "artifacts/label", "label stage output holding prefs.jsonl (prompt, chosen, rejected)"),
    Input("human_prefs", None, "optional extra pairs: a JSONL file, or a directory holding prefs.jsonl", False),
)
# Input files checked by the validate stage's validators (the `validate` params section's limits) before any work.
CHECKED_INPUTS = {"prefs": "prefs", "human_prefs": "prefs"}
# Training metrics (`alignpipe.algos.preference.training_metrics`); with `eval_heldout` also the held-out check's.
METRICS = ("train_loss", "train_nll_loss", "train_log_odds_ratio", "train_reward_margin", "train_reward_accuracy",
           "n_pairs", "seconds")
# The few metrics `dvc metrics show` lists (metrics_headline.json; fnmatch patterns); metrics.json has all.
HEADLINE = ("train_loss", "train_nll_loss", "train_log_odds_ratio", "train_reward_accuracy", "violations_per_char",
            "win_rate_vs_ref", "kl_to_ref", "heldout_reward_accuracy", "seconds")


@dataclass(frozen=True)
class Config(StageConfig, PairTrainerFields, LoraFields):
    SECTION: ClassVar[str] = "orpo"
    RENAMED: ClassVar[dict[str, str]] = {"eval_batch_size": "sampling.batch_size"}

    beta: float = field(0.1, "weight of the odds-ratio term against the NLL (lambda in the ORPO paper)", gt=0)
    checkpoint_dir: str = field("checkpoints/orpo", "Trainer checkpoints, outside the stage output", nonempty=True)

    def __post_init__(self):
        super().__post_init__()
        self.check_lora()


# ---------------------------------------------------------------------------------------------------- training

def _trl_orpo():
    """`trl.experimental.orpo`, imported without its warning that experimental APIs change (trl is pinned, and
    tests/test_orpo.py checks the loss against a hand computation)."""
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module("trl.experimental.orpo")


def trainer_class():
    """`ORPOOnSampledPrompts`: TRL's ORPOTrainer without the BOS it prepends to prompts, evaluating raw pairs."""
    from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt

    class ORPOOnSampledPrompts(_trl_orpo().ORPOTrainer):
        """ORPOTrainer whose rows start with the prompt's own tokens: TRL prepends the tokenizer's BOS to a prompt
        that lacks it, a token `alignpipe.lm.policy.encode_prompts` (sampling) and DPOTrainer never add. Pairs
        given to `evaluate` are rendered and tokenized as the training pairs (TRL does so only at construction;
        DPOTrainer does it for both)."""

        def tokenize_row(self, feature, model=None):
            row = super().tokenize_row(feature, model)
            bos = self.processing_class.bos_token_id
            given = self.processing_class(feature["prompt"], add_special_tokens=False)["input_ids"]
            if bos is not None and row["prompt_input_ids"][:1] == [bos] and given[:1] != [bos]:
                row = {k: v[1:] if k.endswith(("input_ids", "attention_mask", "labels")) else v
                       for k, v in row.items()}
            return row

        def evaluate(self, eval_dataset=None, *args, **kwargs):
            if eval_dataset is not None and "chosen_input_ids" not in eval_dataset.column_names:
                eval_dataset = (eval_dataset.map(maybe_extract_prompt)
                                .map(maybe_apply_chat_template, fn_kwargs={"processing_class": self.processing_class})
                                .map(self.tokenize_row))
            return super().evaluate(eval_dataset, *args, **kwargs)

    return ORPOOnSampledPrompts


def trl_config(cfg: Config, output_dir: str | Path):
    """TRL's ORPOConfig: the arguments the pair trainers share (`alignpipe.algos.preference.trainer_args`) and beta."""
    from alignpipe.algos.preference import trainer_args

    return _trl_orpo().ORPOConfig(**trainer_args(cfg, output_dir), beta=cfg.beta)


def make_trainer(cfg: Config, model, tok, pairs: list[dict], output_dir: str | Path, callbacks: list | None = None):
    """An ORPO trainer on formatted `pairs` (text, or the chat task's messages)."""
    from alignpipe.algos.lora import lora_config
    from alignpipe.algos.preference import pairs_dataset

    return trainer_class()(model=model, args=trl_config(cfg, output_dir), train_dataset=pairs_dataset(pairs, tok),
                           processing_class=tok, callbacks=callbacks, peft_config=lora_config(cfg, model))


# --------------------------------------------------------------------------------------------------------- run

def run(cfg: Config, inputs: dict[str, Path | None], out_dir: Path) -> dict[str, float]:
    """Train with ORPO, save the policy (same PolicyMeta, safetensors) into `out_dir`; with `eval_heldout`, check it
    against the pretrained policy with the oracle (pep8) or on the held-out pairs (chat)."""
    import time

    import torch

    from alignpipe.algos.lora import merged
    from alignpipe.algos.preference import heldout_reward_metrics, load_trainee, training_metrics, training_pairs
    from alignpipe.core import distributed
    from alignpipe.tasks import task_of
    from alignpipe.lm.policy import load_policy, save_policy
    from alignpipe.lm.training import log_at_checkpoints, resume_checkpoint, train_from
    from alignpipe.oracle.policy_eval import heldout_check
    from alignpipe.tracking import runs

    torch.manual_seed(cfg.seed)
    task = task_of(inputs["data"])
    chat = task.conversational()  # pairs of messages: TRL applies the chat template itself
    model, tok, meta = load_trainee(cfg, inputs["policy"], task)
    pairs, n_human, mismatches = training_pairs(cfg, inputs, tok, meta, chat)

    checkpoint_dir = Path(cfg.checkpoint_dir)
    resume_from = resume_checkpoint(cfg, checkpoint_dir)
    trainer = make_trainer(cfg, model, tok, pairs, checkpoint_dir, [runs.mlflow_callback(), log_at_checkpoints()])
    train_start = time.perf_counter()
    result = train_from(trainer, resume_from)
    train_seconds = time.perf_counter() - train_start
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    last = logs[-1] if logs else {}
    # TRL's implicit-reward check on the held-out pairs (a task without an oracle), with the trainer at hand
    heldout = heldout_reward_metrics(trainer, inputs["data"]) if cfg.eval_heldout and not task.has_oracle() else {}

    if not distributed.is_main_process():  # rank 0 saves and evaluates the (identical) DDP-trained weights
        return {"n_pairs": len(pairs), "train_loss": float(last.get("loss", result.training_loss))}
    trained = merged(trainer.model)  # LoRA: adapters folded into the weights, a plain model directory
    meta = dataclasses.replace(meta, extra={**meta.extra, "stage": "orpo", "parent": str(inputs["policy"]),
                                            "beta": cfg.beta, **({"lora_r": cfg.lora_r} if cfg.lora_r else {})})
    save_policy(trained, tok, meta, out_dir)
    del trainer, trained, model
    metrics = training_metrics(last, result, (len(pairs), n_human, mismatches), train_seconds,
                               train_nll_loss="nll_loss", train_log_odds_ratio="log_odds_ratio")
    if cfg.eval_heldout:  # a quick check of this policy alone (evaluate compares every candidate)
        eval_start = time.perf_counter()
        if task.has_oracle():  # the reference of the check only: ORPO trains without one
            reference = load_policy(inputs["policy"], cfg.trust_remote_code)
            heldout = heldout_check(out_dir, reference, inputs["data"], task, cfg.n_eval_prompts,
                                    cfg.sampling, cfg.seed, out_dir, progress="orpo: evaluating")
        metrics.update(heldout, eval_seconds=round(time.perf_counter() - eval_start, 2))
    return metrics
