"""The images, checked statically (no Docker engine here): the tag the components run is the tag `make images`
builds, it follows the package version, and each Dockerfile installs every pinned requirement the way the Makefile
does (torch first at the pyproject pin, then the package with exactly one onnxruntime extra)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from components.image import CPU_IMAGE, GPU_IMAGE, VERSION
from components.stages import COMPONENTS
from pipelines.align import GPU_STAGES

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DOCKERFILES = {"gpu": ROOT / "docker" / "Dockerfile", "cpu": ROOT / "docker" / "Dockerfile.cpu"}
ONNXRUNTIME = {"gpu": "onnxruntime-gpu", "cpu": "onnxruntime"}
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


def arg_default(dockerfile: str, name: str) -> str:
    (value,) = re.findall(rf"^ARG {name}=(\S+)$", dockerfile, re.M)
    return value


def pip_installs(dockerfile: str) -> list[str]:
    """The arguments of every `pip install` in the Dockerfile (continuation lines joined)."""
    text = dockerfile.replace("\\\n", " ")
    return [m.strip() for m in re.findall(r"pip install ([^&\n]+)", text)]


@needs_make
def test_make_images_builds_the_tags_the_components_run():
    out = subprocess.run(["make", "-n", "-f", "docker/images.mk", "images"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    built = dict(re.findall(r"docker build -f (\S+) -t (\S+) \.", out))
    assert built == {"docker/Dockerfile": GPU_IMAGE, "docker/Dockerfile.cpu": CPU_IMAGE}
    for name, component in COMPONENTS.items():
        image = component.component_spec.implementation.container.image
        assert image == (GPU_IMAGE if name in GPU_STAGES else CPU_IMAGE), name


@needs_make
def test_makefile_images_target_is_docker_images_mk():
    makefile = ROOT / "Makefile"
    if not makefile.is_file() or "docker/images.mk" not in makefile.read_text():
        pytest.skip("the Makefile does not include docker/images.mk yet")
    out = subprocess.run(["make", "-n", "images"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert f"-t {GPU_IMAGE} ." in out and f"-t {CPU_IMAGE} ." in out


def test_image_tags_follow_the_package_version():
    assert VERSION == PYPROJECT["project"]["version"]
    assert GPU_IMAGE.endswith(f":{VERSION}-cuda") and CPU_IMAGE.endswith(f":{VERSION}-cpu")


@pytest.mark.parametrize("flavor", ["gpu", "cpu"])
def test_dockerfile_installs_every_pinned_requirement(flavor):
    dockerfile = DOCKERFILES[flavor].read_text()
    pinned = pins()
    # torch first, at the pyproject pin, from the CUDA or the CPU wheel index
    assert arg_default(dockerfile, "TORCH_VERSION") == pinned["torch"]
    index = arg_default(dockerfile, "TORCH_INDEX_URL")
    assert index.startswith("https://download.pytorch.org/whl/") and (index.endswith("/cpu") == (flavor == "cpu"))
    installs = pip_installs(dockerfile)
    assert installs[0] == "--upgrade pip"
    assert installs[1] == '"torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"'
    # then the package with its flavour's extra: pip installs every `==` pin of pyproject.toml, nothing else
    assert installs[2:] == [f'"/src[{flavor}]"']
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert [Requirement(r).name for r in extras[flavor]] == [ONNXRUNTIME[flavor]]  # one onnxruntime, never both
    assert "pip check" in dockerfile
    # the same order and torch pin as the Makefile's install
    makefile = (ROOT / "Makefile").read_text() if (ROOT / "Makefile").is_file() else ""
    if "pip install" in makefile:
        assert f"torch=={pinned['torch']}" in makefile
        assert makefile.index("torch==") < makefile.index('-e ".[')


@pytest.mark.parametrize("flavor", ["gpu", "cpu"])
def test_build_context_and_runtime_of_the_image(flavor):
    dockerfile = DOCKERFILES[flavor].read_text()
    lines = Path(f"{DOCKERFILES[flavor]}.dockerignore").read_text().splitlines()
    ignore = [line for line in lines if line and not line.startswith("#")]
    assert ignore[0] == "*" and "!pyproject.toml" in ignore  # everything out, then only what the install needs
    for package_dir in {*PYPROJECT["tool"]["setuptools"]["package-dir"].values()}:
        assert f"!{package_dir}" in ignore, package_dir
    # the KFP task command runs `python3`: the venv's must come first on PATH
    assert re.search(r"PATH=/opt/venv/bin:\$PATH", dockerfile)
    python = "3.11"
    assert python in (arg_default(dockerfile, "PYTHON_VERSION") if flavor == "gpu"
                      else arg_default(dockerfile, "PYTHON_IMAGE"))
    assert Requirement(f"python{PYPROJECT['project']['requires-python']}").specifier.contains(f"{python}.0")
    if flavor == "gpu":
        assert "cudnn" in arg_default(dockerfile, "CUDA_IMAGE") and "cu13" in arg_default(dockerfile, "TORCH_INDEX_URL")
        assert "CUDAExecutionProvider" in dockerfile  # the build fails if onnxruntime-gpu lost CUDA
