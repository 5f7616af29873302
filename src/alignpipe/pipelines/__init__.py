"""Source checkouts only (src/ on the path): `alignpipe.pipelines` is the repository's top-level pipelines/ folder. An
install (pip, the images) maps that folder to this package instead (pyproject.toml's package-dir); this file is
not installed."""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parents[3] / "pipelines")]
