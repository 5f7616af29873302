"""The layer contract of the package (`[tool.importlinter]` in pyproject.toml), checked by import-linter on the
source: each subpackage imports only the layers below it (core at the ground, the command line on top), imports
inside functions included; only tracking/ and serving/ import MLflow, and only cli/ imports kfp and dvc. The
contracts are shown to hold on this tree and to break on a copy of it with one forbidden import added."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))")


def installed_copy(tmp: Path) -> Path:
    """A copy of the package as an install lays it out, under `tmp`: src/alignpipe with the repository's
    components/ and pipelines/ in place of the shims that point at them in a checkout (import-linter reads files
    from the package's folder, so it would not see their modules there)."""
    shutil.copytree(ROOT / "src" / "alignpipe", tmp / "alignpipe", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("components", "pipelines"):
        shutil.rmtree(tmp / "alignpipe" / name)
        shutil.copytree(ROOT / name, tmp / "alignpipe" / name, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp


def lint_imports(src: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with this repository's contracts on the `alignpipe` package found under `src`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", LINT, str(ROOT / "pyproject.toml")], cwd=src, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_layer_contracts_hold(tmp_path):
    result = lint_imports(installed_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout and "Contracts: 3 kept, 0 broken." in result.stdout


@pytest.mark.parametrize("module, added, broken", [
    # the deliberate edit of acceptance 5: the ground floor imports a stage
    ("core/io.py", "from alignpipe.stages import STAGE_NAMES\n",
     "alignpipe.core is not allowed to import alignpipe.stages"),
    # an import inside a function counts as much as one at the top
    ("core/config.py", "\n\ndef _later():\n    from alignpipe.run.runner import execute\n\n    return execute\n",
     "alignpipe.core is not allowed to import alignpipe.run"),
    ("lm/models.py", "import mlflow\n", "alignpipe.lm is not allowed to import mlflow"),
    ("stages/evaluate.py", "\n\ndef _dag():\n    import kfp\n\n    return kfp\n",
     "alignpipe.stages is not allowed to import kfp"),
    # components/ and pipelines/ are checked as installed, inside the package
    ("components/stages.py", "from alignpipe.pipelines import align\n",
     "alignpipe.components is not allowed to import alignpipe.pipelines"),
    ("tracking/runs.py", "\n\ndef _serve():\n    from alignpipe.serving import models\n\n    return models\n",
     "alignpipe.tracking is not allowed to import alignpipe.serving"),
])
def test_an_upward_import_breaks_the_contract(tmp_path, module, added, broken):
    path = installed_copy(tmp_path) / "alignpipe" / module
    text = path.read_text()
    edited = text + added if added.startswith("\n") else text.replace("\nfrom alignpipe", f"\n{added}from alignpipe", 1)
    assert edited != text
    path.write_text(edited)
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BROKEN" in result.stdout and broken in result.stdout, result.stdout
