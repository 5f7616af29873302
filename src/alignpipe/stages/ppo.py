"""Proximal policy optimisation of the pretrained policy against the reward model, with a KL penalty to the reference.

TRL removed PPOTrainer after 1.12, so PPO is written here in one file, in the spirit of cleanrl's ppo.py
(https://github.com/vwxyzjn/cleanrl/blob/master/cleanrl/ppo.py) and of TRL's last PPOTrainer, with the papers' names:

- the objective (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593 eq. 2; Ouyang et al. 2022 "InstructGPT",
  https://arxiv.org/abs/2203.02155 eq. 2):  maximise  E_{x~D, y~pi}[ r(x, y) - beta * log(pi(y|x) / pi_ref(y|x)) ],
  spread over tokens: each token t gets -beta * (log pi(y_t|s_t) - log pi_ref(y_t|s_t)) and the last token also the
  reward model's score r(x, y) of the cleaned completion;
- beta fixed, or adaptive to a KL target (Ziegler et al. 2019 section 2.2);
- a value head (one linear layer on the policy's last hidden state), GAE (Schulman et al. 2016,
  https://arxiv.org/abs/1506.02438), advantage whitening, the clipped surrogate and clipped value loss (Schulman et
  al. 2017, https://arxiv.org/abs/1707.06347 eq. 7), several PPO epochs over minibatches of each rollout batch;
- rollouts from `alignpipe.lm.policy.sample` (HF generate with a KV cache; the completion unit is one logical line),
  at `temperature` (0.7, as the evaluation and TRL's PPOTrainer) with top-p off, so that the sampling
  distribution is the one whose log-probabilities PPO computes (same temperature, banned words, first token).

The saved policy is a plain causal LM (loadable by `alignpipe.lm.policy.load_policy`, same PolicyMeta); the value head
is saved beside it in `value_head.safetensors`. PPO runs in a single process (no DDP), on one GPU when present.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

from alignpipe.core.config import StageConfig, field
from alignpipe.core.errors import ConfigError, DataError
from alignpipe.stages import Input

INPUTS = (
    Input("data", "data", "dataset directory: train_prompts.jsonl for rollouts, prompts.jsonl for the evaluation"),
    Input("policy", "artifacts/pretrain", "pretrained policy directory: the initial policy and the frozen reference"),
    Input("reward_model", "artifacts/reward", "reward model directory (sequence classification, one score)"),
)
METRICS = ("violations_per_char", "zero_violation_frac", "win_rate_vs_ref", "kl_to_ref", "seconds")
# The few metrics `dvc metrics show` lists (metrics_headline.json; fnmatch patterns); metrics.json has all.
HEADLINE = ("violations_per_char", "win_rate_vs_ref", "kl_to_ref", "seconds")
VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass(frozen=True)
class Config(StageConfig):
    SECTION: ClassVar[str] = "ppo"

    max_steps: int = field(20, "PPO iterations (rollout batch + update): the budget")
    rollout_batch_size: int = field(64, "prompts sampled per iteration")
    minibatch_size: int = field(16, "rollouts per gradient step")
    ppo_epochs: int = field(4, "passes over each rollout batch")
    learning_rate: float = field(3e-5, "AdamW learning rate of the policy and the value head")
    kl_coef: float = field(0.05, "beta: the per-token KL penalty coefficient (the initial one when adaptive)")
    kl_target: float = field(0.0, "> 0: adapt beta towards this KL (nats per completion); 0: beta stays fixed")
    kl_horizon: int = field(10000, "adaptive KL horizon in rollouts (Ziegler et al. 2019: 10000)")
    gamma: float = field(1.0, "discount")
    lam: float = field(0.95, "GAE lambda")
    cliprange: float = field(0.2, "epsilon of the clipped surrogate")
    cliprange_value: float = field(0.2, "clip range of the value update around the rollout's values")
    vf_coef: float = field(0.1, "weight of the value loss")
    max_grad_norm: float = field(1.0, "gradient clipping norm")
    temperature: float = field(0.7, "rollout sampling temperature (log-probabilities use the same temperature)")
    max_new_tokens: int = field(48, "completion length cap in tokens")
    max_prompt_tokens: int = field(192, "keep the last N prompt tokens, as the evaluation's sampling does")
    bf16: bool = field(True, "bf16 autocast for the transformer where supported (log-probabilities stay fp32)")
    seed: int = field(0, "seed of prompt order, sampling, minibatches and the evaluation")
    save_every: int = field(5, "checkpoint every N iterations into checkpoint_dir")
    checkpoint_dir: str = field("checkpoints/ppo", "checkpoints (policy, value head, optimizer, beta)")
    resume: bool = field(False, "resume from the latest checkpoint in checkpoint_dir")
    n_eval_prompts: int = field(512, "held-out prompts in the oracle evaluation (policy and reference samples)")
    eval_batch_size: int = field(64, "prompts per sampling batch in the evaluation")

    def __post_init__(self):
        for key in ("max_steps", "rollout_batch_size", "minibatch_size", "ppo_epochs", "kl_horizon",
                    "max_new_tokens", "max_prompt_tokens", "save_every", "n_eval_prompts", "eval_batch_size"):
            self.check(getattr(self, key) >= 1, key, "must be >= 1")
        self.check(self.minibatch_size <= self.rollout_batch_size, "minibatch_size", "must be <= rollout_batch_size")
        self.check(self.learning_rate > 0, "learning_rate", "must be > 0")
        self.check(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        self.check(self.kl_target >= 0, "kl_target", "must be >= 0 (0 keeps beta fixed)")
        self.check(0 < self.gamma <= 1, "gamma", "must be in (0, 1]")
        self.check(0 <= self.lam <= 1, "lam", "must be in [0, 1]")
        self.check(self.cliprange > 0, "cliprange", "must be > 0")
        self.check(self.cliprange_value > 0, "cliprange_value", "must be > 0")
        self.check(self.vf_coef >= 0, "vf_coef", "must be >= 0")
        self.check(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        self.check(self.temperature > 0, "temperature", "must be > 0")
        self.check(bool(self.checkpoint_dir), "checkpoint_dir", "must be a directory path")


# ------------------------------------------------------------------------------------------------------ the math
# Tensors are [batch, T]: T completion tokens, right-padded; `mask` is 1 on real tokens.

def kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef: float):
    """Per-token rewards r_t = -beta * (log pi(y_t|s_t) - log pi_ref(y_t|s_t)), plus the score r(x, y) on the last
    real token (Ziegler et al. 2019 eq. 2; InstructGPT eq. 2). Returns (rewards, per-token KL estimate)."""
    import torch

    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = mask.sum(1).long() - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalized advantage estimation (Schulman et al. 2016 eq. 16): delta_t = r_t + gamma V(s_{t+1}) - V(s_t),
    A_t = delta_t + gamma lam A_{t+1}; V is 0 after the last token. Returns (advantages, returns = A + V)."""
    import torch

    values = values * mask
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[:, 0])
    T = rewards.shape[1]
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t + 1 < T else torch.zeros_like(lastgaelam)
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = (delta + gamma * lam * lastgaelam) * mask[:, t]
        advantages[:, t] = lastgaelam
    return advantages, advantages + values


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x, mask, eps: float = 1e-8):
    """(x - mean) / std over the real tokens (advantage normalisation, as in cleanrl and TRL)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * (var + eps).rsqrt() * mask


def ppo_loss(logprobs, old_logprobs, advantages, values, old_values, returns, mask, cliprange: float,
             cliprange_value: float, vf_coef: float):
    """The clipped surrogate (Schulman et al. 2017 eq. 7) as a loss, plus vf_coef * the clipped value loss.
    Returns (loss, stats) with pg_loss, vf_loss, clipfrac, approx_kl (http://joschu.net/blog/kl-approx.html, k3)."""
    import torch

    logratio = logprobs - old_logprobs
    ratio = torch.exp(logratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    pg_loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (values_clipped - returns) ** 2), mask)
    with torch.no_grad():
        stats = {
            "losses/policy_loss": pg_loss.detach(),
            "losses/value_loss": vf_loss.detach(),
            "policy/clipfrac": masked_mean(((ratio - 1).abs() > cliprange).float(), mask),
            "policy/approx_kl": masked_mean((ratio - 1) - logratio, mask),
            "losses/value_clipfrac": masked_mean(((values - old_values).abs() > cliprange_value).float(), mask),
        }
    return pg_loss + vf_coef * vf_loss, stats


