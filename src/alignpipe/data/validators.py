"""Checks of the files the pipeline reads: a corpus split, a prompt file, a preference file, each against a
suite of expectations (Great Expectations) with the limits in `Limits`. The validate stage runs them on its
inputs; any stage that reads such a file can call `validate_files` on it.

Each file goes through three steps, and every failed expectation becomes one `Check` (one line on stderr):

1. structure (by hand, before GX: a DataFrame cannot hold what does not parse): not empty, valid UTF-8, one
   JSON object per line;
2. a GX "schema" suite on the JSON type of every known column: required columns present, no nulls, the right
   types (NaN and Infinity, which Python's json accepts, are not JSON numbers and fail here);
3. a GX "content" suite on the columns that passed step 2: not empty or whitespace-only, length bounds, score
   ranges, message lists well formed (known roles, non-blank contents within `max_field_chars`), their turns in
   order (`<column>.roles`: a prompt alternates user/assistant after an optional system turn and ends on a user
   turn; chosen/rejected start with the assistant), chosen != rejected, no duplicate rows.

Preference and prompt files are TRL's standard form (`prompt`/`chosen`/`rejected` strings) or its conversational form
(lists of `{"role", "content"}` messages), optionally with `score_chosen`, `score_rejected` and `judge`.
Great Expectations is imported only when a `Validator` is made (its import takes 2-4 s).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignpipe.core.control import CONTROL_TOKEN_PATTERN, REASON as CONTROL_REASON
from alignpipe.core.errors import DataError
from alignpipe.core.io import check_readable_file, iter_lines, parse_json_line

CORPUS_SPLITS = ("train.jsonl", "val.jsonl", "test.jsonl")
PROMPT_FILES = ("prompts.jsonl", "train_prompts.jsonl")
ROLES = ["system", "user", "assistant"]
DOCS_SITE = "alignpipe"
_MISSING = object()


@dataclass(frozen=True)
class Limits:
    """The bounds the suites check (the validate stage's Config holds the same fields, with their help)."""

    max_text_chars: int = 100_000  # a corpus `text` chunk or a free-text column
    max_field_chars: int = 20_000  # a prompt, chosen or rejected (or one message)
    min_rows: int = 1  # fewest rows a file may have
    allow_duplicates: bool = False  # accept repeated rows
    max_abs_score: float = 1e6  # bound on |score_chosen| and |score_rejected|


@dataclass(frozen=True)
class Column:
    """What one column must hold: its JSON types and, for the content suite, bounds or a JSON schema."""

    name: str
    types: tuple[str, ...]
    required: bool = False
    non_blank: bool = False  # a string that is neither empty nor whitespace-only
    max_chars: int | None = None
    bounds: tuple[float | None, float | None] | None = None
    schema: dict | None = None  # JSON schema of an array, checked on its canonical JSON text
    pattern: str | None = None  # regex the canonical JSON text of an array must match
    roles: str | None = None  # messages: regex their roles, joined by ",", must match (checked as `<name>.roles`)
    content: bool = False  # user text a model reads: no control or chat-template token (alignpipe.core.control)


@dataclass(frozen=True)
class Suite:
    """The columns of one kind of file and the columns whose combination must be unique."""

    kind: str
    columns: tuple[Column, ...]
    unique_key: tuple[str, ...] | None  # None: all present columns
    distinct_pair: tuple[str, str] | None = None


def _messages_schema(max_chars: int) -> dict:
    content = {"type": "string", "minLength": 1, "maxLength": max_chars, "pattern": r"\S"}
    message = {"type": "object", "required": ["role", "content"],
               "properties": {"role": {"enum": ROLES}, "content": content}}
    return {"type": "array", "minItems": 1, "items": message}


# The order of turns, as a regex on the roles joined by "," (a conversational column's `<name>.roles`), and what it
# means (said in the failure line).
PROMPT_TURNS = r"^(?:system,)?user(?:,assistant,user)*$"
ANSWER_TURNS = r"^assistant(?:,user,assistant)*$"
DIALOGUE_TURNS = r"^(?:system,)?user,assistant(?:,user,assistant)*$"
TURN_RULES = {
    PROMPT_TURNS: "turns must alternate user/assistant after an optional first system turn and end on a user turn",
    ANSWER_TURNS: "turns must start with the assistant and alternate assistant/user",
    DIALOGUE_TURNS: "turns must alternate user/assistant after an optional first system turn",
}


def roles_of(value: Any) -> str | None:
    """The roles of a message list joined by "," when every message is well formed (a known role, a string
    content); None otherwise (the message schema reports those rows; GX skips nulls, so one line per fault)."""
    if not isinstance(value, list) or not all(isinstance(m, dict) and m.get("role") in ROLES
                                              and isinstance(m.get("content"), str) and m["content"].strip()
                                              for m in value):
        return None
    return ",".join(m["role"] for m in value)


def corpus_suite(limits: Limits) -> Suite:
    """A corpus split: `text`, plus the annotations `alignpipe data build` adds."""
    return Suite("corpus", (
        Column("text", ("string",), required=True, non_blank=True, max_chars=limits.max_text_chars, content=True),
        Column("source", ("string",), max_chars=limits.max_text_chars),
        Column("start_line", ("integer",), bounds=(0, None)),
        Column("n_chars", ("integer",), bounds=(0, None)),
        Column("violations", ("integer",), bounds=(0, None)),
        Column("violations_per_char", ("integer", "number"), bounds=(0, 1)),
        # A non-empty list of ints >= 0: on ~60-item lists a regex on the canonical JSON is ~100x faster than
        # a JSON schema, and exact (json.dumps writes ints as plain digits, separated by ", ").
        Column("line_violations", ("array",), pattern=r"^\[\d+(?:, \d+)*\]$"),
        # A conversation (a --dataset build of conversational pairs: prompt + chosen turns).
        Column("messages", ("array",), schema=_messages_schema(limits.max_field_chars), roles=DIALOGUE_TURNS,
               content=True),
    ), unique_key=None)


def prompts_suite(limits: Limits, conversational: bool = False) -> Suite:
    """The prompt files (held-out and training): a non-blank `prompt` (or a message list ending on a user turn);
    string context, reference and source."""
    prompt = (Column("prompt", ("array",), required=True, schema=_messages_schema(limits.max_field_chars),
                     roles=PROMPT_TURNS, content=True) if conversational else
              Column("prompt", ("string",), required=True, non_blank=True, max_chars=limits.max_field_chars,
                     content=True))
    return Suite("prompts", (
        prompt,
        Column("context", ("string",), max_chars=limits.max_text_chars, content=True),
        Column("reference", ("string",), max_chars=limits.max_text_chars, content=True),
        Column("source", ("string",), max_chars=limits.max_text_chars),
    ), unique_key=None)


def prefs_suite(limits: Limits, conversational: bool) -> Suite:
    """Preference pairs in TRL's standard (strings) or conversational (message lists) form."""
    if conversational:
        schema = _messages_schema(limits.max_field_chars)
        text = [Column(c, ("array",), required=True, schema=schema, roles=PROMPT_TURNS if c == "prompt" else
                       ANSWER_TURNS, content=True) for c in ("prompt", "chosen", "rejected")]
    else:
        text = [Column(c, ("string",), required=True, non_blank=True, max_chars=limits.max_field_chars,
                       content=True) for c in ("prompt", "chosen", "rejected")]
    bound = (-limits.max_abs_score, limits.max_abs_score)
    extra = [Column("score_chosen", ("integer", "number"), bounds=bound),
             Column("score_rejected", ("integer", "number"), bounds=bound),
             Column("judge", ("string",), max_chars=limits.max_field_chars)]
    return Suite("prefs", (*text, *extra), unique_key=("prompt", "chosen", "rejected"),
                 distinct_pair=("chosen", "rejected"))


@dataclass
class Check:
    """The outcome of one expectation on one file (a row of report.json, a line on stderr when failed)."""

    expectation: str
    column: str
    success: bool
    unexpected_count: int = 0
    example: str = ""

    def line(self, path: str) -> str:
        return (f"validate: FAIL {path}: {self.expectation} ({self.column}): {self.unexpected_count} rows, "
                f"e.g. {self.example}")


def _show(value: Any, limit: int = 60) -> str:
    """A value as it reads in the JSONL file, cut to `limit` characters."""
    if value is _MISSING:
        return "<missing>"
    text = json.dumps(value, ensure_ascii=False)
    if len(text) <= limit:
        return text
    size = f"{len(value)} chars" if isinstance(value, str) else f"{len(text)} chars of JSON"
    return f"{text[:limit]}... ({size})"


def _json_type(value: Any) -> str | None:
    """The JSON type name of a parsed value; None for null. NaN/Infinity get their own name: not JSON numbers."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number" if math.isfinite(value) else "non-finite number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def read_rows(path: Path) -> tuple[list[int], list[dict], list[Check]]:
    """Parse a JSONL file: (line numbers, objects, structural checks). Blank lines are skipped, as
    `alignpipe.core.io.iter_jsonl` does; the checks say whether the file holds UTF-8 JSON objects, one per line."""
    bad: dict[str, list[str]] = {"utf8": [], "json": [], "object": []}
    lines: list[int] = []
    rows: list[dict] = []
    n_lines = 0
    with check_readable_file(path).open("rb") as f:
        for n_lines, raw in iter_lines(f):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad["utf8"].append(f"line {n_lines}: {e.reason} 0x{raw[e.start]:02x} at byte {e.start}")
                continue
            try:
                obj = parse_json_line(text)
            except json.JSONDecodeError as e:
                start = text.strip()
                start = repr(start if len(start) <= 40 else start[:40] + "...")
                bad["json"].append(f"line {n_lines}: {e.msg} (column {e.colno}) in {start}")
                continue
            except ValueError as e:
                bad["json"].append(f"line {n_lines}: {e}")
                continue
            if not isinstance(obj, dict):
                bad["object"].append(f"line {n_lines}: got a JSON {_json_type(obj) or 'null'}, not an object")
                continue
            lines.append(n_lines)
            rows.append(obj)
    empty = not rows and not any(bad.values())
    checks = [Check("expect_file_to_have_json_lines", "file", not empty, 0,
                    ("file is empty" if n_lines == 0 else f"{n_lines} blank lines, no JSON") if empty else "")]
    for name, key in (("expect_lines_to_be_valid_utf8", "utf8"), ("expect_lines_to_be_json", "json"),
                      ("expect_lines_to_be_json_objects", "object")):
        checks.append(Check(name, "line", not bad[key], len(bad[key]), bad[key][0] if bad[key] else ""))
    return lines, rows, checks


class Validator:
    """One ephemeral GX context for the whole run: a pandas data source, and a schema and a content
    checkpoint per file (checkpoints store their results, which the Data Docs then render into `docs_dir`)."""

    def __init__(self, docs_dir: Path | None = None):
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # no usage statistics sent from pipeline runs
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.gx = gx
        self.ctx = gx.get_context(mode="ephemeral")
        self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        if docs_dir is not None:
            self.ctx.add_data_docs_site(site_name=DOCS_SITE, site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            })
        asset = self.ctx.data_sources.add_pandas("jsonl").add_dataframe_asset("rows")
        self.batch = asset.add_batch_definition_whole_dataframe("whole file")
        self.names: set[str] = set()

    def run(self, name: str, expectations: list, frame, by_line: dict[int, dict]) -> list[Check]:
        """Run `expectations` on `frame` (indexed by line number) and describe each outcome."""
        gx = self.gx
        while name in self.names:
            name += "+"
        self.names.add(name)
        suite = self.ctx.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        vd = self.ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=self.batch, suite=suite))
        checkpoint = self.ctx.checkpoints.add(gx.Checkpoint(
            name=name, validation_definitions=[vd],
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": 2}))
        result = checkpoint.run(batch_parameters={"dataframe": frame})
        (validation,) = result.run_results.values()
        return [_describe(r, by_line, len(frame)) for r in validation.results]

    def build_docs(self) -> None:
        self.ctx.build_data_docs(site_names=[DOCS_SITE])


def _gx_error(info: dict) -> str | None:
    """The message of an exception GX caught while computing a result (its info is flat or keyed by metric)."""
    for item in [info, *info.values()]:
        if isinstance(item, dict) and item.get("raised_exception"):
            return str(item.get("exception_message"))
    return None


def _describe(r, by_line: dict[int, dict], n_rows: int) -> Check:
    """A GX ExpectationValidationResult as a Check, with an example taken from the raw rows."""
    kind = r.expectation_config.type
    kw = r.expectation_config.kwargs
    columns = kw.get("column_list") or ([kw["column"]] if "column" in kw else [])
    check = Check(kind, ", ".join(columns) or "table", bool(r.success))
    if r.success:
        return check
    error = _gx_error(r.exception_info or {})
    if error:
        check.example = f"GX error: {error}"
        return check
    res = r.result
    if kind == "expect_column_to_exist":
        check.unexpected_count = n_rows
        check.example = "no row has this column"
    elif kind == "expect_table_row_count_to_be_between":
        check.unexpected_count = int(res.get("observed_value", 0))
        check.example = f"at least {kw.get('min_value')} rows required"
    else:
        check.unexpected_count = int(res.get("unexpected_count", 0))
        index = res.get("partial_unexpected_index_list") or []
        if index:
            row = by_line[index[0]]
            twin = _same_values(by_line, index[0], columns) if kind.endswith("_to_be_unique") else None
            where = f"lines {index[0]}, {twin}" if twin else f"line {index[0]}"
            limit = 60 if len(columns) == 1 else 30
            values = ", ".join(f"{c}={_show(row.get(c, _MISSING), limit)}" for c in columns)
            check.example = f"{where}: {values}{_reason(kind, kw, row)}"
    return check


def _reason(kind: str, kw: dict, row: dict) -> str:
    """Why the example fails, where the expectation's name does not say it: the turn-order rule, or the JSON
    schema's first error (e.g. `'robot' is not one of [...]`)."""
    if kind == "expect_column_values_to_match_regex" and kw.get("regex") in TURN_RULES:
        return f" ({TURN_RULES[kw['regex']]})"
    if kind == "expect_column_values_to_not_match_regex" and kw.get("regex") == CONTROL_TOKEN_PATTERN:
        from alignpipe.core.control import find_control_token

        return f" ({find_control_token(row.get(kw['column']))!r} {CONTROL_REASON})"
    if kind.endswith("json_schema") and kw.get("json_schema"):
        import jsonschema

        schema = kw["json_schema"]
        validator = jsonschema.validators.validator_for(schema)(schema)
        error = jsonschema.exceptions.best_match(validator.iter_errors(row.get(kw["column"])))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path)
            return f" ({kw['column']}/{where}: {error.message[:80]})" if where else f" ({error.message[:80]})"
    return ""


