"""ClickHouse backend: clickhouse-connect, with a client built from the database URL.

URLs: ``clickhouse://user:password@host:8123/database`` (HTTP),
``clickhouses://user:password@host:8443/database`` (HTTPS), and
``chdb:///path/to/dir`` (chDB: the ClickHouse engine embedded in the writer
process, storing its data in that directory; one process may use one path).

Tables are ``ReplacingMergeTree``:

- requests, logs and dead letters by ``ORDER BY (job_id, <time>, id)`` and
  ``PARTITION BY toYYYYMM(<time>)``, where ``<time>`` is the record's own
  timestamp (``started_at``, ``logged_at``, ``created_at``), which is what the
  cookbook's per-job and per-time queries filter on;
- items by ``ReplacingMergeTree(version) ORDER BY (item_type, item_key)``, not
  partitioned (the engine only collapses rows within a partition), so that a
  keyed item (``INGEST_ITEM_KEYS``) has one current row per key. An item
  without a key is stored with its own id (as text) as ``item_key`` and
  ``version`` 0 (NULL in the other databases): a row of its own. The table
  fills both in itself (``item_key String DEFAULT toString(id)``, and an
  ``Int64``'s default 0), so such items are inserted without them. Data-skipping
  indexes on ``job_id`` (bloom filter) and ``scraped_at`` (minmax) keep the
  per-job and per-time queries narrow;
- item versions (``INGEST_KEEP_VERSIONS``) by ``ORDER BY (item_type,
  item_key, version)``;
- the job table by ``job_id``, with ``updated_at`` as the version, since a job
  row is refreshed by inserting a newer version of it (read it with ``FINAL``).

JSON columns are of the ``JSON`` type when the server has it (ClickHouse 25.3
and later), else ``String`` (read with ``JSONExtract*``); ``errors`` (a list,
which the ``JSON`` type cannot hold) is ``Nullable(String)`` everywhere.

Writes are idempotent twice over: a batch written again first drops the ids
that are stored already, and the table engine collapses rows with the same
sorting key (``FINAL``, or a merge) should a duplicate slip through.

Keyed items. ClickHouse cannot update a row in place, so a batch of keyed
items reads the current rows of its keys (``FINAL``), decides with
:func:`~scrapy_ingest.backends._upsert.plan_upsert`, and inserts: the previous
versions of changed items into the history table first, then into the items
table, in one ``INSERT``, the rows of new keys (version 1), the next version
of changed items, and the current row of unchanged ones again with its new
``last_seen_at`` (same version: among rows of equal version the engine keeps
the last inserted). Read items with ``FINAL`` (``SELECT ... FROM ingest_items
FINAL``) to see one row per key at once; without it, replaced rows show until
a merge drops them.

What holds without transactions or row locks: a crawl writes a table from one
thread, batch after batch, so its own versions are exact; a batch written
again after an unknown outcome finds the rows it wrote and counts them as
unchanged. Two processes (concurrent crawls) that write the same key at the
same moment may both read the same current row and both write the same next
version (or both version 1 of a new key): the later insert wins, the other's
content is not kept as a version of its own, and both count their row as
changed (or new). Every key still ends with one current row, whose version
counts the changes that were not lost that way, and the history holds each
replaced version once (its sorting key has the version).

An items table made by an older scrapy-ingestion (``ORDER BY (job_id,
scraped_at, id)``, monthly partitions) keeps taking items without a key, but
ClickHouse cannot change a table's sorting key: keyed items written to it
raise :class:`~scrapy_ingest.exceptions.SchemaError`, which names the fix, and
go to the dead-letter table.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import clickhouse_connect
import orjson
from clickhouse_connect.datatypes.registry import get_from_name
from clickhouse_connect.driver import exceptions as ch_errors

from scrapy_ingest._ids import format_uuid
from scrapy_ingest._redact import redact_secrets_of, redact_url
from scrapy_ingest.backends._upsert import StoredItem, plan_upsert, split_keyed
from scrapy_ingest.backends.base import (
    PRUNED_JOB_STATUSES,
    Failure,
    conversions_by_kind,
    is_same_job,
    log_migration,
    needs_migration,
    retention_columns,
    safe_text,
)
from scrapy_ingest.exceptions import BackendRefused, BackendUnavailable, SchemaError
from scrapy_ingest.schema import SCHEMA_VERSION

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

    from clickhouse_connect.datatypes.base import ClickHouseType
    from clickhouse_connect.driver.client import Client

    from scrapy_ingest._shapes import Row
    from scrapy_ingest.schema import Column, ColumnKind, TableSpec

logger = logging.getLogger(__name__)

CLICKHOUSE_SCHEMES = ("clickhouse", "clickhouses", "chdb")

_TYPES: dict[ColumnKind, str] = {
    "uuid": "UUID",
    "text": "String",
    "int": "Int32",
    "bigint": "Int64",
    "float": "Float64",
    "bool": "Bool",
    "timestamp": "DateTime64(6, 'UTC')",
    "json": "String",  # JSON when the server has it, see _column_type
}
#: text columns with few distinct values
_LOW_CARDINALITY = frozenset(
    {"spider", "item_type", "method", "level_name", "logger", "kind", "status", "hostname"}
)
#: server error codes about a value, not about the server (docs/reliability.md): 6
#: CANNOT_PARSE_TEXT, 26 CANNOT_PARSE_QUOTED_STRING, 27 CANNOT_PARSE_INPUT_ASSERTION_FAILED,
#: 38 CANNOT_PARSE_DATE, 41 CANNOT_PARSE_DATETIME, 53 TYPE_MISMATCH, 69 ARGUMENT_OUT_OF_BOUND,
#: 70 CANNOT_CONVERT_TYPE, 72 CANNOT_PARSE_NUMBER, 117 INCORRECT_DATA, 131
#: TOO_LARGE_STRING_SIZE, 190 SIZES_OF_ARRAYS_DONT_MATCH, 321
#: VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE, 395 FUNCTION_THROW_IF_VALUE_IS_NON_ZERO, 469
#: VIOLATED_CONSTRAINT
_DATA_CODES = frozenset({6, 26, 27, 38, 41, 53, 69, 70, 72, 117, 131, 190, 321, 395, 469})
#: server error codes no retry can heal: 16 NO_SUCH_COLUMN_IN_TABLE, 47 UNKNOWN_IDENTIFIER (a
#: column missing), 60 UNKNOWN_TABLE, 81 UNKNOWN_DATABASE, 164 READONLY, 192 UNKNOWN_USER, 193
#: WRONG_PASSWORD, 194 REQUIRED_PASSWORD, 497 ACCESS_DENIED, 516 AUTHENTICATION_FAILED; every
#: other code (159 TIMEOUT_EXCEEDED, 202 TOO_MANY_SIMULTANEOUS_QUERIES, 241
#: MEMORY_LIMIT_EXCEEDED, 242 TABLE_IS_READ_ONLY, 252 TOO_MANY_PARTS, ...) and a network error
#: are transient
_PERMANENT_CODES = frozenset({16, 47, 60, 81, 164, 192, 193, 194, 497, 516})
_LOGIN_CODES = frozenset({192, 193, 194, 516})
#: the code a server (or chDB) reports in its message, where the exception has none
_CODE = re.compile(r"\bCode:\s*(\d+)")
#: JSON columns that hold a list, which the JSON type cannot (it holds objects): String
_JSON_LISTS = frozenset({"errors"})
#: the tables of items and of their previous versions
_ITEM_KINDS = frozenset({"items", "item_versions"})
#: item columns that are not nullable here, being in the sorting key or the engine's version
_ITEM_KEY_COLUMNS = frozenset({"item_key", "version"})
#: the layout of an items table that can hold keyed items (see the module docstring)
_KEYED_ENGINE = "ReplacingMergeTree(version) ORDER BY (item_type, item_key)"
_KEYED_SORTING_KEY = "item_type, item_key"
#: the engine with its parameters, out of system.tables' engine_full
_ENGINE_HEAD = re.compile(r"\w+(\([^)]*\))?")
#: ReplacingMergeTree (or Replicated..., Shared...) with the version column "version"
_VERSIONED_ENGINE = re.compile(r"\w*ReplacingMergeTree\((?:[^)]*,\s*)?`?version`?\s*\)")
#: item keys looked up per query (they travel as a query parameter)
_KEYS_PER_QUERY = 500
#: the default of an items table's item_key: an item without a key is stored under its id
_ITEM_KEY_DEFAULT = "toString(id)"
#: the types of a column of JSON that needs no conversion
_TEXT_OR_NONE = frozenset({str, type(None)})


@dataclass(frozen=True)
class _ItemsLayout:
    """An items table as the database has it (an older version of ours may have made it)."""

    #: ``ReplacingMergeTree(version) ORDER BY (item_type, item_key)``, unpartitioned: it keeps
    #: one row per key, and rows without a key need their id as key and version 0
    keyed: bool
    #: the JSON columns of the JSON type (read back as text with toJSONString)
    json_typed: frozenset[str]
    #: whether the table fills in the item_key and version of an item without a key (one made
    #: by hand or by a development version of scrapy-ingestion may not: it is given both)
    fills_unkeyed: bool
    #: engine, sorting key and partition key, for messages
    ddl: str


class ClickHouseBackend:
    threads = 1  # a clickhouse-connect client runs one query at a time
    json_as_text = True  # clickhouse-connect writes str; bytes it would decode value by value
    takes_batches = False

    def __init__(self, url: str, tables: Sequence[TableSpec], *, create_tables: bool) -> None:
        self._url = url
        self.url = redact_url(url)
        self._tables = {t.name: t for t in tables}
        self._versions = next(t for t in tables if t.kind == "schema_version")
        self._create_tables = create_tables
        self._client: Client | None = None
        self._json_type = False
        self._conversions = conversions_by_kind(_column_conversion)
        #: items table name -> its layout, read from the database at its first write
        self._layouts: dict[str, _ItemsLayout] = {}
        #: table name -> column name -> type, read from the database at the table's first write
        self._types: dict[str, dict[str, ClickHouseType]] = {}

    # lifecycle

    def open(self) -> None:
        self._layouts.clear()
        self._types.clear()
        try:
            self._client = _client(self._url)
            self._json_type = _has_json_type(self._client)
            self._prepare_schema()
        except ch_errors.ClickHouseError as exc:
            self.close()
            if self.classify(exc) is Failure.PERMANENT:
                raise BackendRefused(
                    self.explain_refusal(exc, creating=self._create_tables)
                ) from None
            reason = redact_secrets_of(self._url, str(exc)).strip().splitlines()[0]
            raise BackendUnavailable(f"cannot use ClickHouse at {self.url}: {reason}") from None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _prepare_schema(self) -> None:
        assert self._client is not None
        client = self._client
        if self._create_tables:
            for table in self._tables.values():
                client.command(self._create_table_sql(table))
        exists = client.command(f"EXISTS TABLE {_quote(self._versions.name)}")
        if str(exists).strip() != "1":
            raise SchemaError(
                f"the table {self._versions.name} does not exist in {self.url}. Fix: set "
                "INGEST_CREATE_TABLES = True once, or create the tables as "
                "docs/backends.md shows."
            )
        found = client.query(f"SELECT max(version) FROM {_quote(self._versions.name)}")
        current = found.result_rows[0][0] if found.result_rows else None
        current = current or None  # max() of no rows is 0 in ClickHouse
        if not needs_migration(current, self.url, create_tables=self._create_tables):
            return
        if current is not None:
            for table in self._tables.values():
                for column in table.columns:
                    client.command(
                        f"ALTER TABLE {_quote(table.name)} ADD COLUMN IF NOT EXISTS "
                        f"{_quote(column.name)} {self._column_type(column)}"
                    )
        client.command(self._version_row_sql())
        if current is not None:
            log_migration(self.url, current)

    def create_table(self, table: TableSpec) -> None:
        assert self._client is not None, "create_table() before open()"
        if self._create_tables:
            self._client.command(self._create_table_sql(table))
        self._tables[table.name] = table
        self._layouts.pop(table.name, None)
        self._types.pop(table.name, None)

    # retention and DDL (scrapy ingest prune, migrate)

    def prune(self, table: TableSpec, older_than: float, *, batch_rows: int) -> Iterator[int]:
        """ClickHouse's own means: one lightweight ``DELETE FROM ... WHERE`` per table (rows
        are masked at once and dropped by later merges; inserts are never blocked), after
        counting what it removes (every stored version of a row counts). Job rows go by
        ``job_id``, every version of each, for the jobs whose latest version (``FINAL``)
        finished before the cutoff, *batch_rows* jobs a statement."""
        assert self._client is not None, "prune() before open()"
        client = self._client
        name = _quote(table.name)
        if str(client.command(f"EXISTS TABLE {name}")).strip() != "1":
            return
        times = ", ".join(_quote(c) for c in retention_columns(table))
        condition = f"coalesce({times}) < toDateTime64({{cutoff:Float64}}, 6, 'UTC')"
        params: dict[str, Any] = {"cutoff": older_than}
        if table.kind != "jobs":
            found = client.query(f"SELECT count() FROM {name} WHERE {condition}", parameters=params)
            count = int(found.result_rows[0][0])
            if count:
                client.command(f"DELETE FROM {name} WHERE {condition}", parameters=params)
                yield count
            return
        statuses = ", ".join(f"'{status}'" for status in PRUNED_JOB_STATUSES)
        found = client.query(
            f"SELECT job_id FROM {name} FINAL WHERE status IN ({statuses}) AND {condition}",
            parameters=params,
        )
        ids = [row[0] for row in found.result_rows]
        for start in range(0, len(ids), batch_rows):
            chunk = {"ids": ids[start : start + batch_rows]}
            in_chunk = "job_id IN {ids:Array(String)}"
            found = client.query(f"SELECT count() FROM {name} WHERE {in_chunk}", parameters=chunk)
            client.command(f"DELETE FROM {name} WHERE {in_chunk}", parameters=chunk)
            yield int(found.result_rows[0][0])

    def create_statements(self, tables: Sequence[TableSpec]) -> list[str]:
        """What :meth:`open` runs on an empty database. The type of the JSON columns depends
        on the server (``JSON`` from ClickHouse 25.3, else ``String``): unless the backend is
        open, this connects to ask (``SELECT CAST('{}', 'JSON')``, nothing else)."""
        if self._client is None:
            try:
                client = _client(self._url)
                try:
                    self._json_type = _has_json_type(client)
                finally:
                    client.close()
            except ch_errors.ClickHouseError as exc:
                reason = redact_secrets_of(self._url, str(exc)).strip().splitlines()[0]
                raise BackendUnavailable(f"cannot use ClickHouse at {self.url}: {reason}") from None
        statements = [self._create_table_sql(t) for t in tables]
        versions = next(t for t in tables if t.kind == "schema_version")
        statements.append(self._version_row_sql(versions))
        return statements

    def _version_row_sql(self, versions: TableSpec | None = None) -> str:
        """The statement that records the current schema version."""
        name = _quote((versions or self._versions).name)
        return f"INSERT INTO {name} (version, applied_at) VALUES ({SCHEMA_VERSION}, now64(6))"

    def _create_table_sql(self, table: TableSpec) -> str:
        columns = ", ".join(self._column_definition(table, c) for c in _column_specs(table))
        if table.kind == "jobs":
            engine = "ReplacingMergeTree(updated_at) ORDER BY job_id"
        elif table.kind == "schema_version":
            engine = "ReplacingMergeTree ORDER BY version"
        elif table.kind == "items":
            # no partitions: the engine collapses the versions of a key within a partition only
            engine = _KEYED_ENGINE
            columns += (
                f", INDEX {_quote('job_id_idx')} job_id TYPE bloom_filter GRANULARITY 1"
                f", INDEX {_quote('scraped_at_idx')} scraped_at TYPE minmax GRANULARITY 1"
            )
        elif table.kind == "item_versions":
            engine = "ReplacingMergeTree ORDER BY (item_type, item_key, version)"
            columns += f", INDEX {_quote('job_id_idx')} job_id TYPE bloom_filter GRANULARITY 1"
        else:
            time_column = _quote(_time_column(table))
            engine = (
                f"ReplacingMergeTree ORDER BY (job_id, {time_column}, id) "
                f"PARTITION BY toYYYYMM({time_column})"
            )
        return f"CREATE TABLE IF NOT EXISTS {_quote(table.name)} ({columns}) ENGINE = {engine}"

    def _column_definition(self, table: TableSpec, column: Column) -> str:
        definition = f"{_quote(column.name)} {self._column_type(column)}"
        if table.kind == "items" and column.name == "item_key":
            definition += f" DEFAULT {_ITEM_KEY_DEFAULT}"
        return definition

    def _column_type(self, column: Column) -> str:
        kind = column.kind
        json_type = kind == "json" and self._json_type and column.name not in _JSON_LISTS
        base = "JSON" if json_type else _TYPES[kind]
        if column.nullable and base != "JSON":
            base = f"Nullable({base})"
        if kind == "text" and column.name in _LOW_CARDINALITY:
            base = f"LowCardinality({base})"
        return base

    # writing

    def write(
        self, table: TableSpec, rows: Sequence[Row], *, idempotent: bool
    ) -> dict[str, list[int]] | None:
        """Insert *rows*; upsert the keyed items among them (see the module docstring).

        Raise :class:`SchemaError` for keyed items in an items table whose layout cannot keep
        one row per key, before anything is written.
        """
        assert self._client is not None, "write() before open()"
        if not table.unique:
            self._insert_new(table, rows, idempotent=idempotent)
            return None
        layout = self._items_layout(table)
        rows, keyed = split_keyed(table, rows)
        if keyed and layout is not None and not layout.keyed:
            raise SchemaError(self._unkeyed_layout_message(table, layout))
        if rows:
            by_id = layout if layout is not None and layout.keyed else None
            self._insert_new(table, rows, idempotent=idempotent, by_id=by_id)
        if keyed:
            return self._upsert(table, keyed, layout)
        return None

    def _insert_new(
        self,
        table: TableSpec,
        rows: Sequence[Row],
        *,
        idempotent: bool,
        by_id: _ItemsLayout | None = None,
    ) -> None:
        """Insert *rows*; with *idempotent*, those whose id is not stored yet.

        *by_id*: the layout of the keyed items table that *rows*, items without a key, go to;
        each is stored with its id (as text) as ``item_key`` and version 0, and found by that
        key.
        """
        if idempotent:
            rows = self._without_stored_ids(table, rows, by_key=by_id is not None)
        if rows:
            self._insert(table, rows, by_id=by_id)

    def _insert(
        self, table: TableSpec, rows: Sequence[Row], *, by_id: _ItemsLayout | None = None
    ) -> None:
        assert self._client is not None
        # column by column: one comprehension per column converts faster than a loop per row
        columns = [list(column) for column in zip(*rows, strict=True)]
        for index, convert in self._conversions[table.kind]:
            columns[index] = convert(columns[index])
        types = self._column_types(table)
        names = list(table.column_names)
        # a Nullable column that is NULL in every row is left out, and ClickHouse fills in
        # NULL: writing its null map and a placeholder per row cost about 7% of the insert of
        # a batch of unkeyed items, which leave four of the items table's columns NULL
        left_out = {
            i
            for i, name in enumerate(names)
            if types is not None
            and name in types
            and types[name].nullable
            and columns[i].count(None) == len(rows)
        }
        if by_id is not None:
            at = table.position
            if by_id.fills_unkeyed:  # formatting ids here was a tenth of this method's time
                left_out.update((at("item_key"), at("version")))
            else:  # after the conversions: a formatted id needs no cleaning
                columns[at("item_key")] = [format_uuid(v) for v in columns[at("id")]]
                columns[at("version")] = [0] * len(rows)
        if left_out:
            names = [name for i, name in enumerate(names) if i not in left_out]
            columns = [column for i, column in enumerate(columns) if i not in left_out]
        try:
            column_types = None if types is None else [types[name] for name in names]
        except KeyError as exc:
            del self._types[table.name]  # read again: the table may be mended by then
            # permanent, like the server's NO_SUCH_COLUMN_IN_TABLE: no row of it can be stored
            raise BackendRefused(
                f"the table {table.name} in {self.url} has no column {exc.args[0]}, which "
                "scrapy-ingestion writes. Fix: let the crawl create its tables "
                "(INGEST_CREATE_TABLES = True) in a new database, or add the column "
                "(docs/tables.md lists each table's columns)"
            ) from None
        try:
            self._client.insert(
                table.name,
                columns,
                column_names=names,
                column_types=column_types,
                column_oriented=True,
            )
        except Exception:
            self._types.pop(table.name, None)  # the table may have changed: read it again
            raise

    def _column_types(self, table: TableSpec) -> dict[str, ClickHouseType] | None:
        """*table*'s column types as the database has them, read at its first insert. Given to
        each insert, they spare it the ``DESCRIBE TABLE`` that clickhouse-connect otherwise
        runs before every insert (an eighth of the time of an insert of 2,000 items into
        chDB)."""
        types = self._types.get(table.name)
        if types is None:
            found = self._table_columns(table.name)
            if not found:  # no such table: the insert says so
                return None
            types = self._types[table.name] = {
                name: get_from_name(type_)
                for name, type_, default_kind, _ in found
                if default_kind not in ("ALIAS", "MATERIALIZED")  # not inserted
            }
        return types

    def _table_columns(self, name: str) -> list[tuple[str, str, str, str]]:
        """The name, type, default kind and default expression of each column of the table
        *name*; none when there is no such table."""
        assert self._client is not None
        found = self._client.query(
            "SELECT name, type, default_kind, default_expression FROM system.columns "
            "WHERE database = currentDatabase() AND table = {name:String}",
            parameters={"name": name},
        )
        return [(row[0], row[1], row[2], row[3]) for row in found.result_rows]

    def _without_stored_ids(
        self, table: TableSpec, rows: Sequence[Row], *, by_key: bool = False
    ) -> list[Row]:
        assert self._client is not None
        position = table.column_names.index(table.primary_key)
        ids = [format_uuid(row[position]) for row in rows]
        if by_key:  # the sorting key finds them; id is in no index of a keyed items table
            type_at = table.position("item_type")
            found = self._client.query(
                f"SELECT item_key FROM {_quote(table.name)} "
                "WHERE (item_type, item_key) IN {keys:Array(Tuple(String, String))}",
                parameters={
                    "keys": [(row[type_at], id_) for row, id_ in zip(rows, ids, strict=True)]
                },
            )
        else:
            found = self._client.query(
                f"SELECT toString({_quote(table.primary_key)}) FROM {_quote(table.name)} "
                f"WHERE {_quote(table.primary_key)} IN {{ids:Array(UUID)}}",
                parameters={"ids": ids},
            )
        stored = {row[0] for row in found.result_rows}
        return [row for row, id_ in zip(rows, ids, strict=True) if id_ not in stored]

    # keyed items

    def _upsert(
        self, table: TableSpec, rows: Sequence[Row], layout: _ItemsLayout | None
    ) -> dict[str, list[int]]:
        """Write keyed item rows as :func:`plan_upsert` decides, given their keys' rows."""
        at = table.position
        type_at, key_at, last_at = at("item_type"), at("item_key"), at("last_seen_at")
        # the key as stored (text is cleaned on its way in), so that it is found again
        rows = [_clean_key(row, type_at, key_at) for row in rows]
        keys = sorted({(row[type_at], row[key_at]) for row in rows})
        plan = plan_upsert(table, rows, self._current_rows(table, keys, layout))
        history = table.history
        if history is not None and (plan.archive or plan.archive_rows):
            # the versions being replaced, before they are: a failure in between leaves them
            # current, and the batch written again archives them again (the same sorting key)
            archived = [found.row for found in plan.archive if found.row is not None]
            self._insert(history, _uuids_as_ints(history, [*archived, *plan.archive_rows]))
        current = [*plan.inserts, *(row for _, row in plan.replaces)]
        for found, seen in plan.touches:
            # the current version again (same version: the last inserted wins), seen later
            assert found.row is not None
            last_seen = found.row[last_at]
            if last_seen is None or seen > last_seen:
                current.append(_with(found.row, last_at, seen))
        if current:
            self._insert(table, _uuids_as_ints(table, current))
        return plan.changes

    def _current_rows(
        self, table: TableSpec, keys: list[tuple[str, str]], layout: _ItemsLayout | None
    ) -> dict[tuple[str, str], StoredItem]:
        """The current row (``FINAL``) of each of *keys* the table holds, whole, in the row
        conventions of :mod:`scrapy_ingest.schema`, so that it can be written again."""
        assert self._client is not None
        json_typed = layout.json_typed if layout is not None else frozenset()
        names = table.column_names
        select = ", ".join(_read_expression(table, name, json_typed) for name in names)
        at = table.position
        id_at, type_at, key_at = at("id"), at("item_type"), at("item_key")
        hash_at, version_at, first_at = at("content_hash"), at("version"), at("first_seen_at")
        json_at = [i for i, name in enumerate(names) if table.column_kind(name) == "json"]
        stored: dict[tuple[str, str], StoredItem] = {}
        for start in range(0, len(keys), _KEYS_PER_QUERY):
            found = self._client.query(
                f"SELECT {select} FROM {_quote(table.name)} FINAL "
                "WHERE (item_type, item_key) IN {keys:Array(Tuple(String, String))}",
                parameters={"keys": keys[start : start + _KEYS_PER_QUERY]},
            )
            for values in found.result_rows:
                row = list(values)
                for i in json_at:  # JSON as text, as rows hold it here (json_as_text)
                    if isinstance(row[i], bytes):
                        row[i] = row[i].decode()
                stored[(row[type_at], row[key_at])] = StoredItem(
                    row[id_at], row[hash_at], row[version_at], row[first_at], tuple(row)
                )
        return stored

    def _items_layout(self, table: TableSpec) -> _ItemsLayout | None:
        """The layout of the items *table* (None while the table does not exist)."""
        layout = self._layouts.get(table.name)
        if layout is not None:
            return layout
        assert self._client is not None
        found = self._client.query(
            "SELECT engine_full, sorting_key, partition_key FROM system.tables "
            "WHERE database = currentDatabase() AND name = {name:String}",
            parameters={"name": table.name},
        ).result_rows
        if not found:
            return None
        engine_full, sorting_key, partition_key = found[0]
        columns = self._table_columns(table.name)
        defaults = {name: (kind, expression) for name, _, kind, expression in columns}
        head = _ENGINE_HEAD.match(engine_full)
        engine = head.group(0) if head else engine_full
        ddl = f"{engine} ORDER BY ({sorting_key})"
        if partition_key:
            ddl += f" PARTITION BY {partition_key}"
        layout = self._layouts[table.name] = _ItemsLayout(
            keyed=bool(
                _VERSIONED_ENGINE.fullmatch(engine)
                and sorting_key == _KEYED_SORTING_KEY
                and not partition_key
            ),
            json_typed=frozenset(
                name for name, type_, _, _ in columns if type_.startswith(("JSON", "Object("))
            ),
            fills_unkeyed=(
                defaults.get("item_key") == ("DEFAULT", _ITEM_KEY_DEFAULT)
                and defaults.get("version") == ("", "")
            ),
            ddl=ddl,
        )
        return layout

    def _unkeyed_layout_message(self, table: TableSpec, layout: _ItemsLayout) -> str:
        name = table.name
        return (
            f"the table {name} in {self.url} cannot hold keyed items (INGEST_ITEM_KEYS): "
            f"they need ENGINE = {_KEYED_ENGINE} without PARTITION BY, which keeps one row "
            f"per key, but {name} is {layout.ddl} (made by an older scrapy-ingestion, or by "
            "hand), and ClickHouse cannot change the sorting key of a table. Fix: send the "
            "keyed item types to a new table with an INGEST_ROUTES rule, e.g. {'kind': "
            "'items', 'item_type': 'ProductItem', 'url': ..., 'table': 'products'} "
            f"(created with that layout), or rename this one (RENAME TABLE {name} TO "
            f"{name}_old) so that the next crawl creates {name} anew"
        )

    # what `scrapy ingest check` asks: it works before open() (and after open() failed on
    # missing tables), with a client that close() releases

    def _inspection_client(self) -> Client:
        if self._client is None:
            try:
                self._client = _client(self._url)
            except ch_errors.ClickHouseError as exc:
                raise self._unavailable(exc) from None
        return self._client

    def _unavailable(self, exc: ch_errors.ClickHouseError) -> BackendUnavailable:
        reason = redact_secrets_of(self._url, str(exc)).strip().splitlines()[0]
        return BackendUnavailable(f"cannot use ClickHouse at {self.url}: {reason}")

    def _no_chdb_data(self) -> bool:
        """Whether this is chDB with no data directory yet (connecting would create it)."""
        if not self._url.startswith("chdb:"):
            return False
        path = self._url.split("://", 1)[-1].split("?", 1)[0]
        return bool(path) and not os.path.exists(path)

    def schema_version(self) -> int | None:
        if self._no_chdb_data():
            return None
        client = self._inspection_client()
        name = _quote(self._versions.name)
        try:
            if str(client.command(f"EXISTS TABLE {name}")).strip() != "1":
                return None
            found = client.query(f"SELECT max(version) FROM {name}")
        except ch_errors.ClickHouseError as exc:
            raise self._unavailable(exc) from None
        current = found.result_rows[0][0] if found.result_rows else None
        return int(current) if current else None  # max() of no rows is 0 in ClickHouse

    def check_privileges(self, tables: Sequence[TableSpec]) -> list[str]:
        """The user's ``readonly`` setting, then ``CHECK GRANT`` (ClickHouse 23.9 and later;
        older servers are not asked) of SELECT and INSERT on each table and, with
        ``create_tables``, of CREATE TABLE on the database. chDB has every privilege."""
        if self._no_chdb_data():
            names = list(dict.fromkeys(t.name for t in tables))
            return [] if self._create_tables else [self._missing_message(names)]
        client = self._inspection_client()
        try:
            return self._privilege_problems(client, list(dict.fromkeys(t.name for t in tables)))
        except ch_errors.ClickHouseError as exc:
            raise self._unavailable(exc) from None

    def _privilege_problems(self, client: Client, names: list[str]) -> list[str]:
        database = str(client.command("SELECT currentDatabase()")).strip()
        user = str(client.command("SELECT currentUser()")).strip()
        problems = []
        readonly = str(client.command("SELECT getSetting('readonly')")).strip()
        if readonly not in ("0", ""):
            problems.append(
                f"user {user} may not write in {self.url} (readonly = {readonly} in its "
                "settings profile). Fix: give it a settings profile with readonly = 0"
            )
        missing = [
            n for n in names if str(client.command(f"EXISTS TABLE {_quote(n)}")).strip() != "1"
        ]
        lacking = [
            n
            for n in names
            if n not in missing
            and not _granted(client, f"SELECT, INSERT ON {_quote(database)}.{_quote(n)}")
        ]
        if lacking:
            problems.append(
                f"user {user} may not SELECT or INSERT into the table(s) {', '.join(lacking)}. "
                f"Fix: GRANT SELECT, INSERT ON {_quote(database)}.* TO {_quote(user)}"
            )
        if not self._create_tables:
            if missing:
                problems.append(self._missing_message(missing))
        elif not _granted(client, f"CREATE TABLE ON {_quote(database)}.*"):
            problems.append(
                f"with INGEST_CREATE_TABLES = True a crawl runs CREATE TABLE IF NOT EXISTS, and "
                f"user {user} may not create tables in {database}. Fix: GRANT CREATE TABLE ON "
                f"{_quote(database)}.* TO {_quote(user)}, or "
                + (
                    "run `scrapy ingest migrate` as a user that may, then set "
                    "INGEST_CREATE_TABLES = False"
                    if missing
                    else "set INGEST_CREATE_TABLES = False (the tables are there)"
                )
            )
        return problems

    def _missing_message(self, missing: list[str]) -> str:
        return (
            f"the table(s) {', '.join(missing)} do not exist in {self.url}, and "
            "INGEST_CREATE_TABLES is False. Fix: run `scrapy ingest migrate`, or have a DBA run "
            "what `scrapy ingest migrate --sql` prints"
        )

    def classify(self, exc: BaseException) -> Failure:
        """By the server's error code (docs/reliability.md has the table): clickhouse-connect's
        ``code``, else the ``Code: NNN`` the server (or chDB) reports; a code not listed, and
        a network error, are transient."""
        if isinstance(exc, SchemaError):
            return Failure.DATA  # keyed items in an old items table: no retry can help
        if isinstance(exc, (ValueError, TypeError, OverflowError, UnicodeError)):
            return Failure.DATA  # a value the client cannot serialize
        code = _error_code(exc)
        if code is None:
            # the client's own DataError: a value it cannot serialize; anything else without
            # a code (a dropped connection, a chDB directory another process holds) may heal
            return Failure.DATA if isinstance(exc, ch_errors.DataError) else Failure.TRANSIENT
        if code in _DATA_CODES:
            return Failure.DATA
        if code in _PERMANENT_CODES:
            return Failure.PERMANENT
        return Failure.TRANSIENT

    def explain_refusal(  # noqa: PLR0911 - one return per kind of refusal
        self, exc: BaseException, *, creating: bool = False
    ) -> str:
        """The cause of a permanent failure and its fix, in plain words (no password)."""
        code = _error_code(exc)
        parts = urlsplit(self._url)
        user = unquote(parts.username or "default")
        database = unquote(parts.path.strip("/")) or "default"
        where = f"ClickHouse at {self.url}"
        detail = redact_secrets_of(self._url, str(exc)).strip().splitlines()[0][:300]
        if code in _LOGIN_CODES:
            return (
                f"{where} refused the user {user!r} or its password ({detail}). Fix: correct "
                "the user and password in the database URL"
            )
        if code == 81:
            return (
                f"database {database!r} does not exist on {where}. Fix: create it (CREATE "
                f"DATABASE {_quote(database)}), or fix the database name in the URL"
            )
        if code == 164:
            return (
                f"user {user!r} may not write in {where}: its settings profile has readonly "
                "set. Fix: give it a settings profile with readonly = 0"
            )
        if code == 497 and creating:
            return (
                f"user {user!r} may not create tables in database {database!r} of {where} "
                f"({detail}). Fix: GRANT CREATE TABLE ON {_quote(database)}.* TO "
                f"{_quote(user)}; or set INGEST_CREATE_TABLES = False and have a user that "
                "may run the DDL that `scrapy ingest migrate --sql` prints"
            )
        if code == 497:
            return (
                f"user {user!r} may not write the tables of this crawl in {where} ({detail}). "
                f"Fix: GRANT SELECT, INSERT ON {_quote(database)}.* TO {_quote(user)}"
            )
        if code in (16, 47, 60):
            return (
                f"a table or column of this crawl is missing in {where} ({detail}). Fix: run "
                "`scrapy ingest migrate` (or one crawl with INGEST_CREATE_TABLES = True); "
                "where that is not allowed, have a user that may run the DDL that `scrapy "
                "ingest migrate --sql` prints"
            )
        return (
            f"{where} refuses this crawl ({detail}): no retry can fix that. Fix: see "
            "docs/reliability.md for what this error needs"
        )

    # jobs: a job row is refreshed by inserting a newer version of it

    def insert_job(self, table: TableSpec, row: Mapping[str, Any]) -> bool:
        current = self._job(table, row["job_id"])
        if current is not None:
            return is_same_job(row, current["hostname"], current["pid"], current["started_at"])
        self._insert_job_version(table, dict(row))
        return True

    def update_job(
        self, table: TableSpec, job_id: str, values: Mapping[str, Any], *, unless_finished: bool
    ) -> None:
        current = self._job(table, job_id)
        if current is None or (unless_finished and current["status"] == "finished"):
            return
        self._insert_job_version(table, {**current, **values})

    def _job(self, table: TableSpec, job_id: str) -> dict[str, Any] | None:
        assert self._client is not None, "job access before open()"
        names = table.column_names
        select = ", ".join(
            f"toFloat64({_quote(n)})" if table.column_kind(n) == "timestamp" else _quote(n)
            for n in names
        )
        found = self._client.query(
            f"SELECT {select} FROM {_quote(table.name)} FINAL WHERE job_id = {{job_id:String}}",
            parameters={"job_id": job_id},
        )
        if not found.result_rows:
            return None
        job = dict(zip(names, found.result_rows[0], strict=True))
        for name in names:  # back to what rows hold: JSON as bytes
            if table.column_kind(name) == "json" and job[name] is not None:
                value = job[name]
                job[name] = value.encode() if isinstance(value, str) else _json_bytes(value)
        return job

    def mark_crashed(
        self, table: TableSpec, stale_before: float, alive: str, crawl_id: str | None = None
    ) -> list[str]:
        assert self._client is not None, "mark_crashed() before open()"
        found = self._client.query(
            f"SELECT job_id FROM {_quote(table.name)} FINAL WHERE status = 'running' "
            "AND toFloat64(updated_at) < {stale:Float64} AND job_id != {alive:String}"
            + (" AND crawl_id = {crawl:String}" if crawl_id is not None else ""),
            parameters={"stale": stale_before, "alive": alive, "crawl": crawl_id or ""},
        )
        ids = [row[0] for row in found.result_rows]
        for job_id in ids:
            job = self._job(table, job_id)
            if job is None or job["status"] != "running":
                continue
            # a newer version of the row: updated_at is its version, so it moves to now
            crashed = {"status": "crashed", "close_reason": "crashed"}
            self._insert_job_version(
                table,
                {**job, **crashed, "finished_at": job["updated_at"], "updated_at": time.time()},
            )
        return ids

    def recent_jobs(
        self, table: TableSpec, *, running: bool, spider: str | None, limit: int
    ) -> list[dict[str, Any]]:
        assert self._client is not None, "recent_jobs() before open()"
        json_typed = self._json_typed(table.name)
        names = table.column_names
        select = ", ".join(_read_expression(table, name, json_typed) for name in names)
        conditions = ["1"]
        params: dict[str, Any] = {"limit": limit}
        if running:
            conditions.append("status = 'running'")
        if spider is not None:
            conditions.append("spider = {spider:String}")
            params["spider"] = spider
        # FINAL: the latest version of each job row, before the conditions are applied
        found = self._client.query(
            f"SELECT {select} FROM {_quote(table.name)} FINAL WHERE {' AND '.join(conditions)} "
            "ORDER BY started_at DESC, job_id LIMIT {limit:UInt64}",
            parameters=params,
        )
        jobs = []
        for values in found.result_rows:
            job = dict(zip(names, values, strict=True))
            for name in names:
                if table.column_kind(name) == "json" and job[name] is not None:
                    job[name] = orjson.loads(job[name])
            jobs.append(job)
        return jobs

    def job_items(self, table: TableSpec, job_id: str) -> Iterator[str]:
        assert self._client is not None, "job_items() before open()"
        data = _read_expression(table, "data", self._json_typed(table.name))
        # FINAL: the current version of keyed items; streamed block by block
        with self._client.query_row_block_stream(
            f"SELECT {data} FROM {_quote(table.name)} FINAL WHERE job_id = {{job_id:String}} "
            f"ORDER BY scraped_at, {_quote(table.primary_key)}",
            parameters={"job_id": job_id},
        ) as blocks:
            for block in blocks:
                for (value,) in block:
                    yield value.decode() if isinstance(value, bytes) else value

    def _json_typed(self, name: str) -> frozenset[str]:
        """The columns of the table *name* that are of the JSON type (read as toJSONString)."""
        return frozenset(
            column
            for column, type_, _, _ in self._table_columns(name)
            if type_.startswith(("JSON", "Object("))
        )

    def _insert_job_version(self, table: TableSpec, job: dict[str, Any]) -> None:
        assert self._client is not None
        names = [n for n in table.column_names if n in job]
        row = [job[n] for n in names]
        for i, name in enumerate(names):
            convert = _conversion(table.column_kind(name))
            if convert is not None and row[i] is not None:
                row[i] = convert(row[i])
        self._client.insert(table.name, [row], column_names=names)


