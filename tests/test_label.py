"""The label stage and its judges: each judge picks the expected side of a hand-made pair, the llm judge's order
swap cancels position bias, and the stage's output is valid preference data (checked by the validate stage)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiny import make_data, make_policy, make_prefs, make_reward, make_tokenizer

from alignpipe.core.errors import DataError
from alignpipe.oracle.judges import LLMJudge, Pair, RewardModelJudge, ScorerJudge, oracle
from alignpipe.stages import label
from alignpipe.tasks import get_task

CLEAN, DIRTY = "\n    return a + b * 99", "\n    return a+b *99"
PAIR = Pair("def f99(a, b):", CLEAN, DIRTY, context="def f99(a, b):")
PEP8_ORACLE = get_task("pep8").oracle()


pytestmark = pytest.mark.usefixtures("module_mlflow")  # one MLflow store per module (conftest)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("label")
    return {"data": make_data(root / "data"), "policy": make_policy(root / "policy", conditional=True),
            "root": root}


LINES = ("x = 1", "x=1", "y = [1, 2]", "y = [1,2]", "return None", "z  = 3", "f(a , b)", "g = (1,")


def fake_sample(model, tok, meta, prompts, sampling, seed=0, greedy=False, progress=None, unit=None):
    """Stands in for alignpipe.lm.policy.sample (a random tiny policy rarely ends a line): a new line, indented like
    the prompt's last line, drawn from LINES; the unclosed line is what a sample cut at max_new_tokens looks like."""
    import random

    from alignpipe.lm.policy import Sample

    assert meta.prompt_suffix == "<|aligned|>" and progress  # the policy's conditioning reaches the sampler
    rng = random.Random(seed)
    out = []
    for p in prompts:
        last = p.splitlines()[-1]
        line = rng.choice(LINES)
        out.append(Sample(p, "\n" + last[:len(last) - len(last.lstrip())] + line, [], [], capped=line == "g = (1,"))
    return out


def _run_label(tiny, out, **kw):
    from alignpipe.run.runner import execute

    inputs = {"data": tiny["data"], "policy": tiny["policy"], **kw.pop("inputs", {})}
    cfg = label.Config(**{"n_prompts": 16, "k": 3, "sampling": {"max_new_tokens": 12}, "heldout_frac": 0.25, **kw})
    return execute("label", cfg, inputs, out)


def test_scorer_judge_prefers_the_clean_line():
    (sa, sb), = ScorerJudge(PEP8_ORACLE).score([PAIR])
    (oa, ob), = oracle([PAIR], PEP8_ORACLE)
    assert oa == 0 and ob > 0  # violations per char: lower is better
    assert sa > sb and (sa, sb) == (-oa, -ob)  # judge scores: higher is better
    (sb2, sa2), = ScorerJudge(PEP8_ORACLE).score([Pair(PAIR.prompt, DIRTY, CLEAN, PAIR.context)])
    assert sa2 > sb2


def test_reward_model_judge_ranks_by_its_reward_model(tmp_path):
    from alignpipe.lm.reward_model import reward_scores

    judge = RewardModelJudge(str(make_reward(tmp_path / "rm", seed=3)))
    pairs = [PAIR, Pair(PAIR.prompt, DIRTY, CLEAN)]
    (sa, sb), (sc, sd) = judge.score(pairs)
    assert (sa, sb) == (sd, sc)  # a reward model scores each completion on its own: order does not matter
    assert [sa, sb] == reward_scores(judge.model, judge.tok, [PAIR.prompt] * 2, [CLEAN, DIRTY])
    # that a TRAINED reward model picks the clean line: tests/test_reward.py


class _Stub(LLMJudge):
    """An llm judge whose answer log-probabilities come from a rule on the question text."""

    def __init__(self, rule, tok):
        super().__init__("stub", model=object(), tok=tok)
        self.rule = rule

    def answer_logprobs(self, questions):
        return [self.rule(q) for q in questions]


def _shown(question: str, letter: str) -> str:
    return question.split(f"### Next line {letter}\n", 1)[1].split("\n\n", 1)[0]


