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
import threading
import time
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import abc, sql
from psycopg.adapt import PyFormat, Transformer
from psycopg_pool import ConnectionPool, PoolTimeout

from scrapy_ingest._redact import redact_secrets_of, redact_url
from scrapy_ingest._shapes import Batch
from scrapy_ingest._time import TimestampFormatter, utc_from_epoch
from scrapy_ingest.backends._upsert import StoredItem, plan_upsert, split_keyed
from scrapy_ingest.backends.base import (
    PRUNED_JOB_STATUSES,
    Failure,
    conversions_by_kind,
    describe_error,
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

    from scrapy_ingest._shapes import Row
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
#: seconds the connection attempt that finds out why the pool has none may take
_DIAGNOSE_TIMEOUT = 3
#: rows a server-side cursor fetches at a time for the ``scrapy ingest`` commands (job_items)
_READ_ROWS = 1000


class PostgresBackend:
    threads = 2
    json_as_text = False
    #: write() takes a packed Batch as it is, and copies its rows' JSON from its payload
    takes_batches = True

    def __init__(self, url: str, tables: Sequence[TableSpec], *, create_tables: bool) -> None:
        # SQLAlchemy-style "postgresql+psycopg://" is accepted too
        self._conninfo = re.sub(r"^[a-z]+(\+[a-z0-9_]+)?://", "postgresql://", url)
        self.url = redact_url(url)
        self._tables = {t.name: t for t in tables}
        self._versions = next(t for t in tables if t.kind == "schema_version")
        self._create_tables = create_tables
        self._pool: ConnectionPool | None = None
        self._pool_lock = threading.Lock()
        #: the role and schema the connections use (read at open, for messages)
        self._role: str | None = None
        self._schema: str | None = None
        self._format_ts = TimestampFormatter()
        self._conversions = conversions_by_kind(self._conversion)
        #: table kind -> its COPY formatter, made at the first write of that kind
        self._formatters: dict[str, _CopyFormatter] = {}
        #: table name -> the statement that copies rows into it (see _copy_statement)
        self._copy_statements: dict[str, bytes] = {}

    # lifecycle

    def open(self) -> None:
        try:
            with psycopg.connect(self._conninfo, connect_timeout=_CONNECT_TIMEOUT) as conn:
                found = conn.execute("SELECT current_user, current_schema()").fetchone()
                if found is not None:
                    self._role, self._schema = found
                self._prepare_schema(conn)
        except psycopg.Error as exc:
            if self.classify(exc) is Failure.PERMANENT:
                raise BackendRefused(
                    self.explain_refusal(exc, creating=self._create_tables)
                ) from None
            # libpq quotes bits of a malformed DSN, the password included: never show it
            reason = redact_secrets_of(self._conninfo, str(exc)).strip()
            raise BackendUnavailable(
                f"cannot connect to PostgreSQL at {self.url}: {reason}"
            ) from None
        self._pool = self._new_pool()
        self._pool.open(wait=True, timeout=_CONNECT_TIMEOUT)

    def _new_pool(self) -> ConnectionPool:
        return ConnectionPool(
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

    def _renew_pool(self) -> None:
        """The server answers, but the pool gave no connection: after an outage, psycopg_pool
        tries to reconnect with a backoff of its own (1, 2, 4, 8... s), and its next try may
        come long after the server is back. A new pool connects now; the old one is closed
        (a write that still holds it fails once, as transient, and is retried)."""
        with self._pool_lock:
            old = self._pool
            if old is None:
                return
            self._pool = self._new_pool()
            self._pool.open(wait=False)
        old.close(timeout=0)
        logger.info("PostgreSQL at %s answers again: its connection pool is renewed", self.url)

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
            conn.execute(_version_row(versions))
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
        if not idempotent:
            self._copy(cur, self._copy_statement(cur, table), table, rows)
            return
        target = sql.Identifier(table.name)
        columns = sql.SQL(", ").join(map(sql.Identifier, table.column_names))
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

    def _copy_statement(self, cur: psycopg.Cursor[Any], table: TableSpec) -> bytes:
        """``COPY <table> (<columns>) FROM STDIN``, composed once per table: composing it
        (quoting each name) costs as much as copying a hundred rows."""
        statement = self._copy_statements.get(table.name)
        if statement is None:
            columns = sql.SQL(", ").join(map(sql.Identifier, table.column_names))
            composed = sql.SQL("COPY {} ({}) FROM STDIN").format(
                sql.Identifier(table.name), columns
            )
            statement = self._copy_statements[table.name] = composed.as_bytes(cur)
        return statement

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
        statement: sql.Composed | bytes,
        table: TableSpec,
        rows: Sequence[Row],
    ) -> None:
        if cur.connection.info.encoding == "utf-8":
            formatter = self._formatters.get(table.kind)
            if formatter is None:
                by_index = dict(self._conversions[table.kind])
                formatter = self._formatters[table.kind] = _CopyFormatter(table, by_index)
            with cur.copy(statement) as copy:
                formatter.write(copy, rows)
            return
        # another client encoding: psycopg's write_row encodes, formats and escapes; we
        # only turn our values into text first (ids, timestamps, JSON bytes, unsafe text)
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

    # what `scrapy ingest check` asks: on a connection of its own, so that it works before
    # open() and after open() failed on missing tables

    def _inspection(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(
                self._conninfo, connect_timeout=_CONNECT_TIMEOUT, autocommit=True
            )
        except psycopg.Error as exc:
            reason = redact_secrets_of(self._conninfo, str(exc)).strip()
            raise BackendUnavailable(
                f"cannot connect to PostgreSQL at {self.url}: {reason}"
            ) from None

    def schema_version(self) -> int | None:
        name = self._versions.name
        with self._inspection() as conn:
            quoted = sql.Identifier(name).as_string(conn)
            found = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [quoted]).fetchone()
            if not found or not found[0]:
                return None
            try:
                row = conn.execute(
                    sql.SQL("SELECT max(version) FROM {}").format(sql.Identifier(name))
                ).fetchone()
            except psycopg.errors.InsufficientPrivilege:
                raise SchemaError(
                    f"cannot read the table {name} in {self.url}: permission denied. Fix: "
                    f"GRANT SELECT ON {quoted} TO the role of the URL"
                ) from None
        return row[0] if row else None

    def check_privileges(self, tables: Sequence[TableSpec]) -> list[str]:
        """PostgreSQL's own answers (``has_table_privilege``, ``has_schema_privilege``,
        ``has_database_privilege``): SELECT, INSERT and UPDATE on each table, TEMPORARY on
        the database (batches written again go through temporary tables), a read-write
        connection; with ``create_tables``, CREATE on the schema (a crawl runs ``CREATE
        TABLE IF NOT EXISTS`` at start) and ownership of the tables (``CREATE INDEX IF NOT
        EXISTS``). Reads only."""
        with self._inspection() as conn:
            row = conn.execute(
                "SELECT current_user, current_schema(), current_database(), "
                "current_setting('transaction_read_only') = 'on' OR pg_is_in_recovery(), "
                "has_database_privilege(current_database(), 'TEMPORARY')"
            ).fetchone()
            assert row is not None
            user, schema, dbname, read_only, temporary = row
            role = sql.Identifier(user).as_string(conn)
            problems: list[str] = []
            if read_only:
                problems.append(
                    f"the connection to {self.url} is read-only (a standby server, or "
                    "default_transaction_read_only). Fix: connect to the primary server, or "
                    f"ALTER ROLE {role} SET default_transaction_read_only = off"
                )
            if schema is None:
                problems.append(
                    f"no schema of the search_path of role {user} exists in {self.url}. Fix: "
                    f"CREATE SCHEMA, or ALTER ROLE {role} SET search_path to one that exists"
                )
                return problems
            missing: list[str] = []
            not_owned: list[str] = []
            grants: dict[str, list[str]] = {}
            for table in dict.fromkeys(t.name for t in tables):
                quoted = sql.Identifier(table).as_string(conn)
                found = conn.execute(
                    "SELECT has_table_privilege(c.oid, 'SELECT'), "
                    "has_table_privilege(c.oid, 'INSERT'), has_table_privilege(c.oid, 'UPDATE'), "
                    "pg_has_role(c.relowner, 'USAGE') "
                    "FROM pg_class c WHERE c.oid = to_regclass(%s)",
                    [quoted],
                ).fetchone()
                if found is None:
                    missing.append(quoted)
                    continue
                privileges = ("SELECT", "INSERT", "UPDATE")
                denied = [p for p, ok in zip(privileges, found[:3], strict=True) if not ok]
                if denied:
                    grants.setdefault(" or ".join(denied), []).append(quoted)
                if not found[3]:
                    not_owned.append(quoted)
            for denied_text, names in grants.items():
                problems.append(
                    f"role {user} may not {denied_text} the table(s) "
                    f"{', '.join(names)}. Fix: GRANT SELECT, INSERT, UPDATE ON "
                    f"{', '.join(names)} TO {role}"
                )
            if not temporary:
                problems.append(
                    f"role {user} may not create temporary tables (a batch written again after "
                    f"a failure goes through one). Fix: GRANT TEMPORARY ON DATABASE "
                    f"{sql.Identifier(dbname).as_string(conn)} TO {role}"
                )
            problems += self._creation_problems(conn, user, schema, missing, not_owned)
        return problems

    def _creation_problems(
        self,
        conn: psycopg.Connection[Any],
        user: str,
        schema: str,
        missing: list[str],
        not_owned: list[str],
    ) -> list[str]:
        role = sql.Identifier(user).as_string(conn)
        if not self._create_tables:
            if not missing:
                return []
            return [
                f"the table(s) {', '.join(missing)} do not exist in {self.url}, and "
                "INGEST_CREATE_TABLES is False. Fix: run `scrapy ingest migrate`, or have a "
                "DBA run what `scrapy ingest migrate --sql` prints"
            ]
        problems = []
        row = conn.execute("SELECT has_schema_privilege(current_schema(), 'CREATE')").fetchone()
        if not (row and row[0]):
            what = f"creates {', '.join(missing)}" if missing else "runs CREATE TABLE IF NOT EXISTS"
            problems.append(
                f"with INGEST_CREATE_TABLES = True a crawl {what}, but role {user} may not "
                f"create tables in schema {schema}. Fix: GRANT CREATE ON SCHEMA "
                f"{sql.Identifier(schema).as_string(conn)} TO {role}, or "
                + (
                    "set INGEST_CREATE_TABLES = False (the tables are there)"
                    if not missing
                    else "run `scrapy ingest migrate` as a role that may, then set "
                    "INGEST_CREATE_TABLES = False"
                )
            )
        if not_owned:
            problems.append(
                f"with INGEST_CREATE_TABLES = True a crawl runs CREATE INDEX IF NOT EXISTS, "
                f"which only the owner of a table may, and role {user} does not own "
                f"{', '.join(not_owned)}. Fix: set INGEST_CREATE_TABLES = False (the tables "
                f"are there), or ALTER TABLE ... OWNER TO {role}"
            )
        return problems

    def classify(self, exc: BaseException) -> Failure:
        """By SQLSTATE (docs/reliability.md has the table); what is not known is transient."""
        state = self._sqlstate(exc)
        if state is None:
            return Failure.TRANSIENT
        if state == "23505":  # unique_violation
            return Failure.DUPLICATE
        # data exceptions, integrity violations, program limits (value too large)
        if state[:2] in ("22", "23", "54"):
            return Failure.DATA
        if state[:2] == "28" or state in _PERMANENT_STATES:
            return Failure.PERMANENT
        return Failure.TRANSIENT

    def _sqlstate(self, exc: BaseException) -> str | None:
        """The SQLSTATE of *exc*, or of the connection failure behind it.

        libpq keeps no SQLSTATE for an error the server sends while a connection starts
        (psycopg's OperationalError then has ``sqlstate`` None, and no ``diag``): only the
        server's message, which is matched against the few messages of a refusal there
        (in English, the server's default ``lc_messages``; any other stays transient). A
        PoolTimeout says only that no connection came: one connection attempt of our own
        finds out why (kept as the timeout's ``__cause__``, for :meth:`explain_refusal`).
        """
        if isinstance(exc, PoolTimeout):
            cause = exc.__cause__
            if cause is None:
                cause = exc.__cause__ = self._try_connect()
            return None if cause is None else self._sqlstate(cause)
        if not isinstance(exc, psycopg.Error):
            return None
        if exc.sqlstate:
            return exc.sqlstate
        if isinstance(exc, psycopg.OperationalError):
            message = str(exc)
            for pattern, state in _CONNECT_REFUSALS:
                if pattern.search(message):
                    return state
        return None

    def _try_connect(self) -> BaseException | None:
        # short: a server that does not answer at all is an outage, whatever the reason
        try:
            psycopg.connect(self._conninfo, connect_timeout=_DIAGNOSE_TIMEOUT).close()
        except psycopg.Error as exc:
            return exc
        self._renew_pool()
        return None

    def explain_refusal(  # noqa: PLR0911 - one return per kind of refusal
        self, exc: BaseException, *, creating: bool = False
    ) -> str:
        """The cause of a permanent failure and its fix, in plain words (no password)."""
        if isinstance(exc, PoolTimeout) and exc.__cause__ is not None:
            exc = exc.__cause__
        state = self._sqlstate(exc) or ""
        at_connect = isinstance(exc, psycopg.Error) and not exc.sqlstate
        params = psycopg.conninfo.conninfo_to_dict(self._conninfo)
        user = self._role or str(params.get("user") or _pgconn_text(exc, "user") or "?")
        database = str(params.get("dbname") or _pgconn_text(exc, "db") or user)
        schema = self._schema or "public"
        where = f"PostgreSQL at {self.url}"
        if state == "28P01":
            return (
                f"{where} refused the password of user {user!r}. Fix: correct the password "
                "in the database URL"
            )
        if state[:2] == "28":
            return (
                f"{where} does not let user {user!r} log in to database {database!r} (no "
                "such role, a role without LOGIN, or no pg_hba.conf entry for it). Fix: use a "
                "role that may log in, in the database URL"
            )
        if state in ("3D000", "57P04"):
            return (
                f"database {database!r} does not exist on {where}. Fix: create it "
                f"(CREATE DATABASE {_ident(database)}), or fix the database name in the URL"
            )
        if state == "3F000":
            return (
                f"a schema of the search path of user {user!r} does not exist in {where} "
                f"({describe_error(exc)}). Fix: create the schema, or fix the search path"
            )
        if state == "42501" and at_connect:
            return (
                f"role {user!r} may not connect to database {database!r} on {where}. Fix: "
                f"GRANT CONNECT ON DATABASE {_ident(database)} TO {_ident(user)}"
            )
        if state == "42501" and creating:
            return (
                f"role {user!r} may not create tables in schema {schema!r} of {where}. Fix: "
                f"GRANT CREATE ON SCHEMA {_ident(schema)} TO {_ident(user)}; or set "
                "INGEST_CREATE_TABLES = False and have a role that may run the DDL that "
                "`scrapy ingest migrate --sql` prints"
            )
        if state == "42501":
            tables = ", ".join(_ident(name) for name in self._tables)
            return (
                f"role {user!r} may not write the tables of this crawl in {where} "
                f"({describe_error(exc)}). Fix: GRANT SELECT, INSERT, UPDATE ON {tables} "
                f"TO {_ident(user)}"
            )
        if state in ("42P01", "42703"):
            return (
                f"a table or column of this crawl is missing in {where} "
                f"({describe_error(exc)}). Fix: run `scrapy ingest migrate` (or one crawl "
                "with INGEST_CREATE_TABLES = True); where that is not allowed, have a role "
                "that may run the DDL that `scrapy ingest migrate --sql` prints"
            )
        if state == "25006":
            return (
                f"{where} is read-only (a standby, or default_transaction_read_only is on). "
                "Fix: point the database URL at the primary server"
            )
        return f"{where} refuses this crawl ({describe_error(exc)}). Fix: see docs/reliability.md"

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

    def mark_crashed(
        self, table: TableSpec, stale_before: float, alive: str, crawl_id: str | None = None
    ) -> list[str]:
        assert self._pool is not None, "mark_crashed() before open()"
        query = sql.SQL(
            "UPDATE {} SET status = 'crashed', close_reason = 'crashed', "
            "finished_at = updated_at WHERE status = 'running' AND updated_at < %s "
            "AND job_id <> %s AND (%s::text IS NULL OR crawl_id = %s) RETURNING job_id"
        ).format(sql.Identifier(table.name))
        params = [utc_from_epoch(stale_before), alive, crawl_id, crawl_id]
        with self._pool.connection() as conn:
            return [row[0] for row in conn.execute(query, params)]

    def recent_jobs(
        self, table: TableSpec, *, running: bool, spider: str | None, limit: int
    ) -> list[dict[str, Any]]:
        assert self._pool is not None, "recent_jobs() before open()"
        columns = [
            sql.SQL("extract(epoch FROM {})::float8").format(sql.Identifier(c.name))
            if c.kind == "timestamp"
            else sql.Identifier(c.name)  # jsonb: psycopg decodes it
            for c in table.columns
        ]
        conditions: list[sql.Composable] = [sql.SQL("TRUE")]
        params: list[Any] = []
        if running:
            conditions.append(sql.SQL("status = 'running'"))
        if spider is not None:
            conditions.append(sql.SQL("spider = %s"))
            params.append(spider)
        query = sql.SQL(
            "SELECT {} FROM {} WHERE {} ORDER BY started_at DESC, job_id LIMIT %s"
        ).format(
            sql.SQL(", ").join(columns),
            sql.Identifier(table.name),
            sql.SQL(" AND ").join(conditions),
        )
        with self._pool.connection() as conn:
            rows = conn.execute(query, [*params, limit]).fetchall()
        return [dict(zip(table.column_names, row, strict=True)) for row in rows]

    def job_items(self, table: TableSpec, job_id: str) -> Iterator[str]:
        assert self._pool is not None, "job_items() before open()"
        query = sql.SQL(
            "SELECT data::text FROM {} WHERE job_id = %s ORDER BY scraped_at, {}"
        ).format(sql.Identifier(table.name), sql.Identifier(table.primary_key))
        # a server-side cursor: the job's items come _READ_ROWS at a time, never all at once
        with (
            self._pool.connection() as conn,
            conn.cursor(name="scrapy_ingest_job_items") as cursor,
        ):
            cursor.itersize = _READ_ROWS
            cursor.execute(query, [job_id])
            for (data,) in cursor:
                yield data

    # retention and DDL (scrapy ingest prune, migrate)

    def prune(self, table: TableSpec, older_than: float, *, batch_rows: int) -> Iterator[int]:
        """Each transaction picks the next *batch_rows* rows to go by primary key (after the
        last id of the one before, so each batch walks on through the index), locked ``FOR
        UPDATE SKIP LOCKED``: a row a crawl is writing (a keyed item seen again) is left for
        the next prune rather than waited for, and the crawl never waits long for the prune."""
        assert self._pool is not None, "prune() before open()"
        target, pk = sql.Identifier(table.name), sql.Identifier(table.primary_key)
        dated = sql.SQL(", ").join(map(sql.Identifier, retention_columns(table)))
        condition = sql.SQL("coalesce({}) < %(cutoff)s").format(dated)
        if table.kind == "jobs":
            condition += sql.SQL(" AND status = ANY(%(statuses)s)")
        params: dict[str, Any] = {
            "cutoff": utc_from_epoch(older_than),
            "statuses": list(PRUNED_JOB_STATUSES),
            "limit": batch_rows,
        }
        pick = sql.SQL(
            "SELECT {pk} FROM {t} WHERE {after}{cond} ORDER BY {pk} LIMIT %(limit)s "
            "FOR UPDATE SKIP LOCKED"
        )
        delete = sql.SQL("DELETE FROM {} WHERE {} = ANY(%(ids)s) AND {}").format(
            target, pk, condition
        )
        with self._pool.connection() as conn:
            with conn.transaction():
                found = conn.execute("SELECT to_regclass(%s)", [table.name]).fetchone()
            if not found or found[0] is None:
                return
            after: sql.Composable = sql.SQL("")
            while True:
                with conn.transaction():
                    query = pick.format(pk=pk, t=target, after=after, cond=condition)
                    ids = [row[0] for row in conn.execute(query, params)]
                    if not ids:
                        return
                    deleted = conn.execute(delete, {**params, "ids": ids}).rowcount
                yield deleted
                if len(ids) < batch_rows:
                    return
                after = sql.SQL("{} > %(last)s AND ").format(pk)
                params["last"] = ids[-1]

    def create_statements(self, tables: Sequence[TableSpec]) -> list[str]:
        """What :meth:`open` runs on an empty database; needs no connection."""
        versions = next(t for t in tables if t.kind == "schema_version")
        statements = [_create_table(t) for t in tables]
        statements += [s for t in tables for s in _index_statements(t)]
        statements.append(_version_row(versions))
        return [s.as_string(None) for s in statements]

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


#: SQLSTATEs no retry can heal (besides class 28, invalid authorization): docs/reliability.md
_PERMANENT_STATES = frozenset(
    {
        "3D000",  # invalid_catalog_name: the database does not exist
        "3F000",  # invalid_schema_name
        "42501",  # insufficient_privilege
        "42P01",  # undefined_table
        "42703",  # undefined_column
        "25006",  # read_only_sql_transaction (a standby)
        "57P04",  # database_dropped
    }
)

#: libpq's text for the refusals a server sends while a connection starts, where libpq keeps
#: no SQLSTATE (see PostgresBackend._sqlstate), and the SQLSTATE the server sent with it
_CONNECT_REFUSALS = tuple(
    (re.compile(pattern), state)
    for pattern, state in (
        (r"FATAL: +password authentication failed for user ", "28P01"),
        (r"FATAL: +no pg_hba\.conf entry for ", "28000"),
        (r"FATAL: +role \".*\" is not permitted to log in", "28000"),
        (r"FATAL: +role \".*\" does not exist", "28000"),
        (r"FATAL: +database \".*\" does not exist", "3D000"),
        (r"FATAL: +permission denied for database ", "42501"),
    )
)


def _pgconn_text(exc: BaseException, name: str) -> str | None:
    # a failed connection's FinishedPGconn keeps the user and database it asked for
    value = getattr(getattr(exc, "pgconn", None), name, None)
    return value.decode("utf-8", "replace") if isinstance(value, bytes) and value else None


def _ident(name: str) -> str:
    """*name* as an SQL identifier, quoted if it has to be (for the statements a fix names)."""
    if re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        return name
    return '"' + name.replace('"', '""') + '"'


def _copy_rows(cur: psycopg.Cursor[Any], table: sql.Identifier, rows: Sequence[Row]) -> None:
    with cur.copy(sql.SQL("COPY {} FROM STDIN").format(table)) as copy:
        for row in rows:
            copy.write_row(row)


# COPY text, formatted here rather than by psycopg's write_row: one bytes block per batch

#: COPY's text format: NULL, and the characters escaped in a value (psycopg escapes the same)
_NULL = "\\N"
_COPY_ESCAPES = str.maketrans(
    {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\v": "\\v", "\f": "\\f", "\r": "\\r", "\\": "\\\\"}
)
_COPY_SPECIAL_BYTES = (b"\\", b"\b", b"\t", b"\n", b"\v", b"\f", b"\r")
_COPY_DUMP_RE = re.compile(b"[\b\t\n\v\f\r\\\\]")
_COPY_DUMP = {
    b"\b": b"\\b",
    b"\t": b"\\t",
    b"\n": b"\\n",
    b"\v": b"\\v",
    b"\f": b"\\f",
    b"\r": b"\\r",
    b"\\": b"\\\\",
}
#: distinct texts whose COPY form a formatter keeps (job ids, spider names, item types...)
_TEXT_CACHE = 4096


def _plain_utf8(data: bytes) -> bool:
    """Whether *data* is what decoding it and encoding it again as UTF-8 gives (no NUL,
    which psycopg refuses in text)."""
    if b"\x00" in data:
        return False
    if data.isascii():
        return True
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _escape_all(data: bytes) -> bytes:
    return _COPY_DUMP_RE.sub(lambda m: _COPY_DUMP[m.group(0)], data)


def _escape_backslashes(data: bytes) -> bytes:
    return data.replace(b"\\", b"\\\\") if b"\\" in data else data


def _json_escape(data: bytes) -> Callable[[bytes], bytes] | None:
    """How JSON *data* (one row's, or a whole payload) must be escaped for COPY: not at all
    (orjson escapes every control character, so the usual case is none or backslashes only)."""
    if not any(special in data for special in _COPY_SPECIAL_BYTES[1:]):
        return _escape_backslashes if b"\\" in data else None
    return _escape_all


class _Texts(dict[Any, str]):
    """The COPY form of text values (:func:`safe_text`, escaped), kept for the values that
    come again (the job id, the spider, item types); a bounded number of them."""

    def __missing__(self, value: Any) -> str:
        text = safe_text(value)  # raises for what is not text, as it always did
        if not (text.isprintable() and "\\" not in text):
            text = text.translate(_COPY_ESCAPES)
        if len(self) < _TEXT_CACHE:
            self[value] = text
        return text


class _CopyFormatter:
    """Formats rows of one table kind as ``COPY ... FROM STDIN`` text, a block at a time.

    The loop over the rows is compiled once per table kind from its column kinds (like
    :mod:`dataclasses` compiles ``__init__``): one f-string per row and no call per
    column for the values of the expected types. Ids (ints) become 32 hex digits,
    timestamps are formatted inline exactly as :class:`TimestampFormatter` formats them,
    texts come from a cache of their COPY form, and each JSON document goes in as the bytes
    it is (escaped only when it holds a backslash). Anything else (a uuid given as text,
    an int timestamp, JSON that is not UTF-8) goes through :meth:`_dump`, which converts
    it as the row-by-row path did and dumps it with psycopg's own adapters, so the bytes
    sent are the ones ``copy.write_row`` would have sent.
    """

    def __init__(self, table: TableSpec, conversions: Mapping[int, Callable[[Any], Any]]) -> None:
        self._kinds = [column.kind for column in table.columns]
        self._conversions = conversions
        self._texts = _Texts()
        self._generic = self._compile(packed=False)
        self._packed = self._compile(packed=True) if self._kinds[-1] == "json" else None

    def write(self, copy: psycopg.Copy, rows: Sequence[Row]) -> None:
        """Write *rows* to *copy* (a COPY in text format, on a UTF-8 connection)."""
        transformer = Transformer.from_context(copy.cursor)

        def dump(index: int, value: Any) -> str:
            return self._dump(transformer, index, value)

        write = copy.write

        if isinstance(rows, Batch) and rows.payload is not None and self._packed is not None:
            payload = bytes(rows.payload)
            # each row's JSON is a slice of the payload, which goes in as it is when it is
            # UTF-8 without NUL (else each row is checked), escaped only as the payload needs
            if _plain_utf8(payload):
                escape = _json_escape(payload)
                self._packed(rows.packed_rows, payload, rows.start, escape, self._json, dump, write)
                return
            rows = rows.rows()
        self._generic(rows, self._json, dump, write)

    def _json(self, index: int, value: Any, dump: Callable[[int, Any], str]) -> bytes:
        """The COPY form of a JSON value: UTF-8 bytes go in as they are, escaped as needed."""
        if type(value) is bytes and _plain_utf8(value):
            escape = _json_escape(value)
            return value if escape is None else escape(value)
        return dump(index, value).encode()

    def _dump(self, transformer: abc.Transformer, index: int, value: Any) -> str:
        """*value*, converted as the row-by-row path converts it, dumped by psycopg."""
        convert = self._conversions.get(index)
        if convert is not None:
            value = convert(value)
        (dumped,) = transformer.dump_sequence([value], [PyFormat.TEXT])
        if dumped is None:
            return _NULL
        return _escape_all(bytes(dumped)).decode()

    def _compile(self, *, packed: bool) -> Callable[..., None]:
        """The loop that formats rows: generated from the column kinds only."""
        kinds = self._kinds
        names = [f"c{i}" for i in range(len(kinds))]
        body: list[str] = []
        segments: list[str] = []  # the f-string of the current text segment
        pieces: list[str] = []  # what is appended per row: encoded segments and JSON
        first: list[str] = []  # the previous values, before the first row
        for i, kind in enumerate(kinds):
            c, end = names[i], "\\n" if i == len(kinds) - 1 else "\\t"
            if kind == "json":
                if packed and i == len(kinds) - 1:
                    body += [f"j{i} = payload[start:{c}]", f"start = {c}"]
                    body += [f"if escape is not None: j{i} = escape(j{i})"]
                else:
                    body += [f"j{i} = NULLB if {c} is None else json({i}, {c}, dump)"]
                if segments:
                    pieces.append(_segment(segments))
                    segments = []
                pieces.append(f"j{i}")
                segments.append(end)
                continue
            segments.append(f"{{v{i}}}{end}")
            if kind == "timestamp":
                # TimestampFormatter's rounding, inline: for epoch >= 1, int() and the
                # subtraction are math.modf's whole and fraction, exactly
                body += [
                    f"if {c} is None: v{i} = NULL",
                    f"elif type({c}) is float and {c} >= 1.0:",
                    f"    w = int({c}); us = round(({c} - w) * 1e6)",
                    "    if us >= 1000000: w += 1; us -= 1000000",
                    "    if w != second: second = w; prefix = strftime(DATE, gmtime(w))",
                    f'    v{i} = f"{{prefix}}.{{D3[us // 1000]}}{{D3[us % 1000]}}+00:00"',
                    f"else: v{i} = dump({i}, {c})",
                ]
                continue
            # the same object as in the row before (pickle shares them: the job id, the
            # spider, the item type, the url of a page of many items, NULLs) is not
            # converted again
            first.append(f"p{i} = None; v{i} = NULL")
            body += [f"if {c} is not p{i}:", f"    p{i} = {c}; v{i} = {_value(kind, i)}"]
        if segments:
            pieces.append(_segment(segments))
        source = [
            f"def format_rows(rows, {'payload, start, escape, ' * packed}json, dump, write):",
            "    parts = []; size = 0; second = None; prefix = ''",
            *(f"    {line}" for line in first),
            f"    for {', '.join(names)}, in rows:",
            *(f"        {line}" for line in body),
            f"        parts += ({', '.join(pieces)},)",
            "        size += 1",
            "        if size == ROWS_PER_WRITE:",
            "            write(b''.join(parts)); parts = []; size = 0",
            "    if parts: write(b''.join(parts))",
        ]
        namespace: dict[str, Any] = {
            "NULL": _NULL,
            "NULLB": _NULL.encode(),
            "U128": 1 << 128,
            "D3": [f"{i:03d}" for i in range(1000)],
            "texts": self._texts,
            "strftime": time.strftime,
            "gmtime": time.gmtime,
            "DATE": "%Y-%m-%d %H:%M:%S",
            # about 100 kB of items a write: psycopg hands up to 128 kB to libpq at once
            "ROWS_PER_WRITE": 128,
        }
        exec("\n".join(source), namespace)  # from column kinds only: no outside text
        format_rows: Callable[..., None] = namespace["format_rows"]
        return format_rows


def _value(kind: ColumnKind, i: int) -> str:
    """The source of the COPY text of the value ``c<i>`` of a column of *kind*."""
    c = f"c{i}"
    if kind == "text":
        return f"NULL if {c} is None else texts[{c}]"
    if kind == "uuid":  # 32 hex digits, which PostgreSQL reads as a uuid
        fast = f"{c}.to_bytes(16, 'big').hex() if type({c}) is int and 0 <= {c} < U128"
    elif kind in ("int", "bigint"):
        fast = f"{c} if type({c}) is int"
    elif kind == "float":
        fast = f"repr({c}) if type({c}) is float and {c} - {c} == 0.0"
    elif kind == "bool":
        fast = f'("t" if {c} else "f") if type({c}) is bool'
    else:
        return f"NULL if {c} is None else dump({i}, {c})"
    return f"NULL if {c} is None else {fast} else dump({i}, {c})"


def _segment(parts: list[str]) -> str:
    """The source of one text segment of a row: encoded per row, or a constant."""
    text = "".join(parts)
    return f'f"{text}".encode()' if "{" in text else f'b"{text}"'


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
    for statement in _index_statements(table):
        conn.execute(statement)


def _index_statements(table: TableSpec) -> list[sql.Composed]:
    statements = [
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})").format(
            sql.Identifier(table.index_name(columns)),
            sql.Identifier(table.name),
            sql.SQL(", ").join(map(sql.Identifier, columns)),
        )
        for columns in table.indexes
    ]
    if table.unique:  # one row per key, among the rows that have one
        statements.append(
            sql.SQL("CREATE UNIQUE INDEX IF NOT EXISTS {} ON {} ({}) WHERE {} IS NOT NULL").format(
                sql.Identifier(table.index_name(table.unique)),
                sql.Identifier(table.name),
                sql.SQL(", ").join(map(sql.Identifier, table.unique)),
                sql.Identifier(table.unique[-1]),
            )
        )
    return statements


def _version_row(versions: TableSpec) -> sql.Composed:
    """The statement that records the current schema version."""
    return sql.SQL(
        "INSERT INTO {} (version, applied_at) VALUES ({}, now()) ON CONFLICT (version) DO NOTHING"
    ).format(sql.Identifier(versions.name), sql.Literal(SCHEMA_VERSION))


def _lock_key(name: str) -> int:
    digest = hashlib.blake2b(f"scrapy_ingest:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)
