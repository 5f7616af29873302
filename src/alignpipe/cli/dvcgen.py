"""`alignpipe pipeline dvc-yaml`: dvc.yaml generated from the stage registry, so its deps cannot go stale.

Each stage's `cmd` passes its inputs' default paths (the stage module's INPUTS; an optional input without a default,
its `pipeline_path`: evaluate's candidates), `deps` are those paths plus the
code the stage runs (the stage module and its transitive imports inside the alignpipe package, found by walking
the import statements with `ast`, function-local imports included), `params` is its params.yaml section, `outs`
its artifacts folder; `metrics` are each stage's metrics_headline.json and `plots` its curves/ folder (per-step loss,
reward, KL) and evaluate's score-vs-KL frontier.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from alignpipe.core.outputs import FILE_MARKER, write_output_file
from alignpipe.run.runner import CURVES_DIR, HEADLINE_FILE
from alignpipe.stages import STAGE_NAMES, STAGES, load_stage

PACKAGE = "alignpipe"
SRC = Path(__file__).resolve().parents[2]  # the folder that holds the alignpipe package
HEADER = (f"# {FILE_MARKER} (`alignpipe pipeline dvc-yaml --out dvc.yaml`) from the stage registry "
          "(src/alignpipe/stages/):\n# do not edit by hand; tests/test_pipeline.py fails when this file differs "
          "from the generated one.\n")


def _module_file(name: str) -> Path | None:
    """The source file of module `name` inside the package (a package's __init__.py), or None."""
    base = SRC.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imported_modules(module: str, path: Path) -> set[str]:
    """The alignpipe modules `path` (module `module`) imports anywhere in its body, function-local imports
    included: `import a.b`, `from a import b` (b a submodule or a name of a) and relative imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if (m == PACKAGE or m.startswith(PACKAGE + ".")) and _module_file(m) is not None}


def code_deps(module: str) -> list[str]:
    """The source files (relative to the repository root) that importing `module` executes inside the package:
    the module, its transitive imports, and the __init__.py of every package on the way; sorted."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages run their __init__
        todo.extend(_imported_modules(name, _module_file(name)) - seen)
    root = SRC.parent
    return sorted(str(_module_file(m).relative_to(root)) for m in seen)


# Order that no input expresses: training starts only after the data passed validation.
GATES = {"pretrain": ["artifacts/validate/report.json"]}


def _produced(path: str) -> bool:
    """An input DVC can provide: data/ (data.dvc), or a stage's artifacts folder or a path inside it
    (artifacts/evaluate/best), not e.g. a user's file."""
    parts = path.split("/")
    return path == "data" or (len(parts) >= 2 and parts[0] == "artifacts" and parts[1] in STAGE_NAMES)


def stage_entry(name: str) -> dict:
    """One dvc.yaml stage: cmd, deps (input paths, then the code that runs: the stage module and the runner with
    their imports), params, outs."""
    stage = load_stage(name)
    out = f"artifacts/{name}"
    paths = {spec.name: spec.default or spec.pipeline_path for spec in stage.INPUTS}
    paths = {k: v for k, v in paths.items() if v and _produced(v)}
    args = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in paths.items())
    return {
        "cmd": f"alignpipe {name} {args} --out {out}".replace("  ", " "),
        "deps": [*dict.fromkeys([*paths.values(), *GATES.get(name, [])]),
                 *sorted(set(code_deps(f"{PACKAGE}.stages.{name}")) | set(code_deps(f"{PACKAGE}.run.runner")))],
        "params": [name],
        "outs": [out],
    }


def plots() -> list:
    """Top-level dvc.yaml plots: each training stage's curves (one line per metric over steps) and evaluate's
    score-vs-KL frontier (a colleague's evaluate writes frontier.tsv)."""
    out: list = []
    for stage in STAGES:
        if stage.curves:
            out.append({f"artifacts/{stage.name}/{CURVES_DIR}": {"x": "step", "y": "value", "template": "linear"}})
    out.append({"artifacts/evaluate/frontier.tsv": {"x": "kl", "y": "violations_per_char", "template": "scatter",
                                                    "title": "evaluate: violations/char vs KL to the reference"}})
    return out


def generate() -> dict:
    """The whole dvc.yaml as a dict."""
    return {
        "stages": {name: stage_entry(name) for name in STAGE_NAMES},
        "metrics": [f"artifacts/{name}/{HEADLINE_FILE}" for name in STAGE_NAMES],
        "plots": plots(),
    }


def render() -> str:
    """dvc.yaml's text: the header, then the generated YAML (stable key order)."""
    return HEADER + yaml.safe_dump(generate(), sort_keys=False, width=120)


def cmd_dvc_yaml(args) -> int:
    text = render()
    if args.out == "-":
        print(text, end="")
        return 0
    write_output_file(args.out, text, force=args.force)
    print(f"wrote {args.out} ({len(generate()['stages'])} stages)")
    return 0
