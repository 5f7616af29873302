"""MLflow tracking: stage runs (with serving/, the only code that imports mlflow; tests/test_layers.py).

Each stage invocation is one MLflow run named after the stage, with the config as params, the metrics, small
artifacts (reports, plots, JSON) and tags for the git commit and the data version (the md5 in `data.dvc`).
The store is `MLFLOW_TRACKING_URI`, else `sqlite:///<cwd>/mlflow.db`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
from pathlib import Path
from typing import Any, Iterator

import yaml

from alignpipe.core.distributed import is_main_process
from alignpipe.core.errors import AlignpipeError
from alignpipe.core.locks import hold
from alignpipe.core.redaction import has_credentials, redact, redact_logs

__all__ = ["has_credentials", "redact"]  # the one redaction (core/redaction.py), as callers of tracking know it

EXPERIMENT = os.environ.get("ALIGNPIPE_EXPERIMENT", "alignpipe")
SMALL_ARTIFACT_SUFFIXES = {".json", ".jsonl", ".md", ".html", ".png", ".txt", ".yaml", ".csv"}
SMALL_ARTIFACT_BYTES = 20 * 1024 * 1024
# A tracking server that never answers, or refuses connections, fails a run within seconds, not minutes: MLflow's
# per-request timeout (s) and retries (its defaults: 120 s and 7 retries with backoff, ~4 minutes), unless the user
# set them (e.g. a longer timeout for large model uploads through a slow server).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
SCHEMA_LOCK_WAIT = 120.0  # s another process may hold a fresh sqlite store while creating its schema


def tracking_uri() -> str:
    """The tracking store: MLFLOW_TRACKING_URI, else a sqlite file in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def mlflow_module():
    """The mlflow module, pointed at the configured store (model flavors, registry)."""
    return _mlflow()


def active_run_id() -> str | None:
    """The id of MLflow's active run (a stage run, or one a caller started), None outside any."""
    active = _mlflow().active_run()
    return active.info.run_id if active else None


def _mlflow():
    uri = tracking_uri()
    _client_settings(uri)
    import mlflow

    for name in ("mlflow", "alembic"):  # store migrations and experiment creation are not the user's news
        logging.getLogger(name).setLevel(logging.WARNING)
    redact_logs("mlflow", "alembic", "urllib3", "requests")

    # Both globals, always: MLflow's registry store looks logged models up through a client on the GLOBAL
    # tracking URI (not the one a client was built with), which would otherwise fall back to ./mlflow.db.
    from alignpipe.tracking.errors import check_tracking_uri

    check_tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    _create_schema_once(mlflow, uri)
    return mlflow


def _client_settings(uri: str) -> None:
    """MLflow's client settings for talking to `uri`: bounded HTTP timeouts and retries (HTTP_DEFAULTS, unless
    set), no telemetry, and no "View run ... at: <URI>" line on stdout when the URI holds a password."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true" if has_credentials(uri) else \
        os.environ.get("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false")


_schema_ready: set[str] = set()


def _create_schema_once(mlflow, uri: str) -> None:
    """A fresh sqlite store gets its schema from the first process that opens it: two at once (two `register`
    runs) collide in SQLAlchemy. Open both stores (tracking, registry) under a lock beside the database file."""
    if uri in _schema_ready or not uri.startswith("sqlite:///"):
        return
    db = Path(uri[len("sqlite:///"):])
    with tracking_errors(), hold(db, "MLFLOW_TRACKING_URI", wait=SCHEMA_LOCK_WAIT):
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
    _schema_ready.add(uri)


@contextlib.contextmanager
def tracking_errors() -> Iterator[None]:
    """Turn the tracking store's failures inside the block (a refused connection, a server that timed out, an HTTP
    error, a broken database) into one redacted AlignpipeError line (`tracking.errors.store_error`)."""
    from alignpipe.tracking.errors import store_error

    try:
        yield
    except AlignpipeError:
        raise
    except Exception as e:
        error = store_error(e)
        if error is None:
            raise
        raise error from None


def create_experiment(uri: str, artifact_location: Path) -> str:
    """Create the EXPERIMENT in the store at `uri` with its artifacts under `artifact_location` (a folder), unless it
    exists; returns its id. MLflow's default artifact root is `./mlruns` of whichever process first creates it."""
    _client_settings(uri)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(EXPERIMENT, artifact_location=artifact_location.resolve().as_uri())


