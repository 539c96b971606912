"""The tables, described once and turned into DDL by each backend.

Column kinds are logical: each backend maps them to its own types (see
``docs/tables.md``). Rows travel from capture to backend as tuples in column
order, with ``uuid``/``text`` as ``str``, ``timestamp`` as epoch seconds
(``float``), ``json`` as UTF-8 JSON ``bytes`` and ``int``/``float``/``bool`` as such.

Schema versions (``SCHEMA_VERSION``), each applied by the backends under
their creation lock: 1, the first tables; 2, the ``requests`` and ``logs``
tables and the ``requests_count``, ``errors_count`` and ``log_counts``
columns of ``jobs``. A backend migrates an older schema by creating missing
tables and adding missing columns (all nullable), so every migration so far
is additive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ColumnKind = Literal["uuid", "text", "int", "bigint", "float", "bool", "timestamp", "json"]

SCHEMA_VERSION = 2


@dataclass(frozen=True)
class Column:
    name: str
    kind: ColumnKind
    nullable: bool = True


@dataclass(frozen=True)
class TableSpec:
    """One table: *kind* is its role (``items``), *name* the real name with prefix."""

    kind: str
    name: str
    columns: tuple[Column, ...]
    primary_key: str
    indexes: tuple[tuple[str, ...], ...] = ()

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def column_kind(self, name: str) -> ColumnKind:
        """The kind of the column *name*."""
        return next(c.kind for c in self.columns if c.name == name)

    def index_name(self, columns: tuple[str, ...]) -> str:
        return f"{self.name}_{'_'.join(columns)}_idx"


def _c(name: str, kind: ColumnKind, nullable: bool = True) -> Column:
    return Column(name, kind, nullable)


_TABLES: dict[str, tuple[tuple[Column, ...], str, tuple[tuple[str, ...], ...]]] = {
    "jobs": (
        (
            _c("job_id", "text", False),
            _c("crawl_id", "text", False),
            _c("spider", "text", False),
            _c("hostname", "text"),
            _c("pid", "int"),
            _c("status", "text", False),
            _c("close_reason", "text"),
            _c("started_at", "timestamp", False),
            _c("updated_at", "timestamp", False),
            _c("finished_at", "timestamp"),
            _c("items_count", "bigint", False),
            _c("stats", "json"),
            _c("settings", "json"),
            # schema version 2
            _c("requests_count", "bigint"),
            _c("errors_count", "bigint"),
            _c("log_counts", "json"),
        ),
        "job_id",
        (("crawl_id",), ("spider", "started_at"), ("status",)),
    ),
    "items": (
        (
            _c("id", "uuid", False),
            _c("job_id", "text", False),
            _c("spider", "text", False),
            _c("item_type", "text", False),
            _c("url", "text"),
            _c("scraped_at", "timestamp", False),
            _c("data", "json", False),
        ),
        "id",
        (("job_id",), ("spider", "scraped_at"), ("item_type",)),
    ),
    "requests": (
        (
            _c("id", "uuid", False),
            _c("job_id", "text", False),
            _c("spider", "text", False),
            _c("url", "text", False),
            _c("method", "text", False),
            _c("status", "int"),
            _c("started_at", "timestamp", False),
            _c("latency_ms", "float"),
            _c("response_bytes", "bigint"),
            _c("parent_id", "uuid"),
            _c("depth", "int"),
            _c("retry_times", "int", False),
            _c("proxy", "text"),
            _c("error", "text"),
            _c("fingerprint", "text"),
            _c("playwright", "bool", False),
            _c("headers", "json"),
        ),
        "id",
        (("job_id", "started_at"), ("parent_id",), ("status",)),
    ),
    "logs": (
        (
            _c("id", "uuid", False),
            _c("job_id", "text", False),
            _c("spider", "text", False),
            _c("logged_at", "timestamp", False),
            _c("level", "int", False),
            _c("level_name", "text", False),
            _c("logger", "text", False),
            _c("message", "text", False),
            _c("exception", "text"),
        ),
        "id",
        (("job_id", "logged_at"), ("level",)),
    ),
    "dead_letters": (
        (
            _c("id", "uuid", False),
            _c("job_id", "text", False),
            _c("kind", "text", False),
            _c("reason", "text", False),
            _c("payload", "text"),
            _c("created_at", "timestamp", False),
        ),
        "id",
        (("job_id",),),
    ),
    "schema_version": (
        (_c("version", "int", False), _c("applied_at", "timestamp", False)),
        "version",
        (),
    ),
}

#: record kinds, in the order their tables are created
TABLE_KINDS: tuple[str, ...] = tuple(_TABLES)


def table_spec(kind: str, prefix: str, name: str | None = None) -> TableSpec:
    """Return the :class:`TableSpec` of *kind* (``items``, ``jobs``...) named with *prefix*.

    *name* gives another name to a table of that kind (a route's ``table``).
    """
    columns, primary_key, indexes = _TABLES[kind]
    return TableSpec(kind, name or f"{prefix}{kind}", columns, primary_key, indexes)


def all_tables(prefix: str) -> list[TableSpec]:
    return [table_spec(kind, prefix) for kind in TABLE_KINDS]
