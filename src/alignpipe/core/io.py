"""Reading and writing the files stages exchange: JSONL with clear one-line errors, JSON, metrics."""

from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path
from typing import Any, Iterable, Iterator

from alignpipe.core.errors import DataError

PREFS_FILE, HELDOUT_FILE = "prefs.jsonl", "heldout.jsonl"  # the label stage's training and held-out pairs


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the objects of a JSONL file; raise DataError (file, line, reason) on the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "file not found")
    if path.stat().st_size == 0:
        raise DataError(str(path), "file is empty")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}", f"not valid UTF-8 (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}", f"not a JSON line ({e.msg} at column {e.colno})") from None
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
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(str(path), "file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(str(path), f"not valid JSON: {e}") from None


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
