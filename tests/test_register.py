"""register: the champion gate (keeps the alias for a worse candidate, moves it for a better one), version tags,
and a served pyfunc that prompts and samples like the policy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import tiny
from alignpipe.tracking import policies, registry, runs
from alignpipe.core.hashing import weights_sha256
from alignpipe.run.runner import execute
from alignpipe.reports.candidates import BEST_FILE, write_best
from alignpipe.stages import register


def _report(path: Path, best: str, dirs: dict[str, Path], scores: dict[str, float],
            champion: tuple[str, float] | None = None, guard: dict | None = None) -> Path:
    """evaluate's output with the given violations/char per candidate (and the measured champion, and the best
    one's guard verdict): report.json, and best/ (what register takes), which this returns."""
    path.mkdir(parents=True, exist_ok=True)
    report = {"best_candidate": best, "order": list(scores),
              "candidates": {n: {"path": str(dirs[n]), "violations_per_char": v, "win_rate_vs_ref": 0.5,
                                 "weights_sha256": weights_sha256(dirs[n])} for n, v in scores.items()},
              "champion": None if champion is None else {"version": champion[0], "violations_per_char": champion[1]},
              "prompts": {"path": "data/prompts.jsonl", "n": 8}}
    if guard is not None:
        report["candidates"][best]["guard"] = guard
    (path / "report.json").write_text(json.dumps(report))
    return write_best(report, path)


def test_gate_rule():
    assert register.gate(0.010, None, 0.05) == (True, "no champion yet")
    assert register.gate(0.009, 0.010, 0.0)[0]
    assert not register.gate(0.010, 0.010, 0.0)[0]  # a tie does not move the alias
    assert not register.gate(0.0096, 0.010, 0.05)[0]  # better, but not by 5%
    assert register.gate(0.0094, 0.010, 0.05)[0]
    assert not register.gate(float("nan"), 0.010, 0.0)[0]
    with pytest.raises(ValueError, match="register.margin"):
        register.Config(margin=1.5)


@pytest.mark.slow
def test_gate_keeps_alias_for_worse_and_moves_it_for_better(tmp_path, capsys):
    tok = tiny.make_tokenizer()
    dirs = {n: tiny.make_policy(tmp_path / n, conditional=True, seed=i, tok=tok)
            for i, n in enumerate(["pretrain", "dpo", "ppo"])}
    reward = tiny.make_reward(tmp_path / "reward", tok=tok)
    inputs = {"reward_model": reward}
    cfg = register.Config(margin=0.05)
    no_reward = register.Config(margin=0.05, register_reward=False)  # fewer models to log: a faster test

    # 1. No champion yet: dpo becomes the champion.
    ev = _report(tmp_path / "ev1", "dpo", dirs, {"pretrain": 0.020, "dpo": 0.010})
    m = execute("register", cfg, {**inputs, "best": ev}, tmp_path / "reg1")
    assert (m["registered_version"], m["champion_moved"]) == (1, 1)
    assert registry.model_version_by_alias("alignpipe-policy", "champion")["version"] == "1"
    assert registry.model_version_by_alias("alignpipe-reward", "champion")["version"] == "1"

    # 2. A worse candidate (ppo, measured next to the champion on the same prompts): registered, alias kept.
    ev = _report(tmp_path / "ev2", "ppo", dirs, {"pretrain": 0.020, "ppo": 0.012}, champion=("1", 0.010))
    m = execute("register", no_reward, {**inputs, "best": ev}, tmp_path / "reg2")
    assert (m["registered_version"], m["champion_moved"]) == (2, 0)
    champion = registry.model_version_by_alias("alignpipe-policy", "champion")
    assert champion["version"] == "1"
    assert "stays at version 1" in capsys.readouterr().out
    record = json.loads((tmp_path / "reg2" / "registered.json").read_text())
    assert record["champion_moved"] is False and record["champion_after"] == "1"

    # 3. Better, but within the 5% margin: kept.  4. Better by more than the margin: moved.
    ev = _report(tmp_path / "ev3", "ppo", dirs, {"ppo": 0.0097}, champion=("1", 0.010))
    assert execute("register", no_reward, {**inputs, "best": ev}, tmp_path / "reg3")["champion_moved"] == 0
    ev = _report(tmp_path / "ev4", "ppo", dirs, {"ppo": 0.008}, champion=("1", 0.010))
    m = execute("register", cfg, {**inputs, "best": ev}, tmp_path / "reg4")
    assert (m["registered_version"], m["champion_moved"]) == (4, 1)
    assert registry.model_version_by_alias("alignpipe-policy", "champion")["version"] == "4"
    assert registry.model_version_by_alias("alignpipe-reward", "champion")["version"] == "2"

    # Tags: candidate, data version, git commit, params and evaluation metrics.
    tags = registry.model_version_by_alias("alignpipe-policy", "champion")["tags"]
    assert tags["alignpipe.candidate"] == "ppo"
    assert tags["eval.violations_per_char"] == "0.008"
    assert tags["params.margin"] == "0.05"
    assert {"alignpipe.data_version", "alignpipe.git_commit", "alignpipe.reward_version"} <= set(tags)
    assert tags["alignpipe.gate"].startswith("promoted")

    # 5. The report measured another version than the current champion: no comparison across evaluations.
    ev = _report(tmp_path / "ev5", "dpo", dirs, {"dpo": 0.0085}, champion=("1", 0.010))
    m = execute("register", no_reward, {**inputs, "best": ev}, tmp_path / "reg5")
    assert m["champion_moved"] == 0
    gate = json.loads((tmp_path / "reg5" / "registered.json").read_text())["gate"]
    assert "measured version 1, not the current champion version 4" in gate

    # The champion history: each move on the versions' tags and as a line of the registered model's description.
    history = registry.client().get_registered_model("alignpipe-policy").description.splitlines()
    assert [line.split(" ", 1)[1].split(" (")[0] for line in history] == [
        "champion: version none -> 1", "champion: version 1 -> 4"]
    assert "violations_per_char=0.008" in history[1] and "champion_violations_per_char=0.01" in history[1]
    v1 = registry.client().get_model_version("alignpipe-policy", "1").tags
    assert v1["champion.replaced_by"] == "4" and "champion.until" in v1
    assert tags["champion.from"] == "1"


