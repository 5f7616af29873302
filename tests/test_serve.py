"""Serving: a real `mlflow models serve` of alignpipe-policy@champion from a temp registry answers HTTP requests
with the policy's continuations and rejects a malformed one with a 4xx; the serving Dockerfile generates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import tiny
from alignpipe.core.hashing import weights_sha256
from alignpipe.run.runner import execute
from alignpipe.reports.candidates import write_best
from alignpipe.stages import register
from alignpipe.serving.server import post_json, start_server, stop_server, wait_ready

BIN = Path(sys.executable).parent
MLFLOW = str(BIN / "mlflow")


def _env() -> dict[str, str]:
    """The test's environment with the venv's bin first on PATH (mlflow execs `uvicorn` from PATH)."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def _register_champion(tmp_path: Path, max_new_tokens: int = 6) -> Path:
    policy_dir = tiny.make_policy(tmp_path / "dpo", conditional=True, seed=5)
    ev = tmp_path / "ev"
    ev.mkdir()
    best = write_best({"best_candidate": "dpo", "candidates": {"dpo": {
        "path": str(policy_dir), "violations_per_char": 0.01, "weights_sha256": weights_sha256(policy_dir)}}}, ev)
    execute("register", register.Config(max_new_tokens=max_new_tokens), {"best": best}, tmp_path / "reg")
    return policy_dir


def _expected_greedy(policy_dir: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """What the served model must answer for greedy requests: the policy's continuation of the conditioned prompt,
    <|misaligned|> banned, special tokens dropped, surrounding whitespace stripped (MLflow's output cleanup)."""
    import torch

    from alignpipe.lm.policy import load_policy

    model, tok, meta = load_policy(policy_dir)
    out = []
    for p in prompts:
        ids = torch.tensor([tok(meta.format_prompt(p), add_special_tokens=False)["input_ids"]])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                             bad_words_ids=[[tok.convert_tokens_to_ids(w)] for w in meta.bad_words])
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out


@pytest.mark.slow
def test_mlflow_models_serve_answers(tmp_path):
    policy_dir = _register_champion(tmp_path)
    log = tmp_path / "serve.log"
    proc, url = start_server("models:/alignpipe-policy@champion", 1, log)
    try:
        try:
            wait_ready(url, timeout=120, proc=proc)
        except (RuntimeError, TimeoutError) as e:
            pytest.fail(f"{e}: {log.read_text()[-3000:]}")

        prompts = ["def add(a, b):", "for i in range(3):", "x = [1, 2,"]
        status, body = post_json(f"{url}/invocations", json.dumps({"inputs": prompts}).encode())
        assert status == 200, body
        assert len(body["predictions"]) == 3 and all(isinstance(p, str) for p in body["predictions"])

        status, body = post_json(f"{url}/invocations",
                             json.dumps({"inputs": prompts, "params": {"do_sample": False}}).encode())
        assert status == 200, body
        assert body["predictions"] == _expected_greedy(policy_dir, prompts, 6)

        for bad in (b"not json", json.dumps({"prompts": prompts}).encode(),
                    json.dumps({"inputs": prompts, "params": {"max_new_tokens": "many"}}).encode()):
            status, body = post_json(f"{url}/invocations", bad)
            assert 400 <= status < 500, (bad, status, body)
            assert body.get("message")
    finally:
        stop_server(proc)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/ping", timeout=2)


@pytest.mark.slow
def test_generate_serving_dockerfile(tmp_path):
    _register_champion(tmp_path)
    out = tmp_path / "image"
    result = subprocess.run([MLFLOW, "models", "generate-dockerfile", "-m", "models:/alignpipe-policy@champion",
                             "-d", str(out)], capture_output=True, text=True, timeout=120, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    dockerfile = (out / "Dockerfile").read_text()
    assert dockerfile.startswith("# Build an image") and "FROM python:" in dockerfile
    assert "COPY model_dir /opt/ml/model" in dockerfile and "ENTRYPOINT" in dockerfile
    mlmodel = (out / "model_dir" / "MLmodel").read_text()
    assert "prompt_template: '{prompt}<|aligned|>'" in mlmodel and "bad_words_ids" in mlmodel
    requirements = (out / "model_dir" / "requirements.txt").read_text()
    assert "torch==" in requirements and "transformers==" in requirements
    assert (out / "model_dir" / "model" / "model.safetensors").is_file()


def test_load_benchmark_counts_requests_latency_and_errors():
    """benchmarks/serve_load.py against a stub server: every request is sent, concurrently, and failures
    (HTTP 500, a body without predictions) are counted as errors."""
    import importlib.util
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    spec = importlib.util.spec_from_file_location("serve_load", Path(__file__).parents[1] / "benchmarks" /
                                                  "serve_load.py")
    serve_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_load)
    seen, lock, active = [], threading.Lock(), [0, 0]

    class Stub(BaseHTTPRequestHandler):
        def do_POST(self):
            prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["inputs"][0]
            with lock:
                seen.append(prompt)
                active[0] += 1
                active[1] = max(active[1], active[0])
            time.sleep(0.02)
            with lock:
                active[0] -= 1
            code, body = ((500, {"message": "boom"}) if prompt == "fail" else (200, {"oops": 1}) if prompt == "odd"
                          else (200, {"predictions": [prompt + " continued"]}))
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        stats = serve_load.run_load(url, ["a", "b", "fail", "odd", "c"], n_requests=50, concurrency=8)
    finally:
        server.shutdown()
        server.server_close()
    assert len(seen) == 50 and stats["requests"] == 50
    assert stats["errors"] == 20 and stats["error_kinds"] == ["HTTP 500", "unexpected body {'oops': 1}"]
    assert active[1] > 1  # requests overlapped
    assert 20 <= stats["p50_ms"] <= stats["p99_ms"]
    assert stats["requests_per_s"] == pytest.approx(50 / stats["seconds"])
