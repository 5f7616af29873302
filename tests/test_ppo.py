"""PPO: the math against hand computations, log-probabilities against policy.py, learning a toy reward, resume,
and the stage end to end on tiny artifacts."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest

torch = pytest.importorskip("torch")

import tiny  # noqa: E402

from alignpipe.algos import ppo as algo  # noqa: E402
from alignpipe.lm.training import latest_complete  # noqa: E402
from alignpipe.stages import ppo  # noqa: E402
from alignpipe.tasks.pep8 import LogicalLine  # noqa: E402

LINE = LogicalLine()  # the PEP8 task's completion unit: PPO's rollouts are one logical line


def test_kl_shaped_rewards_match_the_formula():
    # r_t = -beta * (log pi - log pi_ref) on every token, plus the score on the last real token
    scores = torch.tensor([1.0, 2.0])
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -1.2, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = algo.kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    expected = [[-0.1 * 0.5, -0.1 * -1.0, -0.1 * 0.0 + 1.0], [-0.1 * -0.2, -0.1 * 0.5 + 2.0, 0.0]]
    assert rewards.flatten().tolist() == pytest.approx(sum(expected, []))
    assert kl.sum(1).tolist() == pytest.approx([-0.5, 0.3])


def test_gae_matches_hand_computation_on_three_steps():
    rewards = torch.tensor([[-0.05, 0.1, 1.0]])
    values = torch.tensor([[0.2, 0.3, 0.4]])
    mask = torch.ones(1, 3)
    advantages, returns = algo.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # delta_2 = 1.0 + 0.9*0 - 0.4 = 0.6                 A_2 = 0.6
    # delta_1 = 0.1 + 0.9*0.4 - 0.3 = 0.16              A_1 = 0.16 + 0.72*0.6 = 0.592
    # delta_0 = -0.05 + 0.9*0.3 - 0.2 = 0.02            A_0 = 0.02 + 0.72*0.592 = 0.44624
    assert advantages[0].tolist() == pytest.approx([0.44624, 0.592, 0.6])
    assert returns[0].tolist() == pytest.approx([0.64624, 0.892, 1.0])


def test_gae_ignores_padding_after_the_last_token():
    rewards = torch.tensor([[0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 9.0]])  # the value at the padded position must not leak in
    advantages, returns = algo.gae(rewards, values, torch.tensor([[1.0, 1.0, 0.0]]), gamma=1.0, lam=1.0)
    assert advantages[0].tolist() == pytest.approx([0.5, 0.75, 0.0])
    assert returns[0].tolist() == pytest.approx([1.0, 1.0, 0.0])


def test_clipped_losses_match_hand_computation():
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    new = old + torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    advantages = torch.tensor([[1.0, -1.0, 0.5]])
    values = torch.tensor([[0.5, 0.0, 1.0]])
    old_values = torch.tensor([[0.2, 0.3, 0.4]])
    returns = torch.tensor([[0.64624, 0.892, 1.0]])
    mask = torch.ones(1, 3)
    loss, stats = algo.ppo_loss(new, old, advantages, values, old_values, returns, mask, cliprange=0.2,
                               cliprange_value=0.2, vf_coef=0.1)
    # max(-A r, -A clip(r, 0.8, 1.2)): max(-1.5, -1.2) = -1.2; max(0.5, 0.8) = 0.8; max(-0.55, -0.55) = -0.55
    pg = (-1.2 + 0.8 - 0.55) / 3
    # clipped values 0.4, 0.1, 0.6; per token max of squared errors
    vf = 0.5 * (max((0.5 - 0.64624) ** 2, (0.4 - 0.64624) ** 2) + max(0.892 ** 2, (0.1 - 0.892) ** 2)
                + max(0.0, 0.4 ** 2)) / 3
    assert float(stats["losses/policy_loss"]) == pytest.approx(pg, abs=1e-6)
    assert float(stats["losses/value_loss"]) == pytest.approx(vf, abs=1e-6)
    assert float(loss) == pytest.approx(pg + 0.1 * vf, abs=1e-6)
    assert float(stats["policy/clipfrac"]) == pytest.approx(2 / 3)
    k3 = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 1.1)) / 3
    assert float(stats["policy/approx_kl"]) == pytest.approx(k3, abs=1e-6)


def test_whiten_and_adaptive_kl_controller():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    w = algo.whiten(x, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert w[0, :3].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert w[0, 3].item() == 0.0
    ctl = algo.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=100)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))
    ctl.update(3.0, n_steps=100)  # error -0.5 clipped to -0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.01) * (1 - 0.2 * 0.01))


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    return tiny.make_policy(tmp_path_factory.mktemp("ppo") / "policy", conditional=True)


def test_token_forward_matches_sequence_logprobs(tiny_policy):
    from alignpipe.lm.policy import Sampling, load_policy, newline_ids, sample, sequence_logprobs

    model, tok, meta = load_policy(tiny_policy)
    samples = sample(model, tok, meta, ["x = 1", "def f(a, b):", "import os"], Sampling(max_new_tokens=6), seed=3,
                     unit=LINE)
    prompt_ids = [s.prompt_ids for s in samples]
    actions = [s.completion_ids or [tok.eos_token_id] for s in samples]
    batch = algo.make_batch(prompt_ids, actions, tok.pad_token_id, "cpu")
    with torch.no_grad():
        logprobs, entropy, _ = algo.token_forward(model, None, batch, algo.TokenDistribution(temperature=1.0))
    expected = sequence_logprobs(model, prompt_ids, actions)
    assert logprobs.sum(1).tolist() == pytest.approx(expected, abs=1e-4)
    assert bool((entropy > 0).all())

    # As sampling, the first token is restricted to tokens that start a new line: renormalised there only.
    first = newline_ids(tok)[1]
    assert all(tok.decode([a[0]]).startswith("\n") for a in actions)
    with torch.no_grad():
        restricted, _, _ = algo.token_forward(model, None, batch, algo.TokenDistribution(1.0, first_ids=first))
    assert bool((restricted[:, 0] > logprobs[:, 0]).all())
    assert torch.allclose(restricted[:, 1:], logprobs[:, 1:])


def _toy_cfg(tmp_path, **kw):
    base = dict(max_steps=4, rollout_batch_size=16, minibatch_size=8, num_ppo_epochs=2, learning_rate=3e-3,
                kl_coef=0.0, sampling=dict(max_new_tokens=6), bf16=False, save_steps=2,
                checkpoint_dir=str(tmp_path / "ckpt"), n_eval_prompts=4)
    base.update(kw)
    return ppo.Config(**base)


def _few_token_meta(tok, meta, x_token):
    """The policy's meta with every token banned but X, six others and the newline (sampling starts a completion
    with a newline): a small action space where "emit token X" starts at about 1/8 per token."""
    allowed = [x_token, "Ċ"] + [t for t in sorted(tok.get_vocab()) if t.startswith("Ġ") and t != x_token][:6]
    banned = tuple(t for t in tok.get_vocab() if t not in allowed)
    return dataclasses.replace(meta, bad_words=banned)


def _emit_x_reward(token_id):
    def reward_fn(samples):  # the fraction of completion tokens that are token X
        return [sum(i == token_id for i in s.completion_ids) / max(len(s.completion_ids), 1) for s in samples]
    return reward_fn


def _mean_reward(model, tok, meta, prompts, reward_fn):
    from alignpipe.lm.policy import Sampling, sample

    samples = sample(model, tok, meta, prompts, Sampling(temperature=1.0, top_p=1.0, max_new_tokens=6), seed=123,
                     unit=LINE)
    return sum(reward_fn(samples)) / len(samples)


@pytest.mark.slow
def test_ppo_updates_raise_a_toy_reward(tiny_policy, tmp_path):
    from alignpipe.lm.policy import load_policy

    model, tok, meta = load_policy(tiny_policy)
    ref, _, _ = load_policy(tiny_policy)
    meta = _few_token_meta(tok, meta, "Ġ=")
    reward_fn = _emit_x_reward(tok.convert_tokens_to_ids("Ġ="))
    prompts = ["x = 1", "def f(a, b):", "import os", "y = [1, 2]", "class A:", "print(os.name)"] * 4
    before = _mean_reward(model, tok, meta, prompts, reward_fn)
    _, state, history = ppo.train(_toy_cfg(tmp_path), model, tok, meta, ref, prompts, reward_fn, progress=None)
    after = _mean_reward(model, tok, meta, prompts, reward_fn)
    assert state.iteration == 4 and len(history) == 4
    assert after > before + 0.15, (before, after)
    assert history[-1]["env/reward_mean"] > history[0]["env/reward_mean"]
    for key in ("objective/kl", "policy/entropy", "losses/value_loss", "policy/clipfrac", "policy/approx_kl",
                "charts/tokens_per_s"):
        assert math.isfinite(history[-1][key])
    assert history[-1]["objective/kl"] > 0  # the policy moved away from the reference


@pytest.mark.slow
def test_resume_reproduces_an_uninterrupted_run(tiny_policy, tmp_path):
    from alignpipe.lm.policy import load_policy

    prompts = ["x = 1", "def f(a, b):", "import os", "class A:"] * 4

    def fresh():
        model, tok, meta = load_policy(tiny_policy)
        ref, _, _ = load_policy(tiny_policy)
        return model, tok, meta, ref

    cfg = _toy_cfg(tmp_path, kl_coef=0.05, kl_target=1.0)
    model, tok, meta, ref = fresh()
    meta = _few_token_meta(tok, meta, "Ġ=")
    reward_fn = _emit_x_reward(tok.convert_tokens_to_ids("Ġ="))
    head, state, history = ppo.train(cfg, model, tok, meta, ref, prompts, reward_fn, progress=None)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    assert [p.name for p in sorted((tmp_path / "ckpt").glob("iter-*"))] == ["iter-000002", "iter-000004"]

    shutil.rmtree(tmp_path / "ckpt" / "iter-000004")  # as if the run had died after iteration 2
    model, tok, _, ref = fresh()
    latest = latest_complete(tmp_path / "ckpt", "iter", ppo.CHECKPOINT_FILES)
    head2, state2, history2 = ppo.train(cfg, model, tok, meta, ref, prompts, reward_fn, resume_from=latest,
                                        progress=None)
    # The history travels in the checkpoint: a resumed run reports the whole run's first/last reward and KL.
    assert len(history2) == 4 and state2.iteration == 4
    for key in ("env/reward_mean", "objective/kl"):
        assert [h[key] for h in history2] == pytest.approx([h[key] for h in history], abs=1e-5), key
    _, _, history3 = ppo.train(cfg, *fresh()[:2], meta, ref, prompts, reward_fn,  # resumed from the final one
                               resume_from=latest_complete(tmp_path / "ckpt", "iter", ppo.CHECKPOINT_FILES),
                               progress=None)
    assert [h["env/reward_mean"] for h in history3] == pytest.approx([h["env/reward_mean"] for h in history])
    assert state2.kl_coef == pytest.approx(state.kl_coef)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, full[k], atol=1e-6), k
    assert torch.allclose(head2.weight, head.weight, atol=1e-6)


@pytest.mark.slow
def test_ppo_stage_end_to_end(tmp_path, monkeypatch, tiny_data):
    from alignpipe.lm.policy import load_policy
    from alignpipe.run.runner import execute

    monkeypatch.chdir(tmp_path)
    tok = tiny.make_tokenizer()
    data = tiny_data
    policy = tiny.make_policy(tmp_path / "policy", conditional=True, tok=tok)
    reward = tiny.make_reward(tmp_path / "reward", tok=tok)
    cfg = ppo.Config(max_steps=2, rollout_batch_size=8, minibatch_size=4, num_ppo_epochs=1,
                     sampling=dict(max_new_tokens=8, batch_size=4),
                     n_eval_prompts=4, save_steps=1, eval_heldout=True)
    metrics = execute("ppo", cfg, {"data": data, "policy": policy, "reward_model": reward}, tmp_path / "out")
    for key in ppo.METRICS:
        assert math.isfinite(metrics[key])
    assert 0.0 <= metrics["win_rate_vs_ref"] <= 1.0
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["win_rate_vs_ref"] == metrics["win_rate_vs_ref"]
    model, _, meta = load_policy(tmp_path / "out")
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert meta.prompt_suffix == "<|aligned|>" and meta.extra["stage"] == "ppo"
    assert (tmp_path / "out" / ppo.VALUE_HEAD_FILE).is_file()
    assert (tmp_path / "checkpoints" / "ppo" / "iter-000002").is_dir()
