"""The Kubeflow pipeline: components and DAG compile; the compiled YAML has every stage with GPUs only where they
belong, caching off where stages sample, parameter defaults from the params file; submit talks to a (fake) KFP
API; the real DAG runs locally with kfp.local (with stand-in stages where a test needs speed or a stage is
missing), and the tiny params give the same metrics through `dvc repro` and `pipeline run --local`."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from alignpipe.cli.main import build_parser, main
from alignpipe.core.config import StageConfig, field, load_params
from alignpipe.core.errors import ConfigError
from alignpipe.stages import CANDIDATES, MULTI_GPU, OUTPUTS, STAGE_NAMES, SWITCHED, STAGES as REGISTRY, load_stage
from alignpipe.cli import kfp as pipeline_cli
from alignpipe.components import runtime
from alignpipe.components.image import CPU_IMAGE, GPU_IMAGE
from alignpipe.components.stages import COMPONENTS
from alignpipe.pipelines.align import GPU_STAGES, MLFLOW_SECRET, NO_CACHE, STAGES, build_pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
EMAIL = Path(sysconfig.get_paths()["stdlib"]) / "email"
PARAMETERS = {"env", "launcher"}  # component inputs that are not artifacts, beside the <stage>__<key> config ones
def is_timing(key: str) -> bool:
    """Metrics measured with a clock (durations, throughputs, latencies, speedups): they differ run to run."""
    return key.endswith(("seconds", "_per_s", "tflops", "_ms", "_ms_ort", "_ms_torch")) or "speedup" in key \
        or "_per_s_" in key


def artifact_inputs(component) -> dict[str, bool]:
    """name -> optional, for the artifact inputs of a component."""
    return {k: bool(v.optional) for k, v in component.component_spec.inputs.items()
            if k not in PARAMETERS and "__" not in k}


def compile_cli(tmp_path: Path, *argv: str, params: Path | None = None) -> tuple[Path, list[dict]]:
    if params is None:
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump({"data": {"n_prompts": 8}}))
    out = tmp_path / "pipeline.yaml"
    assert main(["pipeline", "compile", "--out", str(out), "--params", str(params), *argv]) == 0
    return out, pipeline_cli.task_table(out)


def pipeline_inputs(path: Path) -> dict:
    return yaml.safe_load(path.read_text().split("\n---\n")[0])["root"]["inputDefinitions"]["parameters"]


# ------------------------------------------------------------------------------------------- components


@pytest.mark.parametrize("name", list(COMPONENTS))
def test_every_component_compiles_to_the_pinned_image_without_pip(name, tmp_path):
    from kfp import compiler

    out = tmp_path / f"{name}.yaml"
    compiler.Compiler().compile(COMPONENTS[name], str(out))
    spec = yaml.safe_load(out.read_text())
    container = spec["deploymentSpec"]["executors"][f"exec-{name}"]["container"]
    assert container["image"] == (GPU_IMAGE if name in GPU_STAGES else CPU_IMAGE)
    command = " ".join(container["command"])
    assert "pip install" not in command  # the image has the pinned kfp: pods start offline
    body = container["command"][-1]
    assert f'run_stage("{name}", config' in body and "from alignpipe.components.runtime import" in body
    assert set(spec["root"]["outputDefinitions"]["artifacts"]) >= {"metrics"}
    assert ("launcher" in spec["root"]["inputDefinitions"]["parameters"]) == (name in MULTI_GPU)


@pytest.mark.parametrize("name", ["data", *STAGE_NAMES])
def test_component_inputs_are_the_stage_inputs(name):
    stage = load_stage(name)
    assert set(artifact_inputs(COMPONENTS[name])) == {i.name for i in stage.INPUTS}
    for spec in stage.INPUTS:  # an input the stage can do without is optional in the component too
        if spec.required:
            assert not artifact_inputs(COMPONENTS[name])[spec.name], spec.name


def test_stage_names_match_across_params_dvc_cli_components_and_pipeline(tmp_path):
    assert tuple(COMPONENTS) == STAGES == ("data", *STAGE_NAMES)
    for params_file in [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]:
        assert set(load_params(params_file)) <= set(COMPONENTS), params_file
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert tuple(dvc["stages"]) == STAGE_NAMES  # data/ is built by `alignpipe data build` and tracked by data.dvc
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"data", "pipeline", *STAGE_NAMES} <= set(commands)
    for name, stage in dvc["stages"].items():
        assert stage["cmd"].split()[:2] == ["alignpipe", name]
    _, rows = compile_cli(tmp_path)
    assert {r["stage"] for r in rows} == set(STAGES)
    for name in ["data", *STAGE_NAMES]:
        assert load_stage(name).Config.SECTION == name


def test_components_and_pipelines_are_subpackages_not_top_level_names():
    """components/ and pipelines/ stay top-level folders, installed as alignpipe.components/.pipelines (no generic
    `components`/`pipelines` in site-packages); a source checkout imports the same files."""
    import tomllib

    import alignpipe.components.stages
    import alignpipe.pipelines.align

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"": "src", "alignpipe.components": "components",
                                         "alignpipe.pipelines": "pipelines"}
    assert all(p.startswith("alignpipe") for p in setuptools["packages"])
    assert Path(alignpipe.components.stages.__file__) == ROOT / "components" / "stages.py"
    assert Path(alignpipe.pipelines.align.__file__) == ROOT / "pipelines" / "align.py"


def test_candidates_come_from_the_registry():
    """One list of policy-producing stages: evaluate has one optional input per candidate after the reference,
    export and register take evaluate's `best` alone, and the DAG trains every candidate."""
    from alignpipe.stages import CANDIDATES, REFERENCE

    assert CANDIDATES[0] == (REFERENCE, "policy")
    ev = {i.name: i for i in load_stage("evaluate").INPUTS}
    for stage, output in CANDIDATES[1:]:
        assert ev[output].pipeline_path == f"artifacts/{stage}" and not ev[output].required and not ev[output].default
        assert output in COMPONENTS[stage].component_spec.outputs
        assert stage in NO_CACHE and stage in GPU_STAGES
    assert {i.name for i in load_stage("export").INPUTS} == {"best", "reward_model", "data"}
    assert {i.name for i in load_stage("register").INPUTS} == {"best", "reward_model", "export"}
    assert "best" in COMPONENTS["evaluate"].component_spec.outputs


