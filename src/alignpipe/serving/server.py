"""Start and stop a local model server (used by the serving tests and the load benchmark): `mlflow models serve` of
a registered model, or `alignpipe serve` (the OpenAI-compatible server); a free port, its own process group (mlflow
execs uvicorn, and both must go), the venv's bin on PATH (mlflow starts `uvicorn` from PATH), readiness by GET /ping
(both servers answer it)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def start_server(model_uri: str, workers: int, log_path: Path, openai: bool = False,
                 extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """`mlflow models serve` (or, with `openai`, `alignpipe serve` with the `extra` flags; `workers` unused) on a
    free local port, in its own process group (so it can be stopped whole)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bin_dir = Path(sys.executable).parent  # mlflow execs `uvicorn` from PATH
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    if openai:
        command = [sys.executable, "-m", "alignpipe.cli.main", "serve", model_uri, "--host", "127.0.0.1",
                   "--port", str(port), *extra]
    else:
        command = [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local", "-p",
                   str(port), "--host", "127.0.0.1", "--workers", str(workers)]
    with log_path.open("w") as log:  # the server keeps its own copy of the descriptor
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


@contextmanager
def served(model_uri: str, log_path: Path, timeout: float = 180.0, workers: int = 1, openai: bool = False,
           extra: tuple[str, ...] = ()) -> Iterator[str]:
    """A started, ready server's URL for the `with` body (`start_server`, `wait_ready`), stopped afterwards; a
    server that exits or does not answer raises RuntimeError with the tail of its log."""
    proc, url = start_server(model_uri, workers, log_path, openai, extra)
    try:
        try:
            wait_ready(url, timeout=timeout, proc=proc)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"{e}: {log_path.read_text()[-3000:]}") from None
        yield url
    finally:
        stop_server(proc)


def wait_ready(url: str, timeout: float = 180.0, proc: subprocess.Popen | None = None) -> float:
    """Poll GET /ping until it answers 200; returns the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/ping did not answer in {timeout:.0f} s")


def stop_server(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the started server's process group (mlflow -> uvicorn); SIGKILL what is left after `timeout`."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.poll()
        try:
            os.killpg(proc.pid, 0)  # raises once no process of the group is left
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def post_json(url: str, body: bytes, timeout: float = 60.0) -> tuple[int, dict]:
    """POST `body` as JSON to a model server: (HTTP status, decoded answer), error statuses included."""
    import json

    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
