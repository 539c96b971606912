"""The tables, described once and turned into DDL by each backend.

Column kinds are logical: each backend maps them to its own types (see
``docs/tables.md``). Rows travel from capture to backend as tuples in column
order, with ``uuid``/``text`` as ``str``, ``timestamp`` as epoch seconds
(``float``), ``json`` as UTF-8 JSON ``bytes`` (``str`` for a backend whose ``json_as_text``
is set, see ``_shapes.Batch.rows``) and ``int``/``float``/``bool`` as such;
the ``content_hash`` of a keyed item is a tuple (the fields its hash leaves out) until
``backends._upsert.split_keyed`` computes it, where the batch is written.

Schema versions (``SCHEMA_VERSION``), each applied by the backends under
their creation lock: 1, the first tables; 2, the ``requests`` and ``logs``
tables and the ``requests_count``, ``errors_count`` and ``log_counts``
columns of ``jobs``; 3, the ``item_key``, ``content_hash``, ``version``,
``first_seen_at``, ``last_seen_at`` and ``errors`` columns of ``items`` (and
the unique index of keyed items), the ``item_versions`` table and the
``quality`` column of ``jobs``. A backend migrates an older schema by creating missing
tables and adding missing columns (all nullable), so every migration so far
is additive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

ColumnKind = Literal["uuid", "text", "int", "bigint", "float", "bool", "timestamp", "json"]

SCHEMA_VERSION = 3


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
    #: columns unique among the rows where the last of them is not null (keyed items)
    unique: tuple[str, ...] = ()
    #: items: where the previous versions of keyed items go (INGEST_KEEP_VERSIONS), if anywhere
    history: TableSpec | None = None

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def column_kind(self, name: str) -> ColumnKind:
        """The kind of the column *name*."""
        return next(c.kind for c in self.columns if c.name == name)

    def index_name(self, columns: tuple[str, ...]) -> str:
        return f"{self.name}_{'_'.join(columns)}_idx"

    def position(self, name: str) -> int:
        """The index of the column *name* in a row."""
        return self.column_names.index(name)


def _c(name: str, kind: ColumnKind, nullable: bool = True) -> Column:
    return Column(name, kind, nullable)


#: the columns of items and of their previous versions; ``data`` stays last (see
#: ``Batch.rows``); ``item_key`` to ``errors`` are schema version 3
_ITEM_COLUMNS = (
    _c("id", "uuid", False),
    _c("job_id", "text", False),
    _c("spider", "text", False),
    _c("item_type", "text", False),
    _c("url", "text"),
    _c("scraped_at", "timestamp", False),
    _c("item_key", "text"),
    _c("content_hash", "text"),
    _c("version", "bigint"),
    _c("first_seen_at", "timestamp"),
    _c("last_seen_at", "timestamp"),
    _c("errors", "json"),
    _c("data", "json", False),
)


class ItemRow(NamedTuple):
    """An item's row, as :class:`~scrapy_ingest.pipelines.IngestPipeline` makes it: the columns
    of ``items`` in order, named.

    Rows travel as plain tuples of this shape (``ItemRow(*row)`` names one): a row is made
    for every item and pickled to the writer process in its batch, and a named tuple costs
    about 4x a plain one to make and to unpickle (its ``__new__`` is Python code), measured
    on 2,000-row batches (docs/architecture.md).
    """

    id: int
    job_id: str
    spider: str
    item_type: str
    #: the response the item came from (``SourceMiddleware``), or None
    url: str | None
    scraped_at: float
    #: keyed items (INGEST_ITEM_KEYS): the key, else None, as are the next four
    item_key: str | None
    #: the INGEST_HASH_EXCLUDE fields the item has, until the writer computes the hash
    #: (``backends._upsert.split_keyed``)
    content_hash: tuple[str, ...] | str | None
    version: int | None
    first_seen_at: float | None
    last_seen_at: float | None
    #: the validation errors as JSON (INGEST_VALIDATION = "warn"), or None
    errors: bytes | None
    #: in a packed batch, where the item's JSON ends in the batch's payload (``Batch.rows``)
    data: int | bytes


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
            # schema version 3
            _c("quality", "json"),
        ),
        "job_id",
        (("crawl_id",), ("spider", "started_at"), ("status",)),
    ),
    "items": (_ITEM_COLUMNS, "id", (("job_id",), ("spider", "scraped_at"), ("item_type",))),
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
    "item_versions": (
        _ITEM_COLUMNS,
        "id",
        (("item_type", "item_key", "version"), ("job_id",)),
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


#: the columns that identify a keyed item
ITEM_KEY = ("item_type", "item_key")


def table_spec(
    kind: str, prefix: str, name: str | None = None, *, keep_versions: bool = False
) -> TableSpec:
    """Return the :class:`TableSpec` of *kind* (``items``, ``jobs``...) named with *prefix*.

    *name* gives another name to a table of that kind (a route's ``table``). An items
    table *keep_versions* in ``<prefix>item_versions`` (or ``<name>_versions``).
    """
    columns, primary_key, indexes = _TABLES[kind]
    if kind != "items":
        return TableSpec(kind, name or f"{prefix}{kind}", columns, primary_key, indexes)
    history = None
    if keep_versions:
        history_name = f"{name}_versions" if name else f"{prefix}item_versions"
        history = table_spec("item_versions", prefix, history_name)
    return TableSpec(
        kind, name or f"{prefix}{kind}", columns, primary_key, indexes, ITEM_KEY, history
    )


def all_tables(prefix: str, *, keep_versions: bool = False) -> list[TableSpec]:
    """The default table of each kind (item versions are the history of an items table)."""
    return [
        table_spec(kind, prefix, keep_versions=keep_versions)
        for kind in TABLE_KINDS
        if kind != "item_versions"
    ]