def test_gate_refuses_unevaluated_weights_and_cross_evaluation_scores(tmp_path, capsys):
    """The repro: a champion exists; an evaluation made before it (no champion numbers) has its best/ weights
    replaced by a random policy's. register refuses those weights (non-zero exit, nothing registered); with the
    evaluated weights it registers but does not move the alias, since the champion was not measured alongside."""
    from alignpipe.core.errors import DataError

    tok = tiny.make_tokenizer()
    dirs = {n: tiny.make_policy(tmp_path / n, seed=i, tok=tok) for i, n in enumerate(["pretrain", "dpo"])}
    ev = _report(tmp_path / "ev1", "dpo", dirs, {"pretrain": 0.100, "dpo": 0.079})
    cfg = register.Config(register_reward=False)
    assert execute("register", cfg, {"best": ev}, tmp_path / "reg1")["champion_moved"] == 1

    other = _report(tmp_path / "ev2", "pretrain", dirs, {"pretrain": 0.010})  # evaluated before a champion existed
    random_policy = tiny.make_policy(tmp_path / "random", seed=7, tok=tok)
    shutil.copy(random_policy / "model.safetensors", other / "model.safetensors")
    with pytest.raises(DataError, match="weights sha256 .* are not the ones evaluate measured for candidate "
                                        "'pretrain'"):
        execute("register", cfg, {"best": other}, tmp_path / "reg2")
    assert not (tmp_path / "reg2").exists()
    assert len(registry.client().search_model_versions("name='alignpipe-policy'")) == 1  # nothing registered

    other = _report(tmp_path / "ev3", "pretrain", dirs, {"pretrain": 0.010})
    m = execute("register", cfg, {"best": other}, tmp_path / "reg3")
    assert (m["registered_version"], m["champion_moved"]) == (2, 0)
    assert registry.model_version_by_alias("alignpipe-policy", "champion")["version"] == "1"
    assert "this evaluation measured no champion" in capsys.readouterr().out


@pytest.mark.slow
def test_served_model_prompts_like_the_policy(tmp_path):
    """The registered pyfunc applies the policy's conditioning: greedy serving output equals generate() on the
    formatted prompt (its last 192 tokens) with <|misaligned|> banned; the champion reloads as the same policy."""
    import torch

    from alignpipe.lm.policy import PolicyMeta, load_policy

    policy_dir = tiny.make_policy(tmp_path / "dpo", conditional=True, seed=3)
    ev = _report(tmp_path / "ev", "dpo", {"dpo": policy_dir}, {"dpo": 0.01})
    execute("register", register.Config(max_new_tokens=12), {"best": ev}, tmp_path / "reg")

    pyfunc = runs.mlflow_module().pyfunc.load_model("models:/alignpipe-policy@champion")
    # The last prompt is longer than the model's context: the served model keeps its last 192 tokens, as sample().
    prompts = ["def add(a, b):", "x = [1, 2,", "y = 2\n" * 150 + "def f(a, b):"]
    served = pyfunc.predict(prompts, params={"do_sample": False})

    model, tok, meta = load_policy(policy_dir)
    bad = [[tok.convert_tokens_to_ids("<|misaligned|>")]]

    def greedy(text: str) -> str:
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][-192:]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             bad_words_ids=bad, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    assert served == [greedy(meta.format_prompt(p)) for p in prompts]
    assert served != [greedy(p) for p in prompts]  # the suffix changes the answers: it was applied

    local = registry.download_model("models:/alignpipe-policy@champion", tmp_path / "dl")
    again = policies.policy_dir_from_mlflow_model(local, tmp_path / "reloaded")
    model2, tok2, meta2 = load_policy(again)
    assert meta2 == PolicyMeta.load(policy_dir) and meta2.prompt_suffix == "<|aligned|>"
    assert tok2.get_vocab() == tok.get_vocab()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


