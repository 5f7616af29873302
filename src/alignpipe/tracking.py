"""MLflow tracking: the only module that imports mlflow.

Each stage invocation is one MLflow run named after the stage, with the config as params, the metrics, small
artifacts (reports, plots, JSON) and tags for the git commit and the data version (the md5 in `data.dvc`).
The store is `MLFLOW_TRACKING_URI`, else `sqlite:///<cwd>/mlflow.db`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import yaml

EXPERIMENT = os.environ.get("ALIGNPIPE_EXPERIMENT", "alignpipe")
SMALL_ARTIFACT_SUFFIXES = {".json", ".jsonl", ".md", ".html", ".png", ".txt", ".yaml", ".csv"}
SMALL_ARTIFACT_BYTES = 20 * 1024 * 1024


def tracking_uri() -> str:
    """The tracking store: MLFLOW_TRACKING_URI, else a sqlite file in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _mlflow():
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    for name in ("mlflow", "alembic"):  # store migrations and experiment creation are not the user's news
        logging.getLogger(name).setLevel(logging.WARNING)

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


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


def process_rank() -> int:
    """This process's global rank in a distributed launch (torchrun, accelerate launch, Kubeflow Trainer set
    RANK); 0 in a plain single-process run."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Processes of a distributed launch (torchrun, accelerate launch, Kubeflow Trainer set WORLD_SIZE); 1 in a
    plain single-process run."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True for rank 0, the only process of a distributed launch that records the stage."""
    return process_rank() == 0


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> Iterator[str]:
    """Start the MLflow run of one stage; yields the run id. Failed stages end as FAILED runs. On the other
    ranks of a distributed launch no run is opened (yields ""), so logging there is a no-op."""
    global _active_run
    if not is_main_process():
        yield ""
        return
    mlflow = _mlflow()
    mlflow.set_experiment(EXPERIMENT)
    all_tags = {"alignpipe.stage": stage, "alignpipe.git_commit": git_commit(),
                "alignpipe.data_version": data_version(), **(tags or {})}
    with mlflow.start_run(run_name=stage, tags=all_tags) as run:
        _active_run = run
        try:
            mlflow.log_params(_flatten(params))
            yield run.info.run_id
        finally:
            _active_run = None


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log numeric metrics to the active stage run (a no-op outside a stage run, e.g. in unit tests)."""
    if _active_run is None:
        return
    clean = {k.replace("@", "_at_"): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    _mlflow().log_metrics(clean, step=step)


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


def client():
    """An MlflowClient on the configured store (for the registry: register, aliases, queries)."""
    return _mlflow().MlflowClient(tracking_uri())


def mlflow_module():
    """The configured mlflow module, for model flavors (transformers, onnx) used by register and export."""
    return _mlflow()


# --- Model registry (register, evaluate's champion comparison, the serving tests) ---

def pip_requirements(*packages: str) -> list[str]:
    """`name==version` of installed packages, for a logged model's explicit pip requirements (MLflow's own
    inference of them imports torchvision, which is not installed)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in packages]


def text_signature(example_input: str, example_output, params: dict[str, Any] | None = None):
    """A model signature for string inputs, inferred from one example, with optional inference params."""
    from mlflow.models import infer_signature

    _mlflow()
    return infer_signature([example_input], example_output, params=params)


def log_transformers_model(components: dict[str, Any], name: str, task: str, registered_model_name: str,
                           **kwargs: Any) -> str:
    """Log a transformers model (`{"model": ..., "tokenizer": ...}`) to the active run with the transformers
    flavor and register it as a new version of `registered_model_name`; returns the version number."""
    mlflow = _mlflow()
    info = mlflow.transformers.log_model(components, name=name, task=task,
                                         registered_model_name=registered_model_name, **kwargs)
    return str(info.registered_model_version)


def model_version_by_alias(name: str, alias: str) -> dict[str, Any] | None:
    """`name@alias` as {"version", "source", "run_id", "tags"}; None when the model or the alias does not exist."""
    _mlflow()
    from mlflow.exceptions import MlflowException

    try:
        mv = client().get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return {"version": str(mv.version), "source": mv.source, "run_id": mv.run_id, "tags": dict(mv.tags)}


def set_model_alias(name: str, alias: str, version: str) -> None:
    """Point `name@alias` at `version`."""
    client().set_registered_model_alias(name, alias, str(version))


def set_model_version_tags(name: str, version: str, tags: dict[str, Any]) -> None:
    """Tag one model version (values are stored as strings; MLflow caps a tag value at 5000 characters)."""
    c = client()
    for k, v in tags.items():
        c.set_model_version_tag(name, str(version), k, str(v)[:5000])


def download_model(model_uri: str, dst: str | Path) -> Path:
    """Download a logged or registered model (e.g. `models:/alignpipe-policy@champion`) into `dst`."""
    mlflow = _mlflow()
    Path(dst).mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