def test_committed_dvc_yaml_is_the_generated_one():
    from alignpipe.cli import dvcgen

    assert (ROOT / "dvc.yaml").read_text() == dvcgen.render(), \
        "dvc.yaml is stale: run `alignpipe pipeline dvc-yaml --out dvc.yaml`"


def test_dvc_code_deps_follow_imports_including_function_local_ones(tmp_path, monkeypatch):
    from alignpipe.cli import dvcgen

    pkg = tmp_path / "alignpipe"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "top.py").write_text("from alignpipe.sub import a\n\ndef f():\n    from . import late\n")
    (pkg / "sub" / "a.py").write_text("import os\nfrom .b import thing\n")
    (pkg / "sub" / "b.py").write_text("thing = 1\n")
    (pkg / "late.py").write_text("import alignpipe.sub\n")
    (pkg / "unused.py").write_text("")
    monkeypatch.setattr(dvcgen, "SRC", tmp_path)
    assert dvcgen.code_deps("alignpipe.top") == [
        f"{tmp_path.name}/alignpipe/{p}" for p in
        ("__init__.py", "late.py", "sub/__init__.py", "sub/a.py", "sub/b.py", "top.py")]


def test_dvc_yaml_lists_headline_metrics_and_plots():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert dvc["metrics"] == [f"artifacts/{n}/metrics_headline.json" for n in STAGE_NAMES]
    plots = [next(iter(p)) for p in dvc["plots"]]
    assert plots == [f"artifacts/{s.name}/curves" for s in REGISTRY if s.curves] + ["artifacts/evaluate/frontier.tsv"]
    assert {"pretrain", "reward", "dpo", "ppo"} <= {s.name for s in REGISTRY if s.curves}
    deps = dvc["stages"]["dpo"]["deps"]
    assert {"src/alignpipe/stages/dpo.py", "src/alignpipe/lm/policy.py", "src/alignpipe/run/runner.py"} <= set(deps)


# ------------------------------------------------------------------------------------------- compile


