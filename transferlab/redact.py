"""Credentials in URLs: found (params refuse them) and blanked wherever text is printed or logged.

Secrets belong in the environment or in AWS/MLflow configuration, never in params. Params are
checked by :func:`url_credentials`; everything else (error lines, log records) goes through
:func:`redact`, because a URL can also arrive from the environment (``MLFLOW_TRACKING_URI``) or
inside a library's exception text.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import parse_qsl, urlsplit

MASK = "***"
# scheme://user:password@host -> scheme://***@host (the user name can be a secret too: an
# access key id).
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/?#@\s'\"]+@")
# Query parameters that carry secrets in signed or token URLs.
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&](?:[A-Za-z0-9_.-]*(?:signature|token|secret|password|passwd|credential|"
    r"api[_-]?key|access[_-]?key|sig)[A-Za-z0-9_.-]*))=[^&#\s'\"]*",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with the user-info part and secret query values of every URL in it masked."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}={MASK}", text)


def url_credentials(url: str) -> str | None:
    """What secret ``url`` carries (``"a user name or password"``...), or None when clean."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.username or parts.password or "@" in parts.netloc:
        return "a user name or password"
    for key, _ in parse_qsl(parts.query, keep_blank_values=True):
        if _SECRET_QUERY.fullmatch(f"?{key}=x"):
            return f"a secret query parameter {key!r}"
    return None


class RedactingFilter(logging.Filter):
    """Masks credentials in every record that passes a handler (message and traceback text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add :class:`RedactingFilter` to every handler of ``logger`` (default: the root logger)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
