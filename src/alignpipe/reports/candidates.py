"""Candidates: evaluate's report of the policies it compared, and the chosen one it hands on as `best/`.

evaluate's report.json names every candidate with its metrics, the directory it was read from and the sha256 of its
weights, and the best one on the task's gate. evaluate copies that candidate's directory to `<evaluation>/best/`
with `candidate.json` beside the weights: the report restricted to that one candidate (same schema as report.json).
export and register take `best/` alone: its weights must still hash to what evaluate measured.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from alignpipe.core.errors import DataError
from alignpipe.core.io import read_json, write_json

REPORT_FILE = "report.json"
BEST_DIR = "best"  # evaluate's copy of the chosen candidate (its output `best`)
BEST_FILE = "candidate.json"  # in best/: the report restricted to the chosen candidate
CANDIDATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # what a candidate may be called


def read_report(evaluation: Path, name: str = REPORT_FILE) -> dict[str, Any]:
    """evaluate's report.json (or best/candidate.json), checked for a non-empty `candidates` mapping and a
    `best_candidate` among them."""
    where = str(Path(evaluation) / name)
    report = read_json(Path(evaluation) / name)
    candidates = report.get("candidates") if isinstance(report, dict) else None
    best = report.get("best_candidate") if isinstance(report, dict) else None
    if not isinstance(candidates, dict) or not isinstance(best, str) or best not in candidates:
        raise DataError(where, "expected 'candidates' (name -> metrics) and 'best_candidate' naming one of them")
    check_candidate_name(best, where)
    return report


def check_candidate_name(name: str, where: str) -> str:
    """`name` when it is a candidate's name (a stage name or an evaluate.extra_candidates NAME): a plain word, never
    a path, a URI or markup, since it ends up in registry tags, file names and pages."""
    if not CANDIDATE_NAME.fullmatch(name) or ".." in name:
        raise DataError(where, f"best_candidate {name[:60]!r} is not a candidate name (letters, digits, '_', '-', "
                        "'.'; at most 64 characters)")
    return name


def write_best(report: dict[str, Any], out_dir: Path) -> Path:
    """Copy the best candidate's directory to `out_dir/best/` with candidate.json (the report restricted to it);
    the copy's weights must hash to the sha256 evaluate recorded."""
    name = report["best_candidate"]
    entry = report["candidates"][name]
    best = Path(out_dir) / BEST_DIR
    shutil.copytree(entry["path"], best)
    write_json(best / BEST_FILE, {**report, "order": [name], "candidates": {name: entry},
                                  "reward_hacking": {k: v for k, v in (report.get("reward_hacking") or {}).items()
                                                     if k == name} or None})
    check_weights(report, name, best, str(best / BEST_FILE))
    return best


def best_candidate(best: Path) -> tuple[str, dict[str, Any] | None]:
    """(name, its report) of the policy directory `best`: evaluate's chosen candidate when it holds
    candidate.json (its weights checked against the report), else ("policy", None) for a plain policy directory."""
    if not (Path(best) / BEST_FILE).is_file():
        return "policy", None
    report = read_report(Path(best), BEST_FILE)
    name = report["best_candidate"]
    check_weights(report, name, Path(best), str(Path(best) / BEST_FILE))
    return name, report


def check_weights(report: dict[str, Any], name: str, policy_dir: Path, where: str) -> str:
    """The sha256 of `policy_dir`'s weights when it equals the one evaluate recorded for candidate `name`; a
    DataError when it differs or was not recorded (the metrics in the report would describe other weights)."""
    from alignpipe.core.hashing import weights_sha256

    expected = (report["candidates"][name] or {}).get("weights_sha256")
    if not expected:
        raise DataError(where, f"candidate {name!r} has no weights_sha256 (an evaluation from before weight hashes):"
                        " re-run evaluate")
    actual = weights_sha256(policy_dir)
    if actual != expected:
        raise DataError(str(policy_dir), f"weights sha256 {actual[:12]} are not the ones evaluate measured for "
                        f"candidate {name!r} ({expected[:12]}, {where}): refusing to use unevaluated weights")
    return actual