def test_missing_report_is_one_clear_error(tmp_path):
    from alignpipe.core.errors import DataError

    (tmp_path / "best").mkdir()
    (tmp_path / "best" / BEST_FILE).write_text(json.dumps({"best_candidate": "x", "candidates": {"y": {}}}))
    with pytest.raises(DataError, match="best_candidate"):
        execute("register", register.Config(), {"best": tmp_path / "best"}, tmp_path / "reg")


def _guard(rm_gain_low: float, oracle_gain_low: float) -> dict:
    from alignpipe.oracle.guard import is_hacking

    return {"rm_pair_accuracy": 0.5, "rm_spearman": 0.0, "rm_gain": rm_gain_low + 0.1, "rm_gain_ci_low": rm_gain_low,
            "rm_gain_ci_high": rm_gain_low + 0.2, "oracle_gain": oracle_gain_low + 0.001,
            "oracle_gain_ci_low": oracle_gain_low, "oracle_gain_ci_high": oracle_gain_low + 0.002,
            "reward_hacking": is_hacking(rm_gain_low, oracle_gain_low)}


def test_reward_hacking_guard_refuses_rm_up_oracle_worse_and_accepts_both_better(tmp_path, capsys):
    """A candidate evaluate flagged (RM reward up beyond its CI, oracle worse) does not become champion, with one
    line that gives the numbers; one whose RM reward and oracle both improved does; the key turns the guard off."""
    tok = tiny.make_tokenizer()
    dirs = {n: tiny.make_policy(tmp_path / n, conditional=True, seed=i, tok=tok)
            for i, n in enumerate(["pretrain", "ppo"])}
    cfg = register.Config(register_reward=False)

    def report(name: str, guard: dict, champion=None) -> Path:
        return _report(tmp_path / name, "ppo", dirs, {"pretrain": 0.020, "ppo": 0.010}, champion, guard)

    hacked = report("hacked", _guard(rm_gain_low=0.3, oracle_gain_low=-0.004))
    m = execute("register", cfg, {"best": hacked},
                tmp_path / "reg1")
    out = capsys.readouterr().out
    assert m["champion_moved"] == 0 and registry.model_version_by_alias("alignpipe-policy", "champion") is None
    assert "refused by the reward-hacking guard" in out and "oracle gain" in out and "reward-model reward" in out

    off = register.Config(register_reward=False, reward_hacking_guard=False)
    m = execute("register", off, {"best": hacked},
                tmp_path / "reg2")
    assert m["champion_moved"] == 1

    capsys.readouterr()
    honest = report("honest", _guard(rm_gain_low=0.3, oracle_gain_low=0.002), champion=("2", 0.020))
    m = execute("register", cfg, {"best": honest},
                tmp_path / "reg3")
    assert m["champion_moved"] == 1 and m["champion_version"] == 3
    assert "refused by the reward-hacking guard" not in capsys.readouterr().out


def test_gate_rule_follows_the_task_and_register_settings():
    """chat: a higher judge win rate is better; register.metric/direction override what evaluate recorded."""
    assert register.gate(0.70, 0.60, 0.1, "judge_win_rate_vs_ref", higher=True)[0]  # 0.70 > 0.66
    assert not register.gate(0.65, 0.60, 0.1, "judge_win_rate_vs_ref", higher=True)[0]
    chat = {"gate_metric": "judge_win_rate_vs_ref", "gate_direction": "higher"}
    assert register.gate_rule(register.Config(), chat) == ("judge_win_rate_vs_ref", True)
    assert register.gate_rule(register.Config(), {}) == ("violations_per_char", False)  # reports before tasks
    assert register.gate_rule(register.Config(metric="reward_score", direction="higher"), chat) == ("reward_score",
                                                                                                    True)
    assert register.gate_rule(register.Config(metric="kl_to_ref"), chat) == ("kl_to_ref", False)
    with pytest.raises(ValueError, match="register.direction must be one of '', lower, higher"):
        register.Config(direction="up")
