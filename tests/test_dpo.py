"""DPO: pair reading and formatting, prompt/completion token boundaries, each tested loss type raising the
chosen-vs-rejected margin, the stage end to end and resume."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest

torch = pytest.importorskip("torch")

import tiny  # noqa: E402

from alignpipe.algos import preference  # noqa: E402
from alignpipe.algos.dpo import trl_config  # noqa: E402
from alignpipe.core.errors import DataError  # noqa: E402
from alignpipe.core.hashing import weights_sha256  # noqa: E402
from alignpipe.stages import dpo  # noqa: E402


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_pairs_checks_rows_and_flattens_conversational(tmp_path):
    good = {"prompt": "def f(a):", "chosen": "\n    return a", "rejected": "\n    return(a)"}
    conv = {"prompt": [{"role": "user", "content": "x = 1"}], "chosen": [{"role": "assistant", "content": "\ny = 2"}],
            "rejected": [{"role": "assistant", "content": "\ny=2"}]}
    pairs = preference.read_pairs(_write(tmp_path / "p.jsonl", [conv, {**conv, "source": "human"}]))
    assert pairs[0] == {"prompt": "x = 1", "chosen": "\ny = 2", "rejected": "\ny=2"}
    assert pairs[1]["source"] == "human"  # other fields kept (the label stage's provenance)
    assert preference.read_pairs(tmp_path / "p.jsonl", messages=True)[0] == conv
    assert preference.read_pairs(tmp_path / "p.jsonl", messages=None)[0] == conv
    with pytest.raises(DataError, match="must be a list of role/content messages"):
        preference.read_pairs(_write(tmp_path / "std.jsonl", [good]), messages=True)
    bad_rows = [({**good, "prompt": "def f(a):\n"}, "ends on whitespace"),
                ({**good, "rejected": good["chosen"]}, "identical"),
                ({"prompt": "x", "chosen": "\ny"}, "'rejected'"),
                (conv, "'prompt' must be a string, like the first row's prompt \\(one form per file")]
    for row, message in bad_rows:
        with pytest.raises(DataError, match=message) as err:
            preference.read_pairs(_write(tmp_path / "bad.jsonl", [good, row]))
        assert err.value.where.endswith("bad.jsonl:2")


def test_prompt_is_a_token_prefix_of_prompt_plus_completion(tmp_path):
    from alignpipe.lm.policy import PolicyMeta, encode_prompts, load_policy

    policy = tiny.make_policy(tmp_path / "policy", conditional=True)
    model, tok, meta = load_policy(policy)
    pairs = preference.read_pairs(tiny.make_prefs(tmp_path / "prefs.jsonl", n=8))
    formatted = preference.format_pairs(pairs, tok, meta, max_prompt_tokens=192)
    assert formatted[0]["prompt"] == pairs[0]["prompt"] + "<|aligned|>"
    assert preference.boundary_mismatches(formatted, tok) == 0
    plain = preference.format_pairs(pairs, tok, PolicyMeta(), max_prompt_tokens=192)  # MLE policy: no control token
    assert preference.boundary_mismatches(plain, tok) == 0
    trailing_space = [{"prompt": "x =", "chosen": " 1", "rejected": " 2"}]  # the control case: ids merge
    assert preference.boundary_mismatches([{**p, "prompt": p["prompt"] + " ", "chosen": p["chosen"][1:],
                                     "rejected": p["rejected"][1:]} for p in trailing_space], tok) == 1

    # TRL tokenizes the prompt exactly as sampling does (so DPO trains under the sampling conditioning) and does
    # not warn that the prompt is not a prefix.
    cfg = dpo.Config(max_steps=1, batch_size=4, bf16=False)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    trl_logger = logging.getLogger("trl.trainer.dpo_trainer")
    trl_logger.addHandler(handler)
    try:
        trainer = dpo.make_trainer(cfg, model, load_policy(policy)[0], tok, formatted, tmp_path / "ckpt")
    finally:
        trl_logger.removeHandler(handler)
    assert not [r for r in records if "not a prefix" in r.getMessage()]
    expected = encode_prompts(tok, meta, [p["prompt"] for p in pairs], 192)
    assert list(trainer.train_dataset["prompt_ids"]) == expected


def test_format_pairs_keeps_the_last_prompt_tokens(tmp_path):
    from alignpipe.lm.policy import encode_prompts, load_policy

    _, tok, meta = load_policy(tiny.make_policy(tmp_path / "policy", conditional=True))
    prompt = "\n".join(f"x{i} = {i}" for i in range(40))
    formatted = preference.format_pairs([{"prompt": prompt, "chosen": "\ny = 1", "rejected": "\ny=1"}], tok, meta, 16)
    assert tok(formatted[0]["prompt"])["input_ids"] == encode_prompts(tok, meta, [prompt], 16)[0]


def _margin(model, tok, meta, pairs):
    """Mean of log pi(chosen) - log pi(rejected) over the pairs (the reference's margin before training)."""
    from alignpipe.lm.policy import encode_prompts, sequence_logprobs

    prompt_ids = encode_prompts(tok, meta, [p["prompt"] for p in pairs], 192)
    chosen = [tok(p["chosen"], add_special_tokens=False)["input_ids"] for p in pairs]
    rejected = [tok(p["rejected"], add_special_tokens=False)["input_ids"] for p in pairs]
    lp_c = sequence_logprobs(model, prompt_ids, chosen)
    lp_r = sequence_logprobs(model, prompt_ids, rejected)
    return sum(c - r for c, r in zip(lp_c, lp_r)) / len(pairs)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", dpo.TESTED_LOSS_TYPES)
def test_each_loss_type_raises_the_chosen_vs_rejected_margin(loss_type, tmp_path):
    from alignpipe.lm.policy import load_policy

    policy = tiny.make_policy(tmp_path / "policy", conditional=True)
    model, tok, meta = load_policy(policy)
    ref, _, _ = load_policy(policy)
    pairs = preference.read_pairs(tiny.make_prefs(tmp_path / "prefs.jsonl", n=16))
    before = _margin(model, tok, meta, pairs)
    cfg = dpo.Config(loss_type=loss_type, beta=0.1, label_smoothing=0.1 if loss_type == "robust" else 0.0,
                     learning_rate=2e-3, warmup_steps=0, batch_size=8, max_steps=6, bf16=False, logging_steps=1,
                     save_steps=100)
    trainer = dpo.make_trainer(cfg, model, ref, tok, preference.format_pairs(pairs, tok, meta, 192), tmp_path / "ckpt")
    trainer.train()
    after = _margin(trainer.model.eval(), tok, meta, pairs)
    assert after > before + 1.0, (loss_type, before, after)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0]


