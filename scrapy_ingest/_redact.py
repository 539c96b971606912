"""Keep credentials out of everything we store or log."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "***"

_SECRET_NAME = re.compile(r"PASS|SECRET|TOKEN|API_?KEY|AUTH|CREDENTIAL|COOKIE", re.IGNORECASE)
_SECRET_QUERY = re.compile(r"pass|secret|token|key|auth", re.IGNORECASE)
# "scheme://user:password@host" anywhere inside a longer string
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@")


def redact_url(url: str) -> str:
    """Return *url* with the password of its userinfo and secret query values replaced.

    ``postgresql://scraper:hunter2@db/x?password=y`` becomes
    ``postgresql://scraper:***@db/x?password=***``.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return _USERINFO.sub(rf"\g<scheme>\g<user>:{REDACTED}@", url)
    netloc = parts.netloc
    if "@" not in netloc and not (parts.query and _SECRET_QUERY.search(parts.query)):
        return url
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        if ":" in userinfo:
            userinfo = f"{userinfo.split(':', 1)[0]}:{REDACTED}"
        netloc = f"{userinfo}@{hostinfo}"
    query = parts.query
    if query and _SECRET_QUERY.search(query):
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, REDACTED if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*"
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Replace passwords of any ``scheme://user:password@`` found inside *text*."""
    return _USERINFO.sub(rf"\g<scheme>\g<user>:{REDACTED}@", text)


def redact_value(name: str, value: Any) -> Any:
    """Redact a setting value: whole values of secret-looking names, URLs in the rest."""
    if _SECRET_NAME.search(name) and value not in (None, "", False):
        return REDACTED
    if isinstance(value, str):
        return redact_text(redact_url(value) if "://" in value else value)
    if isinstance(value, Mapping):
        return {str(k): redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(name, v) for v in value]
    return value