def _client(url: str) -> Client:
    if url.startswith("chdb:"):
        return clickhouse_connect.get_client(dsn=url)
    secure = url.startswith("clickhouses:")
    dsn = re.sub(r"^clickhouses?://", "clickhouse://", url)
    return clickhouse_connect.get_client(dsn=dsn, secure=secure, connect_timeout=10)


def _error_code(exc: BaseException) -> int | None:
    """The ClickHouse error code of *exc*: the driver's, else the one its message reports."""
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    if isinstance(exc, ch_errors.ClickHouseError):
        found = _CODE.search(str(exc))
        if found:
            return int(found.group(1))
    return None


def _has_json_type(client: Client) -> bool:
    try:
        client.query("SELECT CAST('{}', 'JSON')")
    except ch_errors.ClickHouseError:
        return False
    return True


def _conversion(kind: ColumnKind) -> Callable[[Any], Any] | None:
    # ids stay ints: clickhouse-connect writes a UUID column from ints as they are
    if kind == "json":
        return _json_text
    if kind == "timestamp":
        return _ticks
    if kind == "text":
        return safe_text
    return None


def _column_specs(table: TableSpec) -> tuple[Column, ...]:
    """*table*'s columns as created here: in a table of items, the columns of the sorting key
    and the engine's version are not nullable."""
    if table.kind not in _ITEM_KINDS:
        return table.columns
    return tuple(
        dataclasses.replace(c, nullable=False) if c.name in _ITEM_KEY_COLUMNS else c
        for c in table.columns
    )


