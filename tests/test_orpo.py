"""ORPO: the loss at step 0 against a hand computation of the objective, the prompt tokens as sampling sees them,
training raising the chosen-vs-rejected margin, the stage end to end (metrics, saved policy, resume) on the pep8
task and on a tiny chat model."""

from __future__ import annotations

import json
import math
import shutil

import pytest

torch = pytest.importorskip("torch")

import tiny  # noqa: E402

from alignpipe.algos import preference  # noqa: E402
from alignpipe.core.errors import DataError  # noqa: E402
from alignpipe.run.runner import execute  # noqa: E402
from alignpipe.stages import orpo  # noqa: E402


@pytest.fixture
def registered(monkeypatch):
    """`execute("orpo", ...)` until the stage registry lists orpo (it then patches nothing)."""
    from alignpipe import stages

    if "orpo" not in stages.STAGE_NAMES:
        monkeypatch.setattr(stages, "STAGE_NAMES", (*stages.STAGE_NAMES, "orpo"))


def _hand_loss(model, tok, pairs, beta):
    """(loss, nll, mean log sigmoid(log odds)) of ORPO (Hong et al. 2024, eq. 6-7) on `pairs` as TRL computes it:
    the NLL pooled over the tokens of prompt + chosen + EOS, P(y|x) the mean token probability of the completion
    (EOS included)."""
    from alignpipe.lm.policy import next_token_logprobs

    nll_sum, nll_count, log_sigmoids = 0.0, 0, []
    for pair in pairs:
        n_prompt = len(tok(pair["prompt"])["input_ids"])
        mean_logp = {}
        for key in ("chosen", "rejected"):
            ids = tok(pair["prompt"] + pair[key])["input_ids"] + [tok.eos_token_id]
            logp = next_token_logprobs(model, [ids])[0][0].double()  # logp[t] = log p(ids[t + 1] | ids[:t + 1])
            mean_logp[key] = logp[n_prompt - 1:].mean()
            if key == "chosen":
                nll_sum -= float(logp.sum())
                nll_count += len(logp)
        a_w, a_l = mean_logp["chosen"], mean_logp["rejected"]
        log_odds = (a_w - a_l) - (torch.log1p(-a_w.exp()) - torch.log1p(-a_l.exp()))
        log_sigmoids.append(float(torch.nn.functional.logsigmoid(log_odds)))
    nll = nll_sum / nll_count
    ratio = sum(log_sigmoids) / len(log_sigmoids)
    return nll - beta * ratio, nll, ratio


def test_loss_at_step_zero_is_the_odds_ratio_objective_on_the_sampled_prompt_tokens(tmp_path):
    from alignpipe.lm.policy import encode_prompts, load_policy

    policy = tiny.make_policy(tmp_path / "policy", conditional=True)
    model, tok, meta = load_policy(policy)
    pairs = preference.format_pairs(preference.read_pairs(tiny.make_prefs(tmp_path / "prefs.jsonl", n=8)), tok,
                                    meta, 192)
    expected = _hand_loss(load_policy(policy)[0].eval(), tok, pairs, beta=0.5)

    cfg = orpo.Config(beta=0.5, learning_rate=1e-3, warmup_steps=0, batch_size=8, max_steps=1, bf16=False,
                      logging_steps=1, save_steps=100)
    trainer = orpo.make_trainer(cfg, model, tok, pairs, tmp_path / "ckpt")
    # the prompt tokens sampling feeds the policy: TRL's BOS is dropped
    assert list(trainer.train_dataset["prompt_input_ids"]) == encode_prompts(tok, meta, [
        p["prompt"] for p in preference.read_pairs(tmp_path / "prefs.jsonl")], 192)
    trainer.train()
    first = next(e for e in trainer.state.log_history if "loss" in e)  # the one batch of all 8 pairs, before the update
    assert first["loss"] == pytest.approx(expected[0], rel=1e-4)
    assert first["nll_loss"] == pytest.approx(expected[1], rel=1e-4)
    assert first["log_odds_ratio"] == pytest.approx(expected[2], rel=1e-4)


def _margin(model, tok, pairs):
    """Mean over formatted pairs of the chosen minus the rejected mean token log-probability (ORPO's P(y|x))."""
    from alignpipe.lm.policy import sequence_logprobs

    prompts = [tok(p["prompt"])["input_ids"] for p in pairs]
    out = 0.0
    for key, sign in (("chosen", 1), ("rejected", -1)):
        completions = [tok(p["prompt"] + p[key])["input_ids"][len(q):] for p, q in zip(pairs, prompts)]
        logps = sequence_logprobs(model, prompts, completions)
        out += sign * sum(lp / len(c) for lp, c in zip(logps, completions)) / len(pairs)
    return out


@pytest.mark.slow
def test_training_raises_the_chosen_vs_rejected_margin_and_changes_the_weights(tmp_path):
    from alignpipe.lm.policy import load_policy

    policy = tiny.make_policy(tmp_path / "policy", conditional=True)
    model, tok, meta = load_policy(policy)
    before_weights = {k: v.clone() for k, v in model.state_dict().items()}
    pairs = preference.format_pairs(preference.read_pairs(tiny.make_prefs(tmp_path / "prefs.jsonl", n=16)), tok,
                                    meta, 192)
    before = _margin(model, tok, pairs)
    cfg = orpo.Config(learning_rate=2e-3, warmup_steps=0, batch_size=8, max_steps=6, bf16=False, logging_steps=1,
                      save_steps=100)
    trainer = orpo.make_trainer(cfg, model, tok, pairs, tmp_path / "ckpt")
    trainer.train()
    after = _margin(trainer.model.eval(), tok, pairs)
    assert after > before + 0.1, (before, after)
    assert any(not torch.equal(v, trainer.model.state_dict()[k]) for k, v in before_weights.items())
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0]