def test_llm_judge_order_swap_cancels_position_bias():
    tok = make_tokenizer()
    always_a = _Stub(lambda q: (0.0, -5.0), tok)  # always answers "A", whatever is shown there
    (sa, sb), = always_a.score([PAIR])
    assert sa == pytest.approx(0.5) and sb == pytest.approx(0.5)  # a tie after averaging both orders

    # prefers the spaced-out line wherever it is shown: picks it in both orders
    content = _Stub(lambda q: (0.0, -5.0) if " + " in _shown(q, "A") else (-5.0, 0.0), tok)
    (sa, sb), = content.score([PAIR])
    (sc, sd), = content.score([Pair(PAIR.prompt, DIRTY, CLEAN)])
    assert sa > 0.99 and sb < 0.01 and sd > 0.99 and sc < 0.01


def test_llm_judge_with_a_tiny_model_is_symmetric(tmp_path):
    judge = LLMJudge(str(make_policy(tmp_path / "lm", seed=1)), max_length=128)
    assert judge.question("x = 1", "\n    a", "\n    b").endswith("### Answer:")
    (sa, sb), = judge.score([PAIR])
    (sc, sd), = judge.score([Pair(PAIR.prompt, DIRTY, CLEAN)])
    assert sa + sb == pytest.approx(1.0) and 0 < sa < 1
    assert sa == pytest.approx(sd, abs=1e-6) and sb == pytest.approx(sc, abs=1e-6)  # swapping the pair mirrors it
    lp = judge.answer_logprobs([judge.question(PAIR.prompt, CLEAN, DIRTY)])
    assert len(lp) == 1 and all(v < 0 for v in lp[0])


def test_candidate_pairs_drop_invalid_identical_and_repeated():
    comps = ["\n    x = 1", "\n    x = 1", "\n", "\n    y = 2", " + 1"]
    pairs, invalid, identical = label.candidate_pairs([(comps[i], comps[j]) for i, j in label.index_pairs(5, "all")])
    assert pairs == [("\n    x = 1", "\n    y = 2")]
    assert invalid == 7 and identical == 2  # blank or not a new line; (0,1) equal; (1,3) repeats (0,3)
    assert label.index_pairs(4, "disjoint") == [(0, 1), (2, 3)]


def test_label_stage_writes_valid_oracle_preferences(tiny, tmp_path, monkeypatch):
    from alignpipe.stages import validate

    monkeypatch.setattr("alignpipe.lm.policy.sample", fake_sample)
    metrics = _run_label(tiny, tmp_path / "label", cap_retries=0)  # no new draws: some pairs stay unscorable
    out = tmp_path / "label"
    train = [json.loads(line) for line in (out / "prefs.jsonl").read_text().splitlines()]
    heldout = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert metrics["n_pairs"] == len(train) + len(heldout) > 0 and heldout
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in heldout})
    for r in train + heldout:
        assert r["chosen"].startswith("\n") and r["rejected"].startswith("\n") and r["chosen"] != r["rejected"]
        assert "<|aligned|>" not in r["prompt"] and r["judge"] == "scorer"
        assert r["oracle_chosen"] < r["oracle_rejected"]  # ties dropped: the oracle strictly prefers chosen
        assert r["score_chosen"] == -r["oracle_chosen"]
        assert "g = (1," not in r["chosen"] + r["rejected"]  # unscorable (E9: unclosed bracket) pairs dropped
    assert metrics["mean_score_gap"] > 0 and "judge_oracle_agreement" not in metrics
    assert metrics["n_ties"] > 0 and metrics["n_samples"] == 16 * 3  # e.g. two clean lines
    assert metrics["n_unscorable_pairs"] > 0
    for name in ("prefs.jsonl", "heldout.jsonl"):
        checked = validate.run(validate.Config(), {"corpus": None, "prefs": out / name}, tmp_path / f"v-{name}")
        assert checked["n_failed_expectations"] == 0