def _column_conversion(kind: ColumnKind) -> Callable[[list[Any]], list[Any]] | None:
    """How :meth:`ClickHouseBackend._insert` converts a whole column of *kind*."""
    if kind == "text":
        return _clean_texts
    if kind == "json":
        return _json_texts
    convert = _conversion(kind)
    if convert is None:
        return None
    return partial(_each, convert)


def _each(convert: Callable[[Any], Any], values: list[Any]) -> list[Any]:
    return [None if v is None else convert(v) for v in values]


def _clean_texts(values: list[Any]) -> list[Any]:
    """*values* with each text made storable: each distinct text is checked once, and the list
    is kept as it is when none needs it. A batch's job id and spider are one text, its item
    types and URLs a few; checking every value was a third of the conversion's time."""
    distinct = set(values)
    distinct.discard(None)
    cleaned = {value: safe_text(value) for value in distinct}
    if all(clean is value for value, clean in cleaned.items()):
        return values
    return [None if v is None else cleaned[v] for v in values]


def _json_texts(values: list[Any]) -> list[Any]:
    """*values* as JSON text: kept as they are when they are text already (rows hold JSON
    as text here, see ``json_as_text``, but those spilled by the crawl process as bytes)."""
    if set(map(type, values)) <= _TEXT_OR_NONE:
        return values
    return _each(_json_text, values)


