"""The built CPU image, run: the CLI and the packages in it, the validate stage in a container on read-only data,
and the tiny DAG with every task in the image (alignpipe.cli.containers: kfp.local.DockerRunner against podman's Docker
API). `make test-images` builds the image and runs these with ALIGNPIPE_TEST_IMAGE, ALIGNPIPE_TEST_SCRATCH (a
folder it removes) and DOCKER_HOST set; without them (e.g. in `make test`) they are skipped."""

# No `from __future__ import annotations`: KFP reads the real annotation objects of the components below.

import json
import os
import re
import socket
import subprocess
import threading
import sys
import time
from pathlib import Path

import pytest

from alignpipe.core.errors import AlignpipeError
from alignpipe.pipelines.align import STAGES

ROOT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("ALIGNPIPE_TEST_IMAGE", "")
SCRATCH = Path(os.environ.get("ALIGNPIPE_TEST_SCRATCH", "/nonexistent"))
USER_ID = "10001"  # the image's non-root user (docker/Dockerfile*)
pytestmark = pytest.mark.skipif(not IMAGE, reason="needs a built image: make test-images")


def podman_run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`podman run --rm --network none ...` (the same container options as the tasks get)."""
    proc = subprocess.run(["podman", "run", "--rm", "--network", "none", *args], capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def fresh_dir(name: str) -> Path:
    """A new folder under the scratch folder that the image's user can write (the host side of a mount)."""
    path = SCRATCH / name
    path.mkdir(parents=True)
    path.chmod(0o777)
    return path


# ------------------------------------------------------------------------------------------ (a) CLI and imports


def test_cli_help_runs_in_the_image():
    start = time.time()
    proc = podman_run(IMAGE, "alignpipe", "--help")
    print(f"\n`podman run --rm --network none IMAGE alignpipe --help`: {time.time() - start:.2f} s")
    for stage in STAGES:
        assert stage in proc.stdout, stage


def test_components_and_pipeline_import_from_the_installed_package():
    proc = podman_run(IMAGE, "python", "-c", "import alignpipe.components.stages as c, alignpipe.pipelines.align; "
                      "import importlib.util as u; print(c.__file__); print(len(c.COMPONENTS)); "
                      "print(u.find_spec('components'), u.find_spec('pipelines'))")
    path, count, *top_level = proc.stdout.split()
    # installed inside the package, not a source copy, and no generic top-level `components`/`pipelines`
    assert path.startswith("/opt/venv/lib/python3.11/site-packages/alignpipe/components/"), path
    assert top_level == ["None", "None"]
    assert int(count) == len(STAGES)


def test_image_runs_as_non_root_without_sources_or_build_secrets():
    proc = podman_run(IMAGE, "sh", "-c", "id -u; pwd; ls -d /ctx /tmp/alignpipe-src /run/secrets/ca_bundle "
                      "2>/dev/null; python -m pip config list")
    uid, home, *rest = proc.stdout.split()
    assert (uid, home) == (USER_ID, "/home/alignpipe")
    # no build context, no copied sources, no CA secret; pip's settings are the image's ENV only (no config file)
    assert rest and all(line.startswith(":env:") for line in rest), rest
    assert not re.search(r"cert|index|find-links", " ".join(rest)), rest
    env = subprocess.run(["podman", "image", "inspect", "--format", "{{json .Config.Env}}", IMAGE],
                         capture_output=True, text=True, check=True).stdout
    assert "PIP_CERT" not in env and "INDEX_URL" not in env, env


# ------------------------------------------------------------------------------------------ (b) validate stage


def validate_in_container(out: Path, corpus: str, prefs: str) -> subprocess.CompletedProcess:
    """`alignpipe validate` in a container: tests/data, params.yaml and configs/ (the tiny overlay layers on
    ../params.yaml) read-only, `out` writable."""
    return podman_run("-v", f"{ROOT / 'tests' / 'data'}:/data:ro", "-v", f"{ROOT / 'params.yaml'}:/cfg/params.yaml:ro",
                      "-v", f"{ROOT / 'configs'}:/cfg/configs:ro",
                      "-v", f"{out}:/out", "-e", "MLFLOW_TRACKING_URI=sqlite:////out/mlflow.db", IMAGE,
                      "alignpipe", "validate", "--params", "/cfg/configs/tiny.yaml", "--corpus", corpus, "--prefs", prefs,
                      "--out", "/out/validate", check=False)


