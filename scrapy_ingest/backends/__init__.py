"""Database backends, chosen by the scheme of a database URL."""

from __future__ import annotations

import importlib.util
import sys
from typing import TYPE_CHECKING

from scrapy_ingest._redact import redact_url
from scrapy_ingest.backends.base import (
    Backend,
    BackendHost,
    Batch,
    Failure,
    LocalHost,
    Row,
    WriteOutcome,
)
from scrapy_ingest.exceptions import ConfigError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from scrapy_ingest.schema import TableSpec

__all__ = [
    "Backend",
    "BackendHost",
    "Batch",
    "Failure",
    "LocalHost",
    "Row",
    "WriteOutcome",
    "create_host",
    "local_host",
]

_POSTGRES = ("postgresql", "postgres")


def _scheme(url: str) -> str:
    return url.split(":", 1)[0].split("+", 1)[0].lower()


def create_host(
    url: str,
    tables: Sequence[TableSpec],
    *,
    create_tables: bool,
    retry_timeout: float,
    writer_process: bool,
) -> BackendHost:
    """Return where the backend of *url* will run; raise ConfigError for a bad URL or driver.

    Network databases run in a writer process when *writer_process* is true
    (see :mod:`scrapy_ingest.backends._process`); SQLite always runs in a
    writer thread, since it does no network I/O.
    """
    scheme = _scheme(url)
    if scheme in _POSTGRES and writer_process and sys.executable:
        _require("psycopg", "postgres", url)
        _require("psycopg_pool", "postgres", url)
        from scrapy_ingest.backends._process import ProcessHost

        return ProcessHost(
            url, tables, create_tables=create_tables, retry_timeout=retry_timeout
        )
    return local_host(url, tables, create_tables=create_tables, retry_timeout=retry_timeout)


def local_host(
    url: str, tables: Sequence[TableSpec], *, create_tables: bool, retry_timeout: float
) -> LocalHost:
    """Return a host that runs the backend of *url* in the calling thread."""
    scheme = _scheme(url)
    if scheme in _POSTGRES:
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
    return LocalHost(backend, retry_timeout)


def _require(module: str, extra: str, url: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"INGEST_DATABASE_URL ({redact_url(url)!r}) needs the Python package {module}, "
            f"which is not installed. Fix: pip install 'scrapy-ingestion[{extra}]'."
        )
