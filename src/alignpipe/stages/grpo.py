"""GRPO: group-relative policy optimisation of the pretrained policy against a reward (TRL `GRPOTrainer`).

Shao et al. 2024 (DeepSeekMath, https://arxiv.org/abs/2402.03300 eq. 3): sample `num_generations` completions per
prompt, use each completion's reward minus its group's mean (divided by the group's std unless `scale_rewards` is
`none`) as the advantage of every token, optimise the clipped surrogate with a KL penalty `beta` to the frozen
reference. RLOO (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740) is this stage with `scale_rewards: none`:
its leave-one-out baseline gives advantages G/(G-1) times GRPO's unscaled ones, a constant absorbed by the learning
rate. TRL's own RLOOTrainer has no custom rollouts, so it cannot keep the completion unit below.

Rollouts come from `alignpipe.lm.policy.sample` through TRL's `rollout_func`, so GRPO samples exactly what the
evaluation samples: the policy's conditioning (control tokens), banned tokens and the completion unit (one logical
line), at `sampling.temperature` with top-p off (TRL's log-probabilities are those of that distribution). The
reward is a spec of `alignpipe.algos.rewards`: `oracle` (default), `model`, `module:function` or a weighted sum.

The chat task (`data.task: chat`, from the data's MANIFEST.json): prompts are conversations, rollouts come from
`alignpipe.oracle.chat_eval.sample_chat` (the chat template with the generation prompt; an answer ends its turn at
EOS / end-of-turn) and the reward has no oracle term (`grpo.reward: model` or a function).

The stage reports training metrics; evaluate compares every candidate. With `eval_heldout` it also checks itself
on held-out prompts (`alignpipe.oracle.policy_eval.heldout_check`: the oracle against the reference, or on chat the
reward of its answers against the reference's and the sampled KL).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from alignpipe.algos.lora import LoraFields
from alignpipe.core.config import MAX_BATCH, MAX_REPEATS, MAX_ROWS, MAX_SEED, MAX_STEPS, StageConfig, field
from alignpipe.core.errors import ConfigError
from alignpipe.lm.policy import Sampling
from alignpipe.stages import Input

INPUTS = (
    Input("data", "data", "dataset directory: train_prompts.jsonl for rollouts, prompts.jsonl for the evaluation"),
    Input("policy", "artifacts/pretrain", "pretrained policy directory: the initial policy and the frozen reference"),
    Input("reward_model", None, "reward model directory; needed when the reward spec uses `model`", False),
)
# Training metrics; with `eval_heldout` also the held-out check's (`alignpipe.oracle.policy_eval.heldout_check`).
METRICS = ("reward_first", "reward_last", "train_kl_last", "train_loss_last", "train_steps")


@dataclass(frozen=True)
class Config(StageConfig, LoraFields):
    SECTION: ClassVar[str] = "grpo"
    RENAMED: ClassVar[dict[str, str]] = {
        "eval_batch_size": "sampling.batch_size",
        **{k: f"sampling.{k}" for k in ("temperature", "max_new_tokens", "max_prompt_tokens")}}

    reward: str = field("oracle", "what GRPO maximises: model, oracle, package.module:function, or a weighted sum "
                                  "(0.5*model + oracle)")
    max_steps: int = field(12, "optimizer steps: the budget (each samples prompts_per_step x num_generations)",
                           ge=1, le=MAX_STEPS)
    prompts_per_step: int = field(16, "distinct prompts per step", ge=1, le=MAX_BATCH)
    num_generations: int = field(4, "completions per prompt: the group of the group-relative advantage",
                                 ge=2, le=MAX_BATCH)
    learning_rate: float = field(1e-4, "AdamW learning rate", gt=0)
    beta: float = field(0.04, "KL coefficient to the frozen reference (0: no reference)", ge=0)
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = field("grpo", "TRL loss aggregation")
    scale_rewards: Literal["group", "batch", "none"] = field(
        "group", "advantage scaling: group std (GRPO), batch std, or none (Dr. GRPO; RLOO up to a constant)")
    epsilon: float = field(0.2, "clip range of the surrogate", gt=0)
    num_iterations: int = field(1, "updates per generation batch (mu)", ge=1, le=MAX_REPEATS)
    sampling: Sampling = field(Sampling(top_p=1.0), "the rollouts' sampling (top_p must stay 1, so TRL's log-probs "
                               "match the sampler; the batch is prompts_per_step x num_generations); batch_size and "
                               "the token caps serve the held-out check")
    warmup_steps: int = field(0, "linear warm-up steps", ge=0, le=MAX_STEPS)
    bf16: bool = field(False, "bf16 autocast (on CPU measured slower than fp32 at this model size)")
    logging_steps: int = field(1, "Trainer logging interval (steps)", ge=1, le=MAX_STEPS)
    save_steps: int = field(0, "checkpoints in checkpoint_dir every N steps (0: none); `--resume` continues",
                            ge=0, le=MAX_STEPS)
    checkpoint_dir: str = field("checkpoints/grpo", "where checkpoints go")
    resume: bool = field(False, "continue from the latest checkpoint in checkpoint_dir")
    eval_heldout: bool = field(False, "check the trained policy on held-out prompts (the oracle against the "
                               "reference; chat: the reward against it); off: evaluate compares every candidate")
    n_eval_prompts: int = field(512, "held-out prompts, policy and reference sampled (the oracle evaluation)",
                                ge=1, le=MAX_ROWS)
    seed: int = field(0, "seed of the prompt order, the rollouts and the evaluation", ge=0, le=MAX_SEED)
    trust_remote_code: bool = field(False, "allow custom model code from the policy's directory or hub repo")

    def __post_init__(self):
        from alignpipe.algos.rewards import parse_reward

        super().__post_init__()
        parse_reward(self.reward, "grpo.reward")
        if self.sampling.top_p != 1.0:
            raise ValueError(f"grpo.sampling.top_p must be 1 (the rollouts' log-probabilities are those of the "
                             f"temperature alone), got {self.sampling.top_p}")
        self.check_lora()


def trl_args(cfg: Config, output_dir: Path):
    """TRL's GRPOConfig for this stage: one generation batch of prompts_per_step x num_generations per step."""
    from trl import GRPOConfig

    from alignpipe.lm.models import bf16_supported

    batch = cfg.prompts_per_step * cfg.num_generations
    return GRPOConfig(
        output_dir=str(output_dir), max_steps=cfg.max_steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, num_generations=cfg.num_generations, learning_rate=cfg.learning_rate,
        beta=cfg.beta, loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards, epsilon=cfg.epsilon,
        num_iterations=cfg.num_iterations, temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
        max_completion_length=cfg.sampling.max_new_tokens, warmup_steps=cfg.warmup_steps,
        lr_scheduler_type="constant_with_warmup",
        bf16=cfg.bf16 and bf16_supported(), logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps else "no", save_steps=cfg.save_steps or 500,
        save_only_model=False, report_to=[], seed=cfg.seed, data_seed=cfg.seed, disable_dropout=True,
        use_cpu=not _cuda(), dataloader_num_workers=0, remove_unused_columns=False,
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def seeded_rollout(cfg: Config, tok, draw):
    """TRL's rollout hook around `draw(model, prompts, sampling, seed) -> (prompt_ids, completion_ids,
    completions)` on the trainer's model in eval mode. Each call gets its own seed from the trainer's step (and
    the call's rank within that step), so a run is deterministic for a seed and a resumed run samples what the
    uninterrupted one did."""
    sampling = dataclasses.replace(cfg.sampling, batch_size=cfg.prompts_per_step * cfg.num_generations)
    calls = {"step": -1, "k": 0}

    def fn(prompts: list, trainer) -> dict:
        step = trainer.state.global_step
        calls["k"] = calls["k"] + 1 if step == calls["step"] else 0
        calls["step"] = step
        model = trainer.accelerator.unwrap_model(trainer.model)
        was_training = model.training
        model.eval()
        prompt_ids, completion_ids, completions = draw(model, list(prompts), sampling,
                                                       cfg.seed * 1_000_003 + step * 1_000 + calls["k"])
        model.train(was_training)
        return {"prompt_ids": prompt_ids, "completion_ids": [c or [tok.eos_token_id] for c in completion_ids],
                "logprobs": None, "clean_completion": completions}

    return fn


def rollout_func(cfg: Config, tok, meta, task):
    """The rollout hook of a text task: our sampler (conditioning, banned tokens, the task's completion unit)."""
    from alignpipe.lm.policy import sample

    def draw(model, prompts, sampling, seed):
        samples = sample(model, tok, meta, prompts, sampling, seed=seed, unit=task.completion_unit())
        return [s.prompt_ids for s in samples], [s.completion_ids for s in samples], [s.completion for s in samples]

    return seeded_rollout(cfg, tok, draw)


def chat_rollout_func(cfg: Config, tok, meta, task):
    """The rollout hook of the chat task: `sample_chat` (chat template, end of turn)."""
    from alignpipe.oracle.chat_eval import sample_chat

    def draw(model, prompts, sampling, seed):
        got = sample_chat((model, tok, meta), prompts, sampling, seed, task)
        return got.prompt_ids, got.completion_ids, got.completions

    return seeded_rollout(cfg, tok, draw)


def trl_reward(reward):
    """The reward as a TRL reward function; it scores the cleaned completions our sampler returned."""

    def alignpipe_reward(prompts, completions, clean_completion=None, **kwargs) -> list[float]:
        texts = clean_completion if clean_completion is not None else completions
        return reward(prompts, texts)

    return alignpipe_reward


def load_model(cfg: Config, policy: Path, task) -> tuple:
    """(model, tok, meta) of the policy to train; checks 4-bit support, the reward against the task and the
    policy's positions."""
    from alignpipe.algos.lora import check_4bit, quantization_config
    from alignpipe.lm.policy import load_policy

    check_4bit(cfg)
    if task.oracle() is None and "oracle" in cfg.reward:
        raise ConfigError("grpo.reward", f"task {task} has no oracle: use model or a function, got {cfg.reward!r}")
    model, tok, meta = load_policy(policy, cfg.trust_remote_code, quantization_config=quantization_config(cfg))
    positions = getattr(model.config, "max_position_embeddings", None)
    needed = cfg.sampling.max_prompt_tokens + cfg.sampling.max_new_tokens + 1
    if positions is not None and needed > positions:
        raise ConfigError("grpo.sampling.max_prompt_tokens", f"max_prompt_tokens + max_new_tokens + 1 must be <= the "
                          f"policy's {positions} positions, got {needed}")
    return model, tok, meta


def training_prompts(data: Path, chat: bool) -> list[dict]:
    """The rollout prompts: the data stage's conversations (validated messages) or the code prompts."""
    if chat:  # conversations: no code context
        from alignpipe.core.io import read_jsonl

        return read_jsonl(Path(data) / "train_prompts.jsonl")
    from alignpipe.oracle.policy_eval import read_train_prompts

    return read_train_prompts(data)


def run(cfg: Config, inputs: dict[str, Path | None], out_dir: Path) -> dict[str, float]:
    """Train with GRPO, save the policy (same PolicyMeta, safetensors); with `eval_heldout`, check it on held-out
    prompts."""
    import os

    from datasets import Dataset
    from transformers import set_seed
    from trl import GRPOTrainer

    from alignpipe.algos.lora import lora_config, merged
    from alignpipe.algos.rewards import build_reward
    from alignpipe.tasks import task_of
    from alignpipe.lm.policy import load_policy, save_policy
    from alignpipe.lm.training import log_at_checkpoints, resume_checkpoint, train_from
    from alignpipe.oracle.policy_eval import heldout_check
    from alignpipe.tracking import runs

    set_seed(cfg.seed)
    task = task_of(inputs["data"])
    chat = task.conversational()
    model, tok, meta = load_model(cfg, inputs["policy"], task)
    rows = training_prompts(inputs["data"], chat)
    contexts = {} if chat else {r["prompt"]: r.get("context", r["prompt"]) for r in rows}
    reward = build_reward(cfg.reward, inputs.get("reward_model"), contexts, probe=[r["prompt"] for r in rows],
                          oracle=task.oracle())
    checkpoint_dir = Path(cfg.checkpoint_dir)
    resume = resume_checkpoint(cfg, checkpoint_dir)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is marked experimental
    trainer = GRPOTrainer(
        model=model, reward_funcs=[trl_reward(reward)], args=trl_args(cfg, checkpoint_dir),
        train_dataset=Dataset.from_dict({"prompt": [r["prompt"] for r in rows]}), processing_class=tok,
        callbacks=[runs.mlflow_callback(), log_at_checkpoints()],
        rollout_func=chat_rollout_func(cfg, tok, meta, task) if chat else rollout_func(cfg, tok, meta, task),
        peft_config=lora_config(cfg, model))
    train_start = time.perf_counter()
    train_from(trainer, resume)
    train_seconds = time.perf_counter() - train_start
    # The log history (restored by a resume, unlike anything in memory): the reward means TRL logged per step.
    logs = [h for h in trainer.state.log_history if "loss" in h]
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]

    model = merged(trainer.accelerator.unwrap_model(trainer.model))  # LoRA: adapters folded into the weights
    meta = dataclasses.replace(meta, extra={**meta.extra, "stage": "grpo", "parent": str(inputs["policy"]),
                                            "reward": str(reward.spec),
                                            **({"lora_r": cfg.lora_r} if cfg.lora_r else {})})
    save_policy(model, tok, meta, out_dir)
    metrics: dict[str, float] = {}
    if cfg.eval_heldout:  # a quick check of this policy alone (evaluate compares every candidate)
        eval_start = time.perf_counter()
        reference = load_policy(inputs["policy"], cfg.trust_remote_code)
        check = Sampling(max_new_tokens=cfg.sampling.max_new_tokens, max_prompt_tokens=cfg.sampling.max_prompt_tokens,
                         batch_size=cfg.sampling.batch_size)  # evaluate's temperature and top-p, the stage's caps
        metrics = heldout_check(out_dir, reference, inputs["data"], task, cfg.n_eval_prompts, check, cfg.seed,
                                out_dir, "grpo: evaluating", reward)
        metrics["eval_seconds"] = round(time.perf_counter() - eval_start, 2)
    metrics.update(
        reward_first=float(rewards[0]) if rewards else math.nan,
        reward_last=float(rewards[-1]) if rewards else math.nan,
        train_kl_last=float(logs[-1].get("kl", 0.0)) if logs else 0.0,
        train_loss_last=float(logs[-1]["loss"]) if logs else 0.0,
        train_steps=float(trainer.state.global_step), train_seconds=round(train_seconds, 2),
    )
    return metrics
