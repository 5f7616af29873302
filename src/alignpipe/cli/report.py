"""Summary printed at the end of `make run`: each stage's time and headline metrics, and how to serve."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from alignpipe.run.runner import HEADLINE_FILE
from alignpipe.stages import STAGE_NAMES
from alignpipe.tracking.policies import POLICY_ONNX_NAME
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
        venv = Path(sys.executable).parent  # the servers start from the venv's bin (mlflow execs `uvicorn` from PATH)
        env = f"PATH={venv}:$PATH MLFLOW_TRACKING_URI={redact(tracking_uri())}"
        onnx = POLICY_ONNX_NAME if POLICY_ONNX_NAME in (info.get("onnx_versions") or {}) else None
        if onnx:
            print(f"\nServe the champion (OpenAI-compatible: base URL http://127.0.0.1:8000/v1; docs/serving.md):\n"
                  f"  {env} alignpipe serve models:/{onnx}@champion --port 8000")
        print(f"\n{'Or through MLflow' if onnx else 'Serve the champion'} (POST {{\"inputs\": [\"def f(a, b):\"]}} to "
              f"http://127.0.0.1:5001/invocations):\n  {env} mlflow models serve -m "
              f"models:/{onnx or info.get('policy_name', 'alignpipe-policy')}@champion --env-manager local -p 5001")

if __name__ == "__main__":
    main()