def test_validate_stage_in_a_container_on_read_only_data():
    out = fresh_dir("validate-good")
    proc = validate_in_container(out, "/data/good/corpus.jsonl", "/data/good/prefs.jsonl")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "validate" / "metrics.json").read_text())
    print(f"\nvalidate in the container: {metrics}")
    assert metrics["n_failed_expectations"] == 0 and metrics["n_rows_checked"] > 0
    assert (out / "validate" / "report.json").is_file() and (out / "validate" / "data_docs" / "index.html").is_file()
    assert (out / "mlflow.db").is_file()  # the stage's MLflow run went to the mounted store
    assert str((out / "validate" / "metrics.json").stat().st_uid) == USER_ID  # written by the image's user
    denied = podman_run("-v", f"{ROOT / 'tests' / 'data'}:/data:ro", IMAGE, "touch", "/data/good/x", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr


def test_validate_stage_in_a_container_stops_on_bad_data():
    out = fresh_dir("validate-bad")
    proc = validate_in_container(out, "/data/good/corpus.jsonl", "/data/bad/prefs_chosen_equals_rejected.jsonl")
    assert proc.returncode != 0
    assert "prefs_chosen_equals_rejected.jsonl" in proc.stderr, proc.stderr[-3000:]
    assert not (out / "validate").exists()  # nothing published


# ------------------------------------------------------------------------------------------ (c) the tiny DAG


def test_tiny_dag_runs_every_task_in_the_image():
    root = SCRATCH / "kfp"
    proc = subprocess.run([sys.executable, "-m", "alignpipe", "pipeline", "run", "--local", "--image", IMAGE,
                           "--params", str(ROOT / "configs" / "tiny.yaml"), "--root", str(root)],
                          cwd=ROOT, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    statuses = re.findall(r"Task '([\w-]+)' finished with status (\w+)", re.sub(r"\x1b\[[0-9;]*m", "", log))
    print("\n" + "\n".join(f"task {name}: {status}" for name, status in statuses))
    assert proc.returncode == 0, log[-6000:]
    print(proc.stdout[proc.stdout.index("pipeline run --local:"):])
    assert [status for _, status in statuses] == ["SUCCESS"] * len(STAGES)
    assert {re.sub(r"-\d+$", "", name) for name, _ in statuses} == set(STAGES)
    assert log.count(f"-> running in {IMAGE}") == len(STAGES)
    assert f"pipeline run --local: {len(STAGES)} tasks in" in proc.stdout
    (run_dir,) = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("alignpipe")]
    for stage in STAGES:
        assert list(run_dir.glob(f"{stage}*/*/metrics.json")), stage
    # the tasks' MLflow artifacts (the registered models' files) outlive their containers: under the root
    assert list((root / "mlartifacts").glob("models/*/artifacts/MLmodel")), sorted((root / "mlartifacts").rglob("*"))


def test_a_failing_component_fails_the_containerized_run():
    from kfp import dsl

    from alignpipe.cli.containers import docker_runner
    from alignpipe.cli.kfp import compile_pipeline, run_local

    @dsl.component(base_image=IMAGE, install_kfp_package=False)
    def write(out: dsl.Output[dsl.Dataset]):
        with open(out.path, "w") as f:
            f.write("ok")

    @dsl.component(base_image=IMAGE, install_kfp_package=False)
    def fail(data: dsl.Input[dsl.Dataset], code: int):
        import sys

        sys.exit(code)

    @dsl.pipeline(name="fails")
    def fails(code: int = 3):
        fail(data=write().outputs["out"], code=code)

    root = SCRATCH / "kfp-fail"
    with docker_runner(IMAGE, root) as runner:
        pipeline_yaml = compile_pipeline(fails, root / "pipeline.yaml")
        with pytest.raises(AlignpipeError) as error:
            run_local(pipeline_yaml, root, runner=runner)
    print(f"\n{error.value}")
    assert "FAILURE" in error.value.reason and "fail" in error.value.reason
    (run_dir,) = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("fails")]
    assert (run_dir / "write" / "out").read_text() == "ok"  # the task before it ran, in its container