class FixedKLController:
    """beta stays at its initial value."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. 2019 section 2.2: e = clip(KL / KL_target - 1, -0.2, 0.2); beta <- beta (1 + e * n / horizon),
    with n the rollouts since the last update."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


# ---------------------------------------------------------------------------------------------- model plumbing

def make_value_head(model):
    """A linear value head on the policy's last hidden state, zero-initialised (V = 0 before training, so the first
    value-loss gradients do not move the shared transformer)."""
    import torch

    head = torch.nn.Linear(model.config.hidden_size, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head.to(next(model.parameters()).device)


def batch_tensors(prompt_ids: list[list[int]], action_ids: list[list[int]], pad_id: int, device):
    """Left-padded prompts followed by right-padded completions: every completion starts at column W.
    Returns input_ids, attention_mask, position_ids, actions [B, T], mask [B, T] and W."""
    import torch

    W, T = max(len(p) for p in prompt_ids), max(len(a) for a in action_ids)
    B = len(prompt_ids)
    input_ids = torch.full((B, W + T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, W + T), dtype=torch.long)
    for r, (p, a) in enumerate(zip(prompt_ids, action_ids)):
        input_ids[r, W - len(p):W + len(a)] = torch.tensor(p + a)
        attention[r, W - len(p):W + len(a)] = 1
    position_ids = (attention.cumsum(1) - 1).clamp(min=0)
    actions = input_ids[:, W:]
    mask = attention[:, W:].float()
    return (input_ids.to(device), attention.to(device), position_ids.to(device), actions.to(device),
            mask.to(device), W)


def token_forward(model, value_head, tensors, temperature: float, bad_ids: list[int], autocast: bool,
                  first_ids: list[int] | None = None):
    """Per-token log pi(y_t|s_t) of the distribution sampling draws from: logits / `temperature`, banned tokens
    masked and, with `first_ids`, the first token restricted to them (as `alignpipe.lm.policy.sample` restricts it to
    tokens that start a new line); the entropy of that distribution and V(s_t) from the value head (None when
    value_head is None). All [B, T], fp32."""
    import torch

    input_ids, attention, position_ids, actions, mask, W = tensors
    device_type = input_ids.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention,
                                  position_ids=position_ids).last_hidden_state
    h = hidden[:, W - 1:-1].float()  # the state before each completion token
    with torch.autocast(device_type, enabled=False):
        logits = model.get_output_embeddings()(h) / temperature
        if bad_ids:
            logits[..., bad_ids] = -math.inf
        if first_ids:
            allowed = torch.full_like(logits[:, 0], -math.inf)
            allowed[:, first_ids] = 0.0
            logits[:, 0] = logits[:, 0] + allowed
        logp_all = torch.log_softmax(logits, dim=-1)
        logprobs = logp_all.gather(-1, actions[..., None])[..., 0]
        entropy = -(logp_all.exp() * logp_all.nan_to_num(neginf=0.0)).sum(-1)
        values = value_head(h)[..., 0] if value_head is not None else None
    # Padding may be a banned token (-inf); a floor keeps an impossible action from turning the ratio into NaN.
    return logprobs.clamp(min=-1e4).masked_fill(mask == 0, 0.0), entropy, values


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


def action_ids(sample, tok, meta, max_new_tokens: int) -> list[int]:
    """The tokens the policy chose for one sample: its completion ids, plus the EOS that ended it when generation
    stopped neither on a finished line nor at max_new_tokens (`alignpipe.lm.policy.sample` drops that EOS)."""
    from alignpipe.lm.policy import line_complete

    ids = list(sample.completion_ids)
    ended_on_line = bool(ids) and "\n" in tok.decode([ids[-1]]) and line_complete(
        meta.clean(tok.decode(ids, skip_special_tokens=True)))
    if not ended_on_line and len(ids) < max_new_tokens:
        ids.append(tok.eos_token_id)
    return ids


# ---------------------------------------------------------------------------------------------------- training

RewardFn = Callable[[list], list[float]]  # samples (alignpipe.lm.policy.Sample) -> one score per sample


@dataclass
class PPOState:
    """What a checkpoint restores besides the weights."""

    iteration: int = 0
    kl_coef: float = 0.0
    negative_kl_iterations: int = 0


def bad_token_ids(tok, meta) -> list[int]:
    """Ids of the policy's banned words, as `alignpipe.lm.policy.sample` bans them."""
    out = []
    for word in meta.bad_words:
        i = tok.convert_tokens_to_ids(word)
        if i is not None and i != tok.unk_token_id:
            out.append(i)
    return out


