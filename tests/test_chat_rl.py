"""PPO and the llm judge on the chat task, for plain tiny Llama, Qwen2 and GPT-NeoX directories with a chat template:
PPO's rollouts go through the chat template and end at the end of the turn, the reward model scores whole answers,
the weights change (full or LoRA); label's llm judge asks which of two answers is better in both orders, averages
them, ties by threshold and reports its position consistency."""

from __future__ import annotations

import json
import math

import pytest

import tiny
from alignpipe.run.runner import execute

pytestmark = pytest.mark.usefixtures("module_mlflow")  # one MLflow store per module (conftest)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """A chat data directory (`data build --dataset`) and an (untrained) reward model with the chat tokenizer."""
    from alignpipe.stages import reward
    from alignpipe.stages.data import Config

    root = tmp_path_factory.mktemp("chat-rl")
    prefs = tiny.make_chat_prefs(root / "prefs.jsonl", n=48)
    execute("data", Config(task="chat", dataset=str(prefs), test_frac=0.25, val_frac=0.1, n_prompts=8), {},
            root / "data")
    model, tok = reward.load_model(str(tiny.make_chat_llama(root / "llama")), reward.Config())
    model.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    return {"root": root, "data": root / "data", "rm": root / "rm"}


@pytest.mark.slow
@pytest.mark.parametrize("family,lora_r", [("llama", 0), ("qwen2", 2), ("gpt_neox", 0)])
def test_ppo_trains_a_chat_model_against_the_reward_model(chat, tmp_path, family, lora_r):
    import torch
    from safetensors.torch import load_file

    from alignpipe.lm.policy import load_policy
    from alignpipe.stages import ppo

    policy = tiny.make_chat_model(tmp_path / "policy", family)
    cfg = ppo.Config(reward="model", max_steps=2, rollout_batch_size=4, minibatch_size=2, num_ppo_epochs=1,
                     learning_rate=1e-2, sampling=dict(max_new_tokens=8, max_prompt_tokens=128, batch_size=4),
                     bf16=False, save_steps=2,
                     checkpoint_dir=str(tmp_path / "ckpt"), n_eval_prompts=4, lora_r=lora_r,
                     eval_heldout=True)
    metrics = execute("ppo", cfg, {"data": chat["data"], "policy": policy, "reward_model": chat["rm"]},
                      tmp_path / "ppo")
    assert {"reward_score", "reward_score_ref", "reward_win_rate_vs_ref", "kl_to_ref", *ppo.METRICS} <= set(metrics)
    assert "violations_per_char" not in metrics
    assert 0 <= metrics["reward_win_rate_vs_ref"] <= 1 and math.isfinite(metrics["kl_to_ref"])
    assert json.loads((tmp_path / "ppo" / "metrics.json").read_text())["reward_last"] == metrics["reward_last"]
    before, after = load_file(policy / "model.safetensors"), load_file(tmp_path / "ppo" / "model.safetensors")
    assert set(after) == set(before)  # LoRA: adapters merged, a plain directory of the same model
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the policy was trained
    model, tok, meta = load_policy(tmp_path / "ppo")
    assert model.config.model_type == family and tok.chat_template and meta.extra["stage"] == "ppo"


def test_ppo_rollouts_end_at_the_end_of_turn_and_start_at_kl_zero(chat, tmp_path):
    """A rollout batch: prompts rendered by the chat template with the generation prompt, each answer's actions end
    on <|im_end|> (kept as the last action) or at the cap; log-probabilities are of the sampled distribution (no
    first-token rule, no banned tokens), so the untrained policy's KL to itself is 0. An oracle reward is refused."""
    import torch

    from alignpipe.algos.ppo import make_value_head
    from alignpipe.core.errors import ConfigError
    from alignpipe.core.io import read_jsonl
    from alignpipe.tasks import task_of
    from alignpipe.lm.policy import load_policy
    from alignpipe.stages import ppo

    policy = tiny.make_chat_model(tmp_path / "policy", "llama", end_logit=4.0)
    model, tok, meta = load_policy(policy)
    task = task_of(chat["data"])
    prompts = [r["prompt"] for r in read_jsonl(chat["data"] / "train_prompts.jsonl")][:8]
    cfg = ppo.Config(sampling=dict(max_new_tokens=12), rollout_batch_size=8, minibatch_size=4, bf16=False)
    dist = ppo.token_distribution(cfg, tok, meta, autocast=False, task=task)
    assert dist.first_ids is None and not dist.banned_ids
    batch = ppo.rollout(cfg, model, make_value_head(model), load_policy(policy)[0], tok, meta, prompts,
                        lambda samples: [0.0] * len(samples), seed=1, dist=dist, task=task)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert sum(a[-1] == end for a in batch.action_ids) >= 4  # most answers end their turn (a high end_logit)
    for actions, prompt, ids in zip(batch.action_ids, prompts, batch.prompt_ids):
        assert (actions[-1] == end or len(actions) == 12) and end not in actions[:-1]
        assert tok.decode(ids) == tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert batch.mask.sum(1).tolist() == [len(a) for a in batch.action_ids]
    assert torch.allclose(batch.logprobs, batch.ref_logprobs)

    with pytest.raises(ConfigError, match="ppo.reward: task chat has no oracle"):
        ppo.run(ppo.Config(reward="0.5*model + oracle"), {"data": chat["data"], "policy": policy,
                                                         "reward_model": chat["rm"]}, tmp_path / "x")


