"""The tracking store's failures as one line: an MLflow, SQLAlchemy or Alembic exception (an unsupported or corrupt
tracking URI, a registry name MLflow refuses, two processes creating a fresh store's schema at once) becomes an
AlignpipeError naming the store, with any credential in the message redacted. The command line applies it to
whatever a command raised (`store_error`), so no entry point prints a traceback for them.
"""

from __future__ import annotations

import importlib.util
import os

from alignpipe.core.errors import AlignpipeError, ConfigError
from alignpipe.core.redaction import redact_text

# the libraries behind the tracking store and the registry, and the HTTP client MLflow talks to a server with
_FROM = ("mlflow", "sqlalchemy", "alembic", "sqlite3", "requests", "urllib3")


def store_error(e: BaseException) -> AlignpipeError | None:
    """`e` as one line when the tracking store's libraries raised it (None for anything else)."""
    if not any(type(e).__module__.split(".")[0] == name for name in _FROM):
        return None
    from alignpipe.tracking.runs import redact, tracking_uri

    code = getattr(e, "error_code", None)
    message = str(getattr(e, "message", None) or e)
    first = redact_text((message.strip().splitlines() or [type(e).__name__])[0])[:300]
    kind = f"{type(e).__name__}{f' {code}' if code else ''}"
    return AlignpipeError(f"tracking store {redact(tracking_uri())}", _unreachable(message) or f"{kind}: {first}",
                          exit_code=1)


def _unreachable(message: str) -> str | None:
    """A server that did not answer, refused the connection or has no address, in a few words (MLflow's message
    nests urllib3's whole retry chain); None for any other failure."""
    low = message.lower()
    timeout, retries = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT"), os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    if "read timed out" in low or "readtimeout" in low or "connecttimeout" in low:
        return (f"no answer: timed out after {timeout} s and {retries} retries (MLFLOW_HTTP_REQUEST_TIMEOUT, "
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES)")
    if "connection refused" in low:
        return f"connection refused, after {retries} retries (is the server running?)"
    if "failed to resolve" in low or "name or service not known" in low:
        return "the host name does not resolve"
    return None


# SQLAlchemy's database drivers MLflow's SQL stores need (`postgresql+psycopg2://` names one explicitly).
SQL_DRIVERS = {"postgresql": ("psycopg2", "psycopg"), "mysql": ("MySQLdb", "pymysql"), "mssql": ("pyodbc",)}


def check_tracking_uri(uri: str) -> None:
    """A ConfigError naming MLFLOW_TRACKING_URI (redacted) when `uri` cannot even be parsed, or names a SQL database
    whose driver is not installed (the two ways a store fails outside MLflow's own exceptions)."""
    from urllib.parse import urlsplit

    from alignpipe.tracking.runs import redact

    where = f"MLFLOW_TRACKING_URI {redact(uri)}"
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 (parsing the port is the check)
    except ValueError as e:
        raise ConfigError(where, f"not a valid URI: {e}") from None
    dialect, _, driver = parts.scheme.partition("+")
    wanted = (driver,) if driver else SQL_DRIVERS.get(dialect, ())
    if wanted and not any(importlib.util.find_spec(name) for name in wanted):
        raise ConfigError(where, f"a {dialect} store needs its database driver installed ({' or '.join(wanted)})")