def first_token_ids(tok) -> list[int]:
    """Ids of the tokens a completion may start with: those starting a new line (sampling's own list)."""
    from alignpipe.lm.policy import _newline_ids

    return _newline_ids(tok)[1]


def rollout(cfg: Config, model, value_head, ref_model, tok, meta, prompts: list[str], reward_fn: RewardFn,
            seed: int, autocast: bool) -> Rollout:
    """Sample one completion per prompt, score it, and record the old log-probabilities, reference log-probabilities
    and values."""
    import torch

    from alignpipe.lm.policy import Sampling, sample

    sampling = Sampling(temperature=cfg.temperature, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
                        batch_size=len(prompts), max_prompt_tokens=cfg.max_prompt_tokens)
    with torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16, enabled=autocast):
        samples = sample(model, tok, meta, prompts, sampling, seed=seed)
    scores = torch.tensor(reward_fn(samples), dtype=torch.float32)
    actions = [action_ids(s, tok, meta, cfg.max_new_tokens) for s in samples]
    prompt_ids = [s.prompt_ids for s in samples]
    device = next(model.parameters()).device
    bad, first = bad_token_ids(tok, meta), first_token_ids(tok)
    logprobs, ref_logprobs, values, masks = [], [], [], []
    with torch.no_grad():
        for start in range(0, len(samples), cfg.minibatch_size):
            sl = slice(start, start + cfg.minibatch_size)
            tensors = batch_tensors(prompt_ids[sl], actions[sl], tok.pad_token_id, device)
            lp, _, v = token_forward(model, value_head, tensors, cfg.temperature, bad, autocast, first)
            ref_lp, _, _ = token_forward(ref_model, None, tensors, cfg.temperature, bad, autocast, first)
            logprobs.append(lp)
            ref_logprobs.append(ref_lp)
            values.append(v * tensors[4])
            masks.append(tensors[4])
    T = max(len(a) for a in actions)

    def cat(parts):  # minibatches have different T: right-pad them to the batch's T
        return torch.cat([torch.nn.functional.pad(p, (0, T - p.shape[1])) for p in parts])

    return Rollout(prompts, [s.completion for s in samples], prompt_ids, actions, scores.to(device),
                   cat(logprobs), cat(ref_logprobs), cat(values), cat(masks))


