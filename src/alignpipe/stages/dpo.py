"""Direct preference optimisation of the pretrained policy on the label stage's pairs (TRL DPOTrainer).

DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290) fits the policy to preference pairs through the
implicit reward beta * log(pi(y|x) / pi_ref(y|x)); `loss_type` picks the loss on the chosen-minus-rejected reward
(sigmoid: DPO; ipo: Azar et al. 2023; hinge: SLiC, Zhao et al. 2023; robust: Chowdhury et al. 2024; TRL's other
loss types are accepted too), optionally plus `sft_weight` times the chosen completions' NLL (RPO). The
reference is the pretrained policy loaded a second time from its directory and passed explicitly (TRL would
otherwise reload it from the model's `_name_or_path`); its log-probabilities are precomputed once before training.

Prompts are formatted with the policy's `PolicyMeta` (conditional training: `prompt<|aligned|>`), so DPO trains
under the conditioning the policy is sampled with, and keep the same last `max_prompt_tokens` tokens as sampling.
A prompt ends on a non-blank character or a control token and a completion starts with a newline, so the tokenized
prompt is a prefix of the tokenized prompt + completion (TRL warns otherwise; `n_prompt_boundary_mismatch` counts
the exceptions). Human pairs (`--human-prefs`) are appended; pairs in TRL's conversational form are flattened to
text for the pep8 task (a code model without a chat template).

The chat task (`data.task: chat`, read from the data's MANIFEST.json): pairs stay TRL conversational messages and
DPOTrainer applies the policy tokenizer's chat template to them (prompt with the generation prompt, then the
assistant turns).

The stage reports training metrics; evaluate compares every candidate. With `eval_heldout` it also checks itself:
the oracle's sampling check against the reference (`alignpipe.oracle.policy_eval.heldout_check`), or on chat the
data's held-out pairs (`heldout.jsonl`): TRL's evaluation of the DPO implicit reward, its accuracy (chosen above
rejected) and margin.

Runs in one process here; `gpus` is the process count of the torchrun/DDP launch on GPU nodes (the Trainer takes
the world size from the launcher).
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from alignpipe.algos.lora import LoraFields
from alignpipe.algos.preference import PairTrainerFields
from alignpipe.core.config import MAX_GPUS, StageConfig, field
from alignpipe.stages import Input

INPUTS = (
    Input("data", "data", "dataset directory; its held-out prompts.jsonl feed the oracle evaluation"),
    Input("policy", "artifacts/pretrain", "pretrained policy directory: the initial policy and the frozen reference"),
    Input("prefs", "artifacts/label", "label stage output holding prefs.jsonl (prompt, chosen, rejected)"),
    Input("human_prefs", None, "optional extra pairs: a JSONL file, or a directory holding prefs.jsonl", False),
)
# Input files checked by the validate stage's validators (the `validate` params section's limits) before any work.
CHECKED_INPUTS = {"prefs": "prefs", "human_prefs": "prefs"}
# Training metrics (`alignpipe.algos.preference.training_metrics`); with `eval_heldout` also the held-out check's.
METRICS = ("train_loss", "train_reward_margin", "train_reward_accuracy", "n_pairs", "seconds")
# The few metrics `dvc metrics show` lists (metrics_headline.json; fnmatch patterns); metrics.json has all.
HEADLINE = ("train_loss", "train_reward_margin", "train_reward_accuracy", "violations_per_char", "win_rate_vs_ref",
            "kl_to_ref", "heldout_reward_accuracy", "seconds")

TESTED_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")  # exercised by tests/test_dpo.py
LOSS_TYPES = TESTED_LOSS_TYPES + ("exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
                                  "apo_zero", "apo_down", "discopop", "sigmoid_norm")


@dataclass(frozen=True)
class Config(StageConfig, PairTrainerFields, LoraFields):
    SECTION: ClassVar[str] = "dpo"
    RENAMED: ClassVar[dict[str, str]] = {"eval_batch_size": "sampling.batch_size"}

    loss_type: str = field("sigmoid", "TRL loss_type: sigmoid (DPO), ipo, hinge, robust, ...", choices=LOSS_TYPES)
    beta: float = field(0.1, "KL strength: the implicit reward is beta * log(pi / pi_ref) (IPO: tau)", gt=0)
    label_smoothing: float = field(0.0, "robust DPO: the assumed label-flip probability, in [0, 0.5)", ge=0, lt=0.5)
    sft_weight: float = field(0.0, "> 0: add this times the NLL of the chosen completion (RPO, Pang et al. 2024)", ge=0)
    precompute_ref_log_probs: bool = field(True, "compute the reference log-probabilities once, before training")
    gpus: int = field(1, "processes of the torchrun/DDP launch on GPU nodes; this CPU stage runs one process",
                      ge=0, le=MAX_GPUS)
    checkpoint_dir: str = field("checkpoints/dpo", "Trainer checkpoints, outside the stage output", nonempty=True)

    def __post_init__(self):
        super().__post_init__()
        self.check(self.loss_type != "exo_pair" or self.label_smoothing > 0, "label_smoothing",
                   "must be > 0 for loss_type exo_pair (the EXO paper uses 1e-3)")
        self.check_lora()


# ---------------------------------------------------------------------------------------------------- training

def make_trainer(cfg: Config, model, ref_model, tok, pairs: list[dict[str, str]], output_dir: str | Path,
                 callbacks: list | None = None):
    """A DPOTrainer on formatted `pairs` with an explicit reference model."""
    from trl import DPOTrainer

    from alignpipe.algos.dpo import trl_config
    from alignpipe.algos.lora import lora_config
    from alignpipe.algos.preference import pairs_dataset

    dataset = pairs_dataset(pairs, tok)
    args = trl_config(cfg, output_dir)  # under torchrun this joins the process group
    if args.world_size > 1 and cfg.precompute_ref_log_probs:
        dataset = shared_dataset(dataset, args, Path(output_dir) / "pairs")
    return DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tok,
                      callbacks=callbacks, peft_config=lora_config(cfg, model))


def shared_dataset(dataset, args, path: Path):
    """The pairs as an Arrow dataset in a folder every rank reads. TRL's precomputed reference log-probabilities
    are cached next to the dataset's files and written by rank 0 alone; an in-memory dataset would put that cache
    in each process's own temp dir, where the other ranks never find it."""
    from datasets import load_from_disk

    with args.main_process_first(local=False, desc="dpo: sharing the pairs"):
        if args.process_index == 0:
            if path.exists():
                shutil.rmtree(path)
            dataset.save_to_disk(str(path))
    return load_from_disk(str(path))


