"""`alignpipe pipeline compile|run|submit`: the Kubeflow pipeline (pipelines/align.py) from the command line.

- compile: params.yaml (with --params/--set) becomes the defaults of the pipeline's typed `<stage>__<key>`
  parameters in the YAML you upload in the Kubeflow UI; prints the task list with images, resources and caching.
- run --local: compiles the same YAML and runs its whole DAG on this machine with kfp.local's SubprocessRunner
  (one subprocess per task, the same components); prints where every artifact landed.
- submit: compiles, then creates a run, or with --schedule a recurring run, on a KFP endpoint via kfp.Client.

kfp is imported only inside these commands (it is slow to import and the stage commands do not need it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

from alignpipe.core.config import DEFAULT_PARAMS, apply_overrides, load_params
from alignpipe.core.errors import AlignpipeError, ConfigError
from alignpipe.core.outputs import check_output_file, make_output_dir, write_output_file
from alignpipe.core.redaction import redact, redact_logs, redact_text
from alignpipe.stages import MULTI_GPU, SWITCHED, load_stage

LOCAL_ROOT = "artifacts/kfp-local"
SUBMIT_TIMEOUT = 10.0  # s: connect and read timeout of each Kubeflow Pipelines API call (kfp's own: none)
SUBMIT_RETRIES = 1  # retries of a failed connection or read (kfp's own: 3, on top of 5 health checks)
DEFAULT_EXPERIMENT = "alignpipe"


def add_pipeline_parser(sub) -> None:
    p = sub.add_parser("pipeline", help="compile, run locally or submit the Kubeflow pipeline",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")

    c = actions.add_parser("compile", help="write the pipeline YAML to upload in the Kubeflow UI")
    _add_build_args(c)
    c.add_argument("--out", required=True, metavar="FILE.yaml", help="the pipeline YAML to write")
    c.add_argument("--force", action="store_true", help="replace --out even if alignpipe did not write it")
    c.set_defaults(func=cmd_compile)

    r = actions.add_parser("run", help="run the whole compiled DAG here (kfp.local SubprocessRunner)")
    _add_build_args(r)
    r.add_argument("--local", action="store_true", required=True,
                   help="run on this machine (runs on a cluster go through `submit`)")
    r.add_argument("--root", default=LOCAL_ROOT, help="pipeline root for the artifacts (default: %(default)s)")
    r.add_argument("--image", help="run every task in a container of this local image (kfp.local.DockerRunner "
                                   "via DOCKER_HOST; alignpipe.cli.containers) instead of in this environment")
    r.add_argument("--network", default="none", choices=("none", "host"), help="the containers' network (--image)")
    r.set_defaults(func=cmd_run)

    s = actions.add_parser("submit", help="submit a run, or a recurring run, to a Kubeflow Pipelines endpoint")
    _add_build_args(s)
    s.add_argument("--host", required=True, metavar="URL", help="KFP API endpoint, e.g. http://localhost:8080")
    s.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="KFP experiment (default: %(default)s)")
    s.add_argument("--schedule", metavar="CRON",
                   help="create a recurring run on this cron schedule (5 fields, e.g. '0 3 * * 1', or KFP's 6 "
                        "with seconds first); each run re-imports its data and retrains with caching off")
    s.add_argument("--run-name", help="name of the run or recurring run (default: from the pipeline and time)")
    s.add_argument("--namespace", help="Kubernetes namespace (multi-user Kubeflow)")
    s.add_argument("--timeout", type=float, default=SUBMIT_TIMEOUT, metavar="SECONDS",
                   help="connect and read timeout of each API call; a host that never answers fails after about "
                        f"{SUBMIT_RETRIES + 1} times this (default: %(default)s)")
    s.set_defaults(func=cmd_submit)

    d = actions.add_parser("dvc-yaml", help="write dvc.yaml, generated from the stage registry")
    d.add_argument("--out", default="dvc.yaml", help="file to write, - for stdout (default: %(default)s)")
    d.add_argument("--force", action="store_true", help="replace --out even if alignpipe did not write it")
    d.set_defaults(func=lambda args: __import__("alignpipe.cli.dvcgen", fromlist=["cmd_dvc_yaml"]).cmd_dvc_yaml(args))

    from alignpipe.cli.trainjob import add_trainjob_parser

    add_trainjob_parser(actions)


def _add_build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default=DEFAULT_PARAMS, help="params YAML file (default: %(default)s)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help=f"override one params value (repeatable); {'/'.join(MULTI_GPU)}.gpus=N asks for N GPUs "
                        "(N > 1: torchrun)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="NAME=URI",
                   help="import an artifact instead of producing it: data (a built data/), corpus (the data "
                        "stage's input), human_prefs, judge_model; repeatable")
    for stage in SWITCHED:
        p.add_argument(f"--no-{stage.replace('_', '-')}", dest=f"no_{stage}", action="store_true",
                       help=f"default the run_{stage} parameter to false")
    p.add_argument("--mlflow-uri", default="",
                   help="default of the mlflow_tracking_uri parameter (local runs: MLFLOW_TRACKING_URI or "
                        "./mlflow.db; clusters: empty = the URI in the alignpipe-mlflow secret)")


# ---------------------------------------------------------------------------------------------- parameters


def pipeline_sections(params_path: str | Path, sets: list[str]) -> tuple[dict[str, dict], dict[str, int]]:
    """Each stage's section of the params file with `sets` applied, checked by its Config (complete with defaults);
    and the GPU count of the multi-GPU stages (`<stage>.gpus`)."""
    from alignpipe.components.stages import COMPONENTS

    for item in sets:
        section = item.split("=", 1)[0].split(".", 1)[0]
        if section not in COMPONENTS:
            raise ConfigError(item.split("=", 1)[0], f"unknown section {section!r}; sections: {', '.join(COMPONENTS)}")
    params = apply_overrides(load_params(params_path, COMPONENTS), sets)
    sections: dict[str, dict] = {}
    gpus: dict[str, int] = {}
    for stage in COMPONENTS:
        cfg = load_stage(stage).Config.from_dict(dict(params.get(stage) or {}))
        section = cfg.to_dict()
        if stage in MULTI_GPU:
            gpus[stage] = cfg.gpus
        sections[stage] = json.loads(json.dumps(section))  # plain JSON types, as KFP stores them
    return sections, gpus


def parse_imports(items: list[str], local: bool) -> dict[str, str]:
    """`NAME=URI` pairs; for local runs a URI is a path on this machine (made absolute)."""
    from alignpipe.pipelines.align import IMPORTS

    imports: dict[str, str] = {}
    for item in items:
        name, sep, uri = item.partition("=")
        if not sep or not uri:
            raise ConfigError(item, "--import expects NAME=URI")
        if name not in IMPORTS:
            raise ConfigError(f"--import {name}", f"cannot be imported; importable: {', '.join(IMPORTS)}")
        if local:
            if not Path(uri).exists():
                raise ConfigError(uri, f"--import {name}: no such file or directory (local runs import local paths)")
            uri = str(Path(uri).resolve())
        elif not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^\s]+", uri) or ".." in uri.split("/"):
            raise ConfigError(f"--import {name}={uri}", "expects an artifact URI of the cluster's store "
                              "(gs://..., s3://..., minio://..., https://...), without spaces or '..'")
        imports[name] = uri
    if "data" in imports and "corpus" in imports:
        raise ConfigError("--import", "import either data (a built data/) or corpus (to build data/ from), not both")
    return imports


def build(args: argparse.Namespace, local: bool = False, caching: bool = True):
    """The pipeline function for these command-line arguments (see alignpipe.pipelines.align.build_pipeline)."""
    from alignpipe.tracking import runs
    from alignpipe.pipelines.align import build_pipeline

    sections, gpus = pipeline_sections(args.params, args.sets)
    imports = parse_imports(args.imports, local)
    if local and any(n > 1 for n in gpus.values()):
        print(f"alignpipe pipeline: note: local run: {gpus} ignored, every stage runs in process", file=sys.stderr)
        gpus = {}
    mlflow_uri = args.mlflow_uri or (runs.tracking_uri() if local else "")
    if runs.has_credentials(mlflow_uri):  # never written into the pipeline YAML
        if args.mlflow_uri:
            raise ConfigError(f"--mlflow-uri {runs.redact(mlflow_uri)}", "holds a password or token, which the "
                              "compiled pipeline would store: give the pods credentials through the MLflow secret")
        mlflow_uri = ""  # a local run's tasks inherit MLFLOW_TRACKING_URI from this process
    run = {stage: not getattr(args, f"no_{stage}") for stage in SWITCHED}
    return build_pipeline(sections, gpus, imports, run=run, mlflow_tracking_uri=mlflow_uri,
                          git_commit=runs.git_commit(), data_version=imports.get("data", ""), caching=caching)


def compile_pipeline(pipeline_func, out: str | Path, force: bool = False) -> Path:
    """Compile to the YAML the Kubeflow UI takes (Pipelines > Upload pipeline); an existing `out` alignpipe did not
    write is refused unless `force` (core.outputs.write_output_file)."""
    from kfp import compiler

    check_output_file(out)
    with tempfile.TemporaryDirectory(prefix="alignpipe-compile-") as tmp:
        compiled = Path(tmp) / "pipeline.yaml"
        compiler.Compiler().compile(pipeline_func, str(compiled))
        return write_output_file(out, compiled.read_text(encoding="utf-8"), force=force)


def task_table(pipeline_yaml: str | Path) -> list[dict[str, Any]]:
    """The leaf tasks of a compiled pipeline with their image, resources, node placement and caching, in DAG
    order; a task inside a dsl.If branch is named `<branch>/<task>` (e.g. `ppo-on/evaluate`)."""
    from alignpipe.pipelines.align import STAGES

    docs = list(yaml.safe_load_all(Path(pipeline_yaml).read_text(encoding="utf-8")))
    spec = docs[0]
    k8s = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    executors = spec["deploymentSpec"]["executors"]
    rows: list[dict[str, Any]] = []

    def walk(dag: dict, prefix: str) -> None:
        for task in dag["tasks"].values():
            ref = task["componentRef"]["name"]
            comp = spec["components"][ref]
            name = task["taskInfo"]["name"]
            if "dag" in comp:
                branch = ref.startswith("comp-condition-") and not ref.startswith("comp-condition-branches")
                walk(comp["dag"], f"{prefix}{name}/" if branch else prefix)
                continue
            executor = executors[comp["executorLabel"]]
            platform = k8s.get(comp["executorLabel"], {})
            container = executor.get("container", {})
            res = container.get("resources", {})
            launcher = task.get("inputs", {}).get("parameters", {}).get("launcher", {})
            rows.append({
                "task": prefix + name,
                "stage": name,
                "component": ref,
                "image": container.get("image", "(importer)" if "importer" in executor else ""),
                "cpu": res.get("resourceCpuRequest", ""),
                "memory": res.get("resourceMemoryLimit", ""),
                "gpus": int(res.get("accelerator", {}).get("resourceCount", 0)),
                "accelerator": res.get("accelerator", {}).get("resourceType", ""),
                "node_selector": platform.get("nodeSelector", {}).get("labels", {}),
                "tolerations": platform.get("tolerations", []),
                "secrets": [s["secretName"] for s in platform.get("secretAsEnv", [])],
                "cache": bool(task.get("cachingOptions", {}).get("enableCache", False)),
                "launcher": launcher.get("runtimeValue", {}).get("constant") or [],
            })

    walk(spec["root"]["dag"], "")
    order = {s: i for i, s in enumerate(STAGES)}
    return sorted(rows, key=lambda r: (order.get(r["stage"], -1), r["task"]))


def format_task_table(rows: list[dict[str, Any]]) -> str:
    """The task table as aligned text (what `compile` prints)."""
    header = ("task", "image", "cpu", "memory", "gpu", "node selector", "cache", "launcher")
    lines = [header]
    for r in rows:
        gpu = f"{r['gpus']} x {r['accelerator']}" if r["gpus"] else "-"
        selector = ",".join(f"{k}={v}" for k, v in r["node_selector"].items()) or "-"
        lines.append((r["task"], r["image"].rsplit("/", 1)[-1], r["cpu"] or "-", r["memory"] or "-", gpu, selector,
                      "on" if r["cache"] else "off", " ".join(r["launcher"]) or "in process"))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)


# ---------------------------------------------------------------------------------------------- local run


@dataclasses.dataclass
class LocalTask:
    name: str
    seconds: float  # from the end of the previous task (tasks run one at a time): includes KFP's overhead
    outputs: dict[str, Path]


@dataclasses.dataclass
class LocalRun:
    run_dir: Path
    seconds: float
    tasks: list[LocalTask]

    def task(self, name: str) -> LocalTask:
        return next(t for t in self.tasks if t.name == name)


def run_local(pipeline_yaml: str | Path, root: str | Path, arguments: dict[str, Any] | None = None,
              runner: Any = None) -> LocalRun:
    """Run the compiled pipeline's whole DAG here: kfp.local's SubprocessRunner in this environment (no venv,
    no pip), or `runner` (alignpipe.cli.containers.docker_runner). Scratch files of the tasks go to `<root>/.tmp`
    (removed afterwards)."""
    from kfp import components, local

    root = Path(root).resolve()
    _check_no_python3(pipeline_yaml, root, arguments or {})
    root.mkdir(parents=True, exist_ok=True)
    local.init(runner=runner or local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    pipeline = components.load_component_from_file(str(pipeline_yaml))
    before = set(root.iterdir())
    scratch = root / ".tmp"
    scratch.mkdir(exist_ok=True)
    old_tmp = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(scratch)  # the task command's `mktemp -d` (KFP leaves those folders behind)
    start = time.time()
    try:
        with warnings.catch_warnings():
            # The components' image is not "python": they run here because this environment has the package.
            warnings.filterwarnings("ignore", message="You may be attemping to run a task that uses custom",
                                    category=RuntimeWarning)
            warnings.filterwarnings("ignore", message=".*have no effect in the current local runner",
                                    category=UserWarning)  # resources and GPUs: documented, expected
            pipeline(**(arguments or {}))
    except RuntimeError as e:
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines()[0]
        raise AlignpipeError("pipeline run --local", f"{message} (its log is above)", exit_code=1) from None
    finally:
        if old_tmp is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_tmp
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.time() - start
    run_dir = max((p for p in root.iterdir() if p.is_dir() and p not in before), key=lambda p: p.stat().st_mtime)
    # kfp.local names a task's folder after its component (`evaluate-2` in the second branch): report the task
    names = {r["component"].removeprefix("comp-"): r["stage"] for r in task_table(pipeline_yaml)}
    return LocalRun(run_dir, seconds, _local_tasks(run_dir, start, names))


def _check_no_python3(pipeline_yaml: str | Path, root: Path, arguments: dict[str, Any]) -> None:
    """kfp 2.17's SubprocessRunner replaces every `python3` in a task's command line with the interpreter's path,
    parameter values and artifact paths included (`.../lib/python3.11/email` becomes a path that does not exist):
    refuse such values here rather than let a stage read a wrong path."""
    spec = next(yaml.safe_load_all(Path(pipeline_yaml).read_text(encoding="utf-8")))
    values = {name: p.get("defaultValue") for name, p in spec["root"]["inputDefinitions"]["parameters"].items()}
    values.update(arguments)
    values["--root"] = str(root)
    for name, value in values.items():
        if "python3" in json.dumps(value):
            raise ConfigError(name, "contains 'python3', which kfp's local runner rewrites to the Python executable; "
                                    "use a path without it for local runs")


def _local_tasks(run_dir: Path, start: float, names: dict[str, str]) -> list[LocalTask]:
    done = sorted((p / "executor_output.json").stat().st_mtime for p in run_dir.iterdir()
                  if (p / "executor_output.json").is_file())
    tasks = []
    for task_dir in run_dir.iterdir():
        marker = task_dir / "executor_output.json"
        if not marker.is_file():
            continue
        end = marker.stat().st_mtime
        previous = max([t for t in done if t < end], default=start)
        outputs = {p.name: p for p in sorted(task_dir.iterdir()) if p.name != "executor_output.json"}
        tasks.append((end, LocalTask(names.get(task_dir.name, task_dir.name), round(end - previous, 1), outputs)))
    return [t for _, t in sorted(tasks, key=lambda x: x[0])]


def format_local_run(run: LocalRun) -> str:
    """Every task with its time and where each of its artifacts landed, plus its metrics."""
    cwd = Path.cwd()

    def show(path: Path) -> str:
        return str(path.relative_to(cwd)) if path.is_relative_to(cwd) else str(path)

    lines = [f"pipeline run --local: {len(run.tasks)} tasks in {run.seconds:.1f} s; "
             f"artifacts under {show(run.run_dir)}"]
    for task in run.tasks:
        lines.append(f"{task.name}  ({task.seconds:.1f} s)")
        width = max((len(n) for n in task.outputs), default=0)
        for name, path in task.outputs.items():
            lines.append(f"  {name:<{width}}  {show(path)}")
        metrics_file = next((p / "metrics.json" for p in task.outputs.values() if (p / "metrics.json").is_file()),
                            None)
        if metrics_file is not None:
            metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
            lines.append("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in metrics.items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- submit


def kfp_cron(expression: str) -> str:
    """KFP's scheduler takes 6-field cron (seconds first): a usual 5-field expression gets `0` seconds."""
    fields = expression.split()
    if len(fields) == 5:
        return " ".join(["0", *fields])
    if len(fields) == 6:
        return " ".join(fields)
    raise ConfigError("--schedule", f"expected cron with 5 fields (minute hour day month weekday) or 6 (seconds "
                                    f"first), got {expression!r}")