def _same_values(by_line: dict[int, dict], line: int, columns: list[str]) -> int | None:
    """The first other line whose `columns` hold the same values as `line` (the duplicate's partner: GX's index
    list mixes the rows of every duplicate group)."""
    key = [json.dumps(by_line[line].get(c), sort_keys=True) for c in columns]
    return next((n for n, row in by_line.items()
                 if n != line and [json.dumps(row.get(c), sort_keys=True) for c in columns] == key), None)


def _schema_frame(suite: Suite, lines: list[int], rows: list[dict]):
    """One column per known column present in any row, holding each value's JSON type (None: null or missing)."""
    import pandas as pd

    present = [c.name for c in suite.columns if any(c.name in row for row in rows)]
    data = {name: pd.Series([_json_type(row.get(name)) for row in rows], index=lines, dtype=object)
            for name in present}
    return pd.DataFrame(data, index=lines), present


def _content_frame(columns: list[Column], lines: list[int], rows: list[dict]):
    """The values of the columns that passed the schema suite; arrays as canonical JSON text (hashable, and what
    the JSON-schema expectation reads)."""
    import pandas as pd

    data = {}
    for c in columns:
        values = [row[c.name] for row in rows]
        if "array" in c.types:
            values = [json.dumps(v, sort_keys=True, ensure_ascii=False) for v in values]
        data[c.name] = pd.Series(values, index=lines, dtype="float64" if "integer" in c.types else object)
        if c.roles:
            data[f"{c.name}.roles"] = pd.Series([roles_of(row[c.name]) for row in rows], index=lines, dtype=object)
    return pd.DataFrame(data, index=lines)