# --------------------------------------------------------------------------------------------------------- run

def load_models(cfg: Config, policy: Path, task) -> tuple[tuple, tuple]:
    """(model, tok, meta) of the policy to train (`alignpipe.algos.preference.load_trainee`: its checks) and of the
    frozen reference, an explicit copy from the saved directory."""
    from alignpipe.algos.preference import load_trainee
    from alignpipe.lm.policy import load_policy

    return load_trainee(cfg, policy, task), load_policy(policy, cfg.trust_remote_code)


def run(cfg: Config, inputs: dict[str, Path | None], out_dir: Path) -> dict[str, float]:
    """Train with DPO, save the policy (same PolicyMeta, safetensors) into `out_dir`; with `eval_heldout`, check it
    on held-out prompts (the oracle) or pairs (chat)."""
    import time

    import torch

    from alignpipe.algos.lora import merged
    from alignpipe.algos.preference import heldout_reward_metrics, training_metrics, training_pairs
    from alignpipe.core import distributed
    from alignpipe.tasks import task_of
    from alignpipe.lm.policy import save_policy
    from alignpipe.lm.training import log_at_checkpoints, resume_checkpoint, train_from
    from alignpipe.oracle.policy_eval import heldout_check
    from alignpipe.tracking import runs

    torch.manual_seed(cfg.seed)
    task = task_of(inputs["data"])
    chat = task.conversational()  # pairs of messages: TRL applies the chat template itself
    (model, tok, meta), reference = load_models(cfg, inputs["policy"], task)
    pairs, n_human, mismatches = training_pairs(cfg, inputs, tok, meta, chat)

    checkpoint_dir = Path(cfg.checkpoint_dir)
    resume_from = resume_checkpoint(cfg, checkpoint_dir)
    trainer = make_trainer(cfg, model, reference[0], tok, pairs, checkpoint_dir,
                           [runs.mlflow_callback(), log_at_checkpoints()])
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
    meta = dataclasses.replace(meta, extra={**meta.extra, "stage": "dpo", "parent": str(inputs["policy"]),
                                            "loss_type": cfg.loss_type, "beta": cfg.beta,
                                            **({"lora_r": cfg.lora_r} if cfg.lora_r else {})})
    save_policy(trained, tok, meta, out_dir)
    del trainer, trained, model
    metrics = training_metrics(last, result, (len(pairs), n_human, mismatches), train_seconds)
    if cfg.eval_heldout:  # a quick check of this policy alone (evaluate compares every candidate)
        eval_start = time.perf_counter()
        if task.has_oracle():
            heldout = heldout_check(out_dir, reference, inputs["data"], task, cfg.n_eval_prompts,
                                    cfg.sampling, cfg.seed, out_dir, progress="dpo: evaluating")
        metrics.update(heldout, eval_seconds=round(time.perf_counter() - eval_start, 2))
    return metrics