def _stage_inputs(tmp_path, tiny_data):
    tok = tiny.make_tokenizer()
    policy = tiny.make_policy(tmp_path / "policy", conditional=True, tok=tok)
    prefs = tmp_path / "label"
    tiny.make_prefs(prefs / "prefs.jsonl", n=24)
    human = _write(tmp_path / "human.jsonl", [
        {"prompt": [{"role": "user", "content": "def g(x):"}],
         "chosen": [{"role": "assistant", "content": "\n    return x * 2"}],
         "rejected": [{"role": "assistant", "content": "\n    return x*2"}]}])
    return {"data": tiny_data, "policy": policy, "prefs": prefs, "human_prefs": human}


@pytest.mark.slow
def test_dpo_stage_end_to_end_and_resume(tmp_path, monkeypatch, tiny_data):
    from alignpipe.lm.policy import load_policy
    from alignpipe.run.runner import execute

    monkeypatch.chdir(tmp_path)
    inputs = _stage_inputs(tmp_path, tiny_data)
    cfg = dpo.Config(max_steps=4, batch_size=4, learning_rate=1e-3, warmup_steps=0, save_steps=2, logging_steps=2,
                     bf16=False, n_eval_prompts=4, sampling=dict(batch_size=4), eval_heldout=True)
    metrics = execute("dpo", cfg, inputs, tmp_path / "out")
    # The held-out check is off by default (evaluate owns evaluation) and draws on no training random state: the
    # same weights without it, and only training metrics.
    quiet = execute("dpo", dpo.Config(**{**cfg.to_dict(), "eval_heldout": False}), inputs, tmp_path / "quiet")
    assert weights_sha256(tmp_path / "quiet") == weights_sha256(tmp_path / "out")
    assert "violations_per_char" not in quiet and "kl_to_ref" not in quiet and set(dpo.METRICS) <= set(quiet)
    assert all(quiet[k] == metrics[k] for k in ("train_loss", "train_reward_margin", "n_pairs"))
    for key in dpo.METRICS:
        assert math.isfinite(metrics[key])
    assert metrics["n_prompt_boundary_mismatch"] == 0 and metrics["n_human_pairs"] == 1
    assert metrics["n_pairs"] == 16  # batch_size * max_steps of the 25 pairs
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["kl_to_ref"] == metrics["kl_to_ref"]
    model, _, meta = load_policy(tmp_path / "out")
    assert meta.prompt_suffix == "<|aligned|>" and meta.extra["stage"] == "dpo"
    assert any((tmp_path / "out").glob("*.safetensors"))
    full = {k: v.clone() for k, v in model.state_dict().items()}

    ckpt = tmp_path / "checkpoints" / "dpo"
    assert sorted(p.name for p in ckpt.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    shutil.rmtree(ckpt / "checkpoint-4")  # as if the run had died after step 2
    resumed_metrics = execute("dpo", dpo.Config(**{**cfg.to_dict(), "resume": True}), inputs, tmp_path / "out2")
    resumed, _, _ = load_policy(tmp_path / "out2")
    for k, v in resumed.state_dict().items():
        assert torch.allclose(v, full[k], atol=1e-5), k
    assert resumed_metrics["train_loss"] == pytest.approx(metrics["train_loss"], abs=1e-4)


def test_resume_without_a_checkpoint_fails_loudly(tmp_path, monkeypatch, tiny_data):
    from alignpipe.run.runner import execute

    monkeypatch.chdir(tmp_path)
    cfg = dpo.Config(max_steps=1, batch_size=4, bf16=False, resume=True, n_eval_prompts=4)
    with pytest.raises(DataError, match="no checkpoint"):
        execute("dpo", cfg, _stage_inputs(tmp_path, tiny_data), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="dpo.beta must be > 0, got -1"):
        dpo.Config(beta=-1.0)
    with pytest.raises(ValueError, match="dpo.loss_type"):
        dpo.Config(loss_type="nope")


@pytest.mark.slow
def test_sft_weight_adds_the_chosen_nll_rpo(tmp_path):
    """sft_weight > 0 (RPO) adds TRL's "sft" loss on the chosen completions with that weight, which keeps the
    chosen log-probability higher than plain DPO does from the same start."""
    from alignpipe.lm.policy import encode_prompts, load_policy, sequence_logprobs

    cfg = dpo.Config(sft_weight=1.0, learning_rate=2e-3, warmup_steps=0, batch_size=8, max_steps=6, bf16=False,
                     save_steps=100)
    args = trl_config(cfg, tmp_path / "args")
    assert list(args.loss_type) == ["sigmoid", "sft"] and list(args.loss_weights) == [1.0, 1.0]
    assert list(trl_config(dpo.Config(), tmp_path / "args").loss_type) == ["sigmoid"]

    policy = tiny.make_policy(tmp_path / "policy", conditional=True)
    pairs = preference.read_pairs(tiny.make_prefs(tmp_path / "prefs.jsonl", n=16))
    chosen_logp = {}
    for weight in (0.0, 1.0):
        model, tok, meta = load_policy(policy)
        ref, _, _ = load_policy(policy)
        trainer = dpo.make_trainer(dpo.Config(**{**cfg.to_dict(), "sft_weight": weight}), model, ref, tok,
                                   preference.format_pairs(pairs, tok, meta, 192), tmp_path / f"ckpt-{weight}")
        trainer.train()
        prompt_ids = encode_prompts(tok, meta, [p["prompt"] for p in pairs], 192)
        chosen = [tok(p["chosen"], add_special_tokens=False)["input_ids"] for p in pairs]
        chosen_logp[weight] = sum(sequence_logprobs(trainer.model.eval(), prompt_ids, chosen)) / len(pairs)
    print(f"mean log pi(chosen) after 6 steps: {chosen_logp}")
    assert chosen_logp[1.0] > chosen_logp[0.0] + 0.5, chosen_logp
