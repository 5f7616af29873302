"""Write the validate fixtures: tests/data/good/*.jsonl (must pass) and tests/data/bad/*.jsonl (each breaks one
rule, named for it). The files are committed; rerun `python tests/data/make_bad.py` after changing this script.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent

PAIRS = [
    {"prompt": "def add(a, b):", "chosen": "\n    return a + b\n", "rejected": "\n  return a+b\n",
     "score_chosen": 0.0, "score_rejected": 0.125, "judge": "pycodestyle"},
    {"prompt": "import os", "chosen": "\nimport sys\n", "rejected": "\nimport sys, re\n",
     "score_chosen": 0.0, "score_rejected": 0.0714, "judge": "pycodestyle"},
    {"prompt": "class A:", "chosen": "\n    x = 1\n", "rejected": "\n    x=1\n",
     "score_chosen": 0, "score_rejected": 0.2, "judge": "pycodestyle"},
]


def _messages(role: str, content: str) -> list[dict]:
    return [{"role": role, "content": content}]


CONVERSATIONS = [{"prompt": _messages("user", p["prompt"]), "chosen": _messages("assistant", p["chosen"]),
                  "rejected": _messages("assistant", p["rejected"])} for p in PAIRS]
CONVERSATIONS[0]["prompt"].insert(0, {"role": "system", "content": "Complete the Python code."})

CORPUS = [
    {"text": "import os\n", "source": "a.py", "start_line": 1, "n_chars": 10, "violations": 0,
     "violations_per_char": 0.0, "line_violations": [0]},
    {"text": "def f( x ):\n    return x\n", "source": "a.py", "start_line": 3, "n_chars": 26, "violations": 2,
     "violations_per_char": 0.0769, "line_violations": [2, 0]},
    {"text": "x=1\n", "source": "b.py", "start_line": 1, "n_chars": 4, "violations": 1,
     "violations_per_char": 0.25, "line_violations": [1]},
]


def _lines(rows: list) -> bytes:
    """JSONL as Python writes it (NaN/Infinity are written as such, like plain json.dumps does)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _with(rows: list[dict], i: int, **changes) -> list[dict]:
    """A copy of `rows` where row `i` has `changes` (a value of ... deletes the key)."""
    out = [dict(r) for r in rows]
    for k, v in changes.items():
        if v is ...:
            del out[i][k]
        else:
            out[i][k] = v
    return out


def good() -> dict[str, bytes]:
    return {"prefs.jsonl": _lines(PAIRS), "prefs_conversational.jsonl": _lines(CONVERSATIONS),
            "corpus.jsonl": _lines(CORPUS)}


def bad() -> dict[str, bytes]:
    """file name -> bytes; the test module lists the expectation and example each one must report."""
    ok = _lines(PAIRS)
    conv = CONVERSATIONS
    return {
        # structure: found before GX
        "prefs_empty_file.jsonl": b"",
        "prefs_blank_lines_only.jsonl": b"\n  \n\t\n",
        "prefs_malformed_json_line.jsonl": ok + b'{"prompt": "x", "chosen": "y" "rejected": "z"}\n',
        "prefs_truncated_last_line.jsonl": ok + b'{"prompt": "def g():", "chosen": "\\n    pass',
        "prefs_not_utf8.jsonl": ok + _lines([{"prompt": "caf\u00e9", "chosen": "a", "rejected": "b"}])
        .replace("caf\u00e9".encode("utf-8"), b"caf\xe9"),
        "prefs_utf8_bom.jsonl": b"\xef\xbb\xbf" + ok,
        "prefs_line_not_an_object.jsonl": ok + b'["prompt", "chosen", "rejected"]\n',
        # schema suite
        "prefs_missing_column.jsonl": _lines([{k: v for k, v in r.items() if k != "rejected"} for r in PAIRS]),
        "prefs_row_missing_chosen.jsonl": _lines(_with(PAIRS, 1, chosen=...)),
        "prefs_null_chosen.jsonl": _lines(_with(PAIRS, 1, chosen=None)),
        "prefs_wrong_type_chosen.jsonl": _lines(_with(PAIRS, 2, chosen=42)),
        "prefs_nan_score.jsonl": _lines(_with(PAIRS, 1, score_chosen=float("nan"))),
        "prefs_infinite_score.jsonl": _lines(_with(PAIRS, 0, score_rejected=float("inf"))),
        "prefs_boolean_score.jsonl": _lines(_with(PAIRS, 2, score_chosen=True)),
        "prefs_conversational_chosen_is_string.jsonl": _lines(_with(conv, 1, chosen="\n    x = 1\n")),
        "corpus_missing_text.jsonl": _lines([{"content": r["text"], "source": r["source"]} for r in CORPUS]),
        # content suite
        "prefs_empty_chosen.jsonl": _lines(_with(PAIRS, 1, chosen="")),
        "prefs_whitespace_only_prompt.jsonl": _lines(_with(PAIRS, 2, prompt="   \n\t ")),
        "prefs_1mb_line.jsonl": _lines(_with(PAIRS, 1, chosen="\n    x = 1" * (1 << 17))),
        "prefs_chosen_equals_rejected.jsonl": _lines(_with(PAIRS, 1, rejected=PAIRS[1]["chosen"])),
        "prefs_duplicate_rows.jsonl": _lines(PAIRS + [PAIRS[0]]),
        "prefs_score_out_of_range.jsonl": _lines(_with(PAIRS, 2, score_rejected=1e9)),
        "prefs_conversational_bad_role.jsonl": _lines(_with(conv, 0, chosen=_messages("robot", "x = 1"))),
        "prefs_conversational_blank_content.jsonl": _lines(_with(conv, 2, rejected=_messages("assistant", " "))),
        "prefs_conversational_two_user_turns.jsonl": _lines(_with(
            conv, 1, prompt=_messages("user", "import os") + _messages("user", "and sys?"))),
        "prefs_conversational_empty_assistant_turn.jsonl": _lines(_with(conv, 2, chosen=_messages("assistant", ""))),
        "corpus_whitespace_only_text.jsonl": _lines(_with(CORPUS, 1, text="\n\n    \n")),
        "corpus_violations_per_char_above_1.jsonl": _lines(_with(CORPUS, 2, violations_per_char=1.5)),
        "corpus_negative_line_violations.jsonl": _lines(_with(CORPUS, 0, line_violations=[0, -1])),
    }


def main() -> None:
    for folder, files in (("good", good()), ("bad", bad())):
        (HERE / folder).mkdir(exist_ok=True)
        for name, data in files.items():
            (HERE / folder / name).write_bytes(data)
        print(f"wrote {len(files)} files to {HERE / folder}")


if __name__ == "__main__":
    main()
