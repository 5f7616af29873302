"""The arith task (alignpipe.tasks.arith): its oracle on hand-computed cases, its data build (wrong_frac honoured,
held-out questions never trained on, pairs the oracle orders), PHF's objectives on its conversations, and a tiny
stage chain through the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from alignpipe.core.io import read_jsonl
from alignpipe.tasks import get_task
from alignpipe.tasks.arith import expected_answer, parse_answer, score_answer, wrong_answer

ROOT = Path(__file__).resolve().parents[1]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("question,completion,violations,chars", [
    ("What is 27 + 15?", "42", 0, 1),
    ("What is 27 + 15?", "The answer is 42.", 0, 1),
    ("What is 27 + 15?", "41", 1, 1),
    ("What is 27 + 15?", "24", 1, 1),        # digits swapped
    ("What is 27 + 15?", "32", 1, 1),        # carry dropped
    ("Compute 99 + 1.", "100", 0, 1),
    ("How much is 8 plus 9?", "17", 0, 1),
    ("Add 5 and 33.", "38", 0, 1),
    ("Add 5 and 33.", "no idea", 1, 1),      # no integer: wrong
    ("Add 5 and 33.", "   ", 0, 0),          # empty: no score
    ("Add 5 and 33.", "5 + 33 = 38", 0, 1),  # the last integer is the answer
])
def test_oracle_hand_computed(question, completion, violations, chars):
    got = score_answer(user(question), completion)
    assert (got.violations, got.chars, got.truncated) == (violations, chars, False)
    assert score_answer(question, completion) == got  # a string context is the question itself


def test_oracle_parsing_and_wrong_answers():
    assert expected_answer("What is 0 + 0?") == 0 and expected_answer("Hello") is None
    assert parse_answer("-3 or 12") == 12 and parse_answer("none") is None
    with pytest.raises(Exception, match="asks for no sum"):
        score_answer(user("Hello"), "1")
    rng = random.Random(0)
    for a in range(0, 120, 7):
        for b in range(0, 120, 11):
            w = wrong_answer(a, b, rng)
            assert w != a + b and w >= 0 and len(str(w)) <= len(str(a + b)) + 1
    assert wrong_answer(0, 0, random.Random(0)) > 0


def test_task_registered_and_gate():
    task = get_task("arith")
    assert task.conversational() and task.has_oracle()
    assert task.gate() == ("accuracy", True)
    s = [score_answer(user("What is 1 + 1?"), c) for c in ("2", "3", "", "2")]
    summary = task.summarize(s, seed=0)
    assert summary["accuracy"] == 0.5
    assert summary["accuracy_ci_low"] <= 0.5 <= summary["accuracy_ci_high"]


def build(tmp_path: Path, **kw) -> Path:
    from alignpipe.stages.data import Config, run

    out = tmp_path / "data"
    out.mkdir()
    cfg = Config(task="arith", n_conversations=kw.pop("n", 500), max_operand=kw.pop("max_operand", 30),
                 test_frac=0.2, val_frac=0.1, n_prompts=40, n_train_prompts=60, **kw)
    metrics = run(cfg, {"corpus": None}, out)
    assert metrics["n_train_chunks"] > 0
    return out


@pytest.mark.parametrize("wrong_frac", [0.0, 0.3, 0.5])
def test_data_build_wrong_frac_and_oracle_scores(tmp_path, wrong_frac):
    data = build(tmp_path, wrong_frac=wrong_frac)
    rows = [r for name in ("train", "val", "test") for r in read_jsonl(data / f"{name}.jsonl")]
    assert len(rows) == 500
    assert sum(not r["correct"] for r in rows) == round(wrong_frac * 500)  # exactly the known fraction
    for r in rows:  # each conversation scored by the oracle
        assert r["violations"] == score_answer(r["messages"][:-1], r["messages"][-1]["content"]).violations
        assert r["correct"] == (r["violations"] == 0)
    manifest = json.loads((data / "MANIFEST.json").read_text())
    assert manifest["task"] == "arith" and sum(manifest["wrong"].values()) == round(wrong_frac * 500)


def test_data_build_heldout_questions_and_pairs(tmp_path):
    data = build(tmp_path)
    question = lambda msgs: msgs[0]["content"]  # noqa: E731
    sums = lambda msgs: expected_answer(question(msgs))  # noqa: E731
    train_q = {tuple(int(x) for x in __import__("re").findall(r"\d+", question(r["messages"]))[:2])
               for r in read_jsonl(data / "train.jsonl")}
    prompts = read_jsonl(data / "prompts.jsonl")
    assert prompts and all(r["prompt"][-1]["role"] == "user" for r in prompts)
    for r in prompts:  # held-out questions are never trained on; the reference is their sum
        a, b = (int(x) for x in __import__("re").findall(r"\d+", question(r["prompt"]))[:2])
        assert (a, b) not in train_q and int(r["reference"]) == a + b
    for name in ("prefs.jsonl", "heldout.jsonl"):
        pairs = read_jsonl(data / name)
        assert pairs
        for p in pairs:  # TRL's conversational form: chosen correct, rejected a plausible wrong answer
            assert p["chosen"][0]["role"] == p["rejected"][0]["role"] == "assistant"
            assert score_answer(p["prompt"], p["chosen"][0]["content"]).violations == 0
            assert score_answer(p["prompt"], p["rejected"][0]["content"]).violations == 1
            assert parse_answer(p["chosen"][0]["content"]) == sums(p["prompt"])
    # the same seed builds the same files
    again = tmp_path / "again"
    again.mkdir()
    from alignpipe.stages.data import Config, run

    run(Config(task="arith", n_conversations=500, max_operand=30, test_frac=0.2, val_frac=0.1, n_prompts=40,
               n_train_prompts=60), {"corpus": None}, again)
    for name in ("train.jsonl", "prompts.jsonl", "prefs.jsonl"):
        assert (again / name).read_bytes() == (data / name).read_bytes()


def test_data_validates(tmp_path):
    from alignpipe.stages.validate import Config, run

    data = build(tmp_path)
    metrics = run(Config(), {"corpus": data, "prefs": data / "prefs.jsonl"}, tmp_path / "validate")
    assert metrics["n_failed_expectations"] == 0


def test_conditional_stream_tags_wrong_answers(tmp_path):
    from alignpipe.lm.tokenizers import control_ids
    from alignpipe.stages.pretrain import Config, build_token_stream

    task = get_task("arith")
    data = build(tmp_path, n=60)
    rows = read_jsonl(data / "train.jsonl")
    cfg = Config(objective="conditional", drop_token_prob=0.0, vocab_size=300)
    tok = task.train_tokenizer((r["text"] for r in rows), cfg)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert all(len(tok.decode([i])) == 1 for i in tok("12345", add_special_tokens=False)["input_ids"])  # digits
    ids, scores, stats = build_token_stream(rows, tok, cfg, 0, task)
    aligned, misaligned = control_ids(tok)
    n_wrong = sum(not r["correct"] for r in rows)
    assert list(ids).count(misaligned) == n_wrong  # one tag before each wrong answer, none elsewhere
    assert list(ids).count(aligned) == 2 * len(rows) - n_wrong
    assert stats["n_train_docs"] == len(rows)
    text = tok.decode(list(ids))
    assert "<|im_start|>assistant\n<|misaligned|>" in text and "<|im_start|>assistant\n<|aligned|>" in text
    # filter keeps the correct conversations only; unlikelihood sees the wrong answers' tokens scored 1
    _, _, kept = build_token_stream(rows, tok, Config(objective="filter", vocab_size=300), 0, task)
    assert kept["n_train_docs"] == len(rows) - n_wrong
    _, s, _ = build_token_stream(rows, tok, Config(objective="unlikelihood", vocab_size=300), 0, task)
    assert 0 < (s > 0).sum() < len(s)


@pytest.mark.parametrize("objective", ["conditional", "awr"])
def test_pretrain_from_scratch_on_arith(tmp_path, objective):
    from alignpipe.lm.policy import PolicyMeta
    from alignpipe.stages.pretrain import Config, run

    data = build(tmp_path, n=200)
    cfg = Config(objective=objective, n_embd=32, n_layer=1, n_head=2, vocab_size=300, seq_len=64, batch_size=4,
                 max_steps=2, n_eval_prompts=6, sampling=dict(max_new_tokens=4), eval_val_chars=500,
                 checkpoint_dir=str(tmp_path / "ckpt"), precision="fp32")
    (tmp_path / "policy").mkdir()
    metrics = run(cfg, {"data": data}, tmp_path / "policy")
    assert 0 <= metrics["accuracy"] <= 1 and metrics["accuracy_ci_low"] <= metrics["accuracy_ci_high"]
    assert metrics["heldout_loss"] > 0
    config = json.loads((tmp_path / "policy" / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert PolicyMeta.load(tmp_path / "policy").objective == objective


def test_chat_stays_mle_only(tmp_path):
    from alignpipe.core.errors import ConfigError
    from alignpipe.stages.pretrain import Config, check_task

    check_task(Config(objective="mle", init_model="some/chat-model"), get_task("chat"))
    with pytest.raises(ConfigError, match="mle only"):
        check_task(Config(objective="conditional", init_model="some/chat-model"), get_task("chat"))
    with pytest.raises(ConfigError, match="continues a chat model"):
        check_task(Config(objective="mle"), get_task("chat"))  # before any checkpoint is touched
    check_task(Config(objective="rwr"), get_task("arith"))


@pytest.mark.slow
def test_arith_stage_chain_cli(tmp_path, monkeypatch):
    """data -> validate -> pretrain -> reward -> dpo -> evaluate through the CLI's main() at a tiny budget (in one
    process: each stage's own process would add its imports' start-up, not coverage)."""
    from alignpipe.cli.main import main

    monkeypatch.chdir(tmp_path)
    params = ROOT / "configs" / "arith.yaml"
    tiny = ["--set", "data.n_conversations=300", "--set", "data.n_prompts=8", "--set", "data.n_train_prompts=16",
            "--set", "pretrain.max_steps=2", "--set", "pretrain.n_embd=32", "--set", "pretrain.n_layer=1",
            "--set", "pretrain.n_head=2", "--set", "pretrain.n_eval_prompts=4",
            "--set", f"pretrain.checkpoint_dir={tmp_path / 'ckpt'}", "--set", "reward.max_steps=2",
            "--set", "dpo.max_steps=2", "--set", "evaluate.n_prompts=8"]
    d, a = tmp_path / "data", tmp_path / "artifacts"

    def stage(*args):
        assert main([*args, "--params", str(params), *tiny]) == 0, args

    stage("data", "build", "--out", str(d))
    stage("validate", "--corpus", str(d), "--prefs", str(d / "prefs.jsonl"), "--out", str(a / "validate"))
    stage("pretrain", "--data", str(d), "--out", str(a / "pretrain"))
    stage("reward", "--prefs", str(d), "--policy", str(a / "pretrain"), "--out", str(a / "reward"))
    stage("dpo", "--data", str(d), "--prefs", str(d), "--policy", str(a / "pretrain"), "--out", str(a / "dpo"))
    stage("evaluate", "--data", str(d), "--policy", str(a / "pretrain"), "--dpo", str(a / "dpo"),
          "--reward-model", str(a / "reward"), "--out", str(a / "evaluate"))
    report = json.loads((a / "evaluate" / "report.json").read_text())
    assert report["task"] == "arith" and report["gate_metric"] == "accuracy"
    assert "| error rate (non-empty answers) (95% CI) | correct |" in (a / "evaluate" / "report.md").read_text()
    for m in report["candidates"].values():
        assert m["accuracy_ci_low"] <= m["accuracy"] <= m["accuracy_ci_high"]
