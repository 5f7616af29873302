"""Issue 17's acceptance 1: the tiny chat DAG (`pipeline run --local --params configs/chat-tiny.yaml`) on a tiny
Llama with a chat template and the committed conversational pairs: every task SUCCESS (ppo included), a champion
registered, and the registered champion answers a messages request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tiny

ROOT = Path(__file__).resolve().parents[1]
CHAT_TINY = ROOT / "configs" / "chat-tiny.yaml"
TASKS = ("data", "validate", "pretrain", "label", "reward", "dpo", "ppo", "grpo", "evaluate", "export", "register")


@pytest.mark.slow
def test_chat_tiny_dag_runs_every_task_registers_a_champion_and_serves_messages(tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException

    from alignpipe.tracking import runs

    llama = tiny.make_chat_llama(tmp_path / "llama", end_logit=2.0)
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "alignpipe", "pipeline", "run", "--local", "--params", str(CHAT_TINY),
                           "--set", f"data.dataset={ROOT / 'tests' / 'data' / 'chat' / 'prefs.jsonl'}",
                           "--set", f"pretrain.init_model={llama}", "--root", str(tmp_path / "runs")],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"pipeline run --local: {len(TASKS)} tasks in" in proc.stdout
    for task in TASKS:
        assert f"\n{task}  (" in proc.stdout, task
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir() and not p.name.startswith(".")]
    (report,) = run_dir.glob("evaluate*/evaluation/report.json")
    report = json.loads(report.read_text())
    assert report["task"] == "chat" and report["order"] == ["pretrain", "dpo", "ppo", "grpo"]
    (registered,) = run_dir.glob("register*/registry/registered.json")
    assert json.loads(registered.read_text())["champion_moved"]  # the first version becomes the champion

    uri = "models:/alignpipe-policy-onnx@champion"
    assert runs.mlflow_module().models.get_model_info(uri).flavors["python_function"]["loader_module"] == \
        "mlflow.pyfunc.loaders.chat_model"
    # The registered champion, loaded as `mlflow models serve` loads it, answers in process; the HTTP server on a
    # registered chat champion is tests/test_chat_serving.py::test_register_serves_the_chat_model_as_champion.
    champion = runs.mlflow_module().pyfunc.load_model(uri)
    body = champion.predict({"messages": [{"role": "user", "content": "Name a prime number."}], "max_tokens": 8})
    assert body["choices"][0]["message"]["role"] == "assistant", body
    assert isinstance(body["choices"][0]["message"]["content"], str)
    with pytest.raises(MlflowException) as bad:
        champion.predict({"messages": [{"role": "bot", "content": "x"}]})
    assert bad.value.error_code == "INVALID_PARAMETER_VALUE"  # the server's 400
