"""One error type for bad input: the CLI prints it as one line and exits non-zero."""

from __future__ import annotations


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
