"""The image recipe, checked as text (tests/test_containers.py runs the built image): the tag the components run is
the tag `make images` builds and it follows the package version; the GPU and CPU Dockerfiles are one recipe (the
same steps below the "shared steps" line, only the base and the variant build args above it); each installs every
pinned requirement the way the Makefile does; and the build context, the network knobs and the runtime user."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from alignpipe.components.image import CPU_IMAGE, GPU_IMAGE, VERSION
from alignpipe.components.stages import COMPONENTS
from alignpipe.pipelines.align import GPU_STAGES

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DOCKERFILES = {"gpu": ROOT / "docker" / "Dockerfile", "cpu": ROOT / "docker" / "Dockerfile.cpu"}
ONNXRUNTIME = {"gpu": "onnxruntime-gpu", "cpu": "onnxruntime"}
SHARED = "# ---- shared steps:"
VARIANT_ARGS = ["TORCH_INDEX_URL", "EXTRA", "ORT_PROVIDER"]  # what the variants may set differently
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def pins() -> dict[str, str]:
    """Requirement name -> pinned version, for the dependencies and every extra of pyproject.toml."""
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    reqs += [Requirement(r) for extra in PYPROJECT["project"]["optional-dependencies"].values() for r in extra]
    out = {}
    for req in reqs:
        (spec,) = req.specifier  # one `==` pin each
        assert spec.operator == "==", req
        out[req.name] = spec.version
    return out


def split(dockerfile: str) -> tuple[str, str]:
    """(the variant's base part, the shared steps) of a Dockerfile."""
    assert dockerfile.count(SHARED) == 1
    head, shared = dockerfile.split(SHARED)
    return head, SHARED + shared


def arg_default(text: str, name: str) -> str:
    (value,) = re.findall(rf"^ARG {name}=(\S*)$", text, re.M)
    return value


def pip_installs(text: str) -> list[str]:
    """The arguments of every `pip install` (continuation lines joined)."""
    text = re.sub(r"\s*\\\n\s*", " ", text)
    return [m.strip() for m in re.findall(r"pip install ([^;&\n]+)", text)]


def make_n(*args: str) -> str:
    out = subprocess.run(["make", "--no-print-directory", "-n", *args], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return re.sub(r"\s*\\\n\s*", " ", out)  # continuation lines joined


def test_dockerfiles_share_every_step_but_the_base_and_the_variant_args():
    (gpu_head, gpu_shared), (cpu_head, cpu_shared) = (split(DOCKERFILES[f].read_text()) for f in ("gpu", "cpu"))
    assert gpu_shared == cpu_shared  # one recipe: the CPU build here exercises the steps the GPU nodes run
    for head in (gpu_head, cpu_head):
        # above the line: the base image and Python 3.11 in /opt/venv, then the variant args; no installs
        assert re.findall(r"^ARG (\w+)=", head.split("\nFROM ")[-1], re.M)[-3:] == VARIANT_ARGS
        assert "pip install" not in head and "/opt/venv" in head
    for name in VARIANT_ARGS:
        assert f"${{{name}}}" in cpu_shared or f"${name}" in cpu_shared, name  # each one is used below


@needs_make
def test_make_images_builds_the_tags_the_components_run():
    built = dict(re.findall(r"docker build -f (\S+) -t (\S+) ", make_n("-f", "docker/images.mk", "images")))
    assert built == {"docker/Dockerfile": GPU_IMAGE, "docker/Dockerfile.cpu": CPU_IMAGE}
    for name, component in COMPONENTS.items():
        image = component.component_spec.implementation.container.image
        assert image == (GPU_IMAGE if name in GPU_STAGES else CPU_IMAGE), name


@needs_make
def test_makefile_images_target_is_docker_images_mk():
    out = make_n("images")
    assert f"-t {GPU_IMAGE} " in out and f"-t {CPU_IMAGE} " in out
    assert "bash docker/test-images.sh" in make_n("test-images")


def test_image_tags_follow_the_package_version():
    assert VERSION == PYPROJECT["project"]["version"]
    assert GPU_IMAGE.endswith(f":{VERSION}-cuda") and CPU_IMAGE.endswith(f":{VERSION}-cpu")


@pytest.mark.parametrize("flavor", ["gpu", "cpu"])
def test_dockerfile_installs_every_pinned_requirement(flavor):
    head, shared = split(DOCKERFILES[flavor].read_text())
    pinned = pins()
    # torch first, at the pyproject pin, from the flavour's wheel index by default
    assert arg_default(shared, "TORCH_VERSION") == pinned["torch"]
    index = arg_default(head, "TORCH_INDEX_URL")
    assert index.startswith("https://download.pytorch.org/whl/") and (index.endswith("/cpu") == (flavor == "cpu"))
    installs = pip_installs(shared)
    assert installs[0] == '"$@" --upgrade pip'
    assert installs[1] == ('--find-links /ctx/wheels ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} '
                           '"torch==${TORCH_VERSION}"')
    # then the package with its flavour's extra: pip installs every `==` pin of pyproject.toml, nothing else
    assert installs[2:] == ['"$@" "/tmp/alignpipe-src[${EXTRA}]"']
    assert arg_default(head, "EXTRA") == flavor
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert [Requirement(r).name for r in extras[flavor]] == [ONNXRUNTIME[flavor]]  # one onnxruntime, never both
    assert "pip check" in shared
    assert arg_default(head, "ORT_PROVIDER") == ("CUDAExecutionProvider" if flavor == "gpu" else "CPUExecutionProvider")
    # the same order and torch pin as the Makefile's install
    makefile = (ROOT / "Makefile").read_text()
    assert f"torch=={pinned['torch']}" in makefile and makefile.index("torch==") < makefile.index('-e ".[')


@needs_make
def test_build_context_is_a_staged_copy_mounted_read_only():
    out = make_n("-f", "docker/images.mk", "image-cpu")
    context = ".tmp/image-context-cpu"
    assert out.rstrip().endswith(f" {context}\nrm -rf {context}")
    (listing,) = [line for line in out.splitlines() if line.startswith("git ls-files")]
    sources = listing.split(" -- ")[1].split(" | ")[0].split()
    needed = {"pyproject.toml", "README.md", *PYPROJECT["tool"]["setuptools"]["package-dir"].values()} - {""}
    assert set(sources) == needed | {"src"}
    shared = split(DOCKERFILES["cpu"].read_text())[1]
    (mount,) = re.findall(r"--mount=type=bind,(\S+)", shared)
    assert mount == "target=/ctx"  # read-only (no `rw`): the build writes nothing into the context
    assert "cp -r /ctx/alignpipe /tmp/alignpipe-src" in shared and "rm -rf /tmp/alignpipe-src" in shared
    # buildah keys its cache on build args, not on the mounted context: the sources' digest is one, before the install
    assert shared.index("ARG SOURCES_DIGEST=") < shared.index("--mount=type=bind")
    assert f"--build-arg SOURCES_DIGEST=$(cd {context} && " in out


@needs_make
def test_network_knobs_pass_through_to_the_build():
    plain = make_n("-f", "docker/images.mk", "image-cpu")
    assert "--secret" not in plain and "wheels/" not in plain.split("mkdir")[1]
    assert re.findall(r"--build-arg (\w+)", plain) == ["SOURCES_DIGEST"]  # the only one without knobs
    out = make_n("-f", "docker/images.mk", "image-cpu", "DOCKER=podman", "CA_BUNDLE=ca.pem", "WHEELS=/w",
                 "INDEX_URL=https://pypi.example/simple", "EXTRA_INDEX_URL=https://more.example/simple",
                 "TORCH_INDEX_URL=", "BUILD_FLAGS=--network host")
    (build,) = [line for line in out.splitlines() if " build " in line]
    assert build.startswith("DOCKER_BUILDKIT=1 podman build ")
    for flag in (f"--secret id=ca_bundle,src={ROOT / 'ca.pem'}", "--build-arg INDEX_URL=https://pypi.example/simple",
                 "--build-arg EXTRA_INDEX_URL=https://more.example/simple", "--build-arg TORCH_INDEX_URL= ",
                 "--network host"):
        assert flag in build, flag
    assert "cp -l /w/*.whl .tmp/image-context-cpu/wheels/" in out
    shared = split(DOCKERFILES["cpu"].read_text())[1]
    assert "--mount=type=secret,id=ca_bundle" in shared and "PIP_CERT=/run/secrets/ca_bundle" in shared
    for name in ("INDEX_URL", "EXTRA_INDEX_URL"):
        assert arg_default(shared, name) == ""  # unset: PyPI


@pytest.mark.parametrize("flavor", ["gpu", "cpu"])
def test_runtime_of_the_image(flavor):
    head, shared = split(DOCKERFILES[flavor].read_text())
    # the KFP task command runs `python3`: the venv's must come first on PATH
    assert re.search(r"PATH=/opt/venv/bin:\$PATH", shared)
    assert re.search(r"^USER 10001:10001$", shared, re.M) and "useradd" in shared  # non-root
    python = "3.11"
    assert python in (arg_default(head, "PYTHON_VERSION") if flavor == "gpu" else arg_default(head, "PYTHON_IMAGE"))
    assert Requirement(f"python{PYPROJECT['project']['requires-python']}").specifier.contains(f"{python}.0")
    if flavor == "gpu":
        assert "cudnn" in arg_default(head, "CUDA_IMAGE") and "cu13" in arg_default(head, "TORCH_INDEX_URL")


@needs_make
def test_serving_image_is_the_cpu_image_plus_the_registered_model():
    from alignpipe.cli.serve import PORT, kserve_manifest

    out = make_n("-f", "docker/images.mk", "image-serve", "DOCKER=podman", "SERVE_IMAGE=serve:test")
    context = ".tmp/image-context-serve"
    assert f"mlflow artifacts download -u models:/alignpipe-policy-onnx@champion -d {context}/model" in out
    assert (f"podman build -f docker/Dockerfile.serve -t serve:test --build-arg BASE_IMAGE={CPU_IMAGE} "
            "--build-arg SERVED_MODEL_NAME=alignpipe-policy-onnx ") in out
    assert out.rstrip().endswith(f"rm -rf {context}")
    versioned = make_n("-f", "docker/images.mk", "image-serve", "SERVE_MODEL=models:/my-chat/3")
    assert "--build-arg SERVED_MODEL_NAME=my-chat " in versioned
    dockerfile = (ROOT / "docker" / "Dockerfile.serve").read_text()
    assert "FROM ${BASE_IMAGE}" in dockerfile and "COPY model /opt/ml/model" in dockerfile
    # the port the KServe manifest probes; the OpenAI-compatible server on the model's files, the registered name
    # as the model id, onnxruntime threads from the env the KServe manifest sets
    (cmd,) = re.findall(r"^CMD .*$", dockerfile, re.M)
    assert f"PORT={PORT}" in dockerfile and "exec alignpipe serve /opt/ml/model --name \\\"$SERVED_MODEL_NAME\\\"" in cmd
    assert "--threads \\\"$ALIGNPIPE_SERVE_THREADS\\\"" in cmd and "--host 0.0.0.0" in cmd
    manifest = kserve_manifest("p", "img", model_uri="models:/m@champion", version="1", threads=2, cpu="2",
                               memory="2Gi")
    (env,) = manifest["spec"]["predictor"]["containers"][0]["env"]
    assert f"${env['name']}" in cmd  # the variable the KServe manifest sets is the one the image reads


def test_every_package_folder_is_installed():
    """The image installs the package (not the checkout): a subpackage missing from pyproject.toml's list imports in
    the editable install here and fails only in the image."""
    dirs = PYPROJECT["tool"]["setuptools"]["package-dir"]
    found = set()
    for name, folder in dirs.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            if name == "" or rel == Path("."):
                found.add(".".join(((name,) if name else ()) + rel.parts))
    assert sorted(PYPROJECT["tool"]["setuptools"]["packages"]) == sorted(found)


@needs_make
def test_sources_digest_changes_with_the_sources(tmp_path):
    out = make_n("-f", "docker/images.mk", "image-cpu")
    (snippet,) = re.findall(r"--build-arg SOURCES_DIGEST=(\$\(cd \S+ && .*?cut -c1-16\))", out)
    snippet = snippet.replace(".tmp/image-context-cpu", str(tmp_path))
    (tmp_path / "alignpipe").mkdir()
    (tmp_path / "wheels").mkdir()
    (tmp_path / "alignpipe" / "a.py").write_text("x = 1\n")

    def digest() -> str:
        return subprocess.run(["bash", "-c", f"echo {snippet}"], capture_output=True, text=True, check=True).stdout

    first = digest()
    assert re.fullmatch(r"[0-9a-f]{16}\n", first) and digest() == first
    (tmp_path / "alignpipe" / "a.py").write_text("x = 2\n")
    assert digest() != first
