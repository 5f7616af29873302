"""The chat task on a tiny Llama with a chat template: reward and dpo train on conversational pairs through the
chat template (TRL applies it), grpo rolls out through it against the reward model, evaluate scores candidates with
the reward model and a judge, register gates on the task's metric and direction."""

from __future__ import annotations

import json

import pytest

import tiny
from alignpipe.run.runner import execute
from alignpipe.stages import CANDIDATES

pytestmark = pytest.mark.usefixtures("module_mlflow")  # one MLflow store per module (conftest)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """A plain tiny Llama directory and a chat data directory built by `data build --dataset`."""
    from alignpipe.stages.data import Config

    root = tmp_path_factory.mktemp("chat")
    prefs = tiny.make_chat_prefs(root / "prefs.parquet", n=48)
    execute("data", Config(task="chat", dataset=str(prefs), test_frac=0.25, val_frac=0.1, n_prompts=8), {},
            root / "data")
    return {"root": root, "data": root / "data", "llama": tiny.make_chat_llama(root / "llama")}


@pytest.fixture(scope="module")
def chat_rm(chat, module_mlflow, tmp_path_factory):
    """A reward model trained 2 steps on the chat pairs, once for the tests that score with it (read-only)."""
    from alignpipe.stages import reward

    root = tmp_path_factory.mktemp("chat_rm")
    execute("reward", reward.Config(max_steps=2, batch_size=8, save_steps=0, max_length=128,
                                    checkpoint_dir=str(root / "c1")), {"prefs": chat["data"],
                                                                       "policy": chat["llama"]}, root / "rm")
    return root / "rm"


@pytest.mark.slow
def test_reward_trains_on_conversations_through_the_chat_template(chat, tmp_path):
    from alignpipe.lm.reward_model import reward_ids
    from alignpipe.stages import reward

    rows = [json.loads(x) for x in (chat["data"] / "prefs.jsonl").read_text().splitlines()]
    model, tok = reward.load_model(str(chat["llama"]), reward.Config())
    trainer = reward.build_trainer(reward.Config(max_length=128, save_steps=0, checkpoint_dir=str(tmp_path / "c")),
                                   model, tok, rows[:2])
    example = trainer.train_dataset[0]
    assert example["chosen_ids"] == reward_ids(rows[0]["prompt"], rows[0]["chosen"], tok)
    text = tok.decode(example["chosen_ids"])
    assert text.startswith("<|im_start|>") and text.count("<|im_end|>") == len(rows[0]["prompt"]) + 1
    assert reward_ids(rows[0]["prompt"], rows[0]["chosen"][0]["content"], tok) == example["chosen_ids"]

    cfg = reward.Config(max_steps=6, batch_size=8, learning_rate=3e-3, warmup_ratio=0.0, save_steps=0,
                        max_length=128, checkpoint_dir=str(tmp_path / "ckpt"))
    metrics = execute("reward", cfg, {"prefs": chat["data"], "policy": chat["llama"]}, tmp_path / "rm")
    assert metrics["n_train_pairs"] == len(rows) and metrics["n_changed_tensors"] > 0
    assert metrics["n_heldout_pairs"] > 0 and 0 <= metrics["heldout_accuracy"] <= 1
    assert "chat template" in json.loads((tmp_path / "rm" / "reward.json").read_text())["format"]