def test_label_reports_drops_by_cause_and_the_cap_rate(tiny, tmp_path, monkeypatch):
    from alignpipe.lm.policy import PolicyMeta

    monkeypatch.setattr("alignpipe.lm.policy.sample", fake_sample)
    m = _run_label(tiny, tmp_path / "label", cap_retries=0)
    prompts = [r["prompt"] for r in label.load_train_prompts(tiny["data"], 16, 0) for _ in range(3)]
    drawn = fake_sample(None, None, PolicyMeta(prompt_suffix="<|aligned|>"), prompts, None, seed=0, progress="x")
    assert 0 < m["cap_reached_frac"] == sum(s.capped for s in drawn) / len(drawn)
    assert m["n_unscorable_capped_pairs"] == m["n_unscorable_pairs"] > 0 and m["n_unscorable_other_pairs"] == 0
    n_sampled = 16 * 3  # K=3: three pairs per prompt
    assert m["dropped_capped_frac"] == m["n_unscorable_capped_pairs"] / n_sampled
    assert m["dropped_tie_frac"] == m["n_ties"] / n_sampled > 0
    dropped = (m["n_invalid_pairs"] + m["n_identical_pairs"] + m["n_unscorable_pairs"] + m["n_ties"]) / n_sampled
    assert abs(dropped + m["kept_pair_frac"] - 1) < 1e-9  # every sampled pair is kept or dropped for one cause


def test_label_draws_rows_cut_at_the_cap_again(tiny, tmp_path, monkeypatch):
    """Rows whose sample reached the cap mid-line are sampled again (the next seed, only those rows) up to
    cap_retries times: fewer pairs are dropped for truncation, and the rates before and after are reported."""
    calls = []

    def counting(model, tok, meta, prompts, sampling, seed=0, greedy=False, progress=None, unit=None):
        drawn = fake_sample(model, tok, meta, prompts, sampling, seed=seed, greedy=greedy, progress=progress)
        calls.append((len(prompts), seed, sum(s.capped for s in drawn)))
        return drawn

    monkeypatch.setattr("alignpipe.lm.policy.sample", counting)
    before = _run_label(tiny, tmp_path / "none", cap_retries=0)
    assert len(calls) == 1 and before["cap_final_frac"] == before["cap_reached_frac"] > 0
    calls.clear()
    after = _run_label(tiny, tmp_path / "three", cap_retries=3)
    assert calls[0] == (16 * 3, 0, round(after["cap_reached_frac"] * 48))  # the same first draw
    for (_, seed, capped), (rows, next_seed, _) in zip(calls, calls[1:]):
        assert rows == capped and next_seed == seed + 1  # only the capped rows, each time with the next seed
    assert len(calls) <= 4 and after["cap_final_frac"] == calls[-1][2] / 48 < after["cap_reached_frac"]
    assert after["n_unscorable_capped_pairs"] < before["n_unscorable_capped_pairs"]
    assert after["n_pairs"] > before["n_pairs"]


def test_label_mixes_validated_human_pairs_and_reports_agreement(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("alignpipe.lm.policy.sample", fake_sample)
    human = make_prefs(tmp_path / "human.jsonl", n=10)
    metrics = _run_label(tiny, tmp_path / "label", judge="reward_model", keep_ties=True, human_pairs=6,
                         inputs={"human_prefs": human, "judge_model": make_reward(tmp_path / "rm")})
    rows = [json.loads(line) for f in ("prefs.jsonl", "heldout.jsonl")
            for line in (tmp_path / "label" / f).read_text().splitlines()]
    assert metrics["n_human_pairs"] == 6 == sum(r["judge"] == "human" for r in rows)
    assert 0 <= metrics["judge_oracle_agreement"] <= 1
    checked = json.loads((tmp_path / "label" / "input_validation.json").read_text())["files"]
    assert [(Path(f["path"]).name, f["success"]) for f in checked] == [("human.jsonl", True)]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x = 1", "chosen": "\ny = 2", "rejected": "\ny = 2"}) + "\n")
    with pytest.raises(DataError):
        _run_label(tiny, tmp_path / "label2", inputs={"human_prefs": bad})
    assert not (tmp_path / "label2").exists()


def test_label_config_rejects_bad_values():
    with pytest.raises(ValueError, match="label.k"):
        label.Config(k=1)
    with pytest.raises(ValueError, match="label.k"):
        label.Config(k=3, pairing="disjoint")
