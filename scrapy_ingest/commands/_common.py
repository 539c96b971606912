"""What the ``scrapy ingest`` actions share: the databases the settings name, opening one
without changing it, and progress on a terminal."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from scrapy_ingest._redact import redact_url
from scrapy_ingest.backends import make_backend
from scrapy_ingest.exceptions import BackendUnavailable
from scrapy_ingest.schema import all_tables, table_spec

if TYPE_CHECKING:
    import argparse

    from scrapy.settings import BaseSettings

    from scrapy_ingest.backends import Backend
    from scrapy_ingest.config import IngestConfig
    from scrapy_ingest.schema import TableSpec


@dataclass(frozen=True)
class Context:
    """What an action is run with."""

    settings: BaseSettings
    config: IngestConfig
    opts: argparse.Namespace


@dataclass(frozen=True)
class Database:
    """A database the settings name, and which kinds of record go there."""

    url: str
    #: the settings that name it (for messages): "INGEST_DATABASE_URL", "INGEST_ROUTES['items']"
    source: str
    #: the tables a crawl writes there (jobs, dead letters and the schema version included)
    tables: tuple[TableSpec, ...]

    @property
    def shown(self) -> str:
        """The URL with its password hidden."""
        return redact_url(self.url)

    def table(self, kind: str) -> TableSpec | None:
        """The table of *kind* in this database (None: that kind goes elsewhere)."""
        return next((t for t in self.tables if t.kind == kind), None)


def databases(config: IngestConfig, extra_urls: tuple[str, ...] = ()) -> list[Database]:
    """Every database the settings name (``INGEST_DATABASE_URL``, then each
    ``INGEST_ROUTES`` URL), once each, with the tables a crawl writes there."""
    prefix, keep = config.table_prefix, config.keep_versions
    tables = {t.kind: t for t in all_tables(prefix, keep_versions=keep)}
    rules = config.rules()
    named: dict[str, tuple[list[str], dict[str, TableSpec]]] = {}

    def add(url: str, source: str, specs: list[TableSpec]) -> None:
        sources, by_name = named.setdefault(url, ([], {}))
        if source not in sources:
            sources.append(source)
        for spec in [*specs, tables["jobs"], tables["dead_letters"], tables["schema_version"]]:
            by_name.setdefault(spec.name, spec)
            if spec.history is not None:
                by_name.setdefault(spec.history.name, spec.history)

    # a kind that a rule without conditions routes elsewhere never falls through to the default
    routed = {r.kind for r in rules if r.spider is None and r.item_type is None}
    kinds = ("items", "requests", "logs")
    add(config.database_url, "INGEST_DATABASE_URL", [tables[k] for k in kinds if k not in routed])
    for rule in rules:
        if rule.kind == "jobs":
            add(rule.url, rule.source, [])
        else:
            add(
                rule.url,
                rule.source,
                [table_spec(rule.kind, prefix, rule.table, keep_versions=keep)],
            )
    for url in extra_urls:
        add(url, "--url", [tables[k] for k in kinds])
    return [
        Database(url, " and ".join(sources), tuple(specs.values()))
        for url, (sources, specs) in named.items()
    ]


def open_backend(database: Database, *, create_tables: bool = False) -> Backend:
    """Open *database*'s backend; by default it creates and migrates nothing, not even an
    SQLite file or a chDB directory that is not there (raise BackendUnavailable, SchemaError,
    ConfigError)."""
    missing = _missing_local_database(database.url)
    if missing is not None and not create_tables:
        raise BackendUnavailable(
            f"there is no {missing}, so nothing was stored there. Fix: run the command where "
            "the crawl ran (a relative path is resolved against the working directory), or "
            "give the database's absolute path"
        )
    backend = make_backend(database.url, database.tables, create_tables=create_tables)
    backend.open()
    return backend


def _missing_local_database(url: str) -> str | None:
    """What is missing of an SQLite file or chDB directory that does not exist ("SQLite file
    /x/ingest.sqlite3"); None for other databases, and for those that exist."""
    scheme, _, rest = url.partition("://")
    kind = scheme.split("+", 1)[0].lower()
    if kind == "sqlite" and rest.startswith("/"):  # sqlite:///relative, sqlite:////absolute
        path = rest[1:].split("?", 1)[0]
    elif kind == "chdb":  # chdb:///absolute, chdb://relative
        path = rest.split("?", 1)[0]
    else:
        return None
    if not path or path == ":memory:" or os.path.exists(path):
        return None
    what = "SQLite file" if kind == "sqlite" else "chDB directory"
    return f"{what} {os.path.abspath(path)}"


class Progress:
    """Counts and rate of long work, redrawn on one line of a terminal (at most 4 times a
    second), and nothing at all when the output is not a terminal (a log, a pipe, cron)."""

    def __init__(self, what: str, stream: TextIO | None = None) -> None:
        self._what = what
        self._stream = stream or sys.stderr
        self._enabled = self._stream.isatty()
        self._started = time.monotonic()
        self._shown = 0.0
        self.count = 0

    def add(self, count: int) -> None:
        self.count += count
        if not self._enabled:
            return
        now = time.monotonic()
        if now - self._shown >= 0.25:
            self._shown = now
            self._draw(now)

    def done(self) -> None:
        """Clear the progress line (what was done is the caller's to print)."""
        if self._enabled and self._shown:
            self._stream.write("\r\033[K")
            self._stream.flush()

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._started, 1e-9)
        self._stream.write(f"\r\033[K{self._what}: {self.count:,} ({self.count / elapsed:,.0f}/s)")
        self._stream.flush()
