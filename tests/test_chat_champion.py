"""Issue 26 on conversational tasks: evaluate measures the registered chat champion on the candidates' conversations
(its row is sampled and scored there, not copied from a registry tag); where a conversational task has an oracle,
label's llm judge reports its agreement with the oracle (checked by hand on `QuietChat`, a chat task defined here,
`data.task: test_chat_champion:QuietChat`: an answer is right when it has no upper-case letter; and reported for the
arith base as its own judge); the served arith champion's greedy answers and accuracy equal evaluate's greedy ones
on the same 50 held-out questions (issue 26's acceptance 4)."""

from __future__ import annotations

import json

import pytest

import tiny
from alignpipe.run.runner import execute
from alignpipe.oracle.scoring import CompletionScore
from alignpipe.tasks.chat import Chat

SPEC = "test_chat_champion:QuietChat"  # tests/ is on sys.path (pytest's rootdir conftest)


def shouting(context, answer: str) -> CompletionScore:
    """The toy oracle: upper-case letters are violations (lower per character is better)."""
    text = answer.strip()
    return CompletionScore(sum(c.isupper() for c in text), len(text), truncated=False)


class QuietChat(Chat):
    """The chat task with an oracle: upper-case letters in the answer are violations."""

    def oracle(self):
        return shouting

    def gate(self) -> tuple[str, bool]:
        return "violations_per_char", False

    def describe(self) -> dict[str, str]:
        return {"scorer": "oracle: an answer without upper-case letters is right",
                "guard_score": "upper-case letters per character"}


def _chat_data(root, task: str, n: int, test_frac: float, n_prompts: int):
    from alignpipe.stages.data import Config

    prefs = tiny.make_chat_prefs(root / f"prefs-{n}.jsonl", n=n)
    execute("data", Config(task=task, dataset=str(prefs), test_frac=test_frac, val_frac=0.1, n_prompts=n_prompts),
            {}, root / f"data-{task.replace(':', '-')}")
    return root / f"data-{task.replace(':', '-')}"


def _reward_model(path):
    """An untrained reward model with the chat tokenizer (a score per answer; training is not what is tested)."""
    from alignpipe.stages import reward

    model, tok = reward.load_model(str(tiny.make_chat_llama(path.parent / f"{path.name}-base")), reward.Config())
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _register_champion(policy, tmp_path, claimed: dict):
    """Register `policy` as alignpipe-policy@champion through the register stage, from an evaluation report that
    claims `claimed` for it (what the registry's tags then say)."""
    from alignpipe.core.hashing import weights_sha256
    from alignpipe.reports.candidates import write_best
    from alignpipe.stages import register

    ev = tmp_path / "old-evaluation"
    ev.mkdir()
    best = write_best({"best_candidate": "dpo", "task": "chat", "gate_metric": "judge_win_rate_vs_ref",
                       "gate_direction": "higher", "candidates": {"dpo": {
                           "path": str(policy), "weights_sha256": weights_sha256(policy), **claimed}}}, ev)
    got = execute("register", register.Config(register_reward=False), {"best": best}, tmp_path / "register")
    assert got["champion_moved"] == 1
    return got["registered_version"]