def test_compiled_pipeline_has_every_stage_with_gpus_only_on_gpu_tasks(tmp_path):
    out, rows = compile_cli(tmp_path)
    by_task = {r["task"]: r for r in rows}
    (switch,) = SWITCHED  # one run-time switch (ppo): two branches, each with the evaluate -> register tail
    trainers = {stage for stage, _ in CANDIDATES[1:] if stage != switch}
    assert {"dpo", "grpo"} <= trainers and switch == "ppo"
    assert set(by_task) == {"data", "validate", "pretrain", "label", "reward", *trainers, f"{switch}-on/{switch}",
                            *(f"{switch}-{b}/{s}" for b in ("on", "off") for s in ("evaluate", "export", "register"))}
    for row in rows:
        gpu = row["stage"] in GPU_STAGES
        assert row["gpus"] == (1 if gpu else 0), row
        assert row["accelerator"] == ("nvidia.com/gpu" if gpu else ""), row
        assert bool(row["node_selector"]) == gpu and bool(row["tolerations"]) == gpu, row
        assert row["image"] == (GPU_IMAGE if gpu else CPU_IMAGE), row
        assert row["cpu"] and row["memory"], row
        assert row["secrets"] == [MLFLOW_SECRET], row
        assert row["cache"] == (row["stage"] not in NO_CACHE), row
    assert {"pretrain", "reward", "dpo", "grpo", "export"} <= {r["stage"] for r in rows if r["gpus"]}
    assert by_task["validate"]["gpus"] == 0 and by_task["validate"]["image"] == CPU_IMAGE
    assert by_task["validate"]["cache"] and not by_task["label"]["cache"] and not by_task["ppo-on/evaluate"]["cache"]
    platform = yaml.safe_load(out.read_text().split("\n---\n")[1])["platforms"]["kubernetes"]["deploymentSpec"]
    secret = platform["executors"]["exec-pretrain"]["secretAsEnv"][0]
    assert secret["optional"] is True and {"envVar": "MLFLOW_TRACKING_PASSWORD",
                                           "secretKey": "MLFLOW_TRACKING_PASSWORD"} in secret["keyToEnv"]
    assert platform["executors"]["exec-pretrain"]["tolerations"] == [
        {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    assert "ppo-on/ppo" in pipeline_cli.format_task_table(rows)


def test_parameter_defaults_come_from_the_params_file_and_set(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"data": {"n_prompts": 7, "val_frac": 0.1}, "validate": {"min_rows": 3}}))
    out, _ = compile_cli(tmp_path, "--set", "data.seed=5", "--set", "validate.allow_duplicates=true",
                         "--mlflow-uri", "http://mlflow:5000", "--no-ppo", params=params)
    inputs = pipeline_inputs(out)
    data_cfg = load_stage("data").Config
    got = {key: inputs[f"data__{key}"].get("defaultValue", "") for key in data_cfg().to_dict()}
    assert got == data_cfg(n_prompts=7, val_frac=0.1, seed=5).to_dict()  # complete: every key, typed
    assert inputs["data__n_prompts"]["parameterType"] == "NUMBER_INTEGER"
    assert inputs["validate__min_rows"]["defaultValue"] == 3
    assert inputs["validate__allow_duplicates"]["defaultValue"] is True
    assert inputs["mlflow_tracking_uri"]["defaultValue"] == "http://mlflow:5000"
    assert inputs["run_ppo"]["defaultValue"] is False
    assert inputs["git_commit"]["defaultValue"]  # the commit that compiled it (or "unknown")
    assert {name.split("__")[0] for name in inputs if "__" in name} == set(STAGES)
    assert inputs["pretrain__max_steps"]["description"].startswith("pretrain.max_steps (params.yaml): ")


def test_repo_params_yaml_compiles(tmp_path):
    out, rows = compile_cli(tmp_path, params=ROOT / "params.yaml")
    inputs = pipeline_inputs(out)
    repo = load_params(ROOT / "params.yaml")
    for stage, section in repo.items():
        for key, value in section.items():
            assert inputs[f"{stage}__{key}"]["defaultValue"] == value, f"{stage}.{key}"


def test_gpus_request_and_torchrun_launch(tmp_path):
    _, rows = compile_cli(tmp_path, "--set", "pretrain.gpus=4", "--set", "dpo.gpus=2")
    by_task = {r["task"]: r for r in rows}
    assert by_task["pretrain"]["gpus"] == 4
    assert by_task["pretrain"]["launcher"] == ["torchrun", "--standalone", "--nproc_per_node", "4", "-m", "alignpipe"]
    assert by_task["pretrain"]["cpu"] == "32"  # per-GPU resources scale with the GPU count
    assert by_task["dpo"]["gpus"] == 2 and "2" in by_task["dpo"]["launcher"]
    assert by_task["reward"]["gpus"] == 1 and by_task["reward"]["launcher"] == []
    assert by_task["label"]["gpus"] == 1 and by_task["label"]["launcher"] == []
    _, rows = compile_cli(tmp_path, "--set", "reward.gpus=0")
    reward = next(r for r in rows if r["task"] == "reward")
    assert reward["gpus"] == 0 and not reward["node_selector"]  # 0: a CPU node


