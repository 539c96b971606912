"""SQLAlchemy Core backend: SQLite by default, MySQL and MariaDB, and on a best-effort basis
any other SQLAlchemy URL.

MySQL and MariaDB (``mysql+pymysql://user:password@host/db``, or ``mariadb+pymysql://``)
get ``JSON`` columns, ``DATETIME(6)`` in UTC, ``VARCHAR(255)`` for the text
columns that are indexed, ``utf8mb4``, and ``INSERT ... ON DUPLICATE KEY UPDATE``
on the id, so that a batch written twice stores its rows once (``INSERT
IGNORE`` would also silence bad values).

SQLite gets WAL journaling and a busy timeout, so several crawl processes can
share one file, and ``INSERT ... ON CONFLICT DO NOTHING``, so a batch written
twice stores its rows once. JSON is stored as text (``json_extract`` reads
it); timestamps as ISO 8601 text in UTC, which SQLite's date functions read.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import re
import sqlite3
import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.schema import CreateIndex, CreateTable

from scrapy_ingest._ids import format_uuid
from scrapy_ingest._redact import redact_text, redact_url
from scrapy_ingest._time import TimestampFormatter, utc_from_epoch
from scrapy_ingest.backends.base import (
    Failure,
    Row,
    is_same_job,
    log_migration,
    needs_migration,
    safe_text,
)
from scrapy_ingest.exceptions import BackendUnavailable, SchemaError
from scrapy_ingest.schema import SCHEMA_VERSION, TABLE_KINDS, table_spec

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from scrapy_ingest.schema import ColumnKind, TableSpec

logger = logging.getLogger(__name__)

_BUSY_TIMEOUT_MS = 30_000


class _JsonText(sa.types.UserDefinedType[str]):
    """A ``JSON`` column that takes our JSON text as it is (SQLAlchemy's JSON would encode it
    again)."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "JSON"


def _sa_type(kind: ColumnKind, indexed: bool) -> sa.types.TypeEngine[Any]:
    types: dict[ColumnKind, sa.types.TypeEngine[Any]] = {
        "uuid": sa.String(36),
        # MySQL indexes no TEXT column without a prefix length
        "text": sa.Text().with_variant(mysql.VARCHAR(255), "mysql", "mariadb")
        if indexed
        else sa.Text(),
        "int": sa.Integer(),
        "bigint": sa.BigInteger(),
        "float": sa.Float().with_variant(mysql.DOUBLE(), "mysql", "mariadb"),
        "bool": sa.Boolean(),
        # text in SQLite, so that the offset is kept and date functions read it
        "timestamp": sa.DateTime(timezone=True)
        .with_variant(sa.String(32), "sqlite")
        .with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb"),
        "json": sa.Text().with_variant(_JsonText(), "mysql", "mariadb"),
    }
    return types[kind]