# ------------------------------------------------------------------------------------------ (d) the serving image

SERVE_IMAGE = "localhost/alignpipe-policy-onnx:test-images"
SERVE_PROMPTS = [f"def {name}(a, b):" for name in ("add", "sub", "mul", "div", "pow", "mod", "eq", "lt", "gt", "ne")]
SERVE_PROMPTS += [
    "for name in sorted(names):", "with open(path) as f:", "if x is None:", "class Parser:", "import os",
    "while queue:", "try:", "return [x for x in", "def __init__(self, path):", "headers = {"]


def test_serving_image_of_the_tiny_runs_champion_answers_prompts_and_rejects_malformed_requests(monkeypatch):
    """After (c): the ONNX policy the containerized tiny DAG registered as champion, built into the serving image
    (`make image-serve`) and run as a container (`alignpipe serve`); 20 prompts (concurrent requests through the
    official `openai` client) get the same greedy answers as the registered model loaded here, and malformed
    requests get OpenAI's error object with a 4xx."""
    import openai

    from alignpipe.tracking import runs
    from alignpipe.serving.server import post_json, wait_ready

    store = SCRATCH / "kfp" / "mlflow.db"
    assert store.is_file(), f"needs the registry of the tiny DAG's run ({store}): run the DAG test first"
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # conftest's store has set both
        monkeypatch.setenv(name, f"sqlite:///{store}")
    start = time.time()
    build = subprocess.run(["make", "-s", "image-serve", "DOCKER=podman", f"SERVE_IMAGE={SERVE_IMAGE}"], cwd=ROOT,
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    size = subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", SERVE_IMAGE], capture_output=True,
                          text=True, check=True).stdout.strip()
    print(f"\n`make image-serve DOCKER=podman SERVE_IMAGE={SERVE_IMAGE}`: {time.time() - start:.1f} s, "
          f"{int(size) / 1e9:.2f} GB")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    name = f"alignpipe-serve-{port}"
    run = ["podman", "run", "-d", "--name", name, "--network", "host", "-e", f"PORT={port}", SERVE_IMAGE]
    print(" ".join(run))
    subprocess.run(run, capture_output=True, text=True, check=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            print(f"GET {url}/ping: 200 after {wait_ready(url, timeout=240):.1f} s")
        except TimeoutError as e:
            logs = subprocess.run(["podman", "logs", name], capture_output=True, text=True)
            pytest.fail(f"{e}: {(logs.stdout + logs.stderr)[-3000:]}")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["alignpipe-policy-onnx"]
        answers = {}

        def ask(i: int) -> None:
            answers[i] = client.completions.create(model="alignpipe-policy-onnx", prompt=SERVE_PROMPTS[i],
                                                   temperature=0).choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(SERVE_PROMPTS))]
        start = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        served = [answers.get(i) for i in range(len(SERVE_PROMPTS))]
        print(f"POST /v1/completions, {len(SERVE_PROMPTS)} concurrent one-prompt requests (openai client) in "
              f"{time.time() - start:.1f} s; e.g. {SERVE_PROMPTS[0]!r} -> {served[0]!r}")
        expected = runs.mlflow_module().pyfunc.load_model("models:/alignpipe-policy-onnx@champion").predict(
            SERVE_PROMPTS, params={"do_sample": False})
        assert served == expected  # the container serves the registered champion, verbatim
        for bad in (b"not json", json.dumps({"model": "alignpipe-policy-onnx", "prompt": []}).encode(),
                    json.dumps({"model": "alignpipe-policy-onnx", "prompt": "def f():",
                                "max_tokens": "many"}).encode()):
            status, body = post_json(f"{url}/v1/completions", bad)
            print(f"POST /v1/completions {bad[:60]!r}: {status} {str(body)[:120]}")
            assert 400 <= status < 500 and set(body["error"]) == {"message", "type", "param", "code"}, (bad, body)
    finally:
        subprocess.run(["podman", "rm", "--force", name], capture_output=True)
        subprocess.run(["podman", "rmi", "--force", SERVE_IMAGE], capture_output=True)
