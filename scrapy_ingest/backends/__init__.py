"""Database backends, chosen by the scheme of a database URL."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from scrapy_ingest._redact import redact_url
from scrapy_ingest.backends.base import (
    Backend,
    Batch,
    Failure,
    LocalHost,
    Row,
    WriteOutcome,
)
from scrapy_ingest.exceptions import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from scrapy_ingest.schema import TableSpec

__all__ = [
    "Backend",
    "Batch",
    "Failure",
    "LocalHost",
    "Row",
    "WriteOutcome",
    "local_host",
    "url_scheme",
]

POSTGRES_SCHEMES = ("postgresql", "postgres")


def url_scheme(url: str) -> str:
    """``postgresql+psycopg://...`` -> ``postgresql``."""
    return url.split(":", 1)[0].split("+", 1)[0].lower()


def local_host(
    url: str,
    tables: Sequence[TableSpec],
    *,
    create_tables: bool,
    retry_timeout: float,
    abort: Callable[[], bool] | None = None,
) -> LocalHost:
    """Return a host that runs the backend of *url* in the calling thread."""
    scheme = url_scheme(url)
    if scheme in POSTGRES_SCHEMES:
        _require("psycopg", "postgres", url)
        _require("psycopg_pool", "postgres", url)
        from scrapy_ingest.backends.postgres import PostgresBackend

        backend: Backend = PostgresBackend(url, tables, create_tables=create_tables)
    elif scheme == "sqlite":
        from scrapy_ingest.backends.sqlalchemy import SqlAlchemyBackend

        backend = SqlAlchemyBackend(url, tables, create_tables=create_tables)
    else:
        raise ConfigError(
            f"INGEST_DATABASE_URL ({redact_url(url)!r}) is invalid: the scheme {scheme!r} is "
            "not supported. Fix: use a sqlite:/// or postgresql:// URL."
        )
    return LocalHost(backend, retry_timeout, abort=abort)


def _require(module: str, extra: str, url: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"INGEST_DATABASE_URL ({redact_url(url)!r}) needs the Python package {module}, "
            f"which is not installed. Fix: pip install 'scrapy-ingestion[{extra}]'."
        )
