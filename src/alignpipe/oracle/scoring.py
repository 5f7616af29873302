"""The PEP8 oracle of Korbak et al. 2023 (PHF): pycodestyle violations per character; lower is better.

Whole documents are scored with `violations_per_char`; per-line counts (`line_violations`) let later stages score
segments. Model completions are scored in the context of the code before them (`score_completion`), counting only
violations on the completion's lines, and excluding the codes that exist only because a sample was cut:
E9xx (tokenize errors from an unfinished statement) and W292/W391 (end-of-file newline rules).
"""

from __future__ import annotations

from dataclasses import dataclass

import pycodestyle

# Codes that only mean "the text was cut here": excluded when scoring completions (not whole documents).
TRUNCATION_CODES = ("E9", "W292", "W391")

_OPTIONS = None


def _options():
    global _OPTIONS
    if _OPTIONS is None:
        _OPTIONS = pycodestyle.StyleGuide(quiet=True).options
    return _OPTIONS


class _Collect(pycodestyle.BaseReport):
    def __init__(self, options):
        super().__init__(options)
        self.found: list[tuple[int, str]] = []

    def error(self, line_number, offset, text, check):
        code = text[:4]
        # Like the default report, skip the codes pycodestyle ignores by default (W503/W504, E121, ...).
        if self._ignore_code(code):
            return None
        self.found.append((line_number, code))
        return code


def violations(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every pycodestyle violation in `text` (1-based lines)."""
    lines = text.splitlines(keepends=True)
    if not lines:
        return []
    options = _options()
    report = _Collect(options)
    checker = pycodestyle.Checker(lines=lines, options=options, report=report)
    checker.check_all()
    return report.found


def line_violations(text: str) -> list[int]:
    """Violation count per line of `text` (one entry per line of `text.splitlines()`)."""
    counts = [0] * len(text.splitlines())
    for lineno, _ in violations(text):
        if 1 <= lineno <= len(counts):
            counts[lineno - 1] += 1
        elif counts:
            counts[-1] += 1
    return counts


def violations_per_char(text: str) -> float:
    """The PHF PEP8 score of a document: violations / characters (0.0 for empty text)."""
    return len(violations(text)) / len(text) if text else 0.0


@dataclass(frozen=True)
class CompletionScore:
    """The oracle's judgement of one completion."""

    violations: int  # counted violations on the completion's lines
    chars: int  # characters of the completion, blank lines and the leading newline excluded
    truncated: bool  # a truncation code (E9, W292, W391) fired on the completion's lines

    @property
    def per_char(self) -> float:
        return self.violations / max(self.chars, 1)


def score_completion(context: str, completion: str) -> CompletionScore:
    """Score `completion` as written after `context` (code before it; the prompt or a longer prefix).

    Only violations on the completion's own lines count; truncation codes are excluded and flagged.
    """
    text = context + completion
    if not text.endswith("\n"):
        text += "\n"
    first = context.count("\n") + 1  # the line the completion starts on
    if completion.startswith("\n"):
        first += 1
    counted, truncated = 0, False
    for lineno, code in violations(text):
        if lineno < first:
            continue
        if code.startswith(TRUNCATION_CODES):
            truncated = True
            continue
        counted += 1
    chars = sum(len(line) for line in completion.split("\n") if line.strip())
    return CompletionScore(counted, chars, truncated)