class SqlAlchemyBackend:
    threads = 1  # SQLite takes one writer at a time anyway

    def __init__(self, url: str, tables: Sequence[TableSpec], *, create_tables: bool) -> None:
        # mysql:// and mariadb:// with no driver: PyMySQL, which the [mysql] extra installs
        self._url = re.sub(r"^(mysql|mariadb)://", r"\1+pymysql://", url)
        self.url = redact_url(url)
        self._versions = next(t for t in tables if t.kind == "schema_version")
        self._create_tables = create_tables
        self._metadata = sa.MetaData()
        #: by table name
        self._tables = {t.name: self._sa_table(t) for t in tables}
        self._engine: sa.Engine | None = None
        self._format_ts = TimestampFormatter()
        self._converters: dict[str, list[Callable[[Any], Any]]] = {}

    def _sa_table(self, spec: TableSpec) -> sa.Table:
        table = sa.Table(
            spec.name,
            self._metadata,
            *(
                sa.Column(
                    c.name,
                    _sa_type(
                        c.kind,
                        indexed=any(c.name in i for i in spec.indexes)
                        or c.name == spec.primary_key,
                    ),
                    primary_key=c.name == spec.primary_key,
                    nullable=c.nullable,
                    autoincrement=False,
                )
                for c in spec.columns
            ),
        )
        for columns in spec.indexes:
            sa.Index(spec.index_name(columns), *(table.c[name] for name in columns))
        return table

    # lifecycle

    def open(self) -> None:
        is_sqlite = self._url.startswith("sqlite")
        connect_args: dict[str, Any] = {}
        if is_sqlite:
            connect_args["check_same_thread"] = False
        elif self._url.startswith(("mysql", "mariadb")):
            connect_args["charset"] = "utf8mb4"  # all of Unicode, not MySQL's 3-byte utf8
        engine = sa.create_engine(self._url, connect_args=connect_args, pool_pre_ping=not is_sqlite)
        if is_sqlite:
            event.listen(engine, "connect", _sqlite_pragmas)
            event.listen(engine, "begin", _begin_immediate)
        self._engine = engine
        # by kind: tables of one kind have the same columns, whatever their name
        self._converters = {
            kind: [
                self._converter(c.kind, engine.dialect.name) for c in table_spec(kind, "").columns
            ]
            for kind in TABLE_KINDS
        }
        try:
            with engine.begin() as conn:
                self._prepare_schema(conn)
        except sa.exc.OperationalError as exc:
            raise BackendUnavailable(
                f"cannot open the database at {self.url}: {redact_text(str(exc.orig))}"
            ) from None

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def _prepare_schema(self, conn: sa.Connection) -> None:
        versions = self._tables[self._versions.name]
        if self._create_tables:
            for table in self._tables.values():
                conn.execute(CreateTable(table, if_not_exists=True))
                for index in sorted(table.indexes, key=lambda i: str(i.name)):
                    conn.execute(CreateIndex(index, if_not_exists=True))
        elif not sa.inspect(conn).has_table(versions.name):
            raise SchemaError(
                f"the table {versions.name} does not exist in {self.url}. Fix: set "
                "INGEST_CREATE_TABLES = True once, or create the tables as docs/tables.md shows."
            )
        current = conn.execute(sa.select(sa.func.max(versions.c.version))).scalar()
        if not needs_migration(current, self.url, create_tables=self._create_tables):
            return
        if current is not None:
            self._add_missing_columns(conn)
        row = self._convert_values(
            self._versions,
            {"version": SCHEMA_VERSION, "applied_at": time.time()},
        )
        conn.execute(self._insert_ignoring_duplicates(versions, conn.dialect.name), [row])
        if current is not None:
            log_migration(self.url, current)

    def _add_missing_columns(self, conn: sa.Connection) -> None:
        inspector = sa.inspect(conn)
        preparer = conn.dialect.identifier_preparer
        for table in self._tables.values():
            found = {column["name"] for column in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in found:
                    kind = column.type.compile(dialect=conn.dialect)
                    conn.execute(
                        sa.text(
                            f"ALTER TABLE {preparer.quote(table.name)} "
                            f"ADD COLUMN {preparer.quote(column.name)} {kind}"
                        )
                    )

    def create_table(self, table: TableSpec) -> None:
        """Create *table* (a table a custom route names) and its indexes, if missing."""
        assert self._engine is not None, "create_table() before open()"
        sa_table = self._tables.get(table.name)
        if sa_table is None:
            sa_table = self._tables[table.name] = self._sa_table(table)
        if not self._create_tables:
            return
        with self._engine.begin() as conn:
            conn.execute(CreateTable(sa_table, if_not_exists=True))
            for index in sorted(sa_table.indexes, key=lambda i: str(i.name)):
                conn.execute(CreateIndex(index, if_not_exists=True))

    # writing

    def write(self, table: TableSpec, rows: Sequence[Row], *, idempotent: bool) -> None:
        assert self._engine is not None, "write() before open()"
        sa_table = self._tables[table.name]
        names = table.column_names
        converters = self._converters[table.kind]
        params = [
            {n: conv(v) for n, conv, v in zip(names, converters, row, strict=True)} for row in rows
        ]
        dialect = self._engine.dialect.name
        with self._engine.begin() as conn:
            if dialect in ("sqlite", "mysql", "mariadb") or not idempotent:
                conn.execute(self._insert_ignoring_duplicates(sa_table, dialect), params)
                return
            # no portable "skip existing": insert row by row, skipping ids that exist
            for param in params:
                with conn.begin_nested(), contextlib.suppress(sa.exc.IntegrityError):
                    conn.execute(sa_table.insert(), [param])

    @staticmethod
    def _insert_ignoring_duplicates(table: sa.Table, dialect: str) -> sa.Insert:
        if dialect == "sqlite":
            return sqlite.insert(table).on_conflict_do_nothing()
        if dialect in ("mysql", "mariadb"):
            statement = mysql.insert(table)
            key = table.primary_key.columns[0]
            return statement.on_duplicate_key_update({key.name: key})
        return table.insert()

    def _converter(self, kind: ColumnKind, dialect: str) -> Callable[[Any], Any]:
        if kind == "json":
            return lambda v: None if v is None else v.decode()
        if kind == "uuid":
            return lambda v: None if v is None else format_uuid(v)
        if kind == "timestamp":
            if dialect == "sqlite":
                fmt: Callable[[float], Any] = self._format_ts
            elif dialect in ("mysql", "mariadb"):
                fmt = _naive_utc  # DATETIME has no time zone: UTC, by convention
            else:
                fmt = utc_from_epoch
            return lambda v: None if v is None else fmt(v)
        if kind == "text" and dialect in ("mysql", "mariadb"):
            return lambda v: None if v is None else safe_text(v)
        return _identity

    def _convert_values(self, table: TableSpec, values: Mapping[str, Any]) -> dict[str, Any]:
        converters = dict(zip(table.column_names, self._converters[table.kind], strict=True))
        return {name: converters[name](value) for name, value in values.items()}

    def classify(self, exc: BaseException) -> Failure:
        if isinstance(exc, sa.exc.IntegrityError):
            duplicate = "UNIQUE" in str(exc.orig) or "Duplicate entry" in str(exc.orig)
            return Failure.DUPLICATE if duplicate else Failure.DATA
        if isinstance(exc, sa.exc.OperationalError):
            return Failure.TRANSIENT
        if isinstance(exc, (sa.exc.DataError, sa.exc.StatementError, ValueError, OverflowError)):
            return Failure.DATA
        return Failure.TRANSIENT

    # jobs

    def insert_job(self, table: TableSpec, row: Mapping[str, Any]) -> bool:
        assert self._engine is not None, "insert_job() before open()"
        jobs = self._tables[table.name]
        try:
            with self._engine.begin() as conn:
                conn.execute(jobs.insert(), [self._convert_values(table, row)])
        except sa.exc.IntegrityError:
            with self._engine.connect() as conn:
                found = conn.execute(
                    sa.select(jobs.c.hostname, jobs.c.pid, jobs.c.started_at).where(
                        jobs.c.job_id == row["job_id"]
                    )
                ).first()
            return found is not None and is_same_job(row, found[0], found[1], _epoch(found[2]))
        return True

    def update_job(
        self, table: TableSpec, job_id: str, values: Mapping[str, Any], *, only_running: bool
    ) -> None:
        assert self._engine is not None, "update_job() before open()"
        jobs = self._tables[table.name]
        stmt = jobs.update().where(jobs.c.job_id == job_id)
        if only_running:
            stmt = stmt.where(jobs.c.status == "running")
        with self._engine.begin() as conn:
            conn.execute(stmt.values(self._convert_values(table, values)))

    def mark_crashed(self, table: TableSpec, stale_before: float) -> list[str]:
        assert self._engine is not None, "mark_crashed() before open()"
        jobs = self._tables[table.name]
        stale = self._convert_values(table, {"updated_at": stale_before})["updated_at"]
        running = (jobs.c.status == "running") & (jobs.c.updated_at < stale)
        with self._engine.begin() as conn:
            ids = [row[0] for row in conn.execute(sa.select(jobs.c.job_id).where(running))]
            if ids:
                conn.execute(
                    jobs.update()
                    .where(running & jobs.c.job_id.in_(ids))
                    .values(status="crashed", close_reason="crashed", finished_at=jobs.c.updated_at)
                )
        return ids


def _epoch(value: Any) -> float:
    """A stored timestamp (ISO text in SQLite, a datetime elsewhere) as epoch seconds."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:  # databases that drop the offset keep UTC
        value = value.replace(tzinfo=dt.timezone.utc)
    return float(value.timestamp())


def _switch_to_wal(cursor: Any) -> None:
    """Put the file in WAL mode (it stays so); retried while another connection holds it.

    Switching a new file to WAL needs it to itself, and SQLite answers "database
    is locked" at once, without the busy timeout, while another connection
    (another crawler opening the same new file) holds a lock.
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
        else:
            return


def _begin_immediate(conn: sa.Connection) -> None:
    """Take SQLite's write lock when a transaction begins, waiting up to the busy timeout.

    Every transaction of ours writes. A deferred one (the sqlite3 module's
    default) that reads first and then writes, while another connection does
    the same, gets "database is locked" at once instead of waiting: SQLite
    cannot let both upgrade to a write lock. Two crawlers opening one file at
    the same moment hit exactly that while preparing the tables.
    """
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _naive_utc(epoch: float) -> dt.datetime:
    return utc_from_epoch(epoch).replace(tzinfo=None)


def _identity(value: Any) -> Any:
    return value


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    # transactions are begun by _begin_immediate, not by the sqlite3 module
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
    _switch_to_wal(cursor)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
