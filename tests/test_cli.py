"""The CLI: --help everywhere, clear one-line errors with non-zero exits."""

from __future__ import annotations

import pytest

from alignpipe.cli.main import main
from alignpipe.stages import STAGE_NAMES


@pytest.mark.parametrize("argv", [[], ["data", "build"], ["pipeline"], ["config", "show"], *[[s] for s in STAGE_NAMES]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: alignpipe" in out
    if argv and argv[0] in STAGE_NAMES:
        assert "--out" in out and "--params" in out and f"--set {argv[0]}.KEY=VALUE" in out


def test_unknown_set_key_names_it(tmp_path, capsys):
    code = main(["data", "build", "--out", str(tmp_path / "d"), "--set", "data.n_promptz=3"])
    err = capsys.readouterr().err
    assert code == 2
    assert "data.n_promptz: unknown key" in err and "n_prompts" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()


def test_bad_value_and_missing_params_file(tmp_path, capsys):
    assert main(["data", "build", "--out", str(tmp_path / "d"), "--set", "data.n_prompts=-1"]) == 2
    assert "data.n_prompts must be >= 1, got -1" in capsys.readouterr().err
    assert main(["data", "build", "--params", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: params file not found" in capsys.readouterr().err


def test_bad_user_corpus_is_one_line_exit_1(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "x = 1\\n"}\n{"text": \n')
    code = main(["data", "build", "--out", str(tmp_path / "d"), "--corpus", str(corpus)])
    err = capsys.readouterr().err.strip()
    assert code == 1
    # the validators every entry runs (alignpipe.data.validators): one line per failed check, then the error line
    fails = [line for line in err.splitlines() if line.startswith("validate: FAIL ")]
    assert len(fails) == 1 and f"{corpus}: expect_lines_to_be_json" in fails[0] and "Traceback" not in err
    # the error line itself names the file, the failed check and its example: readable without the lines above
    assert f"{corpus}: 1 of 4 expectations failed: expect_lines_to_be_json (line), e.g. line 2" in err.splitlines()[-1]
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d.partial"))