@functools.cache
def _compiled_schema_expectation() -> type:
    """GX's ExpectColumnValuesToMatchJsonSchema, with the schema compiled once per column: the stock metric
    calls jsonschema.validate per value, which re-checks the schema (~3 ms a row; this is ~30 us)."""
    import great_expectations.expectations as gxe
    import jsonschema
    from great_expectations.execution_engine import PandasExecutionEngine
    from great_expectations.expectations.metrics.map_metric_provider import (ColumnMapMetricProvider,
                                                                             column_condition_partial)

    class ColumnValuesMatchCompiledJsonSchema(ColumnMapMetricProvider):
        condition_metric_name = "column_values.match_compiled_json_schema"
        condition_value_keys = ("json_schema",)

        @column_condition_partial(engine=PandasExecutionEngine)
        def _pandas(cls, column, json_schema, **kwargs):
            validator = jsonschema.validators.validator_for(json_schema)(json_schema)
            return column.map(lambda text: validator.is_valid(json.loads(text)))

    class ExpectColumnValuesToMatchCompiledJsonSchema(gxe.ExpectColumnValuesToMatchJsonSchema):
        map_metric = "column_values.match_compiled_json_schema"

    return ExpectColumnValuesToMatchCompiledJsonSchema


def _schema_expectations(gxe, suite: Suite, present: list[str], limits: Limits) -> list:
    out = [gxe.ExpectTableRowCountToBeBetween(min_value=limits.min_rows)]
    for c in suite.columns:
        if c.required and c.name not in present:
            out.append(gxe.ExpectColumnToExist(column=c.name))
        if c.name in present:
            out.append(gxe.ExpectColumnValuesToNotBeNull(column=c.name))
            out.append(gxe.ExpectColumnValuesToBeInSet(column=c.name, value_set=list(c.types)))
    return out


