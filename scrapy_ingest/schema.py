"""The tables, described once and turned into DDL by each backend.

Column kinds are logical: each backend maps them to its own types (see
``docs/tables.md``). Rows travel from capture to backend as tuples in column
order, with ``uuid``/``text`` as ``str``, ``timestamp`` as epoch seconds
(``float``), ``json`` as UTF-8 JSON ``bytes`` and ``int``/``bool`` as such.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ColumnKind = Literal["uuid", "text", "int", "bigint", "bool", "timestamp", "json"]

SCHEMA_VERSION = 1


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


def table_spec(kind: str, prefix: str) -> TableSpec:
    """Return the :class:`TableSpec` of *kind* (``items``, ``jobs``...) named with *prefix*."""
    columns, primary_key, indexes = _TABLES[kind]
    return TableSpec(kind, f"{prefix}{kind}", columns, primary_key, indexes)


def all_tables(prefix: str) -> list[TableSpec]:
    return [table_spec(kind, prefix) for kind in TABLE_KINDS]