def test_lora_trains_adapters_only_and_saves_a_merged_plain_model(tmp_path):
    from alignpipe.algos.lora import merged, trainable_fraction
    from alignpipe.lm.policy import load_policy

    policy = tiny.make_policy(tmp_path / "policy", conditional=True)
    model, tok, meta = load_policy(policy)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    pairs = preference.format_pairs(preference.read_pairs(tiny.make_prefs(tmp_path / "prefs.jsonl", n=8)), tok,
                                    meta, 192)
    cfg = orpo.Config(lora_r=4, learning_rate=1e-2, warmup_steps=0, batch_size=4, max_steps=2, bf16=False,
                      save_steps=100)
    trainer = orpo.make_trainer(cfg, model, tok, pairs, tmp_path / "ckpt")
    assert 0 < trainable_fraction(trainer.model) < 0.5
    trainer.train()
    plain = merged(trainer.model)
    assert set(plain.state_dict()) == set(initial)
    assert any(not torch.equal(v, initial[k]) for k, v in plain.state_dict().items())


@pytest.mark.slow
def test_orpo_stage_end_to_end_and_resume(tmp_path, monkeypatch, tiny_data, registered):
    from alignpipe.lm.policy import load_policy

    monkeypatch.chdir(tmp_path)
    tok = tiny.make_tokenizer()
    policy = tiny.make_policy(tmp_path / "policy", conditional=True, tok=tok)
    tiny.make_prefs(tmp_path / "label" / "prefs.jsonl", n=24)
    inputs = {"data": tiny_data, "policy": policy, "prefs": tmp_path / "label", "human_prefs": None}
    cfg = orpo.Config(max_steps=4, batch_size=4, learning_rate=1e-3, warmup_steps=0, save_steps=2, logging_steps=2,
                      bf16=False, n_eval_prompts=4, sampling=dict(batch_size=4), eval_heldout=True)
    metrics = execute("orpo", cfg, inputs, tmp_path / "out")
    for key in orpo.METRICS:
        assert math.isfinite(metrics[key])
    assert metrics["n_pairs"] == 16 and metrics["n_prompt_boundary_mismatch"] == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["train_loss"] == metrics["train_loss"]
    model, _, meta = load_policy(tmp_path / "out")
    assert meta.prompt_suffix == "<|aligned|>" and meta.extra["stage"] == "orpo"
    initial = load_policy(policy)[0].state_dict()
    full = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(not torch.equal(v, initial[k]) for k, v in full.items())

    ckpt = tmp_path / "checkpoints" / "orpo"
    assert sorted(p.name for p in ckpt.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    shutil.rmtree(ckpt / "checkpoint-4")  # as if the run had died after step 2
    resumed_metrics = execute("orpo", orpo.Config(**{**cfg.to_dict(), "resume": True}), inputs, tmp_path / "out2")
    resumed, _, _ = load_policy(tmp_path / "out2")
    for k, v in resumed.state_dict().items():
        assert torch.allclose(v, full[k], atol=1e-5), k
    assert resumed_metrics["train_loss"] == pytest.approx(metrics["train_loss"], abs=1e-4)

    shutil.rmtree(ckpt)
    with pytest.raises(DataError, match="orpo.resume is set but there is no checkpoint"):
        execute("orpo", orpo.Config(**{**cfg.to_dict(), "resume": True}), inputs, tmp_path / "out3")
    assert not (tmp_path / "out3").exists()


@pytest.mark.slow
def test_orpo_trains_a_chat_model_through_its_chat_template(tmp_path, registered):
    from safetensors.torch import load_file

    from alignpipe.lm.policy import load_policy
    from alignpipe.stages.data import Config as DataConfig

    prefs = tiny.make_chat_prefs(tmp_path / "prefs.parquet", n=48)
    execute("data", DataConfig(task="chat", dataset=str(prefs), test_frac=0.25, val_frac=0.1, n_prompts=8), {},
            tmp_path / "data")
    llama = tiny.make_chat_llama(tmp_path / "llama")
    cfg = orpo.Config(max_steps=3, batch_size=4, learning_rate=1e-3, warmup_steps=0, save_steps=3, bf16=False,
                      max_prompt_tokens=96, max_completion_tokens=32, checkpoint_dir=str(tmp_path / "ckpt"),
                      eval_heldout=True)
    metrics = execute("orpo", cfg, {"data": tmp_path / "data", "policy": llama, "prefs": tmp_path / "data"},
                      tmp_path / "orpo")
    assert {"heldout_reward_accuracy", "heldout_reward_margin", "heldout_loss", *orpo.METRICS} <= set(metrics)
    assert "violations_per_char" not in metrics
    assert 0 <= metrics["heldout_reward_accuracy"] <= 1 and metrics["n_heldout_pairs"] > 0
    before, after = load_file(llama / "model.safetensors"), load_file(tmp_path / "orpo" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the policy was trained

    # What the trainer trains on: the chat template's rendering (prompt with the generation prompt, then the answer)
    model, tok, _ = load_policy(llama)
    pair = preference.read_pairs(tmp_path / "data", messages=True)[0]
    row = orpo.make_trainer(cfg, model, tok, [pair], tmp_path / "t").train_dataset[0]
    full = tok.apply_chat_template(pair["prompt"] + pair["chosen"], tokenize=False)
    prompt = tok.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
    assert tok.decode(row["prompt_input_ids"]) == prompt
    assert tok.decode(row["chosen_input_ids"]).startswith(full) and full.endswith("<|im_end|>\n")


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="orpo.beta must be > 0, got 0"):
        orpo.Config(beta=0.0)
    with pytest.raises(ValueError, match="orpo.lora_4bit"):
        orpo.Config(lora_4bit=True)
