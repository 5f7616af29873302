"""Test environment: offline, no telemetry, MLflow and temp files inside a per-test temp dir; under pytest-xdist
(`make test`: `-n 2 --dist loadgroup`) the work units and their order."""

from __future__ import annotations

import collections
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for `import tiny`

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHEAP_MODULE_FIXTURES = {"module_mlflow"}  # module-scoped but cheap: a test using only these may leave its module


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """With `--dist loadgroup`, the work units handed to the workers: the tests of a module that use the same
    module-scoped fixtures are one unit (the fixtures are built once, on one worker), a `slow` test using none is a
    unit of its own, and the other tests of a module are one unit. Units holding a slow test go first, the larger
    first (with `--no-loadscope-reorder`), so that no long end-to-end run starts last while the other worker idles.
    Without xdist nothing changes."""
    if not getattr(config.option, "loadgroup", False):
        return
    group = {}
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        shared = sorted(name for name, defs in (fixtures.name2fixturedefs.items() if fixtures else ())
                        if defs[-1].scope == "module" and name not in CHEAP_MODULE_FIXTURES)
        module = item.nodeid.split("::")[0]
        if shared:  # with the other tests of its module that share these fixtures
            group[item] = f"{module}::{'+'.join(shared)}"
        else:
            group[item] = re.sub(r"[\[\]@]", "_", item.nodeid) if item.get_closest_marker("slow") else module
        item.add_marker(pytest.mark.xdist_group(group[item]))
    slow = {group[item] for item in items if item.get_closest_marker("slow")}
    size = collections.Counter(group.values())
    items.sort(key=lambda item: (group[item] not in slow, -size[group[item]]))  # stable: a unit keeps its order


@pytest.fixture(scope="session")
def _mlflow_template_db(tmp_path_factory):
    """An MLflow sqlite store, migrated (migrations take seconds) and holding the alignpipe experiment, made once and
    copied per test. The experiment keeps its artifacts under pytest's temp dir: MLflow's default, `./mlruns` of the
    working directory, is the checkout."""
    from alignpipe.tracking import runs

    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    runs.create_experiment(f"sqlite:///{db}", db.parent / "mlartifacts")
    return db


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch, _mlflow_template_db):
    """Each test gets its own MLflow store (env and MLflow's global URIs) and TMPDIR under pytest's temp dir (cleaned by
    pytest): nothing a test does reads or writes a ./mlflow.db that `make run` left in the checkout."""
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
def module_mlflow(tmp_path_factory, _mlflow_template_db):
    """One MLflow store for a whole test module (a copy of the template: creating a sqlite store takes seconds)."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    shutil.copy(_mlflow_template_db, db)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
        yield
