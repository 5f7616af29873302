"""Proximal policy optimisation of the pretrained policy against the reward model, with a KL penalty to the reference.

TRL removed PPOTrainer after 1.12, so PPO is written here, in the spirit of cleanrl's ppo.py
(https://github.com/vwxyzjn/cleanrl/blob/master/cleanrl/ppo.py) and of TRL's last PPOTrainer, with the papers' names
(the math in `alignpipe.algos.ppo`; this file is the loop):

- the objective (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593 eq. 2; Ouyang et al. 2022 "InstructGPT",
  https://arxiv.org/abs/2203.02155 eq. 2):  maximise  E_{x~D, y~pi}[ r(x, y) - beta * log(pi(y|x) / pi_ref(y|x)) ],
  spread over tokens: each token t gets -beta * (log pi(y_t|s_t) - log pi_ref(y_t|s_t)) and the last token also the
  reward model's score r(x, y) of the cleaned completion;
- beta fixed, or adaptive to a KL target (Ziegler et al. 2019 section 2.2);
- a value head (one linear layer on the policy's last hidden state), GAE (Schulman et al. 2016,
  https://arxiv.org/abs/1506.02438), advantage whitening, the clipped surrogate and clipped value loss (Schulman et
  al. 2017, https://arxiv.org/abs/1707.06347 eq. 7), several PPO epochs over minibatches of each rollout batch;
- rollouts (HF generate with a KV cache) at `sampling.temperature` (0.7, as the evaluation and TRL's PPOTrainer)
  with top-p and top-k off, so that the sampling distribution is the one whose log-probabilities PPO computes (same
  temperature, banned words, first token). Text prompts (pep8): `alignpipe.lm.policy.sample`, one logical line, the
  first token one that starts a new line, the reward on the cleaned line. Conversational prompts (chat; any Hugging
  Face causal LM with a chat template): `alignpipe.oracle.chat_eval.sample_chat`, the conversation rendered by the
  chat template with the generation prompt, the answer ending at EOS or the end-of-turn token
  (`Task.stop_token_ids`; kept as the last action), the reward model scoring the whole answer as one assistant
  turn after the conversation, as the reward stage trained it (`alignpipe.lm.reward_model.reward_scores`).

The stage reports training metrics; evaluate compares every candidate. With `eval_heldout` it also checks the
policy on held-out prompts (`alignpipe.oracle.policy_eval.heldout_check`, as grpo does): with the oracle against the
reference; a task without an oracle with the reward on held-out conversations against the reference (mean reward,
reward win rate, sampled KL).

The saved policy is a plain causal LM (loadable by `alignpipe.lm.policy.load_policy`, same PolicyMeta); the value head
is saved beside it in `value_head.safetensors`. PPO runs in a single process (no DDP), on one GPU when present.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

from alignpipe.algos.ppo import (AdaptiveKLController, FixedKLController, PPOBatch, TokenDistribution, action_ids,
                                 gae, kl_shaped_rewards, make_batch, make_value_head, masked_mean, ppo_loss,
                                 token_forward, whiten)
from alignpipe.algos.lora import LoraFields
from alignpipe.core.config import MAX_BATCH, MAX_REPEATS, MAX_ROWS, MAX_SEED, MAX_STEPS, StageConfig, field
from alignpipe.core.errors import ConfigError, loading
from alignpipe.lm.policy import Sampling
from alignpipe.stages import Input

INPUTS = (
    Input("data", "data", "dataset directory: train_prompts.jsonl for rollouts, prompts.jsonl for the evaluation"),
    Input("policy", "artifacts/pretrain", "pretrained policy directory: the initial policy and the frozen reference"),
    Input("reward_model", "artifacts/reward", "reward model directory (sequence classification, one score); "
          "needed when the reward spec uses `model`", False),
)
# Training metrics; with `eval_heldout` also the held-out check's (`alignpipe.oracle.policy_eval.heldout_check`).
METRICS = ("reward_first", "reward_last", "train_kl_last", "kl_coef_final", "seconds")
# The few metrics `dvc metrics show` lists (metrics_headline.json; fnmatch patterns); metrics.json has all.
HEADLINE = ("reward_first", "reward_last", "train_kl_last", "violations_per_char", "win_rate_vs_ref", "kl_to_ref",
            "reward_win_rate_vs_ref", "seconds")
VALUE_HEAD_FILE = "value_head.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"  # peft's file name: a LoRA run's checkpoints hold only the adapters
# What an `iter-N` checkpoint holds: the weights (the whole model, or a LoRA run's adapters), value head, optimizer.
CHECKPOINT_FILES = (f"model.safetensors|{ADAPTER_FILE}", VALUE_HEAD_FILE, "trainer.pt")


@dataclass(frozen=True)
class Config(StageConfig, LoraFields):
    SECTION: ClassVar[str] = "ppo"
    RENAMED: ClassVar[dict[str, str]] = {
        "save_every": "save_steps", "ppo_epochs": "num_ppo_epochs", "eval_batch_size": "sampling.batch_size",
        **{k: f"sampling.{k}" for k in ("temperature", "max_new_tokens", "max_prompt_tokens")}}

    reward: str = field("model", "what PPO maximises: model (the reward model), oracle, package.module:function, or "
                                 "a weighted sum (0.5*model + oracle); see alignpipe.algos.rewards")
    max_steps: int = field(20, "PPO iterations (rollout batch + update): the budget", ge=1, le=MAX_STEPS)
    rollout_batch_size: int = field(64, "prompts sampled per iteration", ge=1, le=MAX_BATCH)
    minibatch_size: int = field(16, "rollouts per gradient step", ge=1, le=MAX_BATCH)
    num_ppo_epochs: int = field(4, "passes over each rollout batch (TRL's PPOConfig name)", ge=1, le=MAX_REPEATS)
    learning_rate: float = field(3e-5, "AdamW learning rate of the policy and the value head", gt=0)
    kl_coef: float = field(0.05, "beta: the per-token KL penalty coefficient (the initial one when adaptive)", ge=0)
    kl_target: float = field(0.0, "> 0: adapt beta towards this KL (nats per completion); 0: beta stays fixed", ge=0)
    kl_horizon: int = field(10000, "adaptive KL horizon in rollouts (Ziegler et al. 2019: 10000)", ge=1, le=MAX_ROWS)
    gamma: float = field(1.0, "discount", gt=0, le=1)
    lam: float = field(0.95, "GAE lambda", ge=0, le=1)
    cliprange: float = field(0.2, "epsilon of the clipped surrogate", gt=0)
    cliprange_value: float = field(0.2, "clip range of the value update around the rollout's values", gt=0)
    vf_coef: float = field(0.1, "weight of the value loss", ge=0)
    max_grad_norm: float = field(1.0, "gradient clipping norm", gt=0)
    sampling: Sampling = field(Sampling(top_p=1.0), "the rollouts' sampling (top_p must stay 1: the log-probabilities "
                               "are those of the temperature alone); batch_size and the token caps also serve the "
                               "held-out check")
    bf16: bool = field(True, "bf16 autocast for the transformer where supported (log-probabilities stay fp32)")
    seed: int = field(0, "seed of prompt order, sampling, minibatches and the evaluation", ge=0, le=MAX_SEED)
    trust_remote_code: bool = field(False, "allow custom model code from the policy's directory or hub repo")
    save_steps: int = field(5, "checkpoint every N iterations into checkpoint_dir", ge=1, le=MAX_STEPS)
    checkpoint_dir: str = field("checkpoints/ppo", "checkpoints (policy, value head, optimizer, beta)", nonempty=True)
    resume: bool = field(False, "resume from the latest checkpoint in checkpoint_dir")
    eval_heldout: bool = field(False, "check the trained policy on held-out prompts (the oracle against the "
                               "reference; chat: the reward against it); off: evaluate compares every candidate")
    n_eval_prompts: int = field(512, "held-out prompts in the oracle evaluation (policy and reference samples)",
                                ge=1, le=MAX_ROWS)

    def __post_init__(self):
        from alignpipe.algos.rewards import parse_reward

        super().__post_init__()
        parse_reward(self.reward, "ppo.reward")
        if self.sampling.top_p != 1.0:
            raise ValueError(f"ppo.sampling.top_p must be 1 (the rollouts' log-probabilities are those of the "
                             f"temperature alone), got {self.sampling.top_p}")
        self.check(self.minibatch_size <= self.rollout_batch_size, "minibatch_size", "must be <= rollout_batch_size")
        self.check_lora()


# ---------------------------------------------------------------------------------------------------- rollouts

RewardFn = Callable[[list], list[float]]  # samples (alignpipe.lm.policy.Sample) -> one score per sample


@dataclass
class Rollout:
    """One batch of sampled completions with everything PPO needs (tensors [B, T])."""

    prompts: list[str]
    completions: list[str]
    prompt_ids: list[list[int]]
    action_ids: list[list[int]]
    scores: object
    logprobs: object
    ref_logprobs: object
    values: object
    mask: object

    def minibatch(self, idx: list[int], pad_id: int, device) -> PPOBatch:
        """The token tensors of the rollouts `idx`."""
        return make_batch([self.prompt_ids[i] for i in idx], [self.action_ids[i] for i in idx], pad_id, device)


def token_distribution(cfg: Config, tok, meta, autocast: bool, task) -> TokenDistribution:
    """The distribution `draw` samples rollouts from (temperature; for text prompts banned words and a first token
    that starts a new line; a chat answer has neither), so that PPO's log-probabilities are those of the sampled
    tokens."""
    from alignpipe.lm.policy import banned_token_ids

    if task.conversational():
        return TokenDistribution(cfg.sampling.temperature, [], None, autocast)
    first = task.completion_unit().first_token_ids(tok)  # pep8: tokens that start a new line
    return TokenDistribution(cfg.sampling.temperature, banned_token_ids(tok, meta), first or None, autocast)


def draw(task, model, tok, meta, prompts: list, sampling, seed: int) -> list:
    """One rollout per prompt (`alignpipe.lm.policy.Sample`s): through the chat template to the end of the turn for
    conversational prompts (`alignpipe.oracle.chat_eval.chat_samples`), else the task's completion unit (pep8: one
    logical line)."""
    from alignpipe.lm.policy import sample
    from alignpipe.oracle.chat_eval import chat_samples

    if task.conversational():
        return chat_samples((model, tok, meta), prompts, sampling, seed, task)
    return sample(model, tok, meta, prompts, sampling, seed=seed, unit=task.completion_unit())


def rollout(cfg: Config, model, value_head, ref_model, tok, meta, prompts: list, reward_fn: RewardFn,
            seed: int, dist: TokenDistribution, task) -> Rollout:
    """Sample one completion per prompt (`draw`), score it, and record the old log-probabilities, reference
    log-probabilities and values."""
    import torch

    sampling = dataclasses.replace(cfg.sampling, batch_size=len(prompts))
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dist.autocast):
        samples = draw(task, model, tok, meta, prompts, sampling, seed)
    scores = torch.tensor(reward_fn(samples), dtype=torch.float32)
    prompt_ids = [s.prompt_ids for s in samples]
    stops = task.stop_token_ids(tok)
    unit = task.completion_unit()
    actions = [action_ids(s, tok, meta, cfg.sampling.max_new_tokens, unit, stops) for s in samples]
    parts: dict[str, list] = {"logprobs": [], "ref_logprobs": [], "values": [], "mask": []}
    with torch.no_grad():
        for start in range(0, len(samples), cfg.minibatch_size):
            sl = slice(start, start + cfg.minibatch_size)
            mb = make_batch(prompt_ids[sl], actions[sl], tok.pad_token_id, device)
            lp, _, v = token_forward(model, value_head, mb, dist)
            ref_lp, _, _ = token_forward(ref_model, None, mb, dist)
            for key, value in (("logprobs", lp), ("ref_logprobs", ref_lp), ("values", v * mb.mask),
                               ("mask", mb.mask)):
                parts[key].append(value)
    T = max(len(a) for a in actions)
    # minibatches have different T: right-pad them to the batch's T
    tensors = {k: torch.cat([torch.nn.functional.pad(p, (0, T - p.shape[1])) for p in v]) for k, v in parts.items()}
    return Rollout(prompts, [s.completion for s in samples], prompt_ids, actions, scores.to(device), **tensors)


# ---------------------------------------------------------------------------------------------------- training

@dataclass
class PPOState:
    """What a checkpoint restores besides the weights."""

    iteration: int = 0
    kl_coef: float = 0.0
    negative_kl_iterations: int = 0
    history: list[dict] = dataclasses.field(default_factory=list)  # per-iteration stats: the metrics after a resume


def save_checkpoint(directory: Path, model, value_head, optimizer, tok, meta, state: PPOState) -> None:
    """Write `iter-N` atomically (`alignpipe.lm.training.new_checkpoint`) and keep only the newest two."""
    import torch
    from safetensors.torch import save_file

    from alignpipe.lm.policy import save_policy
    from alignpipe.lm.training import new_checkpoint

    with new_checkpoint(directory, f"iter-{state.iteration:06d}", "iter") as tmp:
        save_policy(model, tok, meta, tmp)
        save_file(value_head.state_dict(), str(tmp / VALUE_HEAD_FILE))
        torch.save({"optimizer": optimizer.state_dict(), "state": dataclasses.asdict(state)}, tmp / "trainer.pt")


def init_training(cfg: Config, model, resume_from: Path | None):
    """(value head, optimizer, state): fresh, or restored from the checkpoint `resume_from` (weights included)."""
    import torch
    from safetensors.torch import load_file

    value_head = make_value_head(model)
    trained = [p for p in model.parameters() if p.requires_grad]  # all of them, or the LoRA adapters
    optimizer = torch.optim.AdamW(trained + list(value_head.parameters()), lr=cfg.learning_rate, eps=1e-5)
    state = PPOState(kl_coef=cfg.kl_coef)
    if resume_from is not None and cfg.lora_r:  # a LoRA checkpoint holds the adapters (peft's save_pretrained)
        from peft import set_peft_model_state_dict

        with loading(resume_from / ADAPTER_FILE, "LoRA adapters (truncated or corrupt)"):
            set_peft_model_state_dict(model, load_file(str(resume_from / ADAPTER_FILE)))
    elif resume_from is not None:
        from alignpipe.lm.policy import load_policy

        resumed, _, _ = load_policy(resume_from, device=str(next(model.parameters()).device))
        model.load_state_dict(resumed.state_dict())
    if resume_from is not None:
        with loading(resume_from / VALUE_HEAD_FILE, "value head (truncated or corrupt)"):
            value_head.load_state_dict(load_file(str(resume_from / VALUE_HEAD_FILE)))
        with loading(resume_from / "trainer.pt", "PPO trainer state (truncated or corrupt)"):
            saved = torch.load(resume_from / "trainer.pt", weights_only=True)
            optimizer.load_state_dict(saved["optimizer"])
            state = PPOState(**saved["state"])
    return value_head, optimizer, state


def check_kl(seq_kls, iteration: int, state: PPOState) -> float:
    """The mean sampled KL per completion; warns (and counts) when it is clearly negative. Its expectation is >= 0:
    below 0 by two standard errors means the rollouts were not sampled from the distribution PPO scores."""
    seq_kl = float(seq_kls.mean())
    if len(seq_kls) > 1 and seq_kl + 2 * float(seq_kls.std()) / math.sqrt(len(seq_kls)) < 0:
        state.negative_kl_iterations += 1
        warnings.warn(f"ppo: iteration {iteration}: the sampled KL to the reference is negative ({seq_kl:.4f} "
                      "nats per completion, more than two standard errors below 0): check that rollouts are "
                      "sampled as the log-probabilities assume (temperature, top-p off, banned tokens)",
                      RuntimeWarning, stacklevel=3)
    return seq_kl


def train(cfg: Config, model, tok, meta, ref_model, prompts: list, reward_fn: RewardFn,
          resume_from: Path | None = None, progress: str | None = "ppo",
          task=None) -> tuple[object, PPOState, list[dict]]:
    """The PPO loop. Returns (value head, final state, per-iteration stats). Checkpoints every `save_steps`
    iterations and at the end into cfg.checkpoint_dir; `resume_from` restores one. `task` says how rollouts are
    prompted and where they end (default: the default task, pep8)."""
    import random

    import torch
    from tqdm import tqdm

    from alignpipe.tasks import task_of
    from alignpipe.lm.models import bf16_supported
    from alignpipe.tracking import runs

    task = task or task_of(None)
    torch.manual_seed(cfg.seed)
    dist = token_distribution(cfg, tok, meta, autocast=cfg.bf16 and bf16_supported(), task=task)
    model.eval()  # dropout off: the PPO ratio compares the same deterministic network before and after updates
    ref_model.eval().requires_grad_(False)
    value_head, optimizer, state = init_training(cfg, model, resume_from)
    params = list(model.parameters()) + list(value_head.parameters())
    kl_ctl = (AdaptiveKLController(state.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target > 0
              else FixedKLController(state.kl_coef))
    order = list(range(len(prompts)))
    random.Random(cfg.seed).shuffle(order)
    checkpoint_dir = Path(cfg.checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    history = state.history  # restored by a resume: reward_first and the averages cover the whole run
    bar = tqdm(range(state.iteration, cfg.max_steps), initial=state.iteration, total=cfg.max_steps,
               desc=progress, disable=progress is None, unit="iter")
    for iteration in bar:
        # 1. rollout: sample, score, and record log pi_old, log pi_ref and V
        t0 = time.perf_counter()
        start = iteration * cfg.rollout_batch_size
        batch_prompts = [prompts[order[(start + i) % len(order)]] for i in range(cfg.rollout_batch_size)]
        batch = rollout(cfg, model, value_head, ref_model, tok, meta, batch_prompts, reward_fn,
                        seed=cfg.seed * 1_000_003 + iteration, dist=dist, task=task)
        t_rollout = time.perf_counter() - t0
        # 2. advantages: KL-shaped rewards, GAE, whitening
        rewards, kl = kl_shaped_rewards(batch.scores, batch.logprobs, batch.ref_logprobs, batch.mask, kl_ctl.value)
        advantages, returns = gae(rewards, batch.values, batch.mask, cfg.gamma, cfg.lam)
        advantages = whiten(advantages, batch.mask)
        # 3. num_ppo_epochs passes of clipped-surrogate minibatch updates
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iteration)
        sums: dict[str, float] = {}
        n_updates = 0
        for _ in range(cfg.num_ppo_epochs):
            perm = torch.randperm(len(batch.prompts), generator=generator).tolist()
            for mb_start in range(0, len(perm), cfg.minibatch_size):
                idx = perm[mb_start:mb_start + cfg.minibatch_size]
                mb = batch.minibatch(idx, tok.pad_token_id, device)
                T = mb.actions.shape[1]
                logprobs, entropy, values = token_forward(model, value_head, mb, dist)
                loss, stats = ppo_loss(logprobs, batch.logprobs[idx, :T], advantages[idx, :T], values,
                                       batch.values[idx, :T], returns[idx, :T], mb.mask, cfg.cliprange,
                                       cfg.cliprange_value, cfg.vf_coef)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                stats["policy/entropy"] = masked_mean(entropy.detach(), mb.mask)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n_updates += 1
        # 4. logging, the KL controller, checkpoints
        seq_kl = check_kl(kl.sum(1), iteration, state)
        stats = {k: v / n_updates for k, v in sums.items()}
        stats.update(rollout_stats(batch, seq_kl, kl_ctl.value, t_rollout, time.perf_counter() - t0))
        kl_ctl.update(seq_kl, cfg.rollout_batch_size)
        state.iteration, state.kl_coef = iteration + 1, kl_ctl.value
        history.append({k: float(v) for k, v in stats.items()})
        runs.log_metrics(stats, step=iteration + 1)
        bar.set_postfix(reward=f"{stats['env/reward_mean']:.3f}", kl=f"{seq_kl:.2f}")
        if state.iteration % cfg.save_steps == 0 or state.iteration == cfg.max_steps:
            save_checkpoint(checkpoint_dir, model, value_head, optimizer, tok, meta, state)
    return value_head, state, history


def rollout_stats(batch: Rollout, seq_kl: float, kl_coef: float, t_rollout: float, seconds: float) -> dict:
    """cleanrl/TRL-named metrics of one iteration's rollouts."""
    n_tokens = float(batch.mask.sum())
    return {
        "env/reward_mean": float(batch.scores.mean()),
        "env/reward_std": float(batch.scores.std()) if len(batch.scores) > 1 else 0.0,
        "objective/kl": seq_kl,
        "objective/kl_coef": kl_coef,
        "objective/rlhf_reward": float(batch.scores.mean()) - kl_coef * seq_kl,
        "charts/completion_tokens_mean": n_tokens / len(batch.prompts),
        "charts/tokens_per_s": n_tokens / seconds,
        "charts/rollout_seconds": t_rollout,
        "charts/iteration_seconds": seconds,
    }


