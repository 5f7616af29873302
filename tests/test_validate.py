"""The validate stage through the real CLI: every malformed fixture is rejected with exit 1 and one line naming the
file, the expectation and an example; good files pass and get a report and Data Docs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from alignpipe.cli.main import main
from alignpipe.core.config import build_config, load_params
from alignpipe.stages.validate import Config

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
PARAMS = str(ROOT / "configs" / "tiny.yaml")

# fixture -> (the failed expectation and its column, a piece of the example); tests/data/make_bad.py writes them.
BAD = {
    "prefs_empty_file.jsonl": ("expect_file_to_have_json_lines (file)", "file is empty"),
    "prefs_blank_lines_only.jsonl": ("expect_file_to_have_json_lines (file)", "3 blank lines, no JSON"),
    "prefs_malformed_json_line.jsonl": ("expect_lines_to_be_json (line)", "line 4: Expecting ',' delimiter"),
    "prefs_truncated_last_line.jsonl": ("expect_lines_to_be_json (line)", "line 4: Unterminated string"),
    "prefs_not_utf8.jsonl": ("expect_lines_to_be_valid_utf8 (line)", "line 4: invalid continuation byte 0xe9"),
    "prefs_utf8_bom.jsonl": ("expect_lines_to_be_json (line)", "line 1: Unexpected UTF-8 BOM"),
    "prefs_line_not_an_object.jsonl": ("expect_lines_to_be_json_objects (line)", "line 4: got a JSON array"),
    "prefs_missing_column.jsonl": ("expect_column_to_exist (rejected)", "no row has this column"),
    "prefs_row_missing_chosen.jsonl": ("expect_column_values_to_not_be_null (chosen)", "line 2: chosen=<missing>"),
    "prefs_null_chosen.jsonl": ("expect_column_values_to_not_be_null (chosen)", "line 2: chosen=null"),
    "prefs_wrong_type_chosen.jsonl": ("expect_column_values_to_be_in_set (chosen)", "line 3: chosen=42"),
    "prefs_nan_score.jsonl": ("expect_column_values_to_be_in_set (score_chosen)", "line 2: score_chosen=NaN"),
    "prefs_infinite_score.jsonl": ("expect_column_values_to_be_in_set (score_rejected)",
                                   "line 1: score_rejected=Infinity"),
    "prefs_boolean_score.jsonl": ("expect_column_values_to_be_in_set (score_chosen)", "line 3: score_chosen=true"),
    "prefs_conversational_chosen_is_string.jsonl": ("expect_column_values_to_be_in_set (chosen)",
                                                    'line 2: chosen="\\n    x = 1\\n"'),
    "corpus_missing_text.jsonl": ("expect_column_to_exist (text)", "no row has this column"),
    "prefs_empty_chosen.jsonl": ("expect_column_value_lengths_to_be_between (chosen)", 'line 2: chosen=""'),
    "prefs_whitespace_only_prompt.jsonl": ("expect_column_values_to_not_match_regex (prompt)",
                                           'line 3: prompt="   \\n\\t "'),
    "prefs_1mb_line.jsonl": ("expect_column_value_lengths_to_be_between (chosen)", "(1310720 chars)"),
    "prefs_chosen_equals_rejected.jsonl": ("expect_select_column_values_to_be_unique_within_record (chosen, rejected)",
                                           'line 2: chosen="\\nimport sys\\n", rejected="\\nimport sys\\n"'),
    "prefs_duplicate_rows.jsonl": ("expect_compound_columns_to_be_unique (prompt, chosen, rejected)",
                                   'lines 1, 4: prompt="def add(a, b):"'),
    "prefs_score_out_of_range.jsonl": ("expect_column_values_to_be_between (score_rejected)",
                                       "line 3: score_rejected=1000000000.0"),
    "prefs_conversational_bad_role.jsonl": ("expect_column_values_to_match_compiled_json_schema (chosen)",
                                            '"role": "robot"'),
    "prefs_conversational_blank_content.jsonl": ("expect_column_values_to_match_compiled_json_schema (rejected)",
                                                 'line 3: rejected=[{"role": "assistant", "content": " "}]'),
    "prefs_conversational_two_user_turns.jsonl": (
        "expect_column_values_to_match_regex (prompt.roles)",
        'line 2: prompt.roles="user,user" (turns must alternate user/assistant after an optional first system turn '
        'and end on a user turn)'),
    "prefs_conversational_empty_assistant_turn.jsonl": (
        "expect_column_values_to_match_compiled_json_schema (chosen)",
        'line 3: chosen=[{"role": "assistant", "content": ""}] (chosen/0/content: '),
    "corpus_whitespace_only_text.jsonl": ("expect_column_values_to_not_match_regex (text)",
                                          'line 2: text="\\n\\n    \\n"'),
    "corpus_violations_per_char_above_1.jsonl": ("expect_column_values_to_be_between (violations_per_char)",
                                                 "line 3: violations_per_char=1.5"),
    "corpus_negative_line_violations.jsonl": ("expect_column_values_to_match_regex (line_violations)",
                                              "line 1: line_violations=[0, -1]"),
}


def validate(capsys, out: Path, *args: str) -> tuple[int, str]:
    """Run `alignpipe validate ARGS --out OUT` in-process; returns (exit code, stderr)."""
    code = main(["validate", *args, "--out", str(out), "--params", PARAMS])
    return code, capsys.readouterr().err


def input_flags(path: Path) -> list[str]:
    """`--prefs PATH --corpus ''` (no corpus: the default `data` may exist in the working dir) or `--corpus PATH`."""
    return ["--prefs", str(path), "--corpus", ""] if path.name.startswith("prefs") else ["--corpus", str(path)]


def test_every_bad_fixture_has_a_test():
    on_disk = {p.name for p in (DATA / "bad").iterdir() if p.suffix == ".jsonl"}
    assert on_disk == set(BAD)
    assert len(on_disk) >= 15


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_is_rejected_with_one_line_naming_file_and_reason(name, tmp_path, capsys):
    path = DATA / "bad" / name
    expectation, example = BAD[name]
    out = tmp_path / "out"
    code, err = validate(capsys, out, *input_flags(path))
    assert code == 1
    fails = [line for line in err.splitlines() if line.startswith("validate: FAIL ")]
    assert len(fails) == 1, err
    assert fails[0].startswith(f"validate: FAIL {path}: {expectation}: "), fails[0]
    assert " rows, e.g. " in fails[0] and example in fails[0], fails[0]
    assert f"alignpipe validate: error: {path}: 1 of " in err
    assert "Traceback" not in err
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def _metrics_and_report(out: Path) -> tuple[dict, dict]:
    assert (out / "data_docs" / "index.html").is_file()
    return json.loads((out / "metrics.json").read_text()), json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("name,form", [("prefs.jsonl", "standard"), ("prefs_conversational.jsonl", "conversational")])
def test_good_prefs_pass_with_report_and_data_docs(name, form, tmp_path, capsys):
    code, err = validate(capsys, tmp_path / "out", *input_flags(DATA / "good" / name))
    assert code == 0, err
    metrics, report = _metrics_and_report(tmp_path / "out")
    assert metrics["n_failed_expectations"] == 0 and metrics["n_rows_checked"] == 3
    assert metrics["n_expectations"] == report["n_expectations"] > 10
    (entry,) = report["files"]
    assert entry["kind"] == "prefs" and entry["form"] == form and entry["success"]
    checked = {e["expectation"] for e in entry["expectations"]}
    assert {"expect_select_column_values_to_be_unique_within_record", "expect_compound_columns_to_be_unique",
            "expect_column_values_to_be_in_set", "expect_lines_to_be_valid_utf8"} <= checked
    validations = list((tmp_path / "out" / "data_docs" / "validations").rglob("*.html"))
    assert len(validations) == 2  # the schema and the content suite of the one file


def test_good_corpus_and_prefs_together(tmp_path, capsys):
    code, err = validate(capsys, tmp_path / "out", "--corpus", str(DATA / "good" / "corpus.jsonl"),
                         "--prefs", str(DATA / "good" / "prefs.jsonl"))
    assert code == 0, err
    metrics, report = _metrics_and_report(tmp_path / "out")
    assert metrics["n_rows_checked"] == 6 and metrics["n_failed_expectations"] == 0
    assert [f["kind"] for f in report["files"]] == ["corpus", "prefs"]


def test_data_build_output_directory_passes(tiny_data, tmp_path, capsys):
    code, err = validate(capsys, tmp_path / "out", "--corpus", str(tiny_data))
    assert code == 0, err
    _, report = _metrics_and_report(tmp_path / "out")
    names = {Path(f["path"]).name: f["kind"] for f in report["files"]}
    assert names == {"train.jsonl": "corpus", "val.jsonl": "corpus", "test.jsonl": "corpus",
                     "prompts.jsonl": "prompts", "train_prompts.jsonl": "prompts"}


def test_directory_names_the_bad_file_only(tmp_path, capsys):
    corpus = tmp_path / "data"
    corpus.mkdir()
    shutil.copy(DATA / "good" / "corpus.jsonl", corpus / "train.jsonl")
    rows = [{"prompt": "import os", "context": "", "reference": "\n", "source": "a.py:1"},
            {"prompt": "\n\n", "context": "", "reference": "x = 1", "source": "a.py:3"}]
    (corpus / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, err = validate(capsys, tmp_path / "out", "--corpus", str(corpus))
    assert code == 1
    fails = [line for line in err.splitlines() if line.startswith("validate: FAIL ")]
    assert fails == [f"validate: FAIL {corpus / 'prompts.jsonl'}: expect_column_values_to_not_match_regex (prompt): "
                     '1 rows, e.g. line 2: prompt="\\n\\n"']


def test_config_is_applied(tmp_path, capsys):
    dup = DATA / "bad" / "prefs_duplicate_rows.jsonl"
    code, err = validate(capsys, tmp_path / "a", *input_flags(dup), "--set", "validate.allow_duplicates=true")
    assert code == 0, err
    good = DATA / "good" / "prefs.jsonl"
    code, err = validate(capsys, tmp_path / "b", *input_flags(good), "--set", "validate.max_field_chars=16")
    assert code == 1
    assert "expect_column_value_lengths_to_be_between (chosen): 1 rows, e.g. line 1:" in err


def test_nothing_to_validate_is_an_error(tmp_path, capsys):
    code, err = validate(capsys, tmp_path / "out", "--corpus", "")
    assert code == 1
    assert "nothing to validate" in err and not (tmp_path / "out").exists()


def test_mistyped_input_path_is_an_error(tmp_path, capsys):
    code, err = validate(capsys, tmp_path / "out", "--corpus", str(tmp_path / "missing"))
    assert code == 1
    assert "missing: input --corpus not found" in err and not (tmp_path / "out").exists()


def test_config_checks_and_params_sections():
    with pytest.raises(ValueError, match=r"validate\.max_field_chars must be > 0, got 0"):
        Config(max_field_chars=0)
    with pytest.raises(ValueError, match=r"validate\.max_abs_score must be a finite number"):
        Config(max_abs_score=float("inf"))
    for params in ("params.yaml", "configs/tiny.yaml"):
        assert build_config(Config, load_params(ROOT / params)) == Config()


def test_help_lists_inputs_and_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for text in ("--corpus", "--prefs", "--out", "max_field_chars", "allow_duplicates"):
        assert text in out


def test_validators_library_checks_a_file_without_the_stage(capsys):
    """Other stages call `alignpipe.data.validators` directly: same checks, the limits passed in, no Data Docs."""
    from alignpipe.core.errors import DataError
    from alignpipe.data.validators import Limits, validate_files

    good = DATA / "good" / "prefs.jsonl"
    (entry,) = validate_files([(good, "prefs")], Limits())
    assert entry["success"] and entry["rows"] == 3 and entry["form"] == "standard"
    assert Config().limits() == Limits()
    with pytest.raises(DataError, match="1 of .* expectations failed"):
        validate_files([(good, "prefs")], Limits(max_field_chars=16))
    assert "expect_column_value_lengths_to_be_between (" in capsys.readouterr().err
