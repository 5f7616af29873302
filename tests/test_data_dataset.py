"""`alignpipe data build --dataset`: preference or prompt data read through `datasets` (local JSONL/Parquet here), in
TRL's standard and conversational forms, written as the pipeline's data files that validate accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tiny
from alignpipe.cli.main import main
from alignpipe.tasks import task_of

ROOT = Path(__file__).resolve().parents[1]
PARAMS = str(ROOT / "configs" / "tiny.yaml")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def build(capsys, out: Path, *args: str) -> tuple[int, str]:
    code = main(["data", "build", *args, "--out", str(out), "--params", PARAMS])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_conversational_pairs_become_the_pipelines_files_and_pass_validate(suffix, tmp_path, capsys):
    source = tiny.make_chat_prefs(tmp_path / f"prefs{suffix}", n=40)
    out = tmp_path / "data"
    code, err = build(capsys, out, "--dataset", str(source), "--task", "chat")
    assert code == 0, err
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert manifest["task"] == "chat" and manifest["form"] == "conversational" and manifest["kind"] == "preference"
    assert str(task_of(out)) == "chat"
    prefs, heldout = _rows(out / "prefs.jsonl"), _rows(out / "heldout.jsonl")
    assert len(prefs) + len(heldout) == 40 and prefs and heldout
    by_prompt = {json.dumps(r["prompt"]): r for r in tiny.chat_rows(40)}
    assert all(by_prompt[json.dumps(r["prompt"])] == r for r in prefs + heldout)  # messages kept as they were
    held = {json.dumps(r["prompt"]) for r in heldout}
    assert held.isdisjoint(json.dumps(r["prompt"]) for r in prefs)  # split by prompt
    assert {json.dumps(r["prompt"]) for r in _rows(out / "prompts.jsonl")} <= held
    corpus = _rows(out / "train.jsonl")
    assert corpus[0]["messages"][-1]["role"] == "assistant" and corpus[0]["text"].endswith(
        corpus[0]["messages"][-1]["content"])

    code, err = main(["validate", "--corpus", str(out), "--prefs", str(out / "prefs.jsonl"),
                      "--out", str(tmp_path / "v"), "--params", PARAMS]), capsys.readouterr().err
    assert code == 0, err
    report = json.loads((tmp_path / "v" / "report.json").read_text())
    forms = {Path(f["path"]).name: f.get("form") for f in report["files"]}
    assert forms["prompts.jsonl"] == forms["prefs.jsonl"] == "conversational"
    checked = {e["column"] for f in report["files"] for e in f["expectations"]}
    assert {"prompt.roles", "chosen.roles", "rejected.roles", "messages.roles"} <= checked


def test_standard_pairs_and_prompt_only_data(tmp_path, capsys):
    pairs = tmp_path / "std.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": f" A{i}.", "rejected": " no"}) + "\n"
                             for i in range(30)))
    code, err = build(capsys, tmp_path / "a", "--dataset", str(pairs))
    assert code == 0, err
    assert str(task_of(tmp_path / "a")) == "pep8"
    assert isinstance(_rows(tmp_path / "a" / "prefs.jsonl")[0]["chosen"], str)

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"Hi {i}"}]}) + "\n"
                               for i in range(30)))
    code, err = build(capsys, tmp_path / "b", "--dataset", str(prompts), "--task", "chat")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "b").glob("*.jsonl")) == ["prompts.jsonl", "train_prompts.jsonl"]


def test_implicit_prompt_is_extracted(tmp_path, capsys):
    """UltraFeedback/HH style: chosen and rejected are whole conversations sharing the prompt turns."""
    rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in tiny.chat_rows(30)]
    path = tmp_path / "implicit.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, err = build(capsys, tmp_path / "d", "--dataset", str(path), "--task", "chat")
    assert code == 0, err
    got = _rows(tmp_path / "d" / "prefs.jsonl")[0]
    assert got["prompt"][-1]["role"] == "user" and [m["role"] for m in got["chosen"]] == ["assistant"]


@pytest.mark.parametrize("case,message", [
    ("missing", "cannot read split 'train' with datasets"),
    ("split", "cannot read split 'test' with datasets"),
    ("chat_needs_dataset", "task chat has no data of its own"),
    ("standard_for_chat", "task chat needs conversational rows"),
])
def test_bad_dataset_is_one_line_and_nothing_written(case, message, tmp_path, capsys):
    source = tiny.make_chat_prefs(tmp_path / "prefs.jsonl", n=10)
    std = tmp_path / "std.jsonl"
    std.write_text(json.dumps({"prompt": "Q?", "chosen": "A", "rejected": "B"}) + "\n")
    args = {"missing": ["--dataset", str(tmp_path / "nope")], "split": ["--dataset", str(source), "--split", "test"],
            "chat_needs_dataset": ["--task", "chat"], "standard_for_chat": ["--dataset", str(std), "--task", "chat"]}
    out = tmp_path / "out"
    code, err = build(capsys, out, *args[case])
    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("alignpipe data: error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and not out.exists()
