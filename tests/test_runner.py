"""The runner: metrics.json, atomic publish (nothing half-written on failure), one MLflow run per stage."""

from __future__ import annotations

import json
import os
import socket
import types
from dataclasses import dataclass
from typing import ClassVar

import pytest

from alignpipe.run import runner
from alignpipe.tracking import registry, runs
from alignpipe.core.config import StageConfig, field
from alignpipe.core.errors import DataError
from alignpipe.core.outputs import MARKER
from alignpipe.stages import Input


@dataclass(frozen=True)
class _Cfg(StageConfig):
    SECTION: ClassVar[str] = "fake"
    fail: bool = field(False, "raise inside run")
    lr: float = field(0.1, "a param")


def _fake_stage(calls):
    def run(cfg, inputs, out_dir):
        calls.append(inputs)
        (out_dir / "model.safetensors").write_bytes(b"weights")
        (out_dir / "report.json").write_text("{}")
        runs.log_metrics({"train/loss": 1.5}, step=1)
        runs.log_metrics({"train/loss": 1.25, "reward/kl": 0.5}, step=2)
        if cfg.fail:
            raise RuntimeError("boom")
        return {"score": 0.25, "count": 3}

    return types.SimpleNamespace(Config=_Cfg, INPUTS=(Input("data", "data", "the data"),
                                                      Input("extra", None, "optional", required=False)),
                                 METRICS=("score",), HEADLINE=("sc*",), run=run)


@pytest.fixture
def fake(monkeypatch):
    calls: list = []
    monkeypatch.setattr(runner, "load_stage", lambda name: _fake_stage(calls))
    return calls


def test_publishes_outputs_and_metrics(tmp_path, fake):
    (tmp_path / "data").mkdir()
    out = tmp_path / "artifacts" / "fake"
    out.mkdir(parents=True)
    (out / MARKER).touch()  # a previous alignpipe output: replaced
    (out / "stale.txt").write_text("from an older run")
    metrics = runner.execute("fake", _Cfg(), {"data": tmp_path / "data"}, out)
    assert metrics["score"] == 0.25 and metrics["count"] == 3 and metrics["seconds"] >= 0
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "curves", "metrics.json", "metrics_headline.json",
                                                     "model.safetensors", "report.json"]
    assert fake[0] == {"data": tmp_path / "data", "extra": None}


def test_headline_metrics_and_per_step_curves_beside_metrics_json(tmp_path, fake):
    (tmp_path / "data").mkdir()
    out = tmp_path / "out"
    runner.execute("fake", _Cfg(), {"data": tmp_path / "data"}, out)
    assert json.loads((out / "metrics_headline.json").read_text()) == {"score": 0.25}
    assert sorted(p.name for p in (out / "curves").iterdir()) == ["reward-kl.tsv", "train-loss.tsv"]
    assert (out / "curves" / "train-loss.tsv").read_text() == "step\tvalue\n1\t1.5\n2\t1.25\n"
    assert (out / "curves" / "reward-kl.tsv").read_text() == "step\tvalue\n2\t0.5\n"


def test_failure_leaves_nothing_half_written(tmp_path, fake):
    (tmp_path / "data").mkdir()
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        runner.execute("fake", _Cfg(fail=True), {"data": tmp_path / "data"}, out)
    assert not out.exists() and not list(tmp_path.glob(".out.partial"))


def test_failure_keeps_only_the_report_page_until_a_success(tmp_path, fake, monkeypatch, capsys):
    (tmp_path / "data").mkdir()
    out = tmp_path / "out"
    stage = _fake_stage(fake)
    plain_run = stage.run

    def run_with_page(cfg, inputs, out_dir):
        (out_dir / "report.html").write_text("<p>why it failed")
        return plain_run(cfg, inputs, out_dir)

    with_page = types.SimpleNamespace(**{**vars(stage), "run": run_with_page})
    monkeypatch.setattr(runner, "load_stage", lambda name: with_page)
    with pytest.raises(RuntimeError, match="boom"):
        runner.execute("fake", _Cfg(fail=True), {"data": tmp_path / "data"}, out)
    failed = tmp_path / "out.failed"
    assert not out.exists() and not list(tmp_path.glob(".out.partial"))
    assert sorted(p.name for p in failed.iterdir()) == [MARKER, "report.html", "report.json"]  # not the weights
    assert f"failure report kept in {failed / 'report.html'}" in capsys.readouterr().err
    runner.execute("fake", _Cfg(), {"data": tmp_path / "data"}, out)
    assert (out / "report.html").is_file() and not failed.exists()  # a stale failure page is gone


