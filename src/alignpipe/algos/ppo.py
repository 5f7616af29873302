"""PPO for language models, the algorithm without the pipeline: the KL-shaped rewards, GAE, advantage whitening,
the clipped policy and value losses, the KL controllers (the papers' equations, cited on each function), and the
per-token forward pass that scores a batch of (prompt, completion) pairs as sampling drew them.

The stage `alignpipe.stages.ppo` runs the loop (rollout -> advantages -> epochs of minibatch updates -> logging).
TRL removed PPOTrainer after 1.12, hence this module, in the spirit of cleanrl's ppo.py
(https://github.com/vwxyzjn/cleanrl/blob/master/cleanrl/ppo.py) and of TRL's last PPOTrainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# ----------------------------------------------------------------------------------------------------- the math
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


@dataclass
class PPOBatch:
    """Token tensors of (prompt, completion) pairs: left-padded prompts followed by right-padded completions, so every
    completion starts at column `prompt_width`. `actions` and `mask` are the completion part, [B, T]."""

    input_ids: object  # [B, prompt_width + T] long
    attention_mask: object  # [B, prompt_width + T] long
    position_ids: object  # [B, prompt_width + T] long: positions count real tokens only
    actions: object  # [B, T] long: the completion tokens
    mask: object  # [B, T] float: 1 on real completion tokens
    prompt_width: int


def make_batch(prompt_ids: list[list[int]], action_ids: list[list[int]], pad_id: int, device) -> PPOBatch:
    """The `PPOBatch` of prompts and their completions (actions), on `device`."""
    import torch

    from alignpipe.lm.batching import pad

    prompts, prompt_mask = pad(prompt_ids, pad_id, side="left")
    actions, action_mask = pad(action_ids, pad_id, side="right")
    input_ids = torch.from_numpy(np.concatenate([prompts, actions], axis=1))
    attention = torch.from_numpy(np.concatenate([prompt_mask, action_mask], axis=1))
    position_ids = (attention.cumsum(1) - 1).clamp(min=0)
    W = prompts.shape[1]
    return PPOBatch(input_ids.to(device), attention.to(device), position_ids.to(device), input_ids[:, W:].to(device),
                    attention[:, W:].float().to(device), W)


@dataclass(frozen=True)
class TokenDistribution:
    """The per-token distribution rollouts are sampled from, which PPO's log-probabilities must match."""

    temperature: float = 1.0  # logits are divided by it
    banned_ids: list[int] = field(default_factory=list)  # never sampled: -inf logits
    first_ids: list[int] | None = None  # when set, the only tokens a completion may start with
    autocast: bool = False  # bf16 autocast for the transformer (the head and log-softmax stay fp32)


def _backbone(model):
    """The transformer under the LM head (a LoRA-wrapped policy: the one inside peft's wrapper, adapters in place)."""
    return (model.get_base_model() if hasattr(model, "get_base_model") else model).base_model


def token_forward(model, value_head, batch: PPOBatch, dist: TokenDistribution):
    """Per-token log pi(y_t|s_t) of the distribution sampling draws from: logits / temperature, banned tokens
    masked and, with `first_ids`, the first token restricted to them (as `alignpipe.lm.policy.sample` restricts it to
    tokens that start a new line); the entropy of that distribution and V(s_t) from the value head (None when
    value_head is None). All [B, T], fp32."""
    import torch

    device_type = batch.input_ids.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=dist.autocast):
        hidden = _backbone(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  position_ids=batch.position_ids).last_hidden_state
    h = hidden[:, batch.prompt_width - 1:-1].float()  # the state before each completion token
    with torch.autocast(device_type, enabled=False):
        logits = model.get_output_embeddings()(h) / dist.temperature
        if dist.banned_ids:
            logits[..., dist.banned_ids] = -math.inf
        if dist.first_ids:
            allowed = torch.full_like(logits[:, 0], -math.inf)
            allowed[:, dist.first_ids] = 0.0
            logits[:, 0] = logits[:, 0] + allowed
        logp_all = torch.log_softmax(logits, dim=-1)
        logprobs = logp_all.gather(-1, batch.actions[..., None])[..., 0]
        entropy = -(logp_all.exp() * logp_all.nan_to_num(neginf=0.0)).sum(-1)
        values = value_head(h)[..., 0] if value_head is not None else None
    # Padding may be a banned token (-inf); a floor keeps an impossible action from turning the ratio into NaN.
    return logprobs.clamp(min=-1e4).masked_fill(batch.mask == 0, 0.0), entropy, values


def action_ids(sample, tok, meta, max_new_tokens: int, unit, stop_ids: list[int] = ()) -> list[int]:
    """The tokens the policy chose for one sample: its completion ids, plus the EOS that ended it when generation
    stopped neither by the task's completion `unit` (pep8: a finished line), nor at max_new_tokens, nor on a stop
    token the ids already end with (`alignpipe.lm.policy.sample` drops the EOS; a chat answer keeps its end-of-turn
    token, `stop_ids`)."""
    ids = list(sample.completion_ids)
    if ids and ids[-1] in stop_ids:
        return ids
    if not unit.ended_by_unit(tok, meta, ids) and len(ids) < max_new_tokens:
        ids.append(tok.eos_token_id)
    return ids