def git_commit(cwd: str | Path = ".") -> str:
    """ALIGNPIPE_GIT_COMMIT when set (a pipeline run passes it), else HEAD's commit with `-dirty` when tracked
    files changed; `unknown` outside a git checkout."""
    if os.environ.get("ALIGNPIPE_GIT_COMMIT"):
        return os.environ["ALIGNPIPE_GIT_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def data_version(dvc_file: str | Path = "data.dvc") -> str:
    """ALIGNPIPE_DATA_VERSION when set (a pipeline run passes it), else the md5 DVC recorded for data/ in
    data.dvc; `unknown` without either."""
    if os.environ.get("ALIGNPIPE_DATA_VERSION"):
        return os.environ["ALIGNPIPE_DATA_VERSION"]
    path = Path(dvc_file)
    if not path.is_file():
        return "unknown"
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or [{}]
    return str(outs[0].get("md5", "unknown"))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return flat


_active_run = None
_curves: list[tuple[int, str, float]] = []  # (step, name, value) of every per-step metric of the active run


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> Iterator[str]:
    """Start the MLflow run of one stage; yields the run id. Failed stages end as FAILED runs. On the other
    ranks of a distributed launch no run is opened (yields ""), so logging there is a no-op."""
    global _active_run
    if not is_main_process():
        yield ""
        return
    with tracking_errors():
        mlflow = _mlflow()
        experiment = mlflow.set_experiment(EXPERIMENT)
        fail_stale_runs(stage, experiment.experiment_id)
        all_tags = {"alignpipe.stage": stage, "alignpipe.git_commit": git_commit(),
                    "alignpipe.data_version": data_version(), "alignpipe.host": socket.gethostname(),
                    "alignpipe.pid": str(os.getpid()), **(tags or {})}
        with mlflow.start_run(run_name=stage, tags=all_tags) as run:
            _active_run = run
            _curves.clear()
            try:
                mlflow.log_params(_flatten(params))
                yield run.info.run_id
            finally:
                _active_run = None


def fail_stale_runs(stage: str, experiment_id: str) -> list[str]:
    """End as FAILED the RUNNING runs of `stage` whose process is gone (killed with SIGKILL, the machine lost
    power): started on this host by a process id that no longer exists. Runs of other hosts are left alone (their
    processes cannot be seen from here). Returns the run ids it ended."""
    client = _mlflow().MlflowClient()
    found = client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                                                              f"tags.`alignpipe.stage` = '{stage}'")
    ended = []
    for run in found:
        host, pid = run.data.tags.get("alignpipe.host"), run.data.tags.get("alignpipe.pid", "")
        if host != socket.gethostname() or not pid.isdigit() or _process_exists(int(pid)):
            continue
        client.set_tag(run.info.run_id, "alignpipe.ended_by",
                       f"the next {stage} run: process {pid} on {host} ended without closing this run (killed)")
        client.set_terminated(run.info.run_id, status="FAILED")
        ended.append(run.info.run_id)
    return ended


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log numeric metrics to the active stage run (a no-op outside a stage run, e.g. in unit tests)."""
    if _active_run is None:
        return
    clean = {k.replace("@", "_at_"): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if step is not None:
        _curves.extend((int(step), k, v) for k, v in clean.items())
    _mlflow().log_metrics(clean, step=step)


def curves() -> dict[str, list[tuple[int, float]]]:
    """The per-step metrics logged so far in the active stage run: name -> [(step, value), ...] in logging order
    (what the runner writes as curves.tsv for `dvc plots`)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for step, name, value in _curves:
        out.setdefault(name, []).append((step, value))
    return out


def log_artifacts(out_dir: str | Path) -> None:
    """Log the small files of a stage's output (reports, plots, JSON) to the active run; models are logged by
    `register`, not copied on every run."""
    if _active_run is None:
        return
    mlflow = _mlflow()
    for path in sorted(Path(out_dir).rglob("*")):
        if (path.is_file() and path.suffix in SMALL_ARTIFACT_SUFFIXES
                and path.stat().st_size <= SMALL_ARTIFACT_BYTES and "checkpoint" not in path.parts[-2]):
            rel = path.parent.relative_to(out_dir)
            mlflow.log_artifact(str(path), artifact_path=None if str(rel) == "." else str(rel))


def mlflow_callback():
    """A transformers TrainerCallback that sends the Trainer's logs (loss, learning rate, ...) to the active run."""
    from transformers import TrainerCallback

    class _Callback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                log_metrics({f"train/{k}": v for k, v in logs.items()}, step=state.global_step)

    return _Callback()