def _content_expectations(gxe, suite: Suite, present: list[str], ok: list[Column], limits: Limits) -> list:
    out = []
    for c in ok:
        if c.non_blank or c.max_chars:
            shortest = 1 if c.non_blank else None
            out.append(gxe.ExpectColumnValueLengthsToBeBetween(
                column=c.name, min_value=shortest, max_value=c.max_chars))
        if c.non_blank:
            out.append(gxe.ExpectColumnValuesToNotMatchRegex(column=c.name, regex=r"^\s+$"))
            out.append(gxe.ExpectColumnValuesToNotMatchRegex(column=c.name, regex="\x00"))  # NUL: no text has one
        if c.bounds:
            out.append(gxe.ExpectColumnValuesToBeBetween(column=c.name, min_value=c.bounds[0],
                                                         max_value=c.bounds[1]))
        if c.schema:
            out.append(_compiled_schema_expectation()(column=c.name, json_schema=c.schema))
        if c.pattern:
            out.append(gxe.ExpectColumnValuesToMatchRegex(column=c.name, regex=c.pattern))
        if c.roles:
            out.append(gxe.ExpectColumnValuesToMatchRegex(column=f"{c.name}.roles", regex=c.roles))
        if c.content:
            out.append(gxe.ExpectColumnValuesToNotMatchRegex(column=c.name, regex=CONTROL_TOKEN_PATTERN))
    names = [c.name for c in ok]
    if suite.distinct_pair and all(n in names for n in suite.distinct_pair):
        # GX has no "pair not equal"; uniqueness within the record is that check for two columns.
        out.append(gxe.ExpectSelectColumnValuesToBeUniqueWithinRecord(column_list=list(suite.distinct_pair)))
    required = [c.name for c in suite.columns if c.required]
    key = list(suite.unique_key or dict.fromkeys(required + present))
    if not limits.allow_duplicates and all(n in names for n in key):
        out.append(gxe.ExpectCompoundColumnsToBeUnique(column_list=key) if len(key) > 1
                   else gxe.ExpectColumnValuesToBeUnique(column=key[0]))
    return out