def ppo_update(cfg: Config, model, value_head, optimizer, batch: Rollout, advantages, returns, tok, meta,
               generator, autocast: bool) -> dict[str, float]:
    """ppo_epochs passes of clipped-surrogate minibatch updates over one rollout batch; mean stats."""
    import torch

    bad, first = bad_token_ids(tok, meta), first_token_ids(tok)
    device = next(model.parameters()).device
    params = [p for p in model.parameters()] + list(value_head.parameters())
    sums: dict[str, float] = {}
    n = 0
    B = len(batch.prompts)
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=generator).tolist()
        for start in range(0, B, cfg.minibatch_size):
            idx = order[start:start + cfg.minibatch_size]
            tensors = batch_tensors([batch.prompt_ids[i] for i in idx], [batch.action_ids[i] for i in idx],
                                    tok.pad_token_id, device)
            T = tensors[3].shape[1]
            mask = tensors[4]
            logprobs, entropy, values = token_forward(model, value_head, tensors, cfg.temperature, bad, autocast,
                                                      first)
            loss, stats = ppo_loss(logprobs, batch.logprobs[idx, :T], advantages[idx, :T], values,
                                   batch.values[idx, :T], returns[idx, :T], mask, cfg.cliprange,
                                   cfg.cliprange_value, cfg.vf_coef)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            stats["policy/entropy"] = masked_mean(entropy.detach(), mask)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
    return {k: v / n for k, v in sums.items()}


def save_checkpoint(directory: Path, model, value_head, optimizer, tok, meta, state: PPOState) -> None:
    """Write `iter-N` atomically (a temporary folder renamed) and keep only the newest two."""
    import torch
    from safetensors.torch import save_file

    from alignpipe.lm.policy import save_policy

    final = directory / f"iter-{state.iteration:06d}"
    partial = directory / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    save_policy(model, tok, meta, partial)
    save_file(value_head.state_dict(), str(partial / VALUE_HEAD_FILE))
    torch.save({"optimizer": optimizer.state_dict(), "state": dataclasses.asdict(state)}, partial / "trainer.pt")
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    for old in sorted(directory.glob("iter-*"))[:-2]:
        shutil.rmtree(old)


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = sorted(Path(directory).glob("iter-*")) if Path(directory).is_dir() else []
    return found[-1] if found else None