def submit(pipeline_yaml: str | Path, host: str, experiment: str, schedule: str | None = None,
           run_name: str | None = None, namespace: str | None = None,
           timeout: float = SUBMIT_TIMEOUT) -> dict[str, str]:
    """Create a run (or a recurring run on `schedule`: one at a time, no catch-up of missed runs) of the compiled
    pipeline; returns its id and kind. Every API call times out after `timeout` seconds (connect and read) and is
    retried at most SUBMIT_RETRIES times; a failure is one line with the host's credentials redacted."""
    import kfp
    import kfp_server_api
    import urllib3

    if not timeout > 0:
        raise ConfigError("--timeout", f"must be > 0 seconds, got {timeout}")
    cron = kfp_cron(schedule) if schedule else None
    redact_logs("kfp", "urllib3")  # kfp logs its failed health checks with the host
    try:
        with _bounded_api_calls(timeout, SUBMIT_RETRIES):
            client = kfp.Client(host=host, **({"namespace": namespace} if namespace else {}))
            if cron is None:
                result = client.create_run_from_pipeline_package(str(pipeline_yaml), arguments={}, run_name=run_name,
                                                                 experiment_name=experiment, namespace=namespace)
                return {"kind": "run", "id": result.run_id, "experiment": experiment}
            exp = client.create_experiment(experiment, namespace=namespace)
            job = client.create_recurring_run(experiment_id=exp.experiment_id,
                                              job_name=run_name or f"{Path(pipeline_yaml).stem} {cron}",
                                              cron_expression=cron, pipeline_package_path=str(pipeline_yaml),
                                              params={}, max_concurrency=1, no_catchup=True)
            return {"kind": "recurring run", "id": job.recurring_run_id, "experiment": experiment, "cron": cron}
    except (kfp_server_api.ApiException, urllib3.exceptions.HTTPError, TimeoutError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise AlignpipeError(redact(host), f"Kubeflow Pipelines API call failed: {redact_text(str(reason))[:300]}",
                             exit_code=1) from None


@contextlib.contextmanager
def _bounded_api_calls(timeout: float, retries: int):
    """Every call of kfp's generated API client (kfp_server_api) inside the block gets a (connect, read) timeout
    and at most `retries` retries: kfp passes none, so a silent host would hang it forever."""
    import kfp_server_api.rest
    import urllib3

    rest = kfp_server_api.rest.RESTClientObject
    original = rest.request

    def request(self, *args, _request_timeout=None, **kwargs):
        self.pool_manager.connection_pool_kw.setdefault("retries", urllib3.Retry(total=retries, backoff_factor=0.5))
        return original(self, *args, _request_timeout=_request_timeout or (timeout, timeout), **kwargs)

    rest.request = request
    try:
        yield
    finally:
        rest.request = original


# ---------------------------------------------------------------------------------------------- commands


def cmd_compile(args: argparse.Namespace) -> int:
    out = compile_pipeline(build(args), args.out, force=args.force)
    print(format_task_table(task_table(out)))
    print(f"\nwrote {out} (upload it in the Kubeflow UI: Pipelines > Upload pipeline)")
    return 0


@contextlib.contextmanager
def _stop_tasks_on_signal():
    """SIGTERM or SIGHUP while the DAG runs: terminate the task processes this run started (kfp.local's subprocess
    and the stage under it, which ends its MLflow run as FAILED and removes its staging folder), then exit; without
    this the running task would be orphaned and go on alone."""
    import signal

    def handler(signum, frame):
        import psutil

        tasks = psutil.Process().children(recursive=True)
        for proc in tasks:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(tasks, timeout=30)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        print(f"alignpipe pipeline: {signal.Signals(signum).name}: stopped the run and its {len(tasks)} task "
              "process(es)", file=sys.stderr)
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


def cmd_run(args: argparse.Namespace) -> int:
    root = make_output_dir(args.root, "--root")
    with _stop_tasks_on_signal():
        return _run_here(args, root)


def _run_here(args: argparse.Namespace, root: Path) -> int:
    # root is alignpipe's own folder (make_output_dir): the pipeline.yaml in it is ours to replace
    if args.image:  # the tasks see the pipeline root only: MLflow's store (and its artifacts) go there
        from alignpipe.cli.containers import docker_runner, tracking_store

        with docker_runner(args.image, root, args.network) as runner:
            args.mlflow_uri = args.mlflow_uri or tracking_store(root)
            pipeline_yaml = compile_pipeline(build(args, local=True), root / "pipeline.yaml", force=True)
            run = run_local(pipeline_yaml, root, runner=runner)
    else:
        pipeline_yaml = compile_pipeline(build(args, local=True), root / "pipeline.yaml", force=True)
        run = run_local(pipeline_yaml, root)
    print(format_local_run(run))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    # A recurring run exists to retrain on the data its importer finds at each run, and KFP's cache is keyed on
    # artifact URIs, not content: its tasks are compiled with caching off.
    with tempfile.TemporaryDirectory() as tmp:
        pipeline_yaml = compile_pipeline(build(args, caching=not args.schedule), Path(tmp) / "alignpipe.yaml")
        result = submit(pipeline_yaml, args.host, args.experiment, args.schedule, args.run_name, args.namespace,
                        args.timeout)
    extra = f" on cron '{result['cron']}'" if "cron" in result else ""
    print(f"submitted {result['kind']} {result['id']} in experiment {result['experiment']}{extra} to "
          f"{redact(args.host)}")
    return 0
