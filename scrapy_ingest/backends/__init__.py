"""Database backends, chosen by the scheme of a database URL."""

from __future__ import annotations

from typing import TYPE_CHECKING

from scrapy_ingest._redact import redact_url
from scrapy_ingest.backends.base import Backend, Failure, Row
from scrapy_ingest.exceptions import ConfigError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from scrapy_ingest.schema import TableSpec

__all__ = ["Backend", "Failure", "Row", "create_backend"]


def create_backend(url: str, tables: Sequence[TableSpec], *, create_tables: bool) -> Backend:
    """Return the backend for *url*; raise ConfigError for an unknown scheme or missing driver."""
    scheme = url.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme in ("postgresql", "postgres"):
        try:
            from scrapy_ingest.backends.postgres import PostgresBackend
        except ImportError as exc:
            raise ConfigError(
                f"INGEST_DATABASE_URL ({redact_url(url)!r}) needs psycopg 3, which is not "
                f"installed ({exc}). Fix: pip install 'scrapy-ingestion[postgres]'."
            ) from None
        return PostgresBackend(url, tables, create_tables=create_tables)
    if scheme == "sqlite":
        from scrapy_ingest.backends.sqlalchemy import SqlAlchemyBackend

        return SqlAlchemyBackend(url, tables, create_tables=create_tables)
    raise ConfigError(
        f"INGEST_DATABASE_URL ({redact_url(url)!r}) is invalid: the scheme {scheme!r} is not "
        "supported. Fix: use a sqlite:/// or postgresql:// URL."
    )