# P(the judge answers "A") for each (answer shown as A, answer shown as B): the stub's whole judgement
P_FIRST = {("4", "5"): 0.9, ("5", "4"): 0.1,  # prefers "4" wherever it is shown: consistent
           ("yes", "no"): 0.8, ("no", "yes"): 0.8,  # always answers A: the orders cancel, a tie
           ("x", "y"): 0.7, ("y", "x"): 0.6}  # a position bias larger than its preference for x


def _stub_judge():
    """An llm judge whose answer log-probabilities come from P_FIRST (no model)."""
    from alignpipe.oracle.judges import CHAT_LLM_TEMPLATE, LLMJudge

    class Stub(LLMJudge):
        def answer_logprobs(self, questions):
            out = []
            for q in questions:
                assert q.startswith("Below is a conversation") and "User: What is 2 plus 2?" in q
                a = q.split("### Answer A\n", 1)[1].split("\n\n", 1)[0]
                b = q.split("### Answer B\n", 1)[1].split("\n\n", 1)[0]
                out.append((math.log(P_FIRST[(a, b)]), math.log(1 - P_FIRST[(a, b)])))
            return out

    return Stub("stub", CHAT_LLM_TEMPLATE, model=object(), tok=tiny.make_chat_tokenizer())


def test_chat_llm_judge_averages_both_orders_and_ties_by_threshold():
    """By hand: P(a) = (P(A | a first) + 1 - P(A | a second)) / 2 = 0.9, 0.5, (0.7 + 0.4) / 2 = 0.55; gaps
    0.8, 0, 0.1; one pair of three prefers the same answer in both orders."""
    from alignpipe.oracle.judges import LLMJudge, Pair, conversation_text, position_consistency
    from alignpipe.stages import label

    conversation = [{"role": "user", "content": "What is 2 plus 2?"}]
    pairs = [(conversation, "4", "5"), (conversation, "yes", "no"), (conversation, "x", "y")]
    orders = _stub_judge().orders([Pair(conversation_text(p), a, b) for p, a, b in pairs])
    assert sum(orders, ()) == pytest.approx((0.9, 0.9, 0.8, 0.2, 0.7, 0.4))
    scores = LLMJudge.averaged(orders)
    assert sum(scores, ()) == pytest.approx((0.9, 0.1, 0.5, 0.5, 0.55, 0.45))
    assert position_consistency(orders) == pytest.approx(1 / 3)

    rows, stats = label.order_chat_pairs(pairs, scores, label.Config(judge="llm", tie_threshold=0.2))
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [("4", "5")]
    assert stats["n_ties"] == 2 and stats["mean_score_gap"] == pytest.approx(0.8)
    rows, stats = label.order_chat_pairs(pairs, scores, label.Config(judge="llm", tie_threshold=0.05))
    assert [r["chosen"][0]["content"] for r in rows] == ["4", "x"] and stats["n_ties"] == 1
    assert rows[1]["score_chosen"] == pytest.approx(0.55) and rows[1]["judge"] == "llm"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox", None])
def test_label_llm_judge_on_chat_labels_sampled_answer_pairs(chat, tmp_path, family):
    """label --set label.judge=llm on chat: K answers per conversation through the chat template, each pair judged
    by a causal LM (a plain directory of each family, or the policy itself: None) in both orders; the chosen answer
    is the one the averaged judge prefers (ties kept: a random tiny judge barely reads the answers; the tie rule itself
    is checked by hand above); the position consistency is in metrics.json."""
    from alignpipe.lm.policy import load_policy
    from alignpipe.oracle.judges import CHAT_LLM_TEMPLATE, LLMJudge, Pair, conversation_text
    from alignpipe.stages import label

    policy = tiny.make_chat_llama(tmp_path / "policy", end_logit=2.0)
    judge_dir = tiny.make_chat_model(tmp_path / "judge", family, seed=5) if family else None
    cfg = label.Config(judge="llm", k=4, n_prompts=6, sampling=dict(max_new_tokens=16), keep_ties=True,
                       llm_chat_template=family == "qwen2")
    inputs = {"data": chat["data"], "policy": policy, **({"judge_model": judge_dir} if judge_dir else {})}
    got = execute("label", cfg, inputs, tmp_path / "label")
    rows = [json.loads(x) for f in ("prefs.jsonl", "heldout.jsonl")
            for x in (tmp_path / "label" / f).read_text().splitlines()]
    judged = [r for r in rows if r.get("source") == "rlaif"]
    assert got["n_judged"] == len(judged) > 0
    assert got["n_judged"] + got["n_dropped_unended_pairs"] == 6 * 6
    assert 0 <= got["judge_position_consistency"] <= 1 and got["judge_is_policy"] == float(family is None)
    saved = json.loads((tmp_path / "label" / "metrics.json").read_text())
    assert saved["judge_position_consistency"] == got["judge_position_consistency"]

    model, tok, _ = load_policy(judge_dir or policy)
    judge = LLMJudge("judge", CHAT_LLM_TEMPLATE, chat_template=cfg.llm_chat_template, model=model, tok=tok,
                     max_length=cfg.judge_max_length)
    r = judged[0]
    ((sc, sr),) = judge.score([Pair(conversation_text(r["prompt"]), r["chosen"][0]["content"],
                                    r["rejected"][0]["content"])])
    assert r["judge"] == "llm" and sc >= sr and sc == pytest.approx(r["score_chosen"], abs=1e-5)
