"""The validate stage's report.json as one page: failures first (file, expectation, field, line, value), then
every file with each expectation that ran on it, pass or fail."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from alignpipe.reports.html import document, esc

# The validate stage's examples read "line 3: chosen=42" or "lines 1, 4: prompt=..." (duplicates).
_WHERE = re.compile(r"^(lines? \d+(?:, \d+)*): (.*)$", re.S)


def split_example(example: str) -> tuple[str, str]:
    """(line(s), value) of a failure's example; ("", example) when it names no line (e.g. "file is empty")."""
    match = _WHERE.match(example or "")
    return (match.group(1), match.group(2)) if match else ("", example or "")


def _failure_rows(files: list[dict[str, Any]]) -> str:
    rows = []
    for f in files:
        for c in f["expectations"]:
            if not c["success"]:
                line, value = split_example(c.get("example", ""))
                rows.append(f'<tr class="failure"><td><code>{esc(f["path"])}</code></td><td>{esc(line) or "-"}</td>'
                            f'<td>{esc(c["column"])}</td><td>{esc(c["expectation"])}</td>'
                            f'<td>{c.get("unexpected_count", 0)}</td><td class="value">{esc(value)}</td></tr>')
    return "\n".join(rows)


def _file_section(f: dict[str, Any]) -> str:
    checks = sorted(f["expectations"], key=lambda c: c["success"])  # failed ones first, order kept otherwise
    n_failed = sum(not c["success"] for c in checks)
    verdict = (f'<span class="bad">{n_failed} of {len(checks)} expectations failed</span>' if n_failed else
               f'<span class="good">all {len(checks)} expectations passed</span>')
    form = f', {esc(f["form"])} form' if f.get("form") else ""
    rows = []
    for c in checks:
        status = "pass" if c["success"] else "fail"
        line, value = split_example(c.get("example", ""))
        observed = f'{c.get("unexpected_count", 0)} of {f["rows"]} rows unexpected'
        detail = f"{esc(line)}: {esc(value)}" if line else esc(value)
        rows.append(f'<tr class="expectation {status}"><td>{status.upper()}</td><td>{esc(c["expectation"])}</td>'
                    f'<td>{esc(c["column"])}</td><td>{observed}</td><td class="value">{detail}</td></tr>')
    return (f'<section class="file"><h2><code>{esc(f["path"])}</code></h2>'
            f'<p class="summary">{esc(f["kind"])} file{form}: {f["rows"]} rows checked; {verdict}</p>'
            "<table><thead><tr><th>result</th><th>expectation</th><th>field</th><th>observed</th>"
            "<th>first offending row</th></tr></thead><tbody>\n" + "\n".join(rows) + "\n</tbody></table></section>")


def validation_html(report: dict[str, Any]) -> str:
    """The page for a validate report.json dict (passing or failing)."""
    files = report["files"]
    n_failed = sum(not c["success"] for f in files for c in f["expectations"])
    n_checks = sum(len(f["expectations"]) for f in files)
    n_rows = sum(f["rows"] for f in files)
    if n_failed:
        bad_files = sum(not f["success"] for f in files)
        head = (f'<p class="summary bad">FAILED: {n_failed} of {n_checks} expectations failed in {bad_files} of '
                f"{len(files)} files ({n_rows} rows checked).</p>"
                '<h2>Failures</h2><table id="failures"><thead><tr><th>file</th><th>line</th><th>field</th>'
                "<th>expectation</th><th>rows</th><th>value</th></tr></thead><tbody>\n"
                + _failure_rows(files) + "\n</tbody></table>")
    else:
        head = (f'<p class="summary good">PASSED: all {n_checks} expectations on {len(files)} files '
                f"({n_rows} rows checked).</p>")
    sections = [_file_section(f) for f in sorted(files, key=lambda f: f["success"])]
    return document("alignpipe validation", "<h1>alignpipe validation</h1>\n" + head + "\n" + "\n".join(sections))


def write_validation_page(report: dict[str, Any], path: Path) -> Path:
    """Write the page for `report` to `path`."""
    path.write_text(validation_html(report), encoding="utf-8")
    return path
