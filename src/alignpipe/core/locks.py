"""Locks on what a run owns (its --out, its checkpoint folder, a fresh registry's schema): a second writer is
refused with one line, or waits a bounded time.

A lock is `fcntl.flock` on a small file holding the owner's pid and command: the kernel releases it when the owner
exits, however it ends (SIGKILL included), so a lock whose process died is never in the way. The file is removed on
release; a holder checks after locking that its file is still the one at the path (a releaser may have removed it
in between) and retries otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from pathlib import Path
from typing import Iterator

from alignpipe.core.errors import ConfigError
from alignpipe.core.redaction import redact_text


def lock_path(path: str | Path) -> Path:
    """The lock file of `path` (a folder or file that may be replaced): `.<name>.lock` beside it."""
    path = Path(path).absolute()
    return path.with_name(f".{path.name}.lock")


def _owner(lock: Path) -> str:
    try:
        return lock.read_text(encoding="utf-8").strip() or "unknown"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def hold(path: str | Path, where: str, wait: float = 0.0) -> Iterator[Path]:
    """Hold the lock of `path` while the block runs. Taken by another live process: wait up to `wait` seconds,
    then a ConfigError naming `where` and the holder's pid."""
    lock = lock_path(path)
    deadline = time.monotonic() + wait
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a read-only folder, a file where a folder should be: said in one line
            raise ConfigError(f"{where} {path}", f"cannot create it: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                raise ConfigError(f"{where} {path}", f"is in use by another alignpipe run ({_owner(lock)}; lock "
                                  f"{lock}); wait for it to finish or choose another path") from None
            time.sleep(0.1)
            continue
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # released and removed by its holder in between: lock the new file
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}: {redact_text(' '.join(sys.argv))[:200]}\n".encode())
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)
