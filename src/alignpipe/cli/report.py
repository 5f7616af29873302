"""Summary printed at the end of `make run`: each stage's time and headline metrics, and how to serve."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from alignpipe.run.runner import HEADLINE_FILE
from alignpipe.stages import STAGE_NAMES
from alignpipe.tracking.runs import redact, tracking_uri


def main(artifacts: str = "artifacts") -> None:
    print(f"{'stage':<10} {'seconds':>8}  headline metrics")
    total = 0.0
    for name in STAGE_NAMES:
        path = Path(artifacts) / name / "metrics.json"
        if not path.is_file():
            continue
        metrics = json.loads(path.read_text())
        seconds = metrics.get("seconds", 0.0)
        total += seconds
        short = Path(artifacts) / name / HEADLINE_FILE  # the stage's HEADLINE keys
        shown = json.loads(short.read_text()) if short.is_file() else metrics
        headline = ", ".join(f"{k}={v:.4g}" for k, v in shown.items() if k != "seconds")
        print(f"{name:<10} {seconds:>8.1f}  {headline[:150]}")
    print(f"{'total':<10} {total:>8.1f}")
    record = Path(artifacts) / "register" / "registered.json"
    if record.is_file():
        info = json.loads(record.read_text())
        venv = Path(sys.executable).parent  # the server starts `uvicorn` from PATH: put the venv's bin on it
        print(f"\nServe the champion (then POST {{\"inputs\": [\"def f(a, b):\"]}} to "
              f"http://127.0.0.1:5001/invocations):\n  PATH={venv}:$PATH MLFLOW_TRACKING_URI={redact(tracking_uri())} "
              f"mlflow models serve -m models:/{info.get('policy_name', 'alignpipe-policy')}@champion "
              "--env-manager local -p 5001")


if __name__ == "__main__":
    main()
