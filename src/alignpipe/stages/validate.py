"""Check the corpus and preference JSONL files with Great Expectations before anything trains on them.

The checks (structure, a GX schema suite and a GX content suite per file; standard and conversational preference
forms) are `alignpipe.data.validators`, the same functions label, reward and dpo run on their inputs; this stage
picks the files from its inputs and runs them with its limits. Outputs: `report.json` (every expectation of every
file), `report.html` (the same as one self-contained page), Data Docs (`data_docs/index.html`) and metrics.json.
Any failure raises DataError, so nothing is published (the runner keeps report.json and report.html in
`<out>.failed/`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from alignpipe.core.config import MAX_CHARS, MAX_ROWS, StageConfig, field
from alignpipe.core.errors import DataError
from alignpipe.core.io import check_readable_file, write_json
from alignpipe.data.validators import Limits, Validator, check_files, corpus_files, raise_on_failures
from alignpipe.reports.validation_page import write_validation_page
from alignpipe.stages import Input

_DEFAULT = Limits()


@dataclass(frozen=True)
class Config(StageConfig):
    SECTION: ClassVar[str] = "validate"

    max_text_chars: int = field(_DEFAULT.max_text_chars,
                                "max characters of a corpus `text` chunk or a free-text column", gt=0, le=MAX_CHARS)
    max_field_chars: int = field(_DEFAULT.max_field_chars,
                                 "max characters of a prompt, chosen or rejected (or of one message)",
                                 gt=0, le=MAX_CHARS)
    min_rows: int = field(_DEFAULT.min_rows, "fewest rows a file may have", ge=1, le=MAX_ROWS)
    allow_duplicates: bool = field(_DEFAULT.allow_duplicates,
                                   "accept repeated rows (same prompt/chosen/rejected, same corpus row)")
    max_abs_score: float = field(_DEFAULT.max_abs_score, "bound on |score_chosen| and |score_rejected|", gt=0)


    def limits(self) -> Limits:
        """The bounds the validators check, from this config."""
        return Limits(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Limits)})


INPUTS = (
    Input("corpus", "data", "corpus JSONL file, or a directory holding train/val/test.jsonl and the prompt files",
          required=False),
    Input("prefs", None, "preference JSONL file (prompt/chosen/rejected, standard or conversational)",
          required=False),
)
METRICS = ("n_rows_checked", "n_expectations", "n_failed_expectations")
# The few metrics `dvc metrics show` lists (metrics_headline.json; fnmatch patterns); metrics.json has all.
HEADLINE = ("n_rows_checked", "n_failed_expectations")


def run(cfg: Config, inputs: dict[str, Path | None], out_dir: Path) -> dict[str, float]:
    """Validate the corpus and/or the preference file; write report.json and Data Docs, or raise DataError."""
    corpus, prefs = inputs.get("corpus"), inputs.get("prefs")
    if corpus is None and prefs is None:
        raise DataError("--corpus/--prefs", "nothing to validate: give an existing corpus or preference path")
    files = corpus_files(corpus) if corpus is not None else []
    if prefs is not None:
        files.append((check_readable_file(prefs), "prefs"))

    validator = Validator((out_dir / "data_docs").resolve())  # GX wants an absolute path
    entries = check_files(validator, files, cfg.limits())
    n_checks = sum(len(e["expectations"]) for e in entries)
    n_failed = sum(not c["success"] for e in entries for c in e["expectations"])
    metrics = {"n_rows_checked": sum(e["rows"] for e in entries), "n_expectations": n_checks,
               "n_failed_expectations": n_failed}
    out_dir.mkdir(parents=True, exist_ok=True)  # callers may pass a folder that does not exist yet
    write_json(out_dir / "report.json", {**metrics, "files": entries})
    write_validation_page({**metrics, "files": entries}, out_dir / "report.html")  # kept by the runner on failure
    raise_on_failures(entries)
    validator.build_docs()
    return metrics
