"""The README is a map for a newcomer (STYLE rule 17): short, no measurements; the docs' links resolve; nothing in
the repository names a path outside it. Reads files only."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
TEXT_DIRS = ("src", "tests", "benchmarks", "docs", "configs", "components", "pipelines", "docker")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".mk", ".txt", ".cfg", ".ini", ".json", ""}
LINK = re.compile(r"\]\(([^)\s]+)\)")


def text_files() -> list[Path]:
    """The repository's own text files: the top-level files and those under TEXT_DIRS (no build outputs)."""
    files = [p for p in ROOT.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES | {".lock"}]
    for name in TEXT_DIRS:
        files += [p for p in (ROOT / name).rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
                  and "__pycache__" not in p.parts]
    return files


def test_readme_is_at_most_150_lines():
    assert len(README.read_text().splitlines()) <= 150


def test_readme_has_no_measurements_or_commit_hashes():
    text = README.read_text()
    assert not re.findall(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", text), "commit hashes"
    assert not re.findall(r"\b\d+\.\d{3,}\b|\[\d\.\d+, \d\.\d+\]|\b\d+(?:\.\d+)? ?(?:s|min) (?:wall|idle)\b", text)


def test_readme_names_the_commands_and_links_the_docs():
    text = README.read_text()
    for needed in ("make run", "make test", "make test-fast", "dvc metrics show", "metrics.json", "mlflow ui",
                   "report.html", "@champion", "package.module:Name"):
        assert needed in text, needed
    for doc in ("tasks.md", "METRICS.md", "models.md", "kubeflow.md", "scaling.md", "serving.md", "reliability.md",
                "results.md"):
        assert f"(docs/{doc})" in text, doc


def test_relative_links_in_readme_and_docs_resolve():
    broken = []
    for md in [README, *DOCS]:
        for target in LINK.findall(md.read_text()):
            path = target.split("#")[0]
            if not path or "://" in path or path.startswith("mailto:"):
                continue
            if not (md.parent / path).exists():
                broken.append(f"{md.relative_to(ROOT)}: {target}")
    assert broken == []


def test_nothing_names_a_path_outside_the_repository():
    outside = ("../" + "shared", "/" + "work/")
    found = [f"{p.relative_to(ROOT)}:{i}" for p in text_files()
             for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
             if any(o in line for o in outside)]
    assert found == []
