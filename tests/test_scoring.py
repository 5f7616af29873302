"""The PEP8 oracle: pycodestyle violations per character, per line, and for completions in context."""

from __future__ import annotations

from alignpipe.oracle.scoring import line_violations, score_completion, violations, violations_per_char


def test_document_scores():
    text = "import os\nx=1\ndef f( a ):\n  return a\n"
    assert [c for _, c in violations(text)] == ["E225", "E302", "E201", "E202", "E111"]
    assert line_violations(text) == [0, 1, 3, 1]
    assert violations_per_char(text) == 5 / len(text)
    assert violations_per_char("x = 1\n") == 0.0
    assert violations_per_char("") == 0.0


def test_completion_counts_only_its_own_lines():
    context = "def f(a):\n  return a"  # E111 in the context does not count
    s = score_completion(context, "\n\n\nx = 1")
    assert (s.violations, s.chars, s.truncated) == (0, 5, False)
    s = score_completion(context, "\n\n\nx=1")  # E225
    assert (s.violations, s.chars, s.per_char) == (1, 3, 1 / 3)


def test_truncation_codes_are_excluded_and_flagged():
    s = score_completion("x = 1", "\ny = foo(1,")  # E901/E902 only because the sample was cut
    assert (s.violations, s.truncated) == (0, True)
    s = score_completion("x = 1", "\ny = foo(1 ,")  # a real E203 is still counted
    assert (s.violations, s.truncated) == (1, True)


def test_empty_completion():
    s = score_completion("x = 1", "")
    assert (s.violations, s.chars, s.per_char) == (0, 0, 0.0)
