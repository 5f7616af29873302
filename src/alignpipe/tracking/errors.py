"""The tracking store's failures as one line: an MLflow, SQLAlchemy or Alembic exception (an unsupported or corrupt
tracking URI, a registry name MLflow refuses, two processes creating a fresh store's schema at once) becomes an
AlignpipeError naming the store, with any credential in the message redacted. The command line applies it to
whatever a command raised (`store_error`), so no entry point prints a traceback for them.
"""

from __future__ import annotations

import re

from alignpipe.core.errors import AlignpipeError

_FROM = ("mlflow", "sqlalchemy", "alembic", "sqlite3")  # the libraries behind the tracking store and the registry
_USERINFO = re.compile(r"(//[^/:@\s]+):[^@/\s]+@")  # //user:password@ -> //user:***@


def store_error(e: BaseException) -> AlignpipeError | None:
    """`e` as one line when the tracking store's libraries raised it (None for anything else)."""
    if not any(type(e).__module__.split(".")[0] == name for name in _FROM):
        return None
    from alignpipe.tracking.runs import redact, tracking_uri

    code = getattr(e, "error_code", None)
    message = getattr(e, "message", None) or str(e)
    first = _USERINFO.sub(r"\1:***@", (message.strip().splitlines() or [type(e).__name__])[0])[:300]
    kind = f"{type(e).__name__}{f' {code}' if code else ''}"
    return AlignpipeError(f"tracking store {redact(tracking_uri())}", f"{kind}: {first}", exit_code=1)
