"""Acceptance: a task defined here (its own tiny data and its own oracle), loaded by `data.task: test_toy_task:Quiet`,
runs data -> validate -> reward -> dpo -> evaluate through the CLI; no stage knows it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tiny
from alignpipe.oracle.scoring import CompletionScore
from alignpipe.tasks import Task, write_manifest

SPEC = "test_toy_task:Quiet"  # tests/ is on sys.path (pytest's rootdir conftest)


def shouting(context: str, completion: str) -> CompletionScore:
    """The toy oracle: upper-case letters are violations (lower per character is better)."""
    text = completion.strip()
    return CompletionScore(sum(c.isupper() for c in text), len(text), truncated=False)


class Quiet(Task):
    """Continue a line of code without shouting: prompts are code, a completion is the policy sampler's one line,
    the oracle counts upper-case letters."""

    def conversational(self) -> bool:
        return False

    def build_data(self, cfg, inputs, out_dir: Path) -> dict[str, float]:
        from alignpipe.core.io import HELDOUT_FILE, PREFS_FILE, write_jsonl

        rows = [{"prompt": f"x{i} = {i}", "chosen": f"\ny{i} = x{i} + 1", "rejected": f"\nY{i} = X{i} + 1"}
                for i in range(40)]
        files = {PREFS_FILE: rows[:24], HELDOUT_FILE: rows[24:32],
                 "prompts.jsonl": [{"prompt": r["prompt"]} for r in rows[32:]],
                 "train_prompts.jsonl": [{"prompt": r["prompt"]} for r in rows[:24]],
                 **{f"{split}.jsonl": [{"text": r["prompt"] + r["chosen"] + "\n"} for r in part]
                    for split, part in (("train", rows[:24]), ("val", rows[24:32]), ("test", rows[32:]))}}
        for name, items in files.items():
            write_jsonl(out_dir / name, items)
        write_manifest(out_dir, self, {"counts": {name: len(items) for name, items in files.items()}})
        return {"n_train_chunks": 24, "n_val_chunks": 8, "n_test_chunks": 8, "n_prompts": 8, "corpus_mb": 0.0}

    def format_prompt(self, prompt, tok, meta=None) -> str:
        return meta.format_prompt(prompt) if meta is not None else prompt

    def oracle(self):
        return shouting

    def gate(self) -> tuple[str, bool]:
        return "violations_per_char", False

    def describe(self) -> dict[str, str]:
        return {"scorer": "upper-case letters per character", "guard_score": "upper-case letters per character"}


class Mute(Task):
    """A task without its gate: refused on load."""

    def conversational(self) -> bool:
        return False

    def format_prompt(self, prompt, tok, meta=None) -> str:
        return prompt

    def oracle(self):
        return shouting

    def describe(self) -> dict[str, str]:
        return {}


def test_a_toy_task_runs_data_validate_reward_dpo_evaluate_through_the_cli(tmp_path, capsys, monkeypatch):
    from alignpipe.cli.main import main

    monkeypatch.chdir(tmp_path)  # evaluate's optional candidates default to artifacts/<stage>: none here
    from alignpipe.tasks import task_of

    root = Path(__file__).resolve().parents[1]
    policy = tiny.make_policy(tmp_path / "policy")
    base = ["--params", str(root / "configs" / "tiny.yaml")]
    d, rm, dpo, ev = (str(tmp_path / n) for n in ("data", "rm", "dpo", "evaluate"))
    assert main(["data", "build", *base, "--task", SPEC, "--out", d]) == 0
    assert str(task_of(d)) == SPEC and isinstance(task_of(d), Quiet)
    assert main(["validate", *base, "--corpus", d, "--prefs", f"{d}/prefs.jsonl", "--out", str(tmp_path / "v")]) == 0
    assert main(["reward", *base, "--prefs", d, "--policy", str(policy), "--out", rm]) == 0
    assert main(["dpo", *base, "--set", "dpo.eval_heldout=true", "--data", d, "--prefs", d, "--policy", str(policy),
                 "--out", dpo]) == 0
    dpo_metrics = json.loads(Path(dpo, "metrics.json").read_text())
    assert 0 <= dpo_metrics["violations_per_char"] <= 1  # dpo checked itself with the toy oracle
    assert main(["evaluate", *base, "--set", "evaluate.compare_champion=false", "--data", d, "--policy", str(policy),
                 "--dpo", dpo, "--reward-model", rm, "--out", ev]) == 0
    report = json.loads(Path(ev, "report.json").read_text())
    assert (report["task"], report["gate_metric"], report["gate_direction"]) == (SPEC, "violations_per_char", "lower")
    assert set(report["candidates"]) == {"pretrain", "dpo"} and report["best_candidate"] in report["candidates"]
    samples = [json.loads(x) for x in Path(ev, "samples.jsonl").read_text().splitlines()]
    for s in samples:  # the toy oracle scored them: violations are the upper-case letters
        assert s["violations"] == sum(c.isupper() for c in s["completion"].strip())


def test_a_task_spec_lacking_a_method_fails_the_data_build_in_one_line(tmp_path, capsys):
    from alignpipe.cli.main import main

    code = main(["data", "build", "--task", "test_toy_task:Mute", "--out", str(tmp_path / "d")])
    err = [line for line in capsys.readouterr().err.splitlines() if "test_toy_task:Mute" in line]
    assert code != 0 and len(err) == 1
    assert err[0].endswith("data.task: task 'test_toy_task:Mute' lacks method gate() of alignpipe.tasks.Task "
                           "(missing: gate)")
    assert not (tmp_path / "d").exists()
