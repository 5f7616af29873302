"""Credentials never printed: the one redaction every printed, logged, tagged or compiled URI and message goes
through (our own lines, the CLI's error line, and MLflow's log records via `RedactingFilter`)."""

from __future__ import annotations

import logging
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

SECRET_WORDS = ("password", "passwd", "pwd", "token", "secret", "key", "auth", "credential", "sig")
_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)([^\s/?#@:]*)(:[^\s/?#@]*)?@")
_QUERY = re.compile(r"([?&][^\s=&#]*(?:" + "|".join(SECRET_WORDS) + r")[^\s=&#]*=)[^\s&#'\"]+", re.IGNORECASE)


def redact(uri: str) -> str:
    """`uri` with any password or token replaced by `***` (`https://user:***@host/`, `?token=***`); unchanged when
    it holds none."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "***"
    netloc, query = parts.netloc, parts.query
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = f"{userinfo.split(':', 1)[0]}:***@{host}" if ":" in userinfo else f"***@{host}"
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(w in k.lower() for k, _ in pairs for w in SECRET_WORDS):
        query = urlencode([(k, "***" if any(w in k.lower() for w in SECRET_WORDS) else v) for k, v in pairs],
                          safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return uri  # nothing to hide: unchanged (urlunsplit would rewrite sqlite:////abs as sqlite://abs)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def has_credentials(uri: str) -> bool:
    """Whether `uri` carries a password or token (redact would change it)."""
    return redact(uri) != uri


def redact_text(text: str) -> str:
    """Free text (an error message, a log line) with the credentials of every URL in it replaced by `***`."""
    if "://" not in text:
        return text

    def userinfo(m: re.Match) -> str:
        return f"{m.group(1)}{m.group(2)}:***@" if m.group(3) is not None else f"{m.group(1)}***@"

    return _QUERY.sub(r"\1***", _USERINFO.sub(userinfo, text))


class RedactingFilter(logging.Filter):
    """A logging filter that redacts credentials in a record's message (and its formatted traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


_FILTER = RedactingFilter()


def redact_logs(*logger_names: str) -> None:
    """Redact what these loggers (and the root logger) emit: the filter on each logger and on each of its
    handlers (a logger's own filters do not see its children's records; its handlers do)."""
    for name in ("", *logger_names):
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            if _FILTER not in target.filters:
                target.addFilter(_FILTER)
