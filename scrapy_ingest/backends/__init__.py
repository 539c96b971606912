"""Database backends, chosen by the scheme of a database URL."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from scrapy_ingest._redact import redact_url
from scrapy_ingest._shapes import Batch, Row, WriteOutcome
from scrapy_ingest.backends._local import LocalHost
from scrapy_ingest.backends.base import Backend, Failure
from scrapy_ingest.exceptions import ConfigError
from scrapy_ingest.spill import SpillJournal

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
    "check_driver",
    "check_url",
    "is_best_effort",
    "local_host",
    "make_backend",
    "url_scheme",
]

POSTGRES_SCHEMES = ("postgresql", "postgres")
CLICKHOUSE_SCHEMES = ("clickhouse", "clickhouses", "chdb")
MYSQL_SCHEMES = ("mysql", "mariadb")
#: every URL scheme a backend takes
SUPPORTED_SCHEMES = ("sqlite", *POSTGRES_SCHEMES, *CLICKHOUSE_SCHEMES, *MYSQL_SCHEMES)


def url_scheme(url: str) -> str:
    """``postgresql+psycopg://...`` -> ``postgresql``."""
    return url.split(":", 1)[0].split("+", 1)[0].lower()


def check_url(url: str, source: str = "INGEST_DATABASE_URL") -> None:
    """Raise ConfigError, naming *source* (the setting), for a URL that no backend takes.

    Besides the schemes we test (``SUPPORTED_SCHEMES``), any URL of a database
    SQLAlchemy has a dialect for is taken, on a best-effort basis.
    """
    scheme = url_scheme(url) if "://" in url else None
    if scheme not in SUPPORTED_SCHEMES and not _sqlalchemy_dialect(url):
        raise ConfigError(
            f"{source} ({redact_url(url)!r}) is invalid: it must be a database URL whose scheme "
            f"is one of {', '.join(SUPPORTED_SCHEMES)}. Fix: use e.g. 'sqlite:///ingest.sqlite3' "
            "or 'postgresql://user:password@host/dbname'."
        )


def _sqlalchemy_dialect(url: str) -> bool:
    import sqlalchemy as sa

    try:
        sa.engine.make_url(url).get_dialect()
    except Exception:  # unknown scheme, malformed URL: not a SQLAlchemy URL
        return False
    return True


def is_best_effort(url: str) -> bool:
    """Whether *url* goes to a database SQLAlchemy knows but our tests do not cover."""
    return url_scheme(url) not in SUPPORTED_SCHEMES


def check_driver(url: str, source: str = "INGEST_DATABASE_URL") -> None:
    """Raise ConfigError, naming *source*, when the driver *url* needs is not installed."""
    scheme = url_scheme(url)
    if scheme in POSTGRES_SCHEMES:
        _require("psycopg", "postgres", url, source)
        _require("psycopg_pool", "postgres", url, source)
    elif scheme in MYSQL_SCHEMES:
        driver = url.split("://", 1)[0].partition("+")[2] or "pymysql"
        module = {"pymysql": "pymysql", "mysqldb": "MySQLdb", "mariadbconnector": "mariadb"}
        _require(module.get(driver, driver), "mysql", url, source)
    elif scheme in CLICKHOUSE_SCHEMES:
        _require("clickhouse_connect", "clickhouse", url, source)
        if scheme == "chdb":
            _require("chdb", "clickhouse", url, source)


def make_backend(url: str, tables: Sequence[TableSpec], *, create_tables: bool) -> Backend:
    """Return the backend of *url* for *tables*, not opened yet (raise ConfigError for a URL
    no backend takes, or whose driver is not installed)."""
    check_url(url)
    check_driver(url)
    scheme = url_scheme(url)
    if scheme in POSTGRES_SCHEMES:
        from scrapy_ingest.backends.postgres import PostgresBackend

        return PostgresBackend(url, tables, create_tables=create_tables)
    if scheme in CLICKHOUSE_SCHEMES:
        from scrapy_ingest.backends.clickhouse import ClickHouseBackend

        return ClickHouseBackend(url, tables, create_tables=create_tables)
    from scrapy_ingest.backends.sqlalchemy import SqlAlchemyBackend

    return SqlAlchemyBackend(url, tables, create_tables=create_tables)


def local_host(
    url: str,
    tables: Sequence[TableSpec],
    *,
    create_tables: bool,
    retry_timeout: float,
    abort: Callable[[], bool] | None = None,
    spill_dir: str | None = None,
    require_backend: bool = True,
    on_replayed: Callable[[int], None] | None = None,
    spill_min_free: int | None = None,
    on_stuck: Callable[[bool], None] | None = None,
) -> LocalHost:
    """Return a host that runs the backend of *url* in the calling thread; with *spill_dir*,
    one that spills to a journal there what the database does not take (see LocalHost), and
    calls *on_replayed* with the rows of each batch it replays from there. *spill_min_free*:
    the journal's minimum free space (SpillJournal); *on_stuck*: see LocalHost."""
    backend = make_backend(url, tables, create_tables=create_tables)
    journal = (
        SpillJournal(spill_dir, url, on_replayed=on_replayed, min_free=spill_min_free)
        if spill_dir
        else None
    )
    return LocalHost(
        backend,
        retry_timeout,
        abort=abort,
        tables=tables,
        journal=journal,
        require_backend=require_backend,
        on_stuck=on_stuck,
    )


def _require(module: str, extra: str, url: str, source: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"{source} ({redact_url(url)!r}) needs the Python package {module}, "
            f"which is not installed. Fix: pip install 'scrapy-ingestion[{extra}]'."
        )
