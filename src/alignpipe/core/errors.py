"""One error type for bad input: the CLI prints it as one line and exits non-zero."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator


class AlignpipeError(Exception):
    """A user-facing error: `where` is a file, a config key or a field; `reason` says what to fix."""

    def __init__(self, where: str, reason: str, exit_code: int = 2):
        self.where = str(where)
        self.reason = reason
        self.exit_code = exit_code
        super().__init__(f"{self.where}: {reason}")


class ConfigError(AlignpipeError):
    """A bad params file, section, key or value."""


class DataError(AlignpipeError):
    """A bad input file: not JSONL, not UTF-8, empty, missing a field, ..."""

    def __init__(self, where: str, reason: str):
        super().__init__(where, reason, exit_code=1)


# What a loader raises on a corrupt or truncated file: OSError, ValueError (json), RuntimeError and EOFError (torch),
# pickle's UnpicklingError, KeyError (a missing tensor), safetensors' SafetensorError, Jinja's TemplateError (a chat
# template's syntax error, sandbox violation or raise_exception); the tokenizers library raises a plain Exception.
# Matched by name so this module imports none of those libraries.
_LOAD_ERRORS = ("OSError", "ValueError", "RuntimeError", "EOFError", "UnpicklingError", "KeyError", "SafetensorError",
                "TemplateError")


@contextlib.contextmanager
def loading(path: str | Path, what: str) -> Iterator[None]:
    """Turn a loader's error on a corrupt, truncated or missing file into one DataError line naming `path` and
    `what` was being loaded; any other error propagates unchanged."""
    try:
        yield
    except AlignpipeError:
        raise
    except Exception as e:
        if type(e) is not Exception and not any(cls.__name__ in _LOAD_ERRORS for cls in type(e).__mro__):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(str(path), f"cannot load the {what}: {type(e).__name__}: {first[:200]}") from None
