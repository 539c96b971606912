"""ClickHouse backend: clickhouse-connect, with a client built from the database URL.

URLs: ``clickhouse://user:password@host:8123/database`` (HTTP),
``clickhouses://user:password@host:8443/database`` (HTTPS), and
``chdb:///path/to/dir`` (chDB: the ClickHouse engine embedded in the writer
process, storing its data in that directory; one process may use one path).

Tables are ``ReplacingMergeTree``: records by ``ORDER BY (job_id, <time>, id)``
and ``PARTITION BY toYYYYMM(<time>)``, where ``<time>`` is the record's own
timestamp (``scraped_at``, ``started_at``, ``logged_at``, ``created_at``), which
is what the cookbook's per-job and per-time queries filter on; the job table by
``job_id``, with ``updated_at`` as the version, since a job row is refreshed by
inserting a newer version of it (read it with ``FINAL``). JSON columns are of
the ``JSON`` type when the server has it (ClickHouse 25.3 and later), else
``String`` (read with ``JSONExtract*``).

Writes are idempotent twice over: a batch written again first drops the ids
that are stored already, and the table engine collapses rows with the same
sorting key (``FINAL``, or a merge) should a duplicate slip through.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Any

import clickhouse_connect
import orjson
from clickhouse_connect.driver import exceptions as ch_errors

from scrapy_ingest._ids import format_uuid
from scrapy_ingest._redact import redact_secrets_of, redact_url
from scrapy_ingest.backends.base import (
    Failure,
    Row,
    conversions_by_kind,
    is_same_job,
    log_migration,
    needs_migration,
    safe_text,
)
from scrapy_ingest.exceptions import BackendUnavailable, SchemaError
from scrapy_ingest.schema import SCHEMA_VERSION

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from clickhouse_connect.driver.client import Client

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
#: server errors about a value, not about the server (CANNOT_PARSE_*, TOO_LARGE_*, ...)
_DATA_ERROR = re.compile(r"Code: (6|26|27|38|41|53|69|70|72|117|131|190|241|321|395)\b")


class ClickHouseBackend:
    threads = 1  # a clickhouse-connect client runs one query at a time

    def __init__(self, url: str, tables: Sequence[TableSpec], *, create_tables: bool) -> None:
        self._url = url
        self.url = redact_url(url)
        self._tables = {t.name: t for t in tables}
        self._versions = next(t for t in tables if t.kind == "schema_version")
        self._create_tables = create_tables
        self._client: Client | None = None
        self._json_type = False
        self._conversions = conversions_by_kind(_conversion)

    # lifecycle

    def open(self) -> None:
        try:
            self._client = _client(self._url)
            self._json_type = _has_json_type(self._client)
            self._prepare_schema()
        except ch_errors.ClickHouseError as exc:
            self.close()
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
        client.insert(
            self._versions.name,
            [(SCHEMA_VERSION, _ticks(time.time()))],
            column_names=["version", "applied_at"],
        )
        if current is not None:
            log_migration(self.url, current)

    def create_table(self, table: TableSpec) -> None:
        assert self._client is not None, "create_table() before open()"
        if self._create_tables:
            self._client.command(self._create_table_sql(table))
        self._tables[table.name] = table

    def _create_table_sql(self, table: TableSpec) -> str:
        columns = ", ".join(f"{_quote(c.name)} {self._column_type(c)}" for c in table.columns)
        if table.kind == "jobs":
            engine = "ReplacingMergeTree(updated_at) ORDER BY job_id"
        elif table.kind == "schema_version":
            engine = "ReplacingMergeTree ORDER BY version"
        else:
            time_column = _quote(_time_column(table))
            engine = (
                f"ReplacingMergeTree ORDER BY (job_id, {time_column}, id) "
                f"PARTITION BY toYYYYMM({time_column})"
            )
        return f"CREATE TABLE IF NOT EXISTS {_quote(table.name)} ({columns}) ENGINE = {engine}"

    def _column_type(self, column: Column) -> str:
        kind = column.kind
        base = "JSON" if kind == "json" and self._json_type else _TYPES[kind]
        if column.nullable and base != "JSON":
            base = f"Nullable({base})"
        if kind == "text" and column.name in _LOW_CARDINALITY:
            base = f"LowCardinality({base})"
        return base

    # writing

    def write(self, table: TableSpec, rows: Sequence[Row], *, idempotent: bool) -> None:
        assert self._client is not None, "write() before open()"
        if idempotent:
            rows = self._without_stored_ids(table, rows)
            if not rows:
                return
        # column by column: one comprehension per column converts faster than a loop per row
        columns = [list(column) for column in zip(*rows, strict=True)]
        for index, convert in self._conversions[table.kind]:
            columns[index] = [None if v is None else convert(v) for v in columns[index]]
        self._client.insert(
            table.name, columns, column_names=list(table.column_names), column_oriented=True
        )

    def _without_stored_ids(self, table: TableSpec, rows: Sequence[Row]) -> list[Row]:
        assert self._client is not None
        position = table.column_names.index(table.primary_key)
        ids = [format_uuid(row[position]) for row in rows]
        found = self._client.query(
            f"SELECT toString({_quote(table.primary_key)}) FROM {_quote(table.name)} "
            f"WHERE {_quote(table.primary_key)} IN {{ids:Array(UUID)}}",
            parameters={"ids": ids},
        )
        stored = {row[0] for row in found.result_rows}
        return [row for row, id_ in zip(rows, ids, strict=True) if id_ not in stored]

    def classify(self, exc: BaseException) -> Failure:
        if isinstance(exc, (ch_errors.DataError, ch_errors.ProgrammingError)):
            return Failure.DATA
        if isinstance(exc, (ValueError, TypeError, OverflowError, UnicodeError)):
            return Failure.DATA  # a value the client cannot serialize
        if isinstance(exc, ch_errors.DatabaseError) and _DATA_ERROR.search(str(exc)):
            return Failure.DATA
        return Failure.TRANSIENT

    # jobs: a job row is refreshed by inserting a newer version of it

    def insert_job(self, table: TableSpec, row: Mapping[str, Any]) -> bool:
        current = self._job(table, row["job_id"])
        if current is not None:
            return is_same_job(row, current["hostname"], current["pid"], current["started_at"])
        self._insert_job_version(table, dict(row))
        return True

    def update_job(
        self, table: TableSpec, job_id: str, values: Mapping[str, Any], *, only_running: bool
    ) -> None:
        current = self._job(table, job_id)
        if current is None or (only_running and current["status"] != "running"):
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

    def mark_crashed(self, table: TableSpec, stale_before: float) -> list[str]:
        assert self._client is not None, "mark_crashed() before open()"
        found = self._client.query(
            f"SELECT job_id FROM {_quote(table.name)} FINAL WHERE status = 'running' "
            "AND toFloat64(updated_at) < {stale:Float64}",
            parameters={"stale": stale_before},
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
        return _clean_text
    return None


def _clean_text(value: str) -> str:
    return value if value.isascii() and "\x00" not in value else safe_text(value)


def _json_text(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def _json_bytes(value: Any) -> bytes:
    return orjson.dumps(value)


def _ticks(epoch: float) -> int:
    """Epoch seconds as DateTime64(6) ticks (microseconds), which clickhouse-connect takes."""
    return round(epoch * 1_000_000)


def _time_column(table: TableSpec) -> str:
    return next(c.name for c in table.columns if c.kind == "timestamp" and not c.nullable)


def _quote(name: str) -> str:
    """A ClickHouse identifier; our names match [a-z_][a-z0-9_]*, and are quoted all the same."""
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"