def _json_text(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def _json_bytes(value: Any) -> bytes:
    return orjson.dumps(value)


def _ticks(epoch: float) -> int:
    """Epoch seconds as DateTime64(6) ticks (microseconds), which clickhouse-connect takes."""
    return round(epoch * 1_000_000)


def _read_expression(table: TableSpec, name: str, json_typed: frozenset[str]) -> str:
    """A column, read back in the row conventions: ids as text, timestamps as epoch seconds,
    JSON as text (bytes once read)."""
    kind, column = table.column_kind(name), _quote(name)
    if kind == "uuid":
        return f"toString({column})"
    if kind == "timestamp":
        return f"toFloat64({column})"
    if kind == "json" and name in json_typed:
        return f"toJSONString({column})"
    return column


def _clean_key(row: Row, type_at: int, key_at: int) -> Row:
    item_type, key = row[type_at], row[key_at]
    clean_type, clean_key = safe_text(item_type), safe_text(key)
    if clean_type is item_type and clean_key is key:
        return row
    return _with(_with(row, type_at, clean_type), key_at, clean_key)


def _with(row: Row, index: int, value: Any) -> Row:
    return (*row[:index], value, *row[index + 1 :])


def _uuids_as_ints(table: TableSpec, rows: list[Row]) -> list[Row]:
    """*rows* with their ids as ints: rows read back hold them as text, new rows as ints, and
    clickhouse-connect writes a UUID column from one or the other, not both."""
    positions = [i for i, c in enumerate(table.columns) if c.kind == "uuid"]
    converted = []
    for row in rows:
        if not any(isinstance(row[i], str) for i in positions):
            converted.append(row)
            continue
        values = list(row)
        for i in positions:
            if isinstance(values[i], str):
                values[i] = uuid.UUID(values[i]).int
        converted.append(tuple(values))
    return converted


def _time_column(table: TableSpec) -> str:
    return next(c.name for c in table.columns if c.kind == "timestamp" and not c.nullable)


def _granted(client: Client, what: str) -> bool:
    """``CHECK GRANT what``; True where the server has no CHECK GRANT (before 23.9)."""
    try:
        return str(client.command(f"CHECK GRANT {what}")).strip() == "1"
    except ch_errors.DatabaseError as exc:
        if "SYNTAX_ERROR" not in str(exc) and "Code: 62." not in str(exc):
            raise
        logger.debug("%s", exc)
        return True


def _quote(name: str) -> str:
    """A ClickHouse identifier; our names match [a-z_][a-z0-9_]*, and are quoted all the same."""
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"
