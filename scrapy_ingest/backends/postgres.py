"""PostgreSQL backend: psycopg 3, a psycopg_pool pool, ``COPY`` into JSONB.

The first attempt at a batch is one plain ``COPY``. A batch that is written
again after a failure whose outcome is unknown (the connection dropped during
``COMMIT``) goes through a temporary staging table and
``INSERT ... ON CONFLICT (id) DO NOTHING``, so no row is ever stored twice.

Keyed items are upserted in the same transaction: the current rows of the
batch's keys are read and locked (``SELECT ... FOR UPDATE``, in key order, so
that two writers of the same keys queue rather than deadlock), new keys are
copied in, previous versions are copied to the history table server-side, and
changed rows are updated from a staging table. A key inserted meanwhile by
another process makes the ``COPY`` fail on the unique index; the batch is then
written again, and finds that row.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from scrapy_ingest._redact import redact_secrets_of, redact_url
from scrapy_ingest._time import TimestampFormatter, utc_from_epoch
from scrapy_ingest.backends.base import (
    Failure,
    Row,
    StoredItem,
    conversions_by_kind,
    is_same_job,
    log_migration,
    needs_migration,
    plan_upsert,
    safe_text,
    split_keyed,
)
from scrapy_ingest.exceptions import BackendUnavailable, SchemaError
from scrapy_ingest.schema import SCHEMA_VERSION

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from scrapy_ingest.schema import ColumnKind, TableSpec

logger = logging.getLogger(__name__)

_TYPES: dict[ColumnKind, str] = {
    "uuid": "uuid",
    "text": "text",
    "int": "integer",
    "bigint": "bigint",
    "float": "double precision",
    "bool": "boolean",
    "timestamp": "timestamptz",
    "json": "jsonb",
}
_CONNECT_TIMEOUT = 10
#: seconds a write waits for a pooled connection (a healthy pool has one ready)
_POOL_WAIT = 2.0


class PostgresBackend:
    threads = 2
    json_as_text = False

    def __init__(self, url: str, tables: Sequence[TableSpec], *, create_tables: bool) -> None:
        # SQLAlchemy-style "postgresql+psycopg://" is accepted too
        self._conninfo = re.sub(r"^[a-z]+(\+[a-z0-9_]+)?://", "postgresql://", url)
        self.url = redact_url(url)
        self._tables = {t.name: t for t in tables}
        self._versions = next(t for t in tables if t.kind == "schema_version")
        self._create_tables = create_tables
        self._pool: ConnectionPool | None = None
        self._format_ts = TimestampFormatter()
        self._conversions = conversions_by_kind(self._conversion)

    # lifecycle

    def open(self) -> None:
        try:
            with psycopg.connect(self._conninfo, connect_timeout=_CONNECT_TIMEOUT) as conn:
                self._prepare_schema(conn)
        except psycopg.Error as exc:
            # libpq quotes bits of a malformed DSN, the password included: never show it
            reason = redact_secrets_of(self._conninfo, str(exc)).strip()
            raise BackendUnavailable(
                f"cannot connect to PostgreSQL at {self.url}: {reason}"
            ) from None
        self._pool = ConnectionPool(
            self._conninfo,
            min_size=1,
            max_size=self.threads + 1,
            kwargs={"connect_timeout": _CONNECT_TIMEOUT},
            # how long connection() waits while the server is down: short, so that the
            # retry loop, not the pool, decides when to give up (and spill)
            timeout=_POOL_WAIT,
            name="scrapy_ingest",
            open=False,
        )
        self._pool.open(wait=True, timeout=_CONNECT_TIMEOUT)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _prepare_schema(self, conn: psycopg.Connection[Any]) -> None:
        versions = self._versions
        with conn.transaction():
            # one process creates the tables; the others wait here, then find them
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [_lock_key(versions.name)])
            if self._create_tables:
                for table in self._tables.values():
                    conn.execute(_create_table(table))
            found = conn.execute("SELECT to_regclass(%s)", [versions.name]).fetchone()
            if not found or found[0] is None:
                raise SchemaError(
                    f"the table {versions.name} does not exist in {self.url}. Fix: set "
                    "INGEST_CREATE_TABLES = True once, or create the tables as "
                    "docs/tables.md shows."
                )
            row = conn.execute(
                sql.SQL("SELECT max(version) FROM {}").format(sql.Identifier(versions.name))
            ).fetchone()
            current = row[0] if row else None
            migrate = needs_migration(current, self.url, create_tables=self._create_tables)
            if migrate and current is not None:
                self._add_missing_columns(conn)
            if self._create_tables:  # after the columns they index
                for table in self._tables.values():
                    _create_indexes(conn, table)
            if not migrate:
                return
            conn.execute(
                sql.SQL("INSERT INTO {} (version, applied_at) VALUES (%s, now())").format(
                    sql.Identifier(versions.name)
                ),
                [SCHEMA_VERSION],
            )
            if current is not None:
                log_migration(self.url, current)

    def _add_missing_columns(self, conn: psycopg.Connection[Any]) -> None:
        for table in self._tables.values():
            found = {
                name
                for (name,) in conn.execute(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_schema = current_schema() AND table_name = %s",
                    [table.name],
                )
            }
            for column in table.columns:
                if column.name not in found:
                    conn.execute(
                        sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(
                            sql.Identifier(table.name),
                            sql.Identifier(column.name),
                            sql.SQL(_TYPES[column.kind]),
                        )
                    )

    def create_table(self, table: TableSpec) -> None:
        """Create *table* (a table a custom route names) and its indexes, if missing."""
        assert self._pool is not None, "create_table() before open()"
        if not self._create_tables:
            return
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [_lock_key(self._versions.name)])
            conn.execute(_create_table(table))
            _create_indexes(conn, table)

    # writing

    def write(
        self, table: TableSpec, rows: Sequence[Row], *, idempotent: bool
    ) -> dict[str, list[int]] | None:
        assert self._pool is not None, "write() before open()"
        rows, keyed = split_keyed(table, rows)
        with self._pool.connection() as conn, conn.cursor() as cur:
            if rows:
                self._insert(cur, table, rows, idempotent=idempotent)
            if keyed:
                return self._upsert(cur, table, keyed)
        return None

    def _insert(
        self, cur: psycopg.Cursor[Any], table: TableSpec, rows: Sequence[Row], *, idempotent: bool
    ) -> None:
        target = sql.Identifier(table.name)
        columns = sql.SQL(", ").join(map(sql.Identifier, table.column_names))
        if not idempotent:
            self._copy(cur, sql.SQL("COPY {} ({}) FROM STDIN").format(target, columns), table, rows)
            return
        stage = sql.Identifier(f"_stage_{table.name}")
        cur.execute(
            sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {}) ON COMMIT DELETE ROWS").format(
                stage, target
            )
        )
        self._copy(cur, sql.SQL("COPY {} ({}) FROM STDIN").format(stage, columns), table, rows)
        cur.execute(
            sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} ON CONFLICT ({}) DO NOTHING").format(
                target, columns, columns, stage, sql.Identifier(table.primary_key)
            )
        )

    def _upsert(
        self, cur: psycopg.Cursor[Any], table: TableSpec, rows: Sequence[Row]
    ) -> dict[str, list[int]]:
        # keys and id pairs travel by COPY into temporary tables: psycopg formats arrays of
        # thousands of parameters in Python, COPY rows in C
        target = sql.Identifier(table.name)
        keys_table = self._scratch(cur, f"_keys_{table.name}", "item_type text, item_key text")
        type_at, key_at = table.position("item_type"), table.position("item_key")
        keys = sorted({(safe_text(row[type_at]), safe_text(row[key_at])) for row in rows})
        _copy_rows(cur, keys_table, keys)
        cur.execute(
            sql.SQL(
                "SELECT t.item_type, t.item_key, t.id, t.content_hash, t.version, "
                "extract(epoch FROM t.first_seen_at)::float8 "
                "FROM {} t JOIN {} k ON t.item_type = k.item_type AND t.item_key = k.item_key "
                "ORDER BY t.item_type, t.item_key FOR UPDATE OF t"
            ).format(target, keys_table)
        )
        stored = {
            (item_type, key): StoredItem(id_, content_hash, version, first_seen)
            for item_type, key, id_, content_hash, version, first_seen in cur.fetchall()
        }
        plan = plan_upsert(table, rows, stored)
        columns = sql.SQL(", ").join(map(sql.Identifier, table.column_names))
        copy_into = sql.SQL("COPY {} ({}) FROM STDIN")
        if plan.inserts:
            self._copy(cur, copy_into.format(target, columns), table, plan.inserts)
        if not plan.replaces and not plan.touches:
            return plan.changes
        # stored id -> the id of the row that replaces it, or the time it was seen again
        pairs = self._scratch(cur, f"_pairs_{table.name}", "old uuid, new uuid, seen timestamptz")
        _copy_rows(
            cur,
            pairs,
            [(found.id, _uuid_text(row[0]), None) for found, row in plan.replaces]
            + [(found.id, None, self._format_ts(seen)) for found, seen in plan.touches],
        )
        history = table.history
        if history is not None and plan.archive:
            # the versions being replaced, copied before they are
            cur.execute(
                sql.SQL(
                    "INSERT INTO {} ({}) SELECT {} FROM {} t JOIN {} p ON t.id = p.old "
                    "WHERE p.new IS NOT NULL ON CONFLICT (id) DO NOTHING"
                ).format(
                    sql.Identifier(history.name),
                    columns,
                    sql.SQL(", ").join(
                        sql.SQL("t.{}").format(sql.Identifier(n)) for n in table.column_names
                    ),
                    target,
                    pairs,
                )
            )
        if history is not None and plan.archive_rows:
            self._insert(cur, history, plan.archive_rows, idempotent=True)
        if plan.replaces:
            stage = self._scratch(cur, f"_upsert_{table.name}", None, like=target)
            self._copy(cur, copy_into.format(stage, columns), table, [r for _, r in plan.replaces])
            assignments = sql.SQL(", ").join(
                sql.SQL("{} = s.{}").format(sql.Identifier(name), sql.Identifier(name))
                for name in table.column_names
            )
            cur.execute(
                sql.SQL(
                    "UPDATE {} t SET {} FROM {} s, {} p WHERE t.id = p.old AND s.id = p.new"
                ).format(target, assignments, stage, pairs)
            )
        if plan.touches:
            cur.execute(
                sql.SQL(
                    "UPDATE {} t SET last_seen_at = greatest(t.last_seen_at, p.seen) "
                    "FROM {} p WHERE t.id = p.old AND p.seen IS NOT NULL"
                ).format(target, pairs)
            )
        return plan.changes

    @staticmethod
    def _scratch(
        cur: psycopg.Cursor[Any],
        name: str,
        columns: str | None,
        *,
        like: sql.Identifier | None = None,
    ) -> sql.Identifier:
        """A temporary table of this session, emptied at each commit: *columns*, or those of
        the table *like*."""
        scratch = sql.Identifier(name)
        shape = sql.SQL("LIKE {}").format(like) if like is not None else sql.SQL(columns or "")
        cur.execute(
            sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS").format(
                scratch, shape
            )
        )
        return scratch

    def _copy(
        self,
        cur: psycopg.Cursor[Any],
        statement: sql.Composed,
        table: TableSpec,
        rows: Sequence[Row],
    ) -> None:
        # psycopg's write_row formats and escapes in C; we only turn our
        # values into text first (ids, timestamps, JSON bytes, unsafe text)
        conversions = self._conversions[table.kind]
        with cur.copy(statement) as copy:
            write_row = copy.write_row
            for row in rows:
                values = list(row)
                for index, convert in conversions:
                    value = values[index]
                    if value is not None:
                        values[index] = convert(value)
                write_row(values)

    def _conversion(self, kind: ColumnKind) -> Callable[[Any], Any] | None:
        if kind == "json":
            return bytes.decode
        if kind == "timestamp":
            return self._format_ts
        if kind == "uuid":
            return _uuid_text
        if kind == "text":
            return safe_text
        return None

    def classify(self, exc: BaseException) -> Failure:
        if isinstance(exc, psycopg.Error):
            state = exc.sqlstate or ""
            if state == "23505":  # unique_violation
                return Failure.DUPLICATE
            # data exceptions, integrity violations, program limits (value too large)
            if state[:2] in ("22", "23", "54"):
                return Failure.DATA
        return Failure.TRANSIENT

    # jobs

    def insert_job(self, table: TableSpec, row: Mapping[str, Any]) -> bool:
        assert self._pool is not None, "insert_job() before open()"
        names = list(row)
        query = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) DO NOTHING").format(
            sql.Identifier(table.name),
            sql.SQL(", ").join(map(sql.Identifier, names)),
            sql.SQL(", ").join(self._placeholder(table, n) for n in names),
            sql.Identifier(table.primary_key),
        )
        with self._pool.connection() as conn:
            cur = conn.execute(query, [self._param(table, n, row[n]) for n in names])
            if cur.rowcount == 1:
                return True
            found = conn.execute(
                sql.SQL(
                    "SELECT hostname, pid, extract(epoch FROM started_at)::float8 "
                    "FROM {} WHERE job_id = %s"
                ).format(sql.Identifier(table.name)),
                [row["job_id"]],
            ).fetchone()
        return found is not None and is_same_job(row, *found)

    def update_job(
        self, table: TableSpec, job_id: str, values: Mapping[str, Any], *, unless_finished: bool
    ) -> None:
        assert self._pool is not None, "update_job() before open()"
        names = list(values)
        query = sql.SQL("UPDATE {} SET {} WHERE job_id = %s{}").format(
            sql.Identifier(table.name),
            sql.SQL(", ").join(
                sql.SQL("{} = {}").format(sql.Identifier(n), self._placeholder(table, n))
                for n in names
            ),
            sql.SQL(" AND status <> 'finished'" if unless_finished else ""),
        )
        with self._pool.connection() as conn:
            conn.execute(query, [*(self._param(table, n, values[n]) for n in names), job_id])

    def mark_crashed(self, table: TableSpec, stale_before: float, alive: str) -> list[str]:
        assert self._pool is not None, "mark_crashed() before open()"
        query = sql.SQL(
            "UPDATE {} SET status = 'crashed', close_reason = 'crashed', "
            "finished_at = updated_at WHERE status = 'running' AND updated_at < %s "
            "AND job_id <> %s RETURNING job_id"
        ).format(sql.Identifier(table.name))
        with self._pool.connection() as conn:
            return [row[0] for row in conn.execute(query, [utc_from_epoch(stale_before), alive])]

    def _placeholder(self, table: TableSpec, name: str) -> sql.Composable:
        return sql.SQL("%s::jsonb" if table.column_kind(name) == "json" else "%s")

    def _param(self, table: TableSpec, name: str, value: Any) -> Any:
        if value is None:
            return None
        kind = table.column_kind(name)
        if kind == "timestamp":
            return utc_from_epoch(value)
        if kind == "json":
            return value.decode()
        return value


def _copy_rows(cur: psycopg.Cursor[Any], table: sql.Identifier, rows: Sequence[Row]) -> None:
    with cur.copy(sql.SQL("COPY {} FROM STDIN").format(table)) as copy:
        for row in rows:
            copy.write_row(row)


def _uuid_text(value: int | str) -> str:
    # PostgreSQL reads 32 hex digits as a uuid, so ints need no dashes
    return f"{value:032x}" if type(value) is int else str(value)


def _create_table(table: TableSpec) -> sql.Composed:
    columns = [
        sql.SQL("{} {}{}").format(
            sql.Identifier(c.name),
            sql.SQL(_TYPES[c.kind]),
            sql.SQL("" if c.nullable else " NOT NULL"),
        )
        for c in table.columns
    ]
    columns.append(sql.SQL("PRIMARY KEY ({})").format(sql.Identifier(table.primary_key)))
    return sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
        sql.Identifier(table.name), sql.SQL(", ").join(columns)
    )


def _create_indexes(conn: psycopg.Connection[Any], table: TableSpec) -> None:
    for columns in table.indexes:
        conn.execute(
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})").format(
                sql.Identifier(table.index_name(columns)),
                sql.Identifier(table.name),
                sql.SQL(", ").join(map(sql.Identifier, columns)),
            )
        )
    if table.unique:  # one row per key, among the rows that have one
        conn.execute(
            sql.SQL("CREATE UNIQUE INDEX IF NOT EXISTS {} ON {} ({}) WHERE {} IS NOT NULL").format(
                sql.Identifier(table.index_name(table.unique)),
                sql.Identifier(table.name),
                sql.SQL(", ").join(map(sql.Identifier, table.unique)),
                sql.Identifier(table.unique[-1]),
            )
        )


def _lock_key(name: str) -> int:
    digest = hashlib.blake2b(f"scrapy_ingest:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)
