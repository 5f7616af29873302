"""Source checkouts only (src/ on the path): `alignpipe.components` is the repository's top-level components/ folder. An
install (pip, the images) maps that folder to this package instead (pyproject.toml's package-dir); this file is
not installed."""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parents[3] / "components")]
