"""Keep credentials out of everything we store or log."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

REDACTED = "***"

_SECRET_NAME = re.compile(r"PASS|SECRET|TOKEN|API_?KEY|AUTH|CREDENTIAL|COOKIE", re.IGNORECASE)
_SECRET_QUERY = re.compile(r"pass|secret|token|key|auth", re.IGNORECASE)
# "scheme://user:password@host" anywhere inside a longer string
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@")


class Redactor:
    """Hides the secrets of URLs in what a crawl stores: the password of every
    ``scheme://user:password@``, and the value of every query parameter named in
    *query_params* (``INGEST_REDACT_QUERY_PARAMS``, matched case-insensitively), also where
    the URL stands inside a longer text (a log message) or is URL-encoded inside another
    URL's query (``?next=https%3A%2F%2Fx%2F%3Ftoken%3D...``).

    The rest of the text is kept as it was, byte for byte.
    """

    def __init__(self, query_params: Iterable[str]) -> None:
        self._names = frozenset(n.lower() for n in query_params if n)

    def __call__(self, text: str) -> str:
        """*text* (a URL, or text with URLs in it) without their secrets."""
        if "@" in text:
            text = _USERINFO.sub(rf"\g<scheme>\g<user>:{REDACTED}@", text)
            # without its scheme, as in "invalid hostname: user:password@host"
            text = _BARE_USERINFO.sub(rf"\g<user>:{REDACTED}@", text)
        if "%40" in text:  # a URL with a password, URL-encoded in another URL's query
            text = _ENCODED_USERINFO.sub(rf"\g<scheme>\g<user>%3A{REDACTED}%40", text)
        if not self._names or ("=" not in text and "%3" not in text):
            return text
        lowered = text.lower()  # most URLs name no secret: a few substring tests say so
        if not any(name in lowered for name in self._names):
            return text
        return self._hide_values(text)

    def _hide_values(self, text: str) -> str:
        parts: list[str] = []
        done = 0
        for head in _QUERY_HEAD.finditer(text):
            start = head.end()
            if start < done or head["name"].lower() not in self._names:
                continue
            end = _VALUE_END.search(text, start)
            parts += (text[done:start], REDACTED)
            done = end.start() if end else len(text)
        parts.append(text[done:])
        return "".join(parts)


# "user:password@host", in a message that shows a URL's authority alone
_BARE_USERINFO = re.compile(r"(?P<user>[\w.~%!$'*+,;=-]+):[^\s@/:]+@(?=[\w\[])")
# "scheme://user:password@" URL-encoded ("scheme%3A%2F%2Fuser%3Apassword%40")
_ENCODED_USERINFO = re.compile(
    r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*%3[Aa]%2[Ff]%2[Ff])(?P<user>(?:(?!%3[Aa])[^%/@&\s])*)"
    r"%3[Aa](?:(?!%40)[^/@&\s])*%40"
)
# a query parameter's name and "=", also URL-encoded inside another URL's query
_QUERY_HEAD = re.compile(r"(?:[?&;]|%3[Ff]|%26)(?P<name>[A-Za-z0-9_.~-]+)(?:=|%3[Dd])")
# where its value ends: the next parameter, the fragment, or where the URL ends inside a
# longer text (white space, a quote or a bracket around it in a log message)
_VALUE_END = re.compile(r"[&#\s'\"<>()\[\]]|%26")


def url_password(url: str) -> str | None:
    """The password in *url*'s userinfo, as written (it may hold "/", "%" or spaces)."""
    _, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return None
    # the last "@" ends the userinfo: a password may contain "@" and "/" too
    userinfo = rest.rpartition("@")[0]
    if ":" not in userinfo:
        return None
    return userinfo.split(":", 1)[1]


def redact_url(url: str) -> str:
    """Return *url* with the password of its userinfo and secret query values replaced.

    ``postgresql://scraper:hunter2@db/x?password=y`` becomes
    ``postgresql://scraper:***@db/x?password=***``. A password that is not
    valid URL syntax (``pa/ss``, ``50%off``) is replaced all the same.
    """
    if "@" not in url and ("?" not in url or not _SECRET_QUERY.search(url)):
        return url  # the common case, kept cheap: called once per request and log line
    password = url_password(url)
    if password is not None:
        scheme, _, rest = url.partition("://")
        userinfo, _, after = rest.rpartition("@")
        url = f"{scheme}://{userinfo.split(':', 1)[0]}:{REDACTED}@{after}"
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    query = parts.query
    if not (query and _SECRET_QUERY.search(query)):
        return url
    pairs = parse_qsl(query, keep_blank_values=True)
    query = urlencode([(k, REDACTED if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def redact_secrets_of(url: str, text: str) -> str:
    """Remove from *text* (say, a driver's error message) the password of *url*, in any form."""
    password = url_password(url)
    if password:
        for form in {password, unquote(password)}:
            if form:
                text = text.replace(form, REDACTED)
    return redact_text(text)


# "'NAME': 'value'" of a secret-looking NAME inside a longer string: a dict of settings as
# Scrapy logs it ("Overridden settings: {...}")
_SECRET_ITEM = re.compile(
    r"""(?P<key>(?P<q>['"])[A-Za-z0-9_.\-]*(?:PASS|SECRET|TOKEN|API_?KEY|AUTH|CREDENTIAL|COOKIE)"""
    r"""[A-Za-z0-9_.\-]*(?P=q)\s*:\s*)(?P<v>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""",
    re.IGNORECASE,
)


def redact_text(text: str) -> str:
    """Replace passwords of any ``scheme://user:password@`` found inside *text*, and the
    quoted values of secret-looking names in a printed dict (``'API_KEY': '...'``)."""
    if "@" in text:  # the common line has none: the pattern is slow to try everywhere
        text = _USERINFO.sub(rf"\g<scheme>\g<user>:{REDACTED}@", text)
    if _names_a_secret(text):
        text = _SECRET_ITEM.sub(rf"\g<key>'{REDACTED}'", text)
    return text


#: words one of which every _SECRET_NAME match holds: looked for first, since the
#: case-insensitive pattern tried at every position costs a log line ~17 us
_SECRET_WORDS = ("pass", "secret", "token", "key", "auth", "credential", "cookie")


def _names_a_secret(text: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in _SECRET_WORDS) and bool(_SECRET_NAME.search(text))


def redact_value(name: str, value: Any) -> Any:
    """Redact a setting value: whole values of secret-looking names, URLs in the rest."""
    if _SECRET_NAME.search(name) and value not in (None, "", False):
        return REDACTED
    if isinstance(value, str):
        return redact_text(redact_url(value) if "://" in value else value)
    if isinstance(value, Mapping):
        # keys can be URLs too (FEEDS: {"ftp://user:password@host/items.json": {...}})
        return {
            redact_value("", _key_text(k)): redact_value(_key_text(k), v) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact_value(name, v) for v in value]
    return value


def _key_text(key: Any) -> str:
    # component dicts are keyed by classes as often as by import paths
    if isinstance(key, type):
        return f"{key.__module__}.{key.__qualname__}"
    return str(key)