@pytest.mark.slow
def test_dpo_trains_on_conversations_and_checks_itself_on_heldout_pairs(chat, tmp_path):
    import torch
    from safetensors.torch import load_file

    from alignpipe.algos import preference
    from alignpipe.stages import dpo

    cfg = dpo.Config(max_steps=3, batch_size=4, learning_rate=1e-3, warmup_steps=0, save_steps=3, bf16=False,
                     max_prompt_tokens=96, max_completion_tokens=32, checkpoint_dir=str(tmp_path / "ckpt"),
                     eval_heldout=True)
    metrics = execute("dpo", cfg, {"data": chat["data"], "policy": chat["llama"], "prefs": chat["data"]},
                      tmp_path / "dpo")
    assert {"heldout_reward_accuracy", "heldout_reward_margin", "heldout_loss", *dpo.METRICS} <= set(metrics)
    assert "violations_per_char" not in metrics
    assert 0 <= metrics["heldout_reward_accuracy"] <= 1 and metrics["n_heldout_pairs"] > 0
    assert metrics["n_prompt_boundary_mismatch"] == 0
    before, after = load_file(chat["llama"] / "model.safetensors"), load_file(tmp_path / "dpo" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the policy was trained

    # What DPOTrainer trained on: the chat template's rendering (prompt with the generation prompt, then the answer)
    from alignpipe.lm.policy import load_policy

    model, tok, _ = load_policy(chat["llama"])
    pair = preference.read_pairs(chat["data"], messages=True)[0]
    trainer = dpo.make_trainer(cfg, model, load_policy(chat["llama"])[0], tok, [pair], tmp_path / "t")
    row = trainer.train_dataset[0]
    full = tok.apply_chat_template(pair["prompt"] + pair["chosen"], tokenize=False)
    prompt = tok.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
    assert tok.decode(row["prompt_ids"]) == prompt
    assert tok.decode(row["prompt_ids"] + row["chosen_ids"]) == full and full.endswith("<|im_end|>\n")


@pytest.mark.slow
def test_evaluate_and_register_gate_on_the_chat_task(chat, chat_rm, tmp_path):
    """evaluate scores chat candidates with the reward model and a judge (no oracle); the report carries the task's
    gate metric and direction, which register's gate reads."""
    from alignpipe.reports.candidates import read_report
    from alignpipe.stages import evaluate, register, reward

    rm = chat_rm
    judge = tmp_path / "judge"  # a second reward model (another seed): the guard's score, not the optimised one
    execute("reward", reward.Config(max_steps=2, batch_size=8, save_steps=0, max_length=128, seed=1,
                                    checkpoint_dir=str(tmp_path / "c2")), {"prefs": chat["data"],
                                                                           "policy": chat["llama"]}, judge)
    other = tiny.make_chat_llama(tmp_path / "other", seed=3)
    cfg = evaluate.Config(n_prompts=6, sampling=dict(max_new_tokens=8, batch_size=6), ppl_max_chars=500,
                          compare_champion=False, judge_model=str(judge), extra_candidates=[f"other={other}"])
    metrics = execute("evaluate", cfg, {"data": chat["data"], "policy": chat["llama"], "reward_model": rm},
                      tmp_path / "eval")
    report = read_report(tmp_path / "eval")
    assert report["task"] == "chat" and report["gate_metric"] == "judge_win_rate_vs_ref"
    assert report["gate_direction"] == "higher" and report["order"] == ["pretrain", "other"]
    ref, cand = report["candidates"]["pretrain"], report["candidates"]["other"]
    assert ref["judge_win_rate_vs_ref"] == 0.5 and ref["kl_to_ref"] == 0.0  # the reference against itself
    assert 0 <= cand["judge_win_rate_vs_ref"] <= 1 and "guard" in cand and "reward_score" in cand
    assert " judge gain " in report["reward_hacking"]["other"] and "violations" not in report["reward_hacking"]["other"]
    assert "guard" not in ref and report["scorer"].startswith("reward model")
    assert metrics["n_candidates"] == 2 and "other/judge_win_rate_vs_ref" in metrics
    samples = [json.loads(x) for x in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12 and all(isinstance(s["prompt"], list) for s in samples)
    assert "<|im_start|>" not in samples[0]["completion"]

    best = report["best_candidate"]
    move, why, value, _ = register.decide(register.Config(), report, best, None)
    assert move and why == "no champion yet" and value == report["candidates"][best]["judge_win_rate_vs_ref"]
    champion = {"version": "1"}
    report["champion"] = {"version": "1", "judge_win_rate_vs_ref": value}
    move, why, _, _ = register.decide(register.Config(margin=0.0), report, best, champion)
    assert not move and "does not beat" in why  # a tie does not move the alias


def test_committed_chat_pairs_are_tinys():
    from pathlib import Path

    committed = Path(__file__).parent / "data" / "chat" / "prefs.jsonl"
    assert [json.loads(x) for x in committed.read_text().splitlines()] == tiny.chat_rows(40)


@pytest.mark.slow
def test_chat_tiny_config_runs_data_validate_reward_and_every_candidate_then_evaluate(tmp_path, monkeypatch, capsys):
    """configs/chat-tiny.yaml through the CLI, as its header says (a tiny Llama built locally)."""
    from pathlib import Path

    from alignpipe.cli.main import main

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the overlay names tests/data/chat/prefs.jsonl relative to the checkout
    params = str(root / "configs" / "chat-tiny.yaml")
    llama, data, art = str(tiny.make_chat_llama(tmp_path / "llama")), str(tmp_path / "data"), tmp_path / "artifacts"
    ckpt = [f"--set=dpo.checkpoint_dir={tmp_path / 'ckpt'}"]  # checkpoints outside the checkout
    steps = [
        ["data", "build", "--out", data],
        ["validate", "--corpus", data, "--prefs", f"{data}/prefs.jsonl", "--out", str(art / "validate")],
        ["reward", "--prefs", data, "--policy", llama, "--out", str(art / "reward"),
         f"--set=reward.checkpoint_dir={tmp_path / 'rckpt'}"],
        ["dpo", "--data", data, "--prefs", data, "--policy", llama, "--out", str(art / "dpo"), *ckpt],
        ["orpo", "--data", data, "--prefs", data, "--policy", llama, "--out", str(art / "orpo"),
         f"--set=orpo.checkpoint_dir={tmp_path / 'ockpt'}"],
        ["grpo", "--data", data, "--policy", llama, "--reward-model", str(art / "reward"), "--out", str(art / "grpo"),
         f"--set=grpo.checkpoint_dir={tmp_path / 'gckpt'}"],
        ["ppo", "--data", data, "--policy", llama, "--reward-model", str(art / "reward"), "--out", str(art / "ppo"),
         f"--set=ppo.checkpoint_dir={tmp_path / 'pckpt'}"],
        # every candidate given explicitly: the checkout's own artifacts/<stage> (a PEP8 run) must not be picked up
        ["evaluate", "--data", data, "--policy", llama, *(a for s, o in CANDIDATES[1:] for a in (f"--{o}", str(art / s))),
         "--reward-model", str(art / "reward"), "--out", str(art / "evaluate")],
    ]
    for argv in steps:
        code = main([*argv, "--params", params])
        assert code == 0, (argv, capsys.readouterr().err[-2000:])
    report = json.loads((art / "evaluate" / "report.json").read_text())
    assert report["task"] == "chat" and report["order"] == [s for s, _ in CANDIDATES] == ["pretrain", "dpo", "orpo",
                                                                                         "ppo", "grpo"]
    assert report["best_candidate"] in report["order"]


@pytest.mark.slow
def test_grpo_on_conversations_with_the_reward_model(chat, chat_rm, tmp_path):
    """GRPO's rollouts go through the chat template and end at the end of the turn; the reward is the reward model
    (no oracle on chat); the stage checks itself against the reference on held-out conversations."""
    import torch
    from safetensors.torch import load_file

    from alignpipe.core.errors import ConfigError
    from alignpipe.stages import grpo

    rm = chat_rm
    inputs = {"data": chat["data"], "policy": chat["llama"], "reward_model": rm}
    with pytest.raises(ConfigError, match="grpo.reward: task chat has no oracle"):
        grpo.run(grpo.Config(), inputs, tmp_path / "x")
    cfg = grpo.Config(reward="model", max_steps=2, prompts_per_step=2, num_generations=2,
                      sampling=dict(max_new_tokens=8, batch_size=4),
                      learning_rate=1e-3, n_eval_prompts=4, save_steps=0, eval_heldout=True,
                      checkpoint_dir=str(tmp_path / "ckpt"))
    metrics = execute("grpo", cfg, inputs, tmp_path / "grpo")
    assert {"reward_score", "reward_score_ref", "reward_win_rate_vs_ref", "kl_to_ref", *grpo.METRICS} <= set(metrics)
    assert "violations_per_char" not in metrics
    assert 0 <= metrics["reward_win_rate_vs_ref"] <= 1 and metrics["train_steps"] == 2
    before, after = load_file(chat["llama"] / "model.safetensors"), load_file(tmp_path / "grpo" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_pretrain_fine_tunes_a_chat_model_on_the_conversations(chat, tmp_path):
    """On chat, pretrain continues `init_model` with MLE on the templated conversations and samples answers through
    the chat template; the PHF objectives and a GPT-2 from scratch are refused with one line."""
    from alignpipe.core.errors import ConfigError
    from alignpipe.lm.policy import load_policy
    from alignpipe.stages import pretrain

    cfg = dict(objective="mle", init_model=str(chat["llama"]), max_steps=3, batch_size=2, seq_len=64,
               n_eval_prompts=4, sampling=dict(max_new_tokens=6), save_steps=3, checkpoint_dir=str(tmp_path / "ckpt"))
    metrics = execute("pretrain", pretrain.Config(**cfg), {"data": chat["data"]}, tmp_path / "policy")
    assert metrics["train_tokens"] == 3 * 2 * 64 and metrics["heldout_loss"] > 0
    assert 0 <= metrics["ended_frac"] <= 1 and "violations_per_char" not in metrics
    model, tok, meta = load_policy(tmp_path / "policy")
    assert tok.chat_template and meta.objective == "mle" and model.config.model_type == "llama"
    samples = [json.loads(x) for x in (tmp_path / "policy" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(isinstance(s["prompt"], list) for s in samples)
    for bad, key in ((dict(objective="conditional"), "pretrain.objective"), (dict(init_model=""), "pretrain.init_model")):
        with pytest.raises(ConfigError, match=key):
            pretrain.run(pretrain.Config(**{**cfg, **bad}), {"data": chat["data"]}, tmp_path / "x")


@pytest.mark.slow
def test_label_on_chat_passes_the_datasets_pairs_and_adds_reward_model_labelled_pairs(chat, tmp_path):
    """No oracle on chat: label hands on the dataset's pairs; with judge reward_model it also samples answers
    through the chat template and lets the reward model order each pair."""
    from alignpipe.core.errors import ConfigError
    from alignpipe.lm.reward_model import reward_scores
    from alignpipe.stages import label, reward

    plain = execute("label", label.Config(), {"data": chat["data"], "policy": chat["llama"]}, tmp_path / "plain")
    dataset = [(chat["data"] / f).read_text() for f in ("prefs.jsonl", "heldout.jsonl")]
    assert [(tmp_path / "plain" / f).read_text() for f in ("prefs.jsonl", "heldout.jsonl")] == dataset
    assert plain["n_pairs"] == plain["n_dataset_pairs"] == sum(len(d.splitlines()) for d in dataset)

    judge, tok = reward.load_model(str(chat["llama"]), reward.Config())
    judge.save_pretrained(tmp_path / "judge")
    tok.save_pretrained(tmp_path / "judge")
    cfg = label.Config(judge="reward_model", k=4, n_prompts=6, sampling=dict(max_new_tokens=16), keep_ties=True)
    ending = tiny.make_chat_llama(tmp_path / "ending", end_logit=2.0)  # a random Llama never ends its turn
    got = execute("label", cfg, {"data": chat["data"], "policy": ending, "judge_model": tmp_path / "judge"},
                  tmp_path / "rlaif")
    rows = [json.loads(x) for f in ("prefs.jsonl", "heldout.jsonl")
            for x in (tmp_path / "rlaif" / f).read_text().splitlines()]
    judged = [r for r in rows if r.get("source") == "rlaif"]
    assert got["n_pairs"] == len(rows) == plain["n_pairs"] + len(judged)
    assert got["n_judged"] == len(judged) > 0 and got["n_judged"] + got["n_dropped_unended_pairs"] == 6 * 6
    for r in judged:  # the judge prefers the chosen answer: its own scores, recomputed
        sc, sr = reward_scores(judge, tok, [r["prompt"]] * 2, [r["chosen"][0]["content"], r["rejected"][0]["content"]])
        assert sc >= sr and r["chosen"][0]["role"] == "assistant"
    with pytest.raises(ConfigError, match="label.judge"):  # a reward-model judge needs its model
        label.run(label.Config(judge="reward_model"), {"data": chat["data"], "policy": chat["llama"]}, tmp_path / "x")