def test_missing_input_is_a_data_error(tmp_path, fake):
    with pytest.raises(DataError, match="input --data not found"):
        runner.execute("fake", _Cfg(), {"data": tmp_path / "nope"}, tmp_path / "out")
    assert not (tmp_path / "out").exists() and fake == []


def test_mlflow_run_has_params_metrics_and_tags(tmp_path, fake, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data.dvc").write_text("outs:\n- md5: abc123.dir\n  path: data\n")
    runner.execute("fake", _Cfg(lr=0.5), {"data": "data"}, tmp_path / "out")
    client = registry.client()
    [run] = client.search_runs([client.get_experiment_by_name(runs.EXPERIMENT).experiment_id])
    assert run.info.run_name == "fake" and run.info.status == "FINISHED"
    assert run.data.params == {"fail": "False", "lr": "0.5"}
    assert run.data.metrics["score"] == 0.25 and run.data.metrics["train/loss"] == 1.25  # the last step
    assert run.data.tags["alignpipe.data_version"] == "abc123.dir"
    assert run.data.tags["alignpipe.stage"] == "fake" and run.data.tags["alignpipe.git_commit"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "report.json"} <= artifacts and "model.safetensors" not in artifacts


def test_sigterm_ends_the_mlflow_run_as_failed_and_publishes_nothing(tmp_path, monkeypatch):
    """A cancelled stage (SIGTERM: pod deleted, `kill`, DVC/KFP cancel) leaves no RUNNING run and no output."""
    import os
    import signal

    def run(cfg, inputs, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the stage")

    stage = types.SimpleNamespace(Config=_Cfg, INPUTS=(Input("data", "data", "the data"),), METRICS=("score",),
                                  run=run)
    monkeypatch.setattr(runner, "load_stage", lambda name: stage)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc:
        runner.execute("fake", _Cfg(), {"data": "data"}, tmp_path / "out")
    assert exc.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the stage's only
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial"))
    client = registry.client()
    [mlflow_run] = client.search_runs([client.get_experiment_by_name(runs.EXPERIMENT).experiment_id])
    assert mlflow_run.info.status == "FAILED"


@pytest.mark.slow
def test_a_run_killed_with_sigkill_is_marked_failed_by_the_next_start(tmp_path, fake, monkeypatch):
    """SIGKILL leaves the MLflow run RUNNING (no handler runs); the next run of the same stage on this host ends it
    as FAILED since its process is gone. A RUNNING run of a live process or of another stage is left alone."""
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    killed = ("import os, signal\nfrom alignpipe.tracking import runs\n"
              "with runs.stage_run('{}', {{}}):\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    for stage in ("fake", "other"):
        assert subprocess.run([sys.executable, "-c", killed.format(stage)]).returncode == -9
    client = registry.client()
    experiment = client.get_experiment_by_name(runs.EXPERIMENT).experiment_id
    live = client.create_run(experiment, tags={"alignpipe.stage": "fake", "alignpipe.pid": str(os.getpid()),
                                               "alignpipe.host": socket.gethostname()}).info.run_id
    assert {r.info.status for r in client.search_runs([experiment])} == {"RUNNING"}

    runner.execute("fake", _Cfg(), {"data": "data"}, tmp_path / "out")
    stale = [r for r in client.search_runs([experiment]) if r.data.tags.get("alignpipe.ended_by")]
    assert len(stale) == 1 and stale[0].info.status == "FAILED" and stale[0].data.tags["alignpipe.stage"] == "fake"
    assert "ended without closing this run" in stale[0].data.tags["alignpipe.ended_by"]
    [other] = [r for r in client.search_runs([experiment]) if r.data.tags.get("alignpipe.stage") == "other"]
    assert other.info.status == "RUNNING"  # another stage: its own next start ends it
    assert client.get_run(live).info.status == "RUNNING"  # a live process: not stale
