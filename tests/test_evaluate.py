"""evaluate: the estimators against hand computations on fixed samples, and a tiny end-to-end run whose report
has every candidate (and the registered champion)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import tiny
from alignpipe.core.errors import ConfigError
from alignpipe.oracle import policy_eval
from alignpipe.oracle.scoring import CompletionScore
from alignpipe.stages import evaluate
from alignpipe.tracking import registry, runs


def test_win_rate_and_kl_equal_hand_computation():
    # Per prompt (violations, chars): 0.1 vs 0 (loss), 0 vs 0 (tie), 0.2 vs 0.1 (loss), empty vs 0.1 (loss),
    # 0.1 vs empty (win): (0 + 0.5 + 0 + 0 + 1) / 5 = 0.3.
    cand = [CompletionScore(1, 10, False), CompletionScore(0, 5, False), CompletionScore(2, 10, False),
            CompletionScore(0, 0, False), CompletionScore(1, 10, False)]
    ref = [CompletionScore(0, 10, False), CompletionScore(0, 8, False), CompletionScore(1, 10, False),
           CompletionScore(1, 10, False), CompletionScore(0, 0, False)]
    # Against itself every prompt ties: 0.5.
    metrics = policy_eval.compare(cand, ref, [-1.0, -2.5, -0.5, -4.0, -3.0], [-2.0, -2.0, -1.5, -1.0, -3.5],
                                  champion_scores=cand)
    assert metrics["win_rate_vs_ref"] == pytest.approx(0.3)
    assert metrics["win_rate_vs_ref_nontied"] == pytest.approx(1 / 4)  # 1 win, 3 losses, the tie left out
    # ceiling: the two clean reference samples can only be tied (1/2 each), the others beaten: (0.5 * 2 + 3) / 5
    assert metrics["win_rate_ceiling"] == pytest.approx(0.8)
    assert metrics["win_rate_vs_champion"] == pytest.approx(0.5)
    # KL: mean of (log p - log p_ref) = (1 - 0.5 + 1 - 3 + 0.5) / 5 = -0.2
    assert metrics["kl_to_ref"] == pytest.approx(-0.2)
    # Mean violations/char over the 4 non-empty samples: (0.1 + 0 + 0.2 + 0.1) / 4; one of five is clean.
    assert metrics["violations_per_char"] == pytest.approx(0.1)
    assert metrics["zero_violation_frac"] == pytest.approx(0.2)


def test_sampled_kl_equals_token_by_token_hand_computation(tmp_path):
    """The KL evaluate reports (batched, padded sequence_logprobs) equals log-probabilities computed one prefix
    at a time, on fixed token sequences."""
    import torch

    from alignpipe.lm.policy import load_policy, sequence_logprobs

    tok = tiny.make_tokenizer()
    policy = load_policy(tiny.make_policy(tmp_path / "p", seed=1, tok=tok))[0]
    ref = load_policy(tiny.make_policy(tmp_path / "r", seed=2, tok=tok))[0]
    prompts = [tok("def f(a, b):")["input_ids"], tok("x = 1")["input_ids"], tok("import os")["input_ids"]]
    completions = [tok("\n    return a + b")["input_ids"], tok("\ny = [1, 2]")["input_ids"], []]

    def by_hand(model, p, c):
        total = 0.0
        for i, token in enumerate(c):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p + c[:i]])).logits[0, -1]
            total += float(torch.log_softmax(logits.float(), -1)[token])
        return total

    expected = sum(by_hand(policy, p, c) - by_hand(ref, p, c) for p, c in zip(prompts, completions)) / 3
    scores = [CompletionScore(0, 5, False)] * 3
    got = policy_eval.compare(scores, scores, sequence_logprobs(policy, prompts, completions),
                              sequence_logprobs(ref, prompts, completions))["kl_to_ref"]
    assert got == pytest.approx(expected, abs=1e-4)
    assert expected != pytest.approx(0.0)


def test_heldout_loss_counts_every_predicted_token(tmp_path):
    import torch

    from alignpipe.lm.heldout import heldout_nll
    from alignpipe.lm.policy import load_policy

    model, tok, _ = load_policy(tiny.make_policy(tmp_path / "p"))
    texts = ["def f(a, b):\n    return a + b\n", "x = 1\n"]
    nll, n = heldout_nll(model, tok, texts, window=4, batch_size=3)  # evaluate's held-out NLL (alignpipe.lm.heldout)
    expected_nll, expected_n = 0.0, 0
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), 4):
            w = ids[start:start + 4]
            if len(w) < 2:
                continue
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([w])).logits[0].float(), -1)
            expected_nll -= sum(float(logp[i, w[i + 1]]) for i in range(len(w) - 1))
            expected_n += len(w) - 1
    assert n == expected_n
    assert nll == pytest.approx(expected_nll, rel=1e-4)


def test_extra_candidates_are_checked():
    with pytest.raises(ValueError, match="evaluate.extra_candidates"):
        evaluate.Config(extra_candidates=["no-equals-sign"])
    with pytest.raises(ConfigError, match="already used"):
        evaluate.candidate_dirs({"policy": Path("p"), "dpo": None, "ppo": None},
                                evaluate.Config(extra_candidates=["pretrain=p"]))


def test_cli_takes_only_the_candidates_given(tmp_path, monkeypatch):
    """A candidate's folder merely present at artifacts/<stage> is not evaluated: the CLI passes only the candidates
    given (dvc.yaml passes every one explicitly, from the registry)."""
    import yaml

    from alignpipe.cli.main import build_parser
    from alignpipe.run.runner import resolve_inputs
    from alignpipe.stages import CANDIDATES

    monkeypatch.chdir(tmp_path)
    for stage, _ in CANDIDATES:
        (tmp_path / "artifacts" / stage).mkdir(parents=True)
    (tmp_path / "data").mkdir()
    args = build_parser("evaluate").parse_args(["evaluate"])
    inputs = resolve_inputs("evaluate", {k[len("input_"):]: v for k, v in vars(args).items()
                                         if k.startswith("input_")})
    assert inputs["policy"] == Path("artifacts/pretrain")
    assert all(inputs[output] is None for _, output in CANDIDATES[1:])
    args = build_parser("evaluate").parse_args(["evaluate", "--dpo", "artifacts/dpo"])
    assert resolve_inputs("evaluate", {"policy": args.input_policy, "dpo": args.input_dpo})["dpo"] == Path(
        "artifacts/dpo")
    cmd = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())["stages"]["evaluate"]["cmd"]
    assert all(f"--{output} artifacts/{stage}" in cmd for stage, output in CANDIDATES[1:])


def _register_champion(tmp_path: Path, policy_dir: Path) -> None:
    """Register `policy_dir` as alignpipe-policy@champion through the register stage (a one-candidate report)."""
    from alignpipe.core.hashing import weights_sha256
    from alignpipe.run.runner import execute
    from alignpipe.reports.candidates import write_best
    from alignpipe.stages import register

    ev = tmp_path / "champion_eval"
    ev.mkdir()
    best = write_best({"best_candidate": "dpo", "candidates": {"dpo": {
        "path": str(policy_dir), "violations_per_char": 0.5, "weights_sha256": weights_sha256(policy_dir)}}}, ev)
    execute("register", register.Config(), {"best": best}, tmp_path / "champion_reg")


@pytest.mark.slow
def test_report_has_every_candidate_and_the_champion(tmp_path, tiny_data):
    tok = tiny.make_tokenizer()
    dirs = {name: tiny.make_policy(tmp_path / name, conditional=name != "mle", seed=i, tok=tok)
            for i, name in enumerate(["pretrain", "dpo", "ppo", "mle"])}
    reward = tiny.make_reward(tmp_path / "reward", tok=tok)
    _register_champion(tmp_path, dirs["dpo"])
    prompts = tmp_path / "prompts.jsonl"  # --prompts: any JSONL with a `prompt` field
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["def add(a, b):", "x = [1, 2,", "import os", "class A:", "for i in range(3):"]))
    cfg = evaluate.Config(n_prompts=0, sampling=dict(max_new_tokens=8, batch_size=8), ppl_max_chars=1500,
                          extra_candidates=[f"mle={dirs['mle']}"])
    from alignpipe.run.runner import execute

    out = tmp_path / "evaluate"
    metrics = execute("evaluate", cfg, {"data": tiny_data, "policy": dirs["pretrain"], "dpo": dirs["dpo"],
                                        "ppo": dirs["ppo"], "reward_model": reward, "prompts": prompts}, out)
    report = json.loads((out / "report.json").read_text())
    assert report["order"] == ["pretrain", "dpo", "ppo", "mle"]
    assert set(report["candidates"]) == {"pretrain", "dpo", "ppo", "mle"}
    assert report["prompts"]["n"] == 5
    for name, entry in report["candidates"].items():
        assert entry["path"] == str(dirs[name])
        for key in ("violations_per_char", "win_rate_vs_ref", "kl_to_ref", "reward_score", "heldout_ppl",
                    "win_rate_vs_champion"):
            assert f"{name}/{key}" in metrics, f"{name}/{key}"
        assert 1 < entry["heldout_ppl"] < 10 * len(tok)
    # The reference against itself: KL 0, every prompt a tie.
    assert metrics["pretrain/kl_to_ref"] == 0.0 and metrics["pretrain/win_rate_vs_ref"] == 0.5
    assert metrics["dpo/kl_to_ref"] != 0.0
    best = report["best_candidate"]
    assert metrics["best_candidate_index"] == report["order"].index(best)
    assert report["candidates"][best]["violations_per_char"] == min(
        c["violations_per_char"] for c in report["candidates"].values())
    # best/: the chosen policy's directory with its report entry (what export and register read)
    from alignpipe.core.hashing import weights_sha256

    chosen = json.loads((out / "best" / "candidate.json").read_text())
    assert chosen["best_candidate"] == best and chosen["candidates"] == {best: report["candidates"][best]}
    assert weights_sha256(out / "best") == report["candidates"][best]["weights_sha256"] == weights_sha256(dirs[best])
    assert {p.name for p in dirs[best].iterdir()} < {p.name for p in (out / "best").iterdir()}
    # The champion, reloaded from the registry, is the dpo policy: same samples, so the same score and all ties.
    assert report["champion"]["version"] == "1"
    assert report["champion"]["violations_per_char"] == pytest.approx(metrics["dpo/violations_per_char"])
    assert metrics["dpo/win_rate_vs_champion"] == 0.5
    for name in ("report.md", "score_vs_kl.png", "score_distributions.png", "samples.jsonl", "metrics.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "score_vs_kl.png").read_bytes()[:4] == b"\x89PNG"
    summary = (out / "report.md").read_text()
    assert all(f"| {n} |" in summary or f"**{n}**" in summary for n in report["order"])
    page = (out / "report.html").read_text()  # the same report as one page, logged with the MLflow run
    assert all(f'data-name="{n}"' in page for n in report["order"]) and page.count('<img class="plot"') == 2
    client = registry.client()
    [run] = client.search_runs([client.get_experiment_by_name(runs.EXPERIMENT).experiment_id],
                               filter_string="tags.mlflow.runName = 'evaluate'")
    assert {"report.html", "report.md"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 5 * 5  # four candidates and the champion
    assert math.isfinite(metrics["mle/kl_to_ref"])
    # The score-vs-KL frontier for DVC plots: a header, then one row per candidate with report.json's values.
    header, *lines = (out / "frontier.tsv").read_text().splitlines()
    assert header.split("\t") == ["candidate", "kl", "violations_per_char", "ci_low", "ci_high"]
    assert [line.split("\t")[0] for line in lines] == report["order"]
    for line in lines:
        name, *values = line.split("\t")
        m = report["candidates"][name]
        assert [float(v) for v in values] == [m["kl_to_ref"], m["violations_per_char"],
                                              m["violations_per_char_ci_low"], m["violations_per_char_ci_high"]]