@pytest.mark.slow
def test_evaluate_on_chat_measures_the_registered_champion(tmp_path):
    """A chat champion registered in the (tmp) MLflow store is downloaded and answers the candidates' conversations
    with their seed: its row equals the row of a candidate with the same weights and differs from the registry's
    claim; every candidate gets its judge win rate against the champion; register's gate reads the measured value."""
    from alignpipe.reports.candidates import read_report
    from alignpipe.stages import evaluate, register
    from alignpipe.tracking import registry

    data = _chat_data(tmp_path, "chat", 48, 0.25, 8)
    policy, other = tiny.make_chat_llama(tmp_path / "llama"), tiny.make_chat_llama(tmp_path / "other", seed=3)
    version = _register_champion(other, tmp_path, {"judge_win_rate_vs_ref": 0.987, "reward_score": 9.5})
    tags = registry.client().get_model_version("alignpipe-policy", str(version)).tags
    assert tags["eval.judge_win_rate_vs_ref"] == "0.987"  # what a copied row would say

    cfg = evaluate.Config(n_prompts=6, sampling=dict(max_new_tokens=8, batch_size=6), ppl_max_chars=500,
                          extra_candidates=[f"other={other}"])
    metrics = execute("evaluate", cfg, {"data": data, "policy": policy, "reward_model": _reward_model(tmp_path / "rm")},
                      tmp_path / "eval")
    report = read_report(tmp_path / "eval")
    champion, twin = report["champion"], report["candidates"]["other"]
    assert (champion["model"], champion["version"]) == ("alignpipe-policy", str(version))
    for key in ("judge_win_rate_vs_ref", "reward_score", "kl_to_ref", "ended_frac", "mean_answer_tokens"):
        assert champion[key] == twin[key], key  # measured: the same weights answer the same conversations alike
    assert champion["judge_win_rate_vs_ref"] != 0.987 and champion["reward_score"] != 9.5
    assert twin["judge_win_rate_vs_champion"] == 0.5  # identical answers: every prompt a tie
    assert 0 <= report["candidates"]["pretrain"]["judge_win_rate_vs_champion"] <= 1
    assert metrics["champion/judge_win_rate_vs_ref"] == champion["judge_win_rate_vs_ref"]
    samples = [json.loads(x) for x in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    answers = {name: [s["completion"] for s in samples if s["candidate"] == name] for name in ("other", "champion")}
    assert len(answers["champion"]) == 6 and answers["champion"] == answers["other"]
    assert f"champion v{version}" in (tmp_path / "eval" / "report.md").read_text()

    best = report["best_candidate"]
    _, why, _, value = register.decide(register.Config(), report, best, {"version": str(version)})
    assert value == champion["judge_win_rate_vs_ref"] and "measured in this evaluation" in why


@pytest.fixture(scope="module")
def quiet(tmp_path_factory, module_mlflow):
    """A data directory of the QuietChat task."""
    root = tmp_path_factory.mktemp("quiet")
    return {"root": root, "data": _chat_data(root, SPEC, 48, 0.25, 8)}


@pytest.mark.slow
def test_label_llm_judge_reports_its_agreement_with_the_oracle(quiet, tmp_path):
    """label --set label.judge=llm on a conversational task with an oracle, the policy as its own judge: each row
    carries the oracle's values, and judge_oracle_agreement in metrics.json is recomputed by hand from the rows."""
    from alignpipe.stages import label

    policy = tiny.make_chat_llama(tmp_path / "policy", end_logit=2.0)
    cfg = label.Config(judge="llm", k=4, n_prompts=8, sampling=dict(max_new_tokens=12), keep_ties=True,
                       tie_threshold=0.001)
    got = execute("label", cfg, {"data": quiet["data"], "policy": policy}, tmp_path / "label")
    rows = [json.loads(x) for f in ("prefs.jsonl", "heldout.jsonl")
            for x in (tmp_path / "label" / f).read_text().splitlines()]
    judged = [r for r in rows if r.get("source") == "rlaif"]
    assert len(judged) == got["n_judged"] > 0 and got["judge_is_policy"] == 1.0
    for r in judged:
        assert r["oracle_chosen"] == shouting("", r["chosen"][0]["content"]).per_char
        assert r["oracle_rejected"] == shouting("", r["rejected"][0]["content"]).per_char
    decided = [r for r in judged if r["oracle_chosen"] != r["oracle_rejected"]]
    assert decided and got["oracle_decided_frac"] == pytest.approx(len(decided) / len(judged))
    by_hand = sum(0.5 if abs(r["score_chosen"] - r["score_rejected"]) <= cfg.tie_threshold
                  else float(r["oracle_chosen"] < r["oracle_rejected"]) for r in decided) / len(decided)
    assert got["judge_oracle_agreement"] == pytest.approx(by_hand)
    saved = json.loads((tmp_path / "label" / "metrics.json").read_text())
    assert saved["judge_oracle_agreement"] == got["judge_oracle_agreement"]
    assert 0 <= saved["judge_position_consistency"] <= 1


def test_oracle_agreement_by_hand():
    """Pairs the oracle decides: 3 of 4; the judge agrees on one, disagrees on one, ties on one: (1 + 0 + 0.5) / 3."""
    from alignpipe.oracle.judges import oracle_agreement

    scores = [(0.9, 0.1), (0.2, 0.8), (0.5, 0.5), (0.7, 0.3)]
    oracles = [(0.0, 0.5), (0.0, 0.5), (0.1, 0.0), (0.2, 0.2)]
    assert oracle_agreement(scores, oracles, 0.0) == pytest.approx((1.5 / 3, 3 / 4))
    assert oracle_agreement(scores[3:], oracles[3:], 0.0) == (0.5, 0.0)  # nothing decided: chance


@pytest.fixture(scope="module")
def arith(tmp_path_factory, module_mlflow):
    """An arith data directory (sums of integers up to 19; 50 held-out questions) and a tiny Llama pretrained on it
    from scratch (MLE, 150 steps: it answers a few held-out questions right, greedy)."""
    from alignpipe.stages import data, pretrain

    root = tmp_path_factory.mktemp("arith")
    execute("data", data.Config(task="arith", n_conversations=1500, max_operand=19, test_frac=0.3, val_frac=0.05,
                                n_prompts=50, n_train_prompts=32), {}, root / "data")
    execute("pretrain", pretrain.Config(
        objective="mle", n_embd=48, n_layer=2, n_head=2, vocab_size=300, seq_len=64, batch_size=16, max_steps=150,
        learning_rate=3e-3, warmup_ratio=0.05, n_eval_prompts=8, sampling=dict(max_new_tokens=4), eval_val_chars=500,
        save_steps=150, checkpoint_dir=str(root / "ckpt"), precision="fp32"), {"data": root / "data"},
        root / "base")
    return {"root": root, "data": root / "data", "base": root / "base"}


@pytest.mark.slow
def test_arith_base_as_its_own_llm_judge_reports_agreement_with_the_oracle(arith, tmp_path):
    """Issue 26's target: label --set label.judge=llm on arith with the base as its own judge reports the judge's
    agreement with the oracle and its position consistency."""
    from alignpipe.stages import label

    cfg = label.Config(judge="llm", k=4, n_prompts=32, sampling=dict(max_new_tokens=12), keep_ties=True)
    got = execute("label", cfg, {"data": arith["data"], "policy": arith["base"]}, tmp_path / "label")
    assert got["judge_is_policy"] == 1.0 and got["n_judged"] > 0
    assert 0 <= got["judge_oracle_agreement"] <= 1 and 0 < got["oracle_decided_frac"] <= 1
    assert 0 <= got["judge_position_consistency"] <= 1


@pytest.mark.slow
def test_the_served_champion_answers_50_questions_with_evaluates_greedy_accuracy(arith, tmp_path):
    """Issue 26's acceptance 4 on arith: evaluate (greedy) -> export -> register make the base the champion;
    `mlflow models serve` of models:/alignpipe-policy-onnx@champion answers the 50 held-out questions at temperature
    0 with evaluate's greedy answers, so the oracle's accuracy of the served answers equals evaluate's."""
    from alignpipe.core.io import read_jsonl
    from alignpipe.oracle.metrics import score_samples
    from alignpipe.reports.candidates import read_report
    from alignpipe.serving.server import post_json, served
    from alignpipe.stages import evaluate, export, register
    from alignpipe.tasks import get_task

    base, rm, task = arith["base"], _reward_model(tmp_path / "rm"), get_task("arith")
    cfg = evaluate.Config(greedy=True, n_prompts=50, sampling=dict(max_new_tokens=6, batch_size=25), ppl_max_chars=500)
    execute("evaluate", cfg, {"data": arith["data"], "policy": base}, tmp_path / "eval")
    report = read_report(tmp_path / "eval")
    assert report["sampling"]["greedy"] and report["gate_metric"] == "accuracy"
    evaluated = [s for s in read_jsonl(tmp_path / "eval" / "samples.jsonl") if s["candidate"] == "pretrain"]
    best = tmp_path / "eval" / "best"
    execute("export", export.Config(n_parity_prompts=4, max_new_tokens=6),
            {"best": best, "reward_model": rm, "data": arith["data"]}, tmp_path / "export")
    got = execute("register", register.Config(max_new_tokens=6),
                  {"best": best, "reward_model": rm, "export": tmp_path / "export"}, tmp_path / "register")
    assert got["champion_moved"] == 1

    questions = [r["prompt"] for r in read_jsonl(arith["data"] / "prompts.jsonl")]
    assert len(questions) == len(evaluated) == 50 and [s["prompt"] for s in evaluated] == questions
    answers = []
    with served("models:/alignpipe-policy-onnx@champion", tmp_path / "serve.log", timeout=120) as url:
        for messages in questions:
            status, body = post_json(f"{url}/invocations", json.dumps(
                {"messages": messages, "max_tokens": 6, "temperature": 0}).encode())
            assert status == 200, body
            answers.append(body["choices"][0]["message"]["content"])
    assert answers == [s["completion"] for s in evaluated]
    served_accuracy = task.summarize(score_samples(answers, questions, task.oracle()))["accuracy"]
    assert served_accuracy == report["candidates"]["pretrain"]["accuracy"]
    assert 0 < served_accuracy < 1  # some answers right, some wrong: the comparison can fail
