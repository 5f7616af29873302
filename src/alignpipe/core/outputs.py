"""Where alignpipe may write and delete: never a user's own files.

An output directory (`--out`, a `checkpoint_dir`) must be new, empty, or one alignpipe made before (it holds the
MARKER file, written when alignpipe creates it). Refused, with one line and nothing touched: a file, a directory
alignpipe did not make, an input of the same run (or a folder holding one), the current directory or any of its
parents, the home directory, `/` and the system folders (`/proc`, `/etc`, ...).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable

from alignpipe.core.errors import ConfigError

MARKER = ".alignpipe-output"  # written into every folder alignpipe creates for its outputs or checkpoints
NAME_MAX, PATH_MAX = 255, 4096  # Linux's limits on one path component and a whole path, in bytes
SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/sbin", "/sys", "/usr")


def _protected(resolved: Path) -> str | None:
    """Why `resolved` (an absolute path) may never be an output, or None."""
    if resolved == Path(resolved.anchor):
        return "is the filesystem root"
    if resolved == Path.home().resolve():
        return "is the home directory"
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        return "is the current directory or one of its parents"
    for system in SYSTEM_DIRS:
        if resolved == Path(system) or Path(system) in resolved.parents:
            return f"is inside the system folder {system}"
    return None


def is_ours(path: Path) -> bool:
    """Whether `path` is a directory alignpipe made (it holds the marker)."""
    return path.is_dir() and not path.is_symlink() and (path / MARKER).is_file()


def check_output_dir(path: str | Path, where: str = "--out", inputs: Iterable[str | Path | None] = ()) -> Path:
    """`path` if alignpipe may replace it (new, an empty directory, or one alignpipe made); a ConfigError naming
    `where` otherwise. `inputs` are the run's input paths: none may be, hold or lie inside the output."""
    if str(path).strip() == "":
        raise ConfigError(where, "empty path: name an output directory")
    path = Path(path)
    _check_form(path, where)
    resolved = path.resolve()
    reason = _protected(resolved)
    if reason:
        raise ConfigError(f"{where} {path}", f"{reason}; refusing to write there")
    for given in inputs:
        if given in (None, ""):
            continue
        src = Path(given).resolve()
        if src == resolved or resolved in src.parents or src in resolved.parents:
            raise ConfigError(f"{where} {path}", f"overlaps the input {given}; choose a separate output directory")
    if path.is_symlink():
        raise ConfigError(f"{where} {path}", "is a symbolic link; refusing to replace it")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{where} {path}", "is an existing file, not a directory; refusing to replace it")
    if path.is_dir() and not is_ours(path) and any(path.iterdir()):
        raise ConfigError(f"{where} {path}", f"is a non-empty directory alignpipe did not create (no {MARKER}); "
                          "choose a new or empty directory")
    return path


def _check_form(path: Path, where: str) -> None:
    """A ConfigError when `path` cannot name a folder to write: a name longer than the filesystem allows
    (NAME_MAX), or `..` after a folder name (`p/new/..`, which means another folder than it reads as, depending on
    folders that may not exist yet; leading `../` are fine)."""
    longest = max((len(os.fsencode(part)) for part in path.parts), default=0)
    if longest > NAME_MAX or len(os.fsencode(str(path.absolute()))) > PATH_MAX:
        raise ConfigError(f"{where} {str(path)[:60]}...", f"path too long (a name over {NAME_MAX} bytes or a path "
                          f"over {PATH_MAX}); choose a shorter one")
    parts = list(path.parts)
    while parts and parts[0] in ("..", path.anchor):
        parts.pop(0)
    if ".." in parts:
        raise ConfigError(f"{where} {path}", "has '..' after a folder name; write the folder it means")


def check_output_file(path: str | Path, where: str = "--out") -> Path:
    """`path` for a file alignpipe writes (a pipeline YAML, a manifest): not empty, not a directory, not a system
    path; a ConfigError naming `where` otherwise."""
    if str(path).strip() == "":
        raise ConfigError(where, "empty path: name the file to write")
    path = Path(path)
    _check_form(path, where)
    if path.is_dir():
        raise ConfigError(f"{where} {path}", "is a directory; name the file to write")
    reason = _protected(path.resolve())
    if reason:
        raise ConfigError(f"{where} {path}", f"{reason}; refusing to write there")
    return path


def make_output_dir(path: str | Path, where: str = "--out") -> Path:
    """Check `path` (check_output_dir), create it and mark it as alignpipe's; returns it."""
    path = check_output_dir(path, where)
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / MARKER).touch()
    except OSError as e:  # a read-only parent, a name too long, a full disk: said in one line
        raise ConfigError(f"{where} {path}", f"cannot create it: {e.strerror or e}") from None
    return path


def remove_ours(path: Path) -> None:
    """Delete `path` if it is a directory alignpipe made or an empty one; anything else is left alone."""
    if is_ours(path):
        shutil.rmtree(path)
    elif path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        os.rmdir(path)