# --------------------------------------------------------------------------------------------------------- run

def check_reward(cfg: Config, task) -> None:
    """A task without an oracle has no `oracle` reward term."""
    from alignpipe.algos.rewards import parse_reward

    if not task.has_oracle() and any(name == "oracle" for _, name in parse_reward(cfg.reward).terms):
        raise ConfigError("ppo.reward", f"task {task} has no oracle: use model or a function, got {cfg.reward!r}")


def run(cfg: Config, inputs: dict[str, Path | None], out_dir: Path) -> dict[str, float]:
    """Train with PPO, save the policy (same PolicyMeta, safetensors) and value head; with `eval_heldout`, check it
    (the oracle, or the reward against the reference where the task has no oracle)."""
    import torch
    from safetensors.torch import save_file

    from alignpipe.algos.lora import check_4bit, merged, quantization_config, with_lora
    from alignpipe.algos.rewards import build_reward
    from alignpipe.tasks import task_of
    from alignpipe.lm.policy import load_policy, save_policy
    from alignpipe.lm.training import resume_checkpoint
    from alignpipe.oracle.policy_eval import heldout_check, read_train_prompts

    check_4bit(cfg)
    task = task_of(inputs["data"])
    check_reward(cfg, task)
    torch.manual_seed(cfg.seed)
    model, tok, meta = load_policy(inputs["policy"], cfg.trust_remote_code,
                                   quantization_config=quantization_config(cfg))
    model = with_lora(cfg, model)
    positions = getattr(model.config, "max_position_embeddings", None)
    needed = cfg.sampling.max_prompt_tokens + cfg.sampling.max_new_tokens + 1
    if positions is not None and needed > positions:
        raise ConfigError("ppo.sampling.max_prompt_tokens", f"max_prompt_tokens + max_new_tokens + 1 must be <= the "
                          f"policy's {positions} positions, got {needed}")
    reference = load_policy(inputs["policy"], cfg.trust_remote_code)
    rows = read_train_prompts(inputs["data"])
    prompts = [r["prompt"] for r in rows]
    contexts = {r["prompt"]: r["context"] for r in rows if isinstance(r["prompt"], str)} if task.has_oracle() else {}
    reward = build_reward(cfg.reward, inputs.get("reward_model"), contexts, probe=prompts, oracle=task.oracle())

    def reward_fn(samples) -> list[float]:
        return reward([s.prompt for s in samples], [s.completion for s in samples])

    resume_from = resume_checkpoint(cfg, cfg.checkpoint_dir, "iter", CHECKPOINT_FILES)
    train_start = time.perf_counter()
    value_head, state, history = train(cfg, model, tok, meta, reference[0], prompts, reward_fn, resume_from,
                                       task=task)
    train_seconds = time.perf_counter() - train_start

    meta = dataclasses.replace(meta, extra={**meta.extra, "stage": "ppo", "parent": str(inputs["policy"]),
                                            "reward": str(reward.spec),
                                            "reward_model": str(inputs.get("reward_model")),
                                            **({"lora_r": cfg.lora_r} if cfg.lora_r else {})})
    save_policy(merged(model), tok, meta, out_dir)  # LoRA: adapters folded into the weights
    save_file(value_head.state_dict(), str(out_dir / VALUE_HEAD_FILE))
    metrics: dict[str, float] = {}
    if cfg.eval_heldout:  # a quick check of this policy alone (evaluate compares every candidate)
        eval_start = time.perf_counter()
        check = Sampling(max_new_tokens=cfg.sampling.max_new_tokens, max_prompt_tokens=cfg.sampling.max_prompt_tokens,
                         batch_size=cfg.sampling.batch_size)  # evaluate's temperature and top-p, the stage's caps
        metrics = heldout_check(out_dir, reference, inputs["data"], task, cfg.n_eval_prompts, check, cfg.seed,
                                out_dir, "ppo: evaluating", reward)
        metrics["eval_seconds"] = round(time.perf_counter() - eval_start, 2)
    first, last = (history[0], history[-1]) if history else ({}, {})
    metrics.update(
        reward_first=first.get("env/reward_mean", 0.0),
        reward_last=last.get("env/reward_mean", 0.0),
        train_kl_last=last.get("objective/kl", 0.0),
        kl_coef_final=state.kl_coef,
        negative_kl_iterations=state.negative_kl_iterations,
        tokens_per_s=sum(h["charts/tokens_per_s"] for h in history) / max(len(history), 1),
        train_seconds=round(train_seconds, 2),
    )
    return metrics
