"""Candidates: the policies evaluate compares, and how a later stage (export, register) finds one of them again.

evaluate's report.json names every candidate with its metrics and the directory it was read from, and the best
one on the task's gate. A later stage takes the directory from its own input of that candidate when given (paths in
a KFP run differ from the ones evaluate recorded), else the recorded path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignpipe.core.errors import DataError
from alignpipe.core.io import read_json

REPORT_FILE = "report.json"
# Candidate names in evaluate's report -> the stage input that carries that candidate's directory.
CANDIDATE_INPUTS = {"pretrain": "policy", "dpo": "dpo", "ppo": "ppo", "grpo": "grpo"}


def read_report(evaluation: Path) -> dict[str, Any]:
    """evaluate's report.json, checked for a non-empty `candidates` mapping and a `best_candidate` among them."""
    where = str(Path(evaluation) / REPORT_FILE)
    report = read_json(Path(evaluation) / REPORT_FILE)
    candidates = report.get("candidates") if isinstance(report, dict) else None
    best = report.get("best_candidate") if isinstance(report, dict) else None
    if not isinstance(candidates, dict) or not isinstance(best, str) or best not in candidates:
        raise DataError(where, "expected 'candidates' (name -> metrics) and 'best_candidate' naming one of them")
    return report


def candidate_dir(report: dict[str, Any], name: str, inputs: dict[str, Path | None], where: str) -> Path:
    """The directory of candidate `name`: the matching input when given, else the path evaluate recorded."""
    if name not in report["candidates"]:
        raise DataError(where, f"no candidate {name!r}; candidates: {', '.join(report['candidates'])}")
    flag = CANDIDATE_INPUTS.get(name, name)
    given = inputs.get(flag)
    if given is not None:
        return Path(given)
    recorded = (report["candidates"][name] or {}).get("path")
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    raise DataError(where, f"candidate {name!r}: directory {recorded!r} not found and no "
                    f"--{flag.replace('_', '-')} given")


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
                        f"candidate {name!r} ({expected[:12]}, {where}): refusing to register unevaluated weights")
    return actual


def best_candidate(inputs: dict[str, Path | None]) -> tuple[str, Path]:
    """(name, directory) of evaluate's best candidate when `inputs["evaluation"]` is given, else
    ("policy", the --policy input)."""
    evaluation = inputs.get("evaluation")
    if evaluation is None:
        if inputs.get("policy") is None:
            raise DataError("--policy", "no policy directory and no --evaluation report to pick one from")
        return "policy", Path(inputs["policy"])
    report = read_report(Path(evaluation))
    best = report["best_candidate"]
    return best, candidate_dir(report, best, inputs, str(Path(evaluation) / REPORT_FILE))