def validate_file(v: Validator, path: Path, kind: str, limits: Limits) -> dict[str, Any]:
    """All checks of one file (`kind`: corpus, prompts or prefs): structure, then the schema suite, then the
    content suite on the columns that passed. Returns its report entry."""
    import great_expectations.expectations as gxe

    lines, rows, checks = read_rows(path)
    entry: dict[str, Any] = {"path": str(path), "kind": kind, "rows": len(rows)}
    if all(c.success for c in checks):
        if kind == "prefs":
            first = next((r for r in rows if r.get("chosen") is not None), rows[0])
            conversational = isinstance(first.get("chosen"), list)
            entry["form"] = "conversational" if conversational else "standard"
            suite = prefs_suite(limits, conversational)
        else:
            conversational = isinstance(next((r.get("prompt") for r in rows if r.get("prompt") is not None), None),
                                        list)
            if kind == "prompts":
                entry["form"] = "conversational" if conversational else "standard"
            suite = prompts_suite(limits, conversational) if kind == "prompts" else corpus_suite(limits)
        by_line = {line: {**row, **{f"{c.name}.roles": roles_of(row.get(c.name)) for c in suite.columns if c.roles}}
                   for line, row in zip(lines, rows)}  # the derived `.roles` values, for the failure's example
        label = f"{kind}.{path.stem}"
        frame, present = _schema_frame(suite, lines, rows)
        schema_checks = v.run(f"{label}.schema", _schema_expectations(gxe, suite, present, limits), frame, by_line)
        failed = {col for c in schema_checks if not c.success for col in c.column.split(", ")}
        ok = [c for c in suite.columns if c.name in present and c.name not in failed]
        checks += schema_checks
        expectations = _content_expectations(gxe, suite, present, ok, limits)
        if expectations:
            checks += v.run(f"{label}.content", expectations, _content_frame(ok, lines, rows), by_line)
    entry["success"] = all(c.success for c in checks)
    entry["expectations"] = [vars(c) for c in checks]
    return entry