@pytest.mark.parametrize("argv, message", [
    (["--set", "validate.gpus=2"], "validate.gpus: unknown key"),
    (["--set", "pretrain.gpus=-1"], "pretrain.gpus"),
    (["--set", "pretrain.gpus=two"], "pretrain.gpus"),
    (["--set", "bogus.key=1"], "unknown section 'bogus'"),
    (["--set", "data.n_promptz=3"], "data.n_promptz: unknown key"),
    (["--import", "weights=gs://b/w"], "cannot be imported"),
    (["--import", "data=gs://b/d", "--import", "corpus=gs://b/c"], "either data"),
])
def test_bad_compile_arguments_are_one_line_errors(argv, message, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("data: {}\n")
    assert main(["pipeline", "compile", "--out", str(tmp_path / "p.yaml"), "--params", str(params), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "p.yaml").exists()


def test_imported_data_replaces_the_data_task(tmp_path):
    out, rows = compile_cli(tmp_path, "--import", "data=gs://bucket/data/v3", "--import", "human_prefs=s3://b/p.jsonl")
    assert "data" not in {r["task"] for r in rows}
    assert sum(r["image"] == "(importer)" for r in rows) == 2
    inputs = pipeline_inputs(out)
    assert inputs["data_uri"]["defaultValue"] == "gs://bucket/data/v3"
    assert inputs["data_version"]["defaultValue"] == "gs://bucket/data/v3"
    assert inputs["human_prefs_uri"]["defaultValue"] == "s3://b/p.jsonl"
    assert "data" not in inputs  # no unused data section in the UI
    spec = yaml.safe_load(out.read_text().split("\n---\n")[0])
    assert "prefs" in spec["root"]["dag"]["tasks"]["validate"]["inputs"]["artifacts"]


def test_run_needs_local(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pipeline", "run"])
    assert e.value.code == 2 and "--local" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- runtime


def test_torchrun_command_line():
    cmd = runtime.cli_command(["torchrun", "--standalone", "--nproc_per_node", "4", "-m", "alignpipe"], "reward",
                              "/tmp/p.yaml", {"prefs": "/a/prefs", "policy": None}, "/a/out")
    assert cmd == ["torchrun", "--standalone", "--nproc_per_node", "4", "-m", "alignpipe", "reward", "--params",
                   "/tmp/p.yaml", "--prefs", "/a/prefs", "--policy", "", "--out", "/a/out"]
    assert runtime.cli_command(["python"], "data", "p", {}, "o")[:3] == ["python", "data", "build"]


@pytest.mark.slow
def test_launched_stage_gives_the_same_outputs_as_in_process(tmp_path):
    """The launcher path (here `python -m alignpipe`, torchrun on GPU nodes) runs the same stage as in process."""
    from alignpipe.run.runner import execute

    config = {"source_dir": str(EMAIL), "test_frac": 0.3, "val_frac": 0.1, "n_prompts": 8}
    cfg = load_stage("data").Config.from_dict(config)
    inproc = execute("data", cfg, {"corpus": None}, tmp_path / "a")
    launched = runtime.launch([sys.executable, "-m", "alignpipe"], "data", config, {"corpus": None},
                              str(tmp_path / "b"))
    assert launched == inproc
    for name in ("train.jsonl", "prompts.jsonl", "MANIFEST.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# ------------------------------------------------------------------------------------------- submit


class FakeKFP(BaseHTTPRequestHandler):
    """The few KFP v2beta1 endpoints kfp.Client calls; every call is recorded."""

    calls: list = []

    def _reply(self, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _record(self) -> tuple[str, dict | None]:
        size = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(size)) if size else None
        url = urlparse(self.path)
        self.calls.append({"method": self.command, "path": url.path, "query": parse_qs(url.query), "body": body})
        return url.path, body

    def do_GET(self):
        path, _ = self._record()
        self._reply({"multi_user": False} if path.endswith("/healthz") else {})  # no experiment exists yet

    def do_POST(self):
        path, body = self._record()
        kind = path.rsplit("/", 1)[-1]
        ids = {"experiments": "experiment_id", "runs": "run_id", "recurringruns": "recurring_run_id"}
        self._reply({ids[kind]: f"{kind}-1", "display_name": body["display_name"]})

    def log_message(self, *args):
        pass


@pytest.fixture
def kfp_server(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.config/kfp/context.json from the user
    FakeKFP.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKFP)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", FakeKFP.calls
    server.shutdown()
    server.server_close()


def test_submit_creates_a_run_in_the_experiment(kfp_server, tmp_path, capsys):
    host, calls = kfp_server
    params = tmp_path / "params.yaml"
    params.write_text("data: {n_prompts: 8}\n")
    assert main(["pipeline", "submit", "--host", host, "--experiment", "nightly", "--params", str(params),
                 "--set", "pretrain.gpus=2", "--run-name", "try-1"]) == 0
    assert "submitted run runs-1 in experiment nightly" in capsys.readouterr().out
    posts = {c["path"]: c["body"] for c in calls if c["method"] == "POST"}
    assert posts["/apis/v2beta1/experiments"]["display_name"] == "nightly"
    run = posts["/apis/v2beta1/runs"]
    assert run["experiment_id"] == "experiments-1" and run["display_name"] == "try-1"
    spec = run["pipeline_spec"]
    assert spec["pipeline_spec"]["pipelineInfo"]["name"] == "alignpipe"
    assert spec["pipeline_spec"]["root"]["inputDefinitions"]["parameters"]["data__n_prompts"]["defaultValue"] == 8
    executors = spec["pipeline_spec"]["deploymentSpec"]["executors"]
    assert executors["exec-pretrain"]["container"]["resources"]["accelerator"]["resourceCount"] == "2"
    assert "nodeSelector" in spec["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-dpo"]
    assert "/apis/v2beta1/recurringruns" not in posts


def test_submit_schedule_creates_a_recurring_run(kfp_server, tmp_path, capsys):
    host, calls = kfp_server
    params = tmp_path / "params.yaml"
    params.write_text("data: {}\n")
    assert main(["pipeline", "submit", "--host", host, "--schedule", "30 2 * * 1", "--params", str(params),
                 "--import", "data=gs://bucket/alignpipe/data/latest"]) == 0
    assert "submitted recurring run recurringruns-1 in experiment alignpipe on cron '0 30 2 * * 1'" in \
        capsys.readouterr().out
    posts = {c["path"]: c["body"] for c in calls if c["method"] == "POST"}
    job = posts["/apis/v2beta1/recurringruns"]
    assert job["trigger"] == {"cron_schedule": {"cron": "0 30 2 * * 1"}}
    assert job["max_concurrency"] == 1 and job["no_catchup"] is True and job["mode"] == "ENABLE"
    assert job["experiment_id"] == "experiments-1"
    spec = job["pipeline_spec"]["pipeline_spec"]
    assert spec["root"]["inputDefinitions"]["parameters"]["data_uri"]["defaultValue"] == \
        "gs://bucket/alignpipe/data/latest"
    assert spec["deploymentSpec"]["executors"]["exec-importer"]["importer"]["reimport"] is True

    def tasks(dag):
        for task in dag["tasks"].values():
            comp = spec["components"][task["componentRef"]["name"]]
            yield from tasks(comp["dag"]) if "dag" in comp else [task]

    assert not any(t.get("cachingOptions", {}).get("enableCache") for t in tasks(spec["root"]["dag"]))


def test_kfp_cron_and_bad_schedule(kfp_server, capsys):
    assert pipeline_cli.kfp_cron("0 3 * * *") == "0 0 3 * * *"
    assert pipeline_cli.kfp_cron("15 0 3 * * *") == "15 0 3 * * *"
    with pytest.raises(ConfigError, match="5 fields"):
        pipeline_cli.kfp_cron("daily")
    host, calls = kfp_server
    assert main(["pipeline", "submit", "--host", host, "--schedule", "@daily", "--params", str(TINY)]) == 2
    assert "--schedule: expected cron" in capsys.readouterr().err
    assert calls == []


# ------------------------------------------------------------------------------------------- local runs

# Stand-in stage modules, for fast DAG runs and for stages not written yet: a `sitecustomize` on PYTHONPATH puts
# them in front of the real ones in every task's subprocess. Each records the paths it got and returns its seed.
STUB_SITE = '''
import importlib.abc, importlib.util, json, os, sys

STUBS = json.loads(os.environ["ALIGNPIPE_STUBS"])
SOURCE = """
from dataclasses import dataclass
from typing import ClassVar
from alignpipe.core.config import StageConfig, field
from alignpipe.core.io import write_json
from alignpipe.stages import Input

@dataclass(frozen=True)
class Config(StageConfig):
    SECTION: ClassVar[str] = NAME
    seed: int = field(0, "seed")

    @classmethod
    def from_dict(cls, values):  # the component hands over every key of the real stage's section: one int kept
        return super().from_dict({"seed": values[INT_KEY]})

INPUTS = tuple(Input(n, None, n, r) for n, r in SPEC)
METRICS = ("seed",)

def run(cfg, inputs, out_dir):
    write_json(out_dir / "inputs.json", {k: (str(v) if v is not None else None) for k, v in inputs.items()})
    (out_dir / "report.md").write_text("# " + NAME)
    (out_dir / "report.html").write_text("<p>" + NAME)
    (out_dir / "best").mkdir()  # evaluate's chosen policy
    (out_dir / "best" / "from.txt").write_text(NAME)
    return {"seed": cfg.seed}
"""


class Loader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        name = module.__name__.rsplit(".", 1)[1]
        module.__dict__.update(NAME=name, SPEC=STUBS[name][0], INT_KEY=STUBS[name][1])
        exec(SOURCE, module.__dict__)


class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        prefix, _, name = fullname.rpartition(".")
        if prefix == "alignpipe.stages" and name in STUBS:
            return importlib.util.spec_from_loader(fullname, Loader())
        return None


sys.meta_path.insert(0, Finder())
'''
REAL_IN_WIRING_TEST = ("data", "validate")  # fast real stages; the others are stand-ins


def stub_int_key(stage: str) -> str:
    """An int key of the real stage's config, handed over by its component: the stand-in reports it as `seed`."""
    return "seed" if "seed" in load_stage(stage).Config().to_dict() else "max_new_tokens"


@pytest.fixture
def stub_stages(tmp_path, monkeypatch):
    site = tmp_path / "stub_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(STUB_SITE)
    stubs = {name: [[[k, not optional] for k, optional in artifact_inputs(comp).items()], stub_int_key(name)]
             for name, comp in COMPONENTS.items() if name not in REAL_IN_WIRING_TEST}
    monkeypatch.setenv("ALIGNPIPE_STUBS", json.dumps(stubs))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    return stubs


def mlflow_runs(db: Path) -> dict[str, dict[str, str]]:
    """Run name -> its tags, read straight from the MLflow sqlite store."""
    with sqlite3.connect(db) as con:
        runs = dict(con.execute("SELECT run_uuid, name FROM runs").fetchall())
        tags = con.execute("SELECT run_uuid, key, value FROM tags").fetchall()
    return {name: {k: v for r, k, v in tags if r == uuid} for uuid, name in runs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("run_ppo", [False], ids=["ppo-off"])
def test_local_run_of_the_whole_dag(run_ppo, stub_stages, tmp_path, monkeypatch):
    """The compiled DAG, run by kfp.local: real data and validate components and stages, stand-ins for the rest.
    Every input reaches its stage from the right upstream task, each stage gets its own params section (ints
    intact), metrics reach the KFP Metrics artifact, HTML/Markdown outputs are written, and MLflow runs land in the
    store given by the pipeline parameter. The ppo-off branch (with imported human preferences) only: the ppo-on
    branch runs for real in `tiny_local_run`, and `test_dvc_repro_and_local_pipeline_give_the_same_metrics` holds
    each of its stages (ppo and evaluate's ppo row included) to dvc repro's metrics."""
    sections = {name: {stub_int_key(name): 100 + i} for i, name in enumerate(STAGES) if name not in REAL_IN_WIRING_TEST}
    source = shutil.copytree(EMAIL, tmp_path / "email")  # not under .../python3.11/: see test_python3_in_a_path...
    sections["data"] = {"source_dir": str(source), "test_frac": 0.3, "val_frac": 0.1, "n_prompts": 8}
    sections["validate"] = {"min_rows": 1}
    imports = {}
    if not run_ppo:  # the importer path too: human preferences, checked by the real validate
        import tiny

        imports["human_prefs"] = str(tiny.make_prefs(tmp_path / "human" / "prefs.jsonl"))
    env_db = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    db = shutil.copy(env_db, tmp_path / "kfp-mlflow.db")  # conftest's migrated, empty store: saves the migration
    monkeypatch.chdir(tmp_path)  # like a pod: no git checkout, no data.dvc, so the run tags come from `env`
    func = build_pipeline(sections, imports=imports, run={"ppo": run_ppo}, mlflow_tracking_uri=f"sqlite:///{db}",
                          git_commit="abc123", data_version="v-test")
    yaml_path = pipeline_cli.compile_pipeline(func, tmp_path / "root" / "pipeline.yaml")
    run = pipeline_cli.run_local(yaml_path, tmp_path / "root")

    expected = [s for s in STAGES if run_ppo or s != "ppo"]
    assert sorted(t.name for t in run.tasks) == sorted(expected)
    out = {t.name: t.outputs for t in run.tasks}
    path = {name: str(out[name][OUTPUTS[name]]) for name in expected}
    folder = {name: Path(p).parent for name, p in path.items()}  # `evaluate-2` in the ppo-off branch
    human = imports.get("human_prefs")
    wiring = {
        "pretrain": {"data": path["data"]},
        "label": {"data": path["data"], "policy": path["pretrain"], "judge_model": None, "human_prefs": human},
        "reward": {"prefs": path["label"], "policy": path["pretrain"]},
        "dpo": {"data": path["data"], "policy": path["pretrain"], "prefs": path["label"], "human_prefs": human},
        "ppo": {"data": path["data"], "policy": path["pretrain"], "reward_model": path["reward"]},
        "grpo": {"data": path["data"], "policy": path["pretrain"], "reward_model": path["reward"]},
        "evaluate": {"data": path["data"], **{output: path.get(stage) for stage, output in CANDIDATES},
                     "reward_model": path["reward"], "prompts": None},
        "export": {"best": str(out["evaluate"]["best"]), "reward_model": path["reward"], "data": path["data"]},
        "register": {"best": str(out["evaluate"]["best"]), "reward_model": path["reward"], "export": path["export"]},
    }
    for name, inputs in wiring.items():
        if name in expected:
            assert json.loads(Path(path[name], "inputs.json").read_text()) == inputs, name
    for name in expected:
        metrics = json.loads(Path(path[name], "metrics.json").read_text())
        executor_output = json.loads((folder[name] / "executor_output.json").read_text())
        kfp_metrics = executor_output["artifacts"]["metrics"]["artifacts"][0]["metadata"]
        assert kfp_metrics == pytest.approx(metrics), name
        if name in stub_stages:
            assert metrics["seed"] == sections[name][stub_int_key(name)] and type(metrics["seed"]) is int, name
    assert (Path(path["data"]) / "prompts.jsonl").is_file()
    validation = json.loads(Path(path["validate"], "report.json").read_text())
    assert validation["n_failed_expectations"] == 0
    assert {f["kind"] for f in validation["files"]} >= ({"prefs"} if human else set())
    assert "PASSED: all" in out["validate"]["report_html"].read_text()  # the validate stage's own page
    assert out["evaluate"]["report"].read_text() == "# evaluate"
    assert out["evaluate"]["report_html"].read_text() == "<p>evaluate"
    assert (out["evaluate"]["best"] / "from.txt").read_text() == "evaluate"  # best/ of evaluate's output

    runs = mlflow_runs(db)
    assert set(runs) == set(expected)  # one run per stage, named after it, in the parameter's store
    assert {(t["alignpipe.data_version"], t["alignpipe.git_commit"]) for t in runs.values()} == {("v-test", "abc123")}
    assert mlflow_runs(env_db) == {}  # the parameter wins over the environment
    assert "executor_output.json" not in pipeline_cli.format_local_run(run)
    assert not list((tmp_path / "root").glob(".tmp"))  # the tasks' scratch folders are cleaned up


def test_python3_in_a_path_is_refused_for_local_runs(tmp_path):
    func = build_pipeline({"data": {"source_dir": str(EMAIL)}})
    yaml_path = pipeline_cli.compile_pipeline(func, tmp_path / "pipeline.yaml")
    with pytest.raises(ConfigError, match="^data__source_dir: contains 'python3'"):
        pipeline_cli.run_local(yaml_path, tmp_path / "root")
    assert not (tmp_path / "root").exists()


def test_containerized_runs_keep_mlflow_artifacts_under_the_pipeline_root(tmp_path):
    from alignpipe.cli.containers import tracking_store
    from alignpipe.tracking import runs

    root = tmp_path / "root"
    root.mkdir()
    uri = tracking_store(root)
    assert uri == f"sqlite:///{root / 'mlflow.db'}" and (root / "mlflow.db").stat().st_mode & 0o777 == 0o666
    from mlflow import MlflowClient

    experiment = MlflowClient(uri).get_experiment_by_name(runs.EXPERIMENT)
    # not ./mlruns of a task's container (lost with it): the root, which every task mounts at its own path
    assert experiment.artifact_location == (root / "mlartifacts").as_uri()
    assert (root / "mlartifacts").stat().st_mode & 0o777 == 0o777
    assert tracking_store(root) == uri  # a second call keeps the experiment


# ------------------------------------------------------------------------------------------- full tiny DAG


def task_dir(run_dir: Path, stage: str) -> Path:
    """A task's folder in a kfp.local run: named after its component (`evaluate` or `evaluate-2`)."""
    (folder,) = [p for p in run_dir.iterdir() if re.fullmatch(rf"{stage}(-\d+)?", p.name)]
    return folder


@pytest.fixture(scope="module")
def tiny_local_run(tmp_path_factory):
    """`alignpipe pipeline run --local --params configs/tiny.yaml`, the real stages end to end."""
    root = tmp_path_factory.mktemp("kfp-local")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "TMPDIR": str(root)}
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "alignpipe", "pipeline", "run", "--local", "--params", str(TINY),
                           "--root", str(root / "runs")], cwd=root, env=env, capture_output=True, text=True)
    seconds = time.time() - start
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (run_dir,) = [p for p in (root / "runs").iterdir() if p.is_dir() and not p.name.startswith(".")]
    return run_dir, seconds, proc.stdout


@pytest.mark.slow
def test_pipeline_run_local_completes_the_tiny_dag(tiny_local_run):
    run_dir, seconds, stdout = tiny_local_run
    print(f"the tiny DAG took {seconds:.0f} s")  # reported, not asserted: tests never assert on wall-clock time
    for stage in STAGES:
        assert (task_dir(run_dir, stage) / "executor_output.json").is_file(), stage
        assert list(task_dir(run_dir, stage).glob("*/metrics.json")), stage
        assert f"\n{stage}  (" in stdout
    assert f"pipeline run --local: {len(STAGES)} tasks in" in stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("dvc", path=str(Path(sys.executable).parent)) is None, reason="needs dvc")
def test_dvc_repro_and_local_pipeline_give_the_same_metrics(tiny_local_run, tmp_path):
    run_dir, _, _ = tiny_local_run
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("dvc.yaml", "src", "configs"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    (work / "params.yaml").write_text(yaml.safe_dump(load_params(TINY)))  # the overlay, layered on params.yaml
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'dvc-mlflow.db'}"}
    for cmd in (["dvc", "init", "--no-scm", "-q"], ["dvc", "config", "core.site_cache_dir", str(tmp_path / "site")],
                ["alignpipe", "data", "build", "--params", "params.yaml", "--out", "data"], ["dvc", "repro", "-q"]):
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, (cmd, proc.stdout[-3000:], proc.stderr[-3000:])
    dvc = yaml.safe_load((work / "dvc.yaml").read_text())
    dvc_metrics = {"data": work / "data" / "metrics.json"}
    for name, stage in dvc["stages"].items():
        outs = [o if isinstance(o, str) else next(iter(o)) for o in stage["outs"]]
        dvc_metrics[name] = work / outs[0] / "metrics.json"
    compared = []
    for name in STAGES:
        if name == "register":  # a registry side effect, not a deterministic result
            continue
        kfp_file = task_dir(run_dir, name) / OUTPUTS[name] / "metrics.json"  # evaluate's best/ holds a trainer's
        a, b = (json.loads(p.read_text()) for p in (dvc_metrics[name], kfp_file))
        same_keys = sorted(k for k in a if not is_timing(k))
        assert {k: a[k] for k in same_keys} == pytest.approx({k: b.get(k) for k in same_keys}), name
        compared.append(name)
    assert len(compared) == len(STAGES) - 1
