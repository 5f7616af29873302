"""One validator at every entry: reward, dpo, label (human pairs) and data build (a user corpus) check their input
files with the validate stage's validators and the `validate` params section's limits before any work; each
failure is one line naming file, line, field and reason, with a non-zero exit and nothing published."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignpipe.cli.main import main

GOOD = [{"prompt": f"def f{i}(a, b):", "chosen": f"\n    return a + b * {i}", "rejected": f"\n    return a+b *{i}"}
        for i in range(40)]


def _write(path: Path, rows: list, blank_after: int | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, the one failure line): each failed expectation is one `validate: FAIL` line; the error line
    after them names the file and the count."""
    code = main(argv)
    err = capsys.readouterr().err
    fails = [line for line in err.splitlines() if line.startswith("validate: FAIL ")]
    assert len(fails) == 1 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert " expectations failed: " in last and fails[0].split(": ", 2)[2].split(" (")[0] in last, last
    return code, fails[0]


def _stage(stage: str, prefs: Path, tmp_path: Path, *extra: str) -> list[str]:
    policy = tmp_path / "policy"  # never loaded: the inputs are rejected first
    policy.mkdir(exist_ok=True)
    inputs = ["--prefs", str(prefs), "--policy", str(policy)]
    if stage == "dpo":
        (tmp_path / "data").mkdir(exist_ok=True)
        inputs += ["--data", str(tmp_path / "data")]
    return [stage, *inputs, "--out", str(tmp_path / f"out-{stage}"), *extra]


@pytest.mark.parametrize("stage", ["reward", "dpo"])
@pytest.mark.parametrize("bad, line, field, reason", [
    ({"chosen": "\n    x = 1", "rejected": "\n    x = 1"}, 8, "chosen, rejected", "unique_within_record"),
    ({"chosen": "\n    x = 1\u0000"}, 8, "chosen", "not_match_regex"),
    ({"prompt": ""}, 8, "prompt", "value_lengths_to_be_between"),
    ({"prompt": "def f():<|aligned|>"}, 8, "prompt", "'<|aligned|>' holds a control or chat-template token"),
])
def test_reward_and_dpo_reject_bad_pairs_before_any_work(stage, bad, line, field, reason, tmp_path, capsys):
    rows = [dict(r) for r in GOOD]
    rows[6].update(bad)
    prefs = _write(tmp_path / "prefs.jsonl", rows, blank_after=3)  # a blank line: file line 8 is row 7
    code, fail = _run(_stage(stage, prefs, tmp_path), capsys)
    assert code == 1 and not (tmp_path / f"out-{stage}").exists()
    assert fail.startswith(f"validate: FAIL {prefs}: ") and reason in fail
    assert f"({field})" in fail and f"e.g. line {line}:" in fail


def test_duplicate_is_reported_at_its_two_exact_lines(tmp_path, capsys):
    rows = [dict(r) for r in GOOD]
    rows[39] = dict(rows[0])  # line 1 and line 41 (after the blank line 3)
    rows[20] = dict(rows[1])  # another duplicate group: must not be mixed in
    prefs = _write(tmp_path / "prefs.jsonl", rows, blank_after=2)
    code, err = _run(_stage("reward", prefs, tmp_path), capsys)
    assert code == 1
    assert "compound_columns_to_be_unique (prompt, chosen, rejected): 4 rows, e.g. lines 1, 41:" in err


@pytest.mark.parametrize("messages", [[{"role": "hacker", "content": "x = 1"}], [{"content": "x = 1"}]])
def test_dpo_rejects_conversational_rows_with_a_bad_role(messages, tmp_path, capsys):
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in GOOD]
    rows[4]["chosen"] = messages
    prefs = _write(tmp_path / "prefs.jsonl", rows)
    code, err = _run(_stage("dpo", prefs, tmp_path), capsys)
    assert code == 1 and "(chosen)" in err and "e.g. line 5:" in err


def test_dpo_fails_fast_on_a_50mb_line(tmp_path, capsys):
    import resource
    import time

    rows = [dict(r) for r in GOOD]
    rows[2]["chosen"] = "\n    x = " + "1" * 50_000_000
    prefs = _write(tmp_path / "prefs.jsonl", rows)
    start = time.perf_counter()
    code = main(_stage("dpo", prefs, tmp_path))
    err = capsys.readouterr().err
    # the bounded reader stops at the line before parsing it (alignpipe.core.io): one line, file and line number
    assert code == 1 and time.perf_counter() - start < 60 and "Traceback" not in err
    assert f"{prefs}:3: line longer than" in err and len(err.strip().splitlines()) == 1, err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 3 * 2**20  # KiB: under 3 GiB (was 9.8 GB)


def test_limits_come_from_the_validate_section(tmp_path, capsys):
    """The same `validate.max_field_chars` that the validate stage uses bounds reward's pairs."""
    prefs = _write(tmp_path / "prefs.jsonl", GOOD)
    code = main(_stage("reward", prefs, tmp_path, "--set", "validate.max_field_chars=10"))
    err = capsys.readouterr().err
    assert code == 1 and "value_lengths_to_be_between (chosen): 40 rows, e.g. line 1:" in err


def test_data_build_checks_a_user_corpus(tmp_path, capsys):
    corpus = _write(tmp_path / "corpus.jsonl", [{"text": "x = 1\n"}, {"text": " "}, {"text": "y = 2\n"}])
    code, err = _run(["data", "build", "--corpus", str(corpus), "--out", str(tmp_path / "data")], capsys)
    assert code == 1 and not (tmp_path / "data").exists()
    assert err.startswith(f"validate: FAIL {corpus}: ") and "e.g. line 2:" in err and "(text)" in err
