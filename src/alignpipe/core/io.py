"""Reading and writing the files stages exchange: JSONL with clear one-line errors, JSON, metrics."""

from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path
from typing import Any, Iterable, Iterator

from alignpipe.core.errors import DataError

PREFS_FILE, HELDOUT_FILE = "prefs.jsonl", "heldout.jsonl"  # the label stage's training and held-out pairs
MAX_FILE_BYTES = 8 << 30  # a JSONL input larger than this is refused before reading (8 GiB)
MAX_LINE_BYTES = 16 << 20  # one JSONL line longer than this is refused before parsing (16 MiB)
MAX_DEPTH = 64  # JSON nesting deeper than this is refused before parsing (json.loads recurses)


def check_readable_file(path: str | Path) -> Path:
    """`path` as a regular file of at most MAX_FILE_BYTES; a DataError that says what it is otherwise."""
    path = Path(path)
    if path.is_dir():
        raise DataError(str(path), "is a directory, expected a file")
    if not path.exists():
        raise DataError(str(path), "file not found")
    if not path.is_file():
        raise DataError(str(path), "not a regular file (a device, FIFO or socket)")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DataError(str(path), f"file is {size} bytes, over the {MAX_FILE_BYTES}-byte limit")
    return path


def iter_lines(f) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of a binary file, each read with a bound: a line over MAX_LINE_BYTES is a DataError
    raised before the rest of it is read."""
    lineno = 0
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > MAX_LINE_BYTES:
            raise DataError(f"{f.name}:{lineno}", f"line longer than {MAX_LINE_BYTES} bytes")
        yield lineno, raw


def json_depth(text: str) -> int:
    """The deepest nesting of [ and { in the JSON `text` (outside strings), counted without recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_json_line(text: str) -> Any:
    """json.loads of one JSONL line, bounded: ValueError (a one-line reason) when it nests deeper than MAX_DEPTH or
    holds a lone UTF-16 surrogate (`\\ud800`, which no UTF-8 writer can encode); json.JSONDecodeError as usual."""
    if text.count("[") + text.count("{") > MAX_DEPTH and json_depth(text) > MAX_DEPTH:
        raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels")
    obj = json.loads(text)
    if "\\u" in text and _has_surrogate(obj):
        raise ValueError("a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), not encodable as UTF-8")
    return obj


def _has_surrogate(obj: Any) -> bool:
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the objects of a JSONL file; raise DataError (file, line, reason) on the first bad line."""
    path = check_readable_file(path)
    if path.stat().st_size == 0:
        raise DataError(str(path), "file is empty")
    with path.open("rb") as f:
        for lineno, raw in iter_lines(f):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}", f"not valid UTF-8 (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = parse_json_line(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}", f"not a JSON line ({e.msg} at column {e.colno})") from None
            except ValueError as e:
                raise DataError(f"{path}:{lineno}", str(e)) from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}", f"expected a JSON object, got {type(obj).__name__}")
            yield obj


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a JSONL file (see iter_jsonl); an empty result is a DataError."""
    rows = list(iter_jsonl(path))
    if not rows:
        raise DataError(str(path), "file has no rows")
    return rows


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSONL (UTF-8, keys in insertion order, one object per line); returns the row count."""
    n = 0
    with Path(path).open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_json(path: str | Path, obj: Any) -> None:
    """Write pretty, key-sorted JSON (stable bytes for DVC and diffs)."""
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> Any:
    """Read a JSON file, with a DataError naming it when missing or malformed."""
    path = check_readable_file(path)
    try:
        return parse_json_line(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(str(path), f"not valid JSON: {e}") from None
    except ValueError as e:
        raise DataError(str(path), str(e)) from None


def clean_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Metrics as a flat dict of finite floats (metrics.json, MLflow and KFP all take this form)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            v = int(v)
        if not isinstance(v, (int, float)):
            raise TypeError(f"metric {k!r} is not a number: {v!r}")
        if not math.isfinite(v):
            raise ValueError(f"metric {k!r} is not finite: {v!r}")
        out[k] = float(v) if isinstance(v, float) else v
    return out


def headline(metrics: dict[str, float], patterns: Iterable[str]) -> dict[str, float]:
    """The metrics whose names match one of `patterns` (fnmatch: `*/violations_per_char`), in `metrics` order."""
    patterns = tuple(patterns)
    return {k: v for k, v in metrics.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}


def write_curves(folder: str | Path, curves: dict[str, list[tuple[int, float]]]) -> list[Path]:
    """Per-step metrics as one TSV per metric (`step`, `value`) in `folder`, named after the metric with `/` as
    `-` (`train-loss.tsv`): the form `dvc plots show` draws. Nothing is written when there are no curves."""
    written = []
    for name, points in sorted(curves.items()):
        if not written:
            Path(folder).mkdir(parents=True, exist_ok=True)
        path = Path(folder) / (name.replace("/", "-") + ".tsv")
        path.write_text("step\tvalue\n" + "".join(f"{step}\t{value!r}\n" for step, value in points),
                        encoding="utf-8")
        written.append(path)
    return written


def is_messages(value: Any) -> bool:
    """Whether `value` is TRL's conversational form: a non-empty list of {"role", "content"} dicts whose role and
    content are strings (content as a list of parts, multimodal, is not text a chat template renders here)."""
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in value))


def check_messages(value: Any, where: str) -> None:
    """A DataError unless `value` is a list of role/content messages."""
    if not is_messages(value):
        raise DataError(where, "expected a list of {'role', 'content'} messages with string contents (TRL's "
                        "conversational form)")
