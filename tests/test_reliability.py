"""Hostile inputs: no user file lost, inf rejected, credentials redacted, corrupt files explained in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from alignpipe.cli.main import main
from alignpipe.core.errors import DataError
from alignpipe.core.outputs import MARKER

GOOD = Path(__file__).parent / "data" / "good"
PARAMS = Path(__file__).parents[1] / "params.yaml"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def corpus_dir(tmp_path, monkeypatch) -> Path:
    """A working directory holding data/train.jsonl (a valid corpus split); the cwd is the working directory."""
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    shutil.copy(GOOD / "corpus.jsonl", work / "data" / "train.jsonl")
    shutil.copy(PARAMS, work / "params.yaml")
    monkeypatch.chdir(work)
    return work


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("alignpipe") and ": error: " in line]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------------ output safety

def test_validate_out_equal_to_its_corpus_is_refused_and_the_dataset_kept(corpus_dir, capsys):
    before = _snapshot(corpus_dir / "data")
    assert main(["validate", "--corpus", "data", "--out", "data"]) == 2
    assert "overlaps the input" in _one_error_line(capsys)
    assert _snapshot(corpus_dir / "data") == before


def test_out_naming_an_existing_file_is_refused_and_the_file_kept(corpus_dir, capsys):
    (corpus_dir / "some_file.txt").write_text("mine\n")
    assert main(["validate", "--corpus", "data", "--out", "some_file.txt"]) == 2
    assert "existing file" in _one_error_line(capsys)
    assert (corpus_dir / "some_file.txt").read_text() == "mine\n"


@pytest.mark.parametrize("out", ["..", ".", "../.."])
def test_out_naming_the_cwd_or_a_parent_is_refused_and_nothing_emptied(corpus_dir, monkeypatch, capsys, out):
    sub = corpus_dir / "sub"
    sub.mkdir()
    (sub / "keep.txt").write_text("x")
    monkeypatch.chdir(sub)
    before = _snapshot(corpus_dir)
    assert main(["validate", "--params", "../params.yaml", "--corpus", "../data", "--out", out]) == 2
    assert "current directory or one of its parents" in _one_error_line(capsys)
    assert _snapshot(corpus_dir) == before


@pytest.mark.parametrize("out", ["/", "/proc", "/etc/alignpipe"])
def test_out_naming_root_or_a_system_folder_is_refused(corpus_dir, capsys, out):
    assert main(["validate", "--corpus", "data", "--out", out]) == 2
    line = _one_error_line(capsys)
    assert "filesystem root" in line or "system folder" in line


def test_out_naming_home_is_refused(corpus_dir, monkeypatch, capsys, tmp_path):
    home = tmp_path / "home"
    (home / "notes").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    assert main(["validate", "--corpus", "data", "--out", str(home)]) == 2
    assert "home directory" in _one_error_line(capsys)
    assert (home / "notes").is_dir()


def test_out_naming_a_foreign_non_empty_directory_is_refused(corpus_dir, capsys):
    (corpus_dir / "mine").mkdir()
    (corpus_dir / "mine" / "thesis.tex").write_text("x")
    assert main(["validate", "--corpus", "data", "--out", "mine"]) == 2
    assert "did not create" in _one_error_line(capsys)
    assert (corpus_dir / "mine" / "thesis.tex").read_text() == "x"


def test_out_may_be_missing_empty_or_a_previous_alignpipe_output(corpus_dir):
    """DVC deletes a stage's outs before running it (missing), KFP hands an existing empty folder, and a rerun
    replaces the folder alignpipe made before."""
    assert main(["validate", "--corpus", "data", "--out", "artifacts/validate"]) == 0
    out = corpus_dir / "artifacts" / "validate"
    assert (out / MARKER).is_file() and (out / "report.json").is_file()
    (out / "stale.txt").write_text("from an older run")
    assert main(["validate", "--corpus", "data", "--out", "artifacts/validate"]) == 0
    assert not (out / "stale.txt").exists()
    (corpus_dir / "kfp_out").mkdir()
    assert main(["validate", "--corpus", "data", "--out", "kfp_out"]) == 0
    assert (corpus_dir / "kfp_out" / "report.json").is_file()


def test_a_foreign_staging_folder_is_not_deleted(corpus_dir, capsys):
    (corpus_dir / ".out.partial").mkdir()
    (corpus_dir / ".out.partial" / "mine.txt").write_text("x")
    assert main(["validate", "--corpus", "data", "--out", "out"]) == 2
    assert "did not create" in _one_error_line(capsys)
    assert (corpus_dir / ".out.partial" / "mine.txt").is_file()


@pytest.mark.parametrize("value", ["", ".", ".."])
def test_pretrain_checkpoint_dir_naming_the_cwd_is_refused_and_tokenizer_kept(corpus_dir, capsys, value):
    (corpus_dir / "tokenizer").mkdir()
    (corpus_dir / "tokenizer" / "vocab.json").write_text("{}")
    assert main(["pretrain", "--data", "data", "--out", "out", "--set", f"pretrain.checkpoint_dir={value}"]) == 2
    assert "pretrain.checkpoint_dir" in _one_error_line(capsys)
    assert (corpus_dir / "tokenizer" / "vocab.json").read_text() == "{}"
    assert not (corpus_dir / "out").exists()


def test_checkpoint_dir_that_is_a_foreign_folder_is_refused(corpus_dir, capsys):
    (corpus_dir / "mine").mkdir()
    (corpus_dir / "mine" / "step-0000001").mkdir()
    assert main(["ppo", "--policy", "data", "--reward-model", "data", "--out", "out",
                 "--set", "ppo.checkpoint_dir=mine"]) == 2
    assert "ppo.checkpoint_dir" in _one_error_line(capsys)
    assert (corpus_dir / "mine" / "step-0000001").is_dir()


def test_data_build_out_is_guarded(corpus_dir, capsys):
    before = _snapshot(corpus_dir / "data")
    assert main(["data", "build", "--corpus", "data/train.jsonl", "--out", "data"]) == 2
    assert _one_error_line(capsys)
    assert _snapshot(corpus_dir / "data") == before


def test_pipeline_run_local_root_is_guarded(corpus_dir, capsys):
    (corpus_dir / "mine").mkdir()
    (corpus_dir / "mine" / "a.txt").write_text("x")
    assert main(["pipeline", "run", "--local", "--root", "mine"]) == 2
    assert "--root mine" in _one_error_line(capsys)
    assert (corpus_dir / "mine" / "a.txt").is_file()


# ----------------------------------------------------------------------------------------------- config values

@pytest.mark.parametrize("item", ["pretrain.learning_rate=1e309", "pretrain.learning_rate=.inf",
                                  "pretrain.learning_rate=-.inf", "pretrain.learning_rate=.nan",
                                  "dpo.beta=1" + "0" * 400])
def test_non_finite_floats_are_rejected_naming_the_key(item, capsys):
    assert main(["config", "show", "--set", item]) == 2
    line = _one_error_line(capsys)
    assert item.split("=")[0] in line


@pytest.mark.parametrize("item", ["dpo.beta=.inf", "pretrain.learning_rate=1e309", "reward.learning_rate=-.inf"])
def test_pipeline_compile_rejects_inf_with_one_line(item, tmp_path, capsys):
    assert main(["pipeline", "compile", "--set", item, "--out", str(tmp_path / "p.yaml")]) == 2
    assert item.split("=")[0] in _one_error_line(capsys)
    assert not (tmp_path / "p.yaml").exists()


def test_pretrain_gpus_zero_means_a_cpu_node():
    from alignpipe.stages.pretrain import Config

    assert Config(gpus=0).gpus == 0
    with pytest.raises(ValueError, match="pretrain.gpus"):
        Config(gpus=-1)


# ----------------------------------------------------------------------------------------------- input readers

def test_deeply_nested_json_is_one_line_not_a_recursion_error(corpus_dir, capsys):
    (corpus_dir / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    assert main(["validate", "--prefs", "deep.jsonl", "--corpus", "", "--out", "out"]) == 1
    assert "deep.jsonl" in _one_error_line(capsys)
    from alignpipe.core.io import read_jsonl

    with pytest.raises(DataError, match="nested deeper"):
        read_jsonl(corpus_dir / "deep.jsonl")


def test_lone_surrogate_is_one_line(corpus_dir, capsys):
    row = {"prompt": "def f():", "chosen": "\n    return 1", "rejected": "\n    return \\ud800"}
    (corpus_dir / "sur.jsonl").write_text(json.dumps(row).replace("\\\\ud800", "\\ud800") + "\n")
    from alignpipe.core.io import read_jsonl

    with pytest.raises(DataError, match="surrogate"):
        read_jsonl(corpus_dir / "sur.jsonl")
    assert main(["validate", "--prefs", "sur.jsonl", "--corpus", "", "--out", "out"]) == 1
    assert "sur.jsonl" in _one_error_line(capsys)


def test_an_over_long_line_is_refused_before_parsing(tmp_path, monkeypatch):
    from alignpipe.core import io

    monkeypatch.setattr(io, "MAX_LINE_BYTES", 100)
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"text": "x" * 500}) + "\n")
    with pytest.raises(DataError, match="long.jsonl:1: line longer than 100 bytes"):
        io.read_jsonl(path)


def test_prefs_naming_a_device_is_not_called_a_directory(corpus_dir, capsys):
    assert main(["validate", "--prefs", "/dev/zero", "--corpus", "", "--out", "out"]) == 1
    line = _one_error_line(capsys)
    assert "not a regular file" in line and "directory" not in line.split("(")[0]


def test_data_build_with_empty_splits_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "x = 1\n", "source": "a.py"}) + "\n")
    assert main(["data", "build", "--corpus", "one.jsonl", "--out", "built"]) == 1
    assert "give no rows" in _one_error_line(capsys)
    assert not (tmp_path / "built").exists()


# --------------------------------------------------------------------------------------------- corrupt models

def test_corrupt_safetensors_and_truncated_tokenizer_are_one_line(tmp_path):
    import tiny

    from alignpipe.lm.policy import load_policy
    from alignpipe.lm.tokenizers import load_tokenizer

    policy = tiny.make_policy(tmp_path / "policy")
    weights = policy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DataError, match="model.safetensors|policy"):
        load_policy(policy, device="cpu")
    tok_file = policy / "tokenizer.json"
    tok_file.write_bytes(tok_file.read_bytes()[:50])
    with pytest.raises(DataError, match="cannot load the tokenizer"):
        load_tokenizer(policy)


def test_resume_skips_a_truncated_latest_checkpoint_and_says_so(tmp_path):
    import tiny
    from transformers import GPT2LMHeadModel

    from alignpipe.lm import training
    from alignpipe.lm.training import STEP_CHECKPOINT as CHECKPOINT_FILES

    tok = tiny.make_tokenizer()
    net = training.lm_with_value(GPT2LMHeadModel(tiny._config(tok)), False)
    opt, sched = training.make_optimizer(net, 1e-3, 0.0, 0.1, 10)
    for step in (1, 2):
        training.save_checkpoint(tmp_path, step, net, opt, sched, {"seed": 0})
    (tmp_path / "step-0000003.tmp").mkdir()  # a kill during a save leaves this: not a checkpoint
    found = training.checkpoints(tmp_path)
    assert [p.name for p in found] == ["step-0000001", "step-0000002"]
    state = found[-1] / "state.pt"
    state.write_bytes(state.read_bytes()[:64])
    said = []
    latest = training.latest_complete(tmp_path, "step", CHECKPOINT_FILES, log=said.append)
    assert latest == found[0] and training.load_checkpoint(latest, net, opt, sched, {"seed": 0}, "cpu") == 1
    assert len(said) == 1 and "step-0000002" in said[0] and "state.pt is truncated or corrupt" in said[0]
    (found[0] / "fingerprint.json").unlink()
    with pytest.raises(DataError, match="none of the 2 checkpoints is complete"):
        training.latest_complete(tmp_path, "step", CHECKPOINT_FILES, log=said.append)
    assert "fingerprint.json is missing" in said[-1]
    assert training.latest_complete(tmp_path / "none", "step", CHECKPOINT_FILES) is None


# ------------------------------------------------------------------------------------------------- redaction

def test_redact_hides_passwords_and_tokens():
    from alignpipe.tracking.runs import has_credentials, redact

    assert redact("https://alice:s3cret@mlflow.example.com/") == "https://alice:***@mlflow.example.com/"
    assert "tok123" not in redact("https://mlflow.example.com/?token=tok123&x=1")
    assert redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    assert not has_credentials("http://mlflow:5000") and has_credentials("postgresql://u:p@db/mlflow")


def test_pipeline_compile_refuses_a_uri_with_a_password_without_printing_it(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert main(["pipeline", "compile", "--mlflow-uri", "https://u:s3cret@mlflow/", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "s3cret" not in err and "password" in err
    assert not out.exists()


def test_a_local_run_never_writes_the_tracking_password_into_the_pipeline(tmp_path, monkeypatch):
    from alignpipe.cli.kfp import build, compile_pipeline
    from alignpipe.cli.main import build_parser

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://u:s3cret@mlflow.example.com/")
    args = build_parser("pipeline").parse_args(["pipeline", "run", "--local", "--root", str(tmp_path / "r")])
    text = compile_pipeline(build(args, local=True), tmp_path / "p.yaml").read_text()
    assert "s3cret" not in text


def test_the_serve_hint_is_redacted(tmp_path, monkeypatch, capsys):
    from alignpipe.cli.report import main as report_main

    (tmp_path / "register").mkdir()
    (tmp_path / "register" / "registered.json").write_text(json.dumps({"policy_name": "p"}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://u:s3cret@mlflow.example.com/")
    report_main(str(tmp_path))
    out = capsys.readouterr().out
    assert "MLFLOW_TRACKING_URI=https://u:***@mlflow.example.com/" in out and "s3cret" not in out


@pytest.mark.parametrize("argv", [["pipeline", "trainjob", "--stage", "pretrain", "--out", "{d}"],
                                  ["pipeline", "compile", "--out", "{d}"]])
def test_a_yaml_out_naming_a_folder_is_one_line(tmp_path, capsys, argv):
    assert main([a.replace("{d}", str(tmp_path)) for a in argv]) == 2
    assert "is a directory" in _one_error_line(capsys)


def test_deeply_nested_yaml_is_one_line(tmp_path, capsys):
    (tmp_path / "p.yaml").write_text("a: " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert main(["config", "show", "--params", str(tmp_path / "p.yaml")]) == 2
    assert "nested too deep" in _one_error_line(capsys)
    assert main(["config", "show", "--set", "dpo.beta=" + "[" * 100_000]) == 2
    assert "dpo.beta: value nested too deep" in _one_error_line(capsys)