def corpus_files(path: Path) -> list[tuple[Path, str]]:
    """The files behind `--corpus`: the file itself, or the splits and prompt files found in the directory."""
    if not path.is_dir():
        return [(check_readable_file(path), "prompts" if path.name in PROMPT_FILES else "corpus")]
    files = [(path / name, "corpus") for name in CORPUS_SPLITS if (path / name).is_file()]
    files += [(path / name, "prompts") for name in PROMPT_FILES if (path / name).is_file()]
    if not files:
        raise DataError(str(path), f"none of {', '.join(CORPUS_SPLITS + PROMPT_FILES)} in this directory")
    return files


def check_files(validator: Validator, files: list[tuple[Path, str]], limits: Limits) -> list[dict]:
    """Every (path, kind) checked with one GX context: their report entries (see `validate_file`), failed
    expectations included; nothing raised for them."""
    return [validate_file(validator, path, kind, limits) for path, kind in files]


def validate_files(files: list[tuple[Path, str]], limits: Limits, docs_dir: Path | None = None) -> list[dict]:
    """Check every (path, kind) and return their report entries; on any failed expectation print them and raise
    DataError (`raise_on_failures`). With `docs_dir` (absolute), the Data Docs of every suite are built there once
    all passed."""
    validator = Validator(docs_dir)
    entries = check_files(validator, files, limits)
    raise_on_failures(entries)
    if docs_dir is not None:
        validator.build_docs()
    return entries


def entry_files(path: Path, kind: str) -> list[tuple[Path, str]]:
    """The files behind a stage input of `kind` (corpus or prefs): the file itself, or for a directory its corpus
    splits and prompt files (corpus) or its prefs.jsonl and heldout.jsonl (prefs, the label stage's output)."""
    from alignpipe.core.io import HELDOUT_FILE, PREFS_FILE

    if kind == "corpus" or not path.is_dir():
        return corpus_files(path) if kind == "corpus" else [(check_readable_file(path), kind)]
    files = [(path / name, kind) for name in (PREFS_FILE, HELDOUT_FILE) if (path / name).is_file()]
    if not files:
        raise DataError(str(path), f"no {PREFS_FILE} in this directory")
    return files


def output_files(folder: Path, kinds: tuple[str, ...]) -> list[tuple[Path, str]]:
    """The non-empty files a stage wrote into `folder` that the validators check (a stage module's
    CHECKED_OUTPUTS kinds: corpus = the splits and prompt files, prefs = prefs.jsonl and heldout.jsonl): what a
    stage publishes passes the same checks as what validate accepts."""
    from alignpipe.core.io import HELDOUT_FILE, PREFS_FILE

    names = {"corpus": CORPUS_SPLITS, "prompts": PROMPT_FILES, "prefs": (PREFS_FILE, HELDOUT_FILE)}
    return [(folder / name, "prompts" if name in PROMPT_FILES else kind) for kind in kinds
            for name in (CORPUS_SPLITS + PROMPT_FILES if kind == "corpus" else names[kind])
            if (folder / name).is_file() and (folder / name).stat().st_size > 0]


def check_inputs(checked: dict[str, str], inputs: dict[str, Path | None], limits: Limits) -> list[dict]:
    """Validate a stage's input files before it does any work: `checked` maps an input name to its kind
    (a stage module's CHECKED_INPUTS); absent optional inputs are skipped. Raises DataError on any failure."""
    files = [f for name, kind in checked.items() if inputs.get(name) is not None
             for f in entry_files(Path(inputs[name]), kind)]
    return validate_files(files, limits) if files else []


def raise_on_failures(entries: list[dict]) -> None:
    """Print one line per failed expectation on stderr and raise DataError naming the file(s); no-op when all
    passed."""
    checks = [(e["path"], c) for e in entries for c in e["expectations"]]
    failed = [(path, c) for path, c in checks if not c["success"]]
    for path, c in failed:
        print(Check(**c).line(path), file=sys.stderr)
    if failed:
        bad_files = sorted({path for path, _ in failed})
        where = bad_files[0] if len(bad_files) == 1 else f"{len(bad_files)} files"
        first = Check(**failed[0][1])
        more = f"; {len(failed) - 1} more listed above" if len(failed) > 1 else ""
        raise DataError(where, f"{len(failed)} of {len(checks)} expectations failed: {first.expectation} "
                               f"({first.column}), e.g. {first.example}{more}")
