"""Test environment: offline, no telemetry, MLflow and temp files inside a per-test temp dir."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for `import tiny`

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def _mlflow_template_db(tmp_path_factory):
    """An empty, migrated MLflow sqlite store, made once (migrations take seconds) and copied per test."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    return db


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch, _mlflow_template_db):
    """Each test gets its own MLflow store (env and MLflow's global URIs) and TMPDIR under pytest's temp dir (cleaned by
    pytest): nothing a test does reads or writes a ./mlflow.db that `make run` left in the checkout."""
    if not _mlflow_template_db.exists():
        from mlflow.tracking import MlflowClient

        MlflowClient(f"sqlite:///{_mlflow_template_db}").search_experiments()
    shutil.copy(_mlflow_template_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)  # the registry follows the tracking store
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # mlflow.set_experiment exports it: an id of an earlier test's store
    if "mlflow" in sys.modules:  # an earlier test set MLflow's global URIs: point them here, not at ./mlflow.db
        import mlflow

        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        import mlflow.tracking.fluent as fluent

        fluent._active_experiment_id = None  # an experiment id of the previous test's store means nothing here
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    yield


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small dataset built by the real data stage from the stdlib `email` package."""
    import tiny

    return tiny.make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def module_mlflow(tmp_path_factory):
    """One MLflow store for a whole test module (creating a sqlite store takes seconds)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
        yield