def train(cfg: Config, model, tok, meta, ref_model, prompts: list[str], reward_fn: RewardFn,
          resume_from: Path | None = None, progress: str | None = "ppo") -> tuple[object, PPOState, list[dict]]:
    """The PPO loop. Returns (value head, final state, per-iteration stats). Checkpoints every `save_every`
    iterations and at the end into cfg.checkpoint_dir; `resume_from` restores one."""
    import random

    import torch
    from safetensors.torch import load_file
    from tqdm import tqdm

    from alignpipe.tracking import runs
    from alignpipe.stages.dpo import bf16_supported

    torch.manual_seed(cfg.seed)
    autocast = cfg.bf16 and bf16_supported()
    model.eval()  # dropout off: the PPO ratio compares the same deterministic network before and after updates
    ref_model.eval().requires_grad_(False)
    value_head = make_value_head(model)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(value_head.parameters()), lr=cfg.learning_rate,
                                  eps=1e-5)
    state = PPOState(kl_coef=cfg.kl_coef)
    if resume_from is not None:
        from alignpipe.lm.policy import load_policy

        resumed, _, _ = load_policy(resume_from, device=str(next(model.parameters()).device))
        model.load_state_dict(resumed.state_dict())
        value_head.load_state_dict(load_file(str(resume_from / VALUE_HEAD_FILE)))
        saved = torch.load(resume_from / "trainer.pt", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        state = PPOState(**saved["state"])
    kl_ctl = (AdaptiveKLController(state.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target > 0
              else FixedKLController(state.kl_coef))
    order = list(range(len(prompts)))
    random.Random(cfg.seed).shuffle(order)
    checkpoint_dir = Path(cfg.checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []
    bar = tqdm(range(state.iteration, cfg.max_steps), initial=state.iteration, total=cfg.max_steps,
               desc=progress, disable=progress is None, unit="iter")
    for iteration in bar:
        t0 = time.perf_counter()
        start = iteration * cfg.rollout_batch_size
        batch_prompts = [prompts[order[(start + i) % len(order)]] for i in range(cfg.rollout_batch_size)]
        batch = rollout(cfg, model, value_head, ref_model, tok, meta, batch_prompts, reward_fn,
                        seed=cfg.seed * 1_000_003 + iteration, autocast=autocast)
        t_rollout = time.perf_counter() - t0
        rewards, kl = kl_shaped_rewards(batch.scores, batch.logprobs, batch.ref_logprobs, batch.mask, kl_ctl.value)
        advantages, returns = gae(rewards, batch.values, batch.mask, cfg.gamma, cfg.lam)
        advantages = whiten(advantages, batch.mask)
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iteration)
        stats = ppo_update(cfg, model, value_head, optimizer, batch, advantages, returns, tok, meta, generator,
                           autocast)
        seq_kls = kl.sum(1)
        seq_kl = float(seq_kls.mean())
        # The sampled KL is noisy but its expectation is >= 0: clearly negative (by two standard errors) means the
        # rollouts were not sampled from the distribution PPO scores (temperature, top-p, banned tokens).
        if len(seq_kls) > 1 and seq_kl + 2 * float(seq_kls.std()) / math.sqrt(len(seq_kls)) < 0:
            state.negative_kl_iterations += 1
            warnings.warn(f"ppo: iteration {iteration}: the sampled KL to the reference is negative ({seq_kl:.4f} "
                          "nats per completion, more than two standard errors below 0): check that rollouts are "
                          "sampled as the log-probabilities assume (temperature, top-p off, banned tokens)",
                          RuntimeWarning, stacklevel=2)
        n_tokens = float(batch.mask.sum())
        seconds = time.perf_counter() - t0
        stats.update({
            "env/reward_mean": float(batch.scores.mean()),
            "env/reward_std": float(batch.scores.std()) if len(batch.scores) > 1 else 0.0,
            "objective/kl": seq_kl,
            "objective/kl_coef": kl_ctl.value,
            "objective/rlhf_reward": float(batch.scores.mean()) - kl_ctl.value * seq_kl,
            "charts/completion_tokens_mean": n_tokens / len(batch.prompts),
            "charts/tokens_per_s": n_tokens / seconds,
            "charts/rollout_seconds": t_rollout,
            "charts/iteration_seconds": seconds,
        })
        kl_ctl.update(seq_kl, cfg.rollout_batch_size)
        state.iteration, state.kl_coef = iteration + 1, kl_ctl.value
        history.append(stats)
        runs.log_metrics(stats, step=iteration + 1)
        bar.set_postfix(reward=f"{stats['env/reward_mean']:.3f}", kl=f"{seq_kl:.2f}")
        if state.iteration % cfg.save_every == 0 or state.iteration == cfg.max_steps:
            save_checkpoint(checkpoint_dir, model, value_head, optimizer, tok, meta, state)
    return value_head, state, history


# --------------------------------------------------------------------------------------------------------- run

def read_train_prompts(data_dir: Path) -> list[str]:
    """Training prompts: `train_prompts.jsonl` of the data directory."""
    from alignpipe.oracle.policy_eval import load_prompts

    path = Path(data_dir) / "train_prompts.jsonl"
    if not path.is_file():
        raise DataError(str(path), "training prompts not found (rebuild the data with `alignpipe data build`)")
    return [row["prompt"] for row in load_prompts(path)]


def run(cfg: Config, inputs: dict[str, Path | None], out_dir: Path) -> dict[str, float]:
    """Train with PPO, save the policy (same PolicyMeta, safetensors) and value head, evaluate with the oracle."""
    import torch
    from safetensors.torch import save_file

    from alignpipe.lm.policy import load_policy, save_policy
    from alignpipe.lm.reward_model import load_reward_model, reward_scores
    from alignpipe.stages.dpo import oracle_metrics

    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model, tok, meta = load_policy(inputs["policy"])
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and cfg.max_prompt_tokens + cfg.max_new_tokens + 1 > positions:
        raise ConfigError("ppo.max_prompt_tokens", f"max_prompt_tokens + max_new_tokens + 1 must be <= the policy's "
                          f"{positions} positions, got {cfg.max_prompt_tokens + cfg.max_new_tokens + 1}")
    reference = load_policy(inputs["policy"])
    rm, rm_tok = load_reward_model(inputs["reward_model"])
    prompts = read_train_prompts(inputs["data"])

    def reward_fn(samples) -> list[float]:
        return reward_scores(rm, rm_tok, [s.prompt for s in samples], [s.completion for s in samples])

    checkpoint_dir = Path(cfg.checkpoint_dir)
    resume_from = None
    if cfg.resume:
        resume_from = latest_checkpoint(checkpoint_dir)
        if resume_from is None:
            raise DataError(str(checkpoint_dir), "ppo.resume is set but there is no iter-N checkpoint to resume from")
    else:
        for old in checkpoint_dir.glob("iter-*"):
            shutil.rmtree(old)
    train_start = time.perf_counter()
    value_head, state, history = train(cfg, model, tok, meta, reference[0], prompts, reward_fn, resume_from)
    train_seconds = time.perf_counter() - train_start

    meta = dataclasses.replace(meta, extra={**meta.extra, "stage": "ppo", "parent": str(inputs["policy"]),
                                            "reward_model": str(inputs["reward_model"])})
    save_policy(model, tok, meta, out_dir)
    save_file(value_head.state_dict(), str(out_dir / VALUE_HEAD_FILE))
    eval_start = time.perf_counter()
    metrics = oracle_metrics(out_dir, reference, inputs["data"], cfg.n_eval_prompts, cfg.eval_batch_size, cfg.seed,
                             out_dir, progress="ppo: evaluating")
    first, last = (history[0], history[-1]) if history else ({}, {})
    metrics.update(
        reward_first=first.get("env/reward_mean", 0.0),
        reward_last=last.get("env/reward_mean", 0.0),
        train_kl_last=last.get("objective/kl", 0.0),
        kl_coef_final=state.kl_coef,
        negative_kl_iterations=state.negative_kl_iterations,
        tokens_per_s=sum(h["charts/tokens_per_s"] for h in history) / max(len(history), 1),
        train_seconds=round(train_seconds, 2),
        eval_seconds=round(time.perf_counter() - eval_start, 2),
        seconds=round(time.perf_counter() - start, 2),
    )
    return metrics
