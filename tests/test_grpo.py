"""Rewards for RL (each choice on a hand-made batch, user functions and their failures) and the grpo stage."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest

import tiny
from alignpipe.algos.rewards import EMPTY_PENALTY, build_reward, oracle_rewards, parse_reward
from alignpipe.core.errors import ConfigError, DataError
from alignpipe.tasks import get_task
from alignpipe.tasks.pep8 import LogicalLine

PROMPTS = ["def f(a, b):", "x = [1, 2]"]
CLEAN, DIRTY = "\n    return a + b", "\ny=x [0]"  # 0 violations; E225 + E211 on 7 characters
PEP8_ORACLE = get_task("pep8").oracle()


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    """An importable module of user reward functions, good and bad."""
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def length(prompts, completions, **kwargs):
            return [float(len(c)) for c in completions]
        def short(prompts, completions, **kwargs):
            return [1.0]
        def nan(prompts, completions, **kwargs):
            return [float("nan")] * len(completions)
        def text(prompts, completions, **kwargs):
            return "oops"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_parse_reward_specs():
    assert parse_reward("oracle").terms == ((1.0, "oracle"),)
    assert parse_reward("0.5*model + 2*oracle").terms == ((0.5, "model"), (2.0, "oracle"))
    assert str(parse_reward("1e-1*pkg.mod:fn")) == "0.1*pkg.mod:fn"
    for bad in ("", "magic", "0.5*", "model + ", "inf*oracle"):
        with pytest.raises(ConfigError):
            parse_reward(bad)


def test_oracle_reward_by_hand():
    # DIRTY: "y=x [0]" has E225 (missing whitespace around =) and E211 (whitespace before [): 2 / 7 characters.
    assert oracle_rewards([CLEAN, DIRTY, "\n"], ["def f(a, b):", "x = [1, 2]", "x = 1"], PEP8_ORACLE) == \
        [0.0, pytest.approx(-2 / 7), -EMPTY_PENALTY]


def test_each_reward_choice_and_a_weighted_sum(user_rewards, tmp_path):
    from alignpipe.lm.reward_model import load_reward_model, reward_scores

    rm_dir = tiny.make_reward(tmp_path / "rm")
    rm, rm_tok = load_reward_model(rm_dir)
    completions = [CLEAN, DIRTY]
    expected_model = reward_scores(rm, rm_tok, PROMPTS, completions)
    assert build_reward("model", rm_dir)(PROMPTS, completions) == pytest.approx(expected_model)
    assert build_reward("oracle", None, oracle=PEP8_ORACLE)(PROMPTS, completions) == pytest.approx([0.0, -2 / 7])
    assert build_reward("my_rewards:length", None)(PROMPTS, completions) == [17.0, 8.0]
    mixed = build_reward("0.5*model + 2*oracle + 0.1*my_rewards:length", rm_dir, oracle=PEP8_ORACLE)
    values = mixed(PROMPTS, completions)
    assert values == pytest.approx([0.5 * m + 2 * o + 0.1 * n
                                    for m, o, n in zip(expected_model, [0.0, -2 / 7], [17.0, 8.0])])
    assert set(mixed.last_terms) == {"model", "oracle", "my_rewards:length"}


def test_oracle_reads_the_longer_context_when_given():
    # Alone "    pass" after "x = 1" is an unexpected indent (E113); after "if x:" it is fine.
    reward = build_reward("oracle", None, contexts={"p": "if x:"}, oracle=PEP8_ORACLE)
    assert reward(["p"], ["\n    pass"]) == [0.0]
    assert build_reward("oracle", None, oracle=PEP8_ORACLE)(["x = 1"], ["\n    pass"])[0] < 0


@pytest.mark.parametrize("spec, error, words", [
    ("no_such_module:fn", ConfigError, "cannot import 'no_such_module'"),
    ("my_rewards:missing", ConfigError, "has no callable 'missing'"),
    ("my_rewards:short", DataError, "returned 1 values for 2 completions"),
    ("my_rewards:nan", DataError, "non-finite value (nan)"),
    ("my_rewards:text", DataError, "must return a list of 2 floats, got str"),
])
def test_bad_user_rewards_fail_before_training(user_rewards, spec, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        build_reward(spec, None, probe=PROMPTS)


def test_model_reward_without_a_reward_model_is_a_config_error():
    with pytest.raises(ConfigError, match="needs a reward model"):
        build_reward("oracle + model", None, oracle=PEP8_ORACLE)


def test_the_oracle_term_scores_with_the_tasks_oracle():
    """The `oracle` term calls the oracle it is given (the task's), not the PEP8 one; without one it is refused."""
    from alignpipe.oracle.scoring import CompletionScore

    seen = []

    def toy(context, completion):
        seen.append((context, completion))
        return CompletionScore(violations=len(completion), chars=2 * len(completion), truncated=False)

    assert build_reward("oracle", None, oracle=toy)(["p"], ["abcd"]) == [-0.5]
    assert seen == [("p", "abcd")]
    with pytest.raises(ConfigError, match="uses the oracle, but the task has none"):
        build_reward("oracle", None)


@pytest.mark.slow
def test_grpo_cli_rejects_a_bad_reward_in_one_line_and_writes_nothing(user_rewards, tmp_path, tiny_data):
    policy = tiny.make_policy(tmp_path / "policy", conditional=True)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "alignpipe", "grpo", "--data", str(tiny_data), "--policy",
                           str(policy), "--out", str(out), "--set", "grpo.reward=my_rewards:nan"],
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(user_rewards), *sys.path])})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors and "reward my_rewards:nan" in errors[-1] and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_grpo_raises_the_oracle_reward_and_changes_weights(tmp_path, tiny_data):
    """Six GRPO steps against the oracle on a random tiny policy: the mean oracle reward of samples on fixed
    training prompts (same seed before and after) goes up, and the weights changed."""
    import torch

    from alignpipe.lm.policy import Sampling, load_policy, sample
    from alignpipe.stages import grpo
    from alignpipe.oracle.policy_eval import read_train_prompts

    policy = tiny.make_policy(tmp_path / "policy", conditional=True)
    rows = read_train_prompts(tiny_data)[:32]

    def mean_oracle_reward(path):
        model, tok, meta = load_policy(path)
        samples = sample(model, tok, meta, [r["prompt"] for r in rows],
                         Sampling(temperature=0.7, top_p=1.0, max_new_tokens=16, batch_size=32), seed=123,
                         unit=LogicalLine())
        values = oracle_rewards([s.completion for s in samples], [r["context"] for r in rows], PEP8_ORACLE)
        return sum(values) / len(values), model

    cfg = grpo.Config(max_steps=6, prompts_per_step=8, num_generations=4, learning_rate=3e-3, beta=0.0,
                      sampling=dict(max_new_tokens=16, batch_size=8), n_eval_prompts=8, eval_heldout=True,
                      checkpoint_dir=str(tmp_path / "ckpt"))
    out = tmp_path / "out"
    out.mkdir()
    metrics = grpo.run(cfg, {"data": tiny_data, "policy": policy, "reward_model": None}, out)
    before, m0 = mean_oracle_reward(policy)
    after, m1 = mean_oracle_reward(out)
    assert after > before, (before, after)
    changed = sum(not torch.equal(a, b) for a, b in zip(m0.state_dict().values(), m1.state_dict().values()))
    assert changed > 0
    assert metrics["train_steps"] == 6 and math.isfinite(metrics["violations_per_char"])
    assert (out / "samples.jsonl").is_file() and (out / "alignpipe.json").is_file()
