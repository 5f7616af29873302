"""Layout rules of the stages: each stage is a short recipe (no function over 80 lines) and imports no other stage
(only the registry's `Input`, `CANDIDATES` and `REFERENCE` from `alignpipe.stages`). Measured with `ast` on the
source, not by running it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

STAGES = Path(__file__).resolve().parents[1] / "src" / "alignpipe" / "stages"
MAX_FUNCTION_LINES = 80
# Stages already shortened; the lead extends this list as the other stages are (then: every file in STAGES).
CHECKED = sorted(p.name for p in STAGES.glob("*.py") if p.name != "__init__.py")


def function_lengths(path: Path) -> dict[str, int]:
    """{qualified name: end_lineno - lineno + 1} of every function (nested ones and methods included) in `path`."""
    out: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    out[name] = child.end_lineno - child.lineno + 1
                name += "."
            visit(child, name)

    visit(ast.parse(path.read_text()), "")
    return out


def stage_imports(path: Path) -> list[str]:
    """`from alignpipe.stages... import name` / `import alignpipe.stages...` statements of `path`, as text."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("alignpipe.stages"):
            found += [f"from {node.module} import {a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.startswith("alignpipe.stages")]
    return found


def test_function_lengths_counts_nested_functions_and_methods(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    def g():\n        pass\n    return g\n\n\nclass C:\n    def m(self):\n"
                   "        x = 1\n        return x\n")
    assert function_lengths(src) == {"f": 4, "f.g": 2, "C.m": 3}


@pytest.mark.parametrize("name", CHECKED)
def test_stage_functions_are_at_most_80_lines(name):
    long = {f: n for f, n in function_lengths(STAGES / name).items() if n > MAX_FUNCTION_LINES}
    assert long == {}, f"{name}: functions over {MAX_FUNCTION_LINES} lines: {long}"


@pytest.mark.parametrize("name", CHECKED)
def test_stages_import_no_other_stage(name):
    """Only the registry (`alignpipe.stages`: Input, CANDIDATES, ...), never a stage module."""
    modules = {p.stem for p in STAGES.glob("*.py")}
    registry = {f"from alignpipe.stages import {n}" for n in ("Input", "CANDIDATES", "REFERENCE")}
    found = set(stage_imports(STAGES / name))
    assert found <= registry, found - registry
    assert not any(line.rsplit(" ", 1)[-1] in modules for line in found)
