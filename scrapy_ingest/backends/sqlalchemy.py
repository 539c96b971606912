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

Keyed items (``INGEST_ITEM_KEYS``) are upserted in the transaction of their
batch, as :func:`~scrapy_ingest.backends.base.plan_upsert` says: the current
rows of the batch's keys are read (``SELECT ... FOR UPDATE`` in key order on
MySQL; SQLite's ``BEGIN IMMEDIATE`` transactions run one at a time anyway), new
keys are inserted, replaced versions copied to the history table, changed rows
updated and the ``last_seen_at`` of unchanged ones moved. A unique index on
``(item_type, item_key)`` (partial, ``WHERE item_key IS NOT NULL``, in SQLite)
makes a key that another process inserted meanwhile fail the insert; the batch
is then written again and finds that row. On MySQL and MariaDB:

- ``item_key`` is ``VARCHAR(255)`` with the ``utf8mb4_bin`` collation (an index
  needs a bounded column; keys compare case- and accent-sensitively, as
  elsewhere). A longer key is stored as its first 222 characters, ``~`` and 32
  hex digits of its BLAKE2b hash (:func:`_bounded_key`), so that it still
  identifies the item; query such items by their ``data``, not their full key.
- ``utf8mb4_bin`` ignores trailing spaces, and ``item_type`` keeps the table's
  (usually case-insensitive) collation: two keys that only differ that way
  would be one row to the database, so the later item goes to the dead-letter
  table with the reason (:class:`ItemKeyConflict`).
- Two writers inserting the same new keys at once may deadlock on InnoDB's gap
  locks; InnoDB rolls one back, and its batch is retried.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import re
import sqlite3
import time
from typing import TYPE_CHECKING, Any, TypeVar

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
    StoredItem,
    is_same_job,
    log_migration,
    needs_migration,
    plan_upsert,
    safe_text,
    split_keyed,
)
from scrapy_ingest.exceptions import BackendUnavailable, SchemaError
from scrapy_ingest.schema import SCHEMA_VERSION, TABLE_KINDS, table_spec

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

    from scrapy_ingest.schema import ColumnKind, TableSpec

logger = logging.getLogger(__name__)

_V = TypeVar("_V")

_BUSY_TIMEOUT_MS = 30_000
#: keys per lookup of stored items, and rows per last_seen_at update: well under the 999
#: parameters of old SQLite versions
_KEYS_PER_QUERY = 500
_TOUCHES_PER_QUERY = 300
#: the column of an item's key
_KEY_COLUMN = "item_key"
#: the longest item key MySQL and MariaDB store as it is (the length of its VARCHAR)
_MYSQL_KEY_LENGTH = 255
_KEY_HASH_DIGITS = 32


class ItemKeyConflict(ValueError):
    """Two different item keys that the database compares as equal (MySQL's collations).

    A ValueError, so that the writer takes it for a refused value: the batch is split
    until the item is alone, and that item goes to the dead-letter table.
    """


class _JsonText(sa.types.UserDefinedType[str]):
    """A ``JSON`` column that takes our JSON text as it is (SQLAlchemy's JSON would encode it
    again)."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "JSON"


def _sa_type(kind: ColumnKind, indexed: bool, *, exact: bool = False) -> sa.types.TypeEngine[Any]:
    """The column type of *kind*; *indexed*: in an index (MySQL needs a bounded type then);
    *exact*: compared byte for byte on MySQL too, not by its case-insensitive collation
    (item keys, see :func:`_bounded_key` for the longer ones)."""
    mysql_text = (
        mysql.VARCHAR(_MYSQL_KEY_LENGTH, charset="utf8mb4", collation="utf8mb4_bin")
        if exact
        else mysql.VARCHAR(255)
    )
    types: dict[ColumnKind, sa.types.TypeEngine[Any]] = {
        "uuid": sa.String(36),
        # MySQL indexes no TEXT column without a prefix length
        "text": sa.Text().with_variant(mysql_text, "mysql", "mariadb") if indexed else sa.Text(),
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
    json_as_text = False

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
                        or c.name in spec.unique
                        or c.name == spec.primary_key,
                        exact=c.name == _KEY_COLUMN,
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
        if spec.unique:
            # among the rows that have a key: MySQL's unique indexes skip NULLs anyway
            keyed = table.c[spec.unique[-1]].is_not(None)
            sa.Index(
                spec.index_name(spec.unique),
                *(table.c[name] for name in spec.unique),
                unique=True,
                sqlite_where=keyed,
                postgresql_where=keyed,
                mssql_where=keyed,
            )
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
        elif not sa.inspect(conn).has_table(versions.name):
            raise SchemaError(
                f"the table {versions.name} does not exist in {self.url}. Fix: set "
                "INGEST_CREATE_TABLES = True once, or create the tables as docs/tables.md shows."
            )
        current = conn.execute(sa.select(sa.func.max(versions.c.version))).scalar()
        migrate = needs_migration(current, self.url, create_tables=self._create_tables)
        if migrate and current is not None:
            self._add_missing_columns(conn)
        if self._create_tables:  # after the columns they index (schema version 3's item_key)
            for table in self._tables.values():
                _create_indexes(conn, table)
        if not migrate:
            return
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
            _create_indexes(conn, sa_table)

    # writing

    def write(
        self, table: TableSpec, rows: Sequence[Row], *, idempotent: bool
    ) -> dict[str, list[int]] | None:
        assert self._engine is not None, "write() before open()"
        rows, keyed = split_keyed(table, rows)
        sa_table = self._tables[table.name]
        with self._engine.begin() as conn:
            if rows:
                self._insert(conn, table, sa_table, rows, idempotent=idempotent)
            if keyed:
                return self._upsert(conn, table, sa_table, keyed)
        return None

    def _insert(
        self,
        conn: sa.Connection,
        table: TableSpec,
        sa_table: sa.Table,
        rows: Sequence[Row],
        *,
        idempotent: bool,
    ) -> None:
        params = self._params(table, rows)
        dialect = conn.dialect.name
        if dialect in ("sqlite", "mysql", "mariadb") or not idempotent:
            conn.execute(self._insert_ignoring_duplicates(sa_table, dialect), params)
            return
        # no portable "skip existing": insert row by row, skipping ids that exist
        for param in params:
            with conn.begin_nested(), contextlib.suppress(sa.exc.IntegrityError):
                conn.execute(sa_table.insert(), [param])

    def _params(self, table: TableSpec, rows: Sequence[Row]) -> list[dict[str, Any]]:
        """*rows* as statement parameters, their values converted for the database."""
        names = table.column_names
        converters = self._converters[table.kind]
        return [
            {n: conv(v) for n, conv, v in zip(names, converters, row, strict=True)} for row in rows
        ]

    def _upsert(
        self, conn: sa.Connection, table: TableSpec, sa_table: sa.Table, rows: Sequence[Row]
    ) -> dict[str, list[int]]:
        """Store keyed items as :func:`plan_upsert` says, in the transaction of *conn*; return
        the new / changed / unchanged counts by item type."""
        if conn.dialect.name in ("mysql", "mariadb"):
            rows = _keys_for_mysql(table, rows)
        stored, last_seen = self._stored_items(conn, table, sa_table, rows)
        plan = plan_upsert(table, rows, stored)
        pk = sa_table.c[table.primary_key]
        if plan.inserts:
            # a plain insert: a key inserted meanwhile by another process must fail here
            # (Failure.DUPLICATE), so that the batch is written again and finds its row
            conn.execute(sa_table.insert(), self._params(table, plan.inserts))
        history = table.history
        if history is not None and (plan.archive or plan.archive_rows):
            versions = self._tables[history.name]
            names = table.column_names
            # the versions being replaced, copied before they are (once: the batch may be
            # written again after a commit whose answer was lost)
            for ids in _chunks([found.id for found in plan.archive], _KEYS_PER_QUERY):
                copied = sa.select(*(sa_table.c[name] for name in names)).where(
                    pk.in_(ids),
                    ~sa.exists().where(versions.c[history.primary_key] == pk),
                )
                conn.execute(versions.insert().from_select(names, copied))
            if plan.archive_rows:
                self._insert(conn, history, versions, plan.archive_rows, idempotent=True)
        if plan.replaces:
            params = self._params(table, [row for _, row in plan.replaces])
            for (found, _), param in zip(plan.replaces, params, strict=True):
                param["stored_id"] = found.id
            conn.execute(sa_table.update().where(pk == sa.bindparam("stored_id")), params)
        # last_seen_at only moves forward (a batch replayed from the spill journal is older)
        convert = self._converters[table.kind][table.position("last_seen_at")]
        touches = [
            (found.id, convert(seen))
            for found, seen in plan.touches
            if (before := last_seen[found.id]) is None or seen > before
        ]
        for chunk in _chunks(touches, _TOUCHES_PER_QUERY):
            conn.execute(
                sa_table.update()
                .where(pk.in_([id_ for id_, _ in chunk]))
                .values(last_seen_at=sa.case(dict(chunk), value=pk))
            )
        return plan.changes

    def _stored_items(
        self, conn: sa.Connection, table: TableSpec, sa_table: sa.Table, rows: Sequence[Row]
    ) -> tuple[dict[tuple[str, str], StoredItem], dict[Any, float | None]]:
        """The current row of each key of *rows* (locked on MySQL, in key order so that two
        writers queue rather than deadlock), and the ``last_seen_at`` of each by id."""
        type_at, key_at = table.position("item_type"), table.position(_KEY_COLUMN)
        wanted = {(row[type_at], row[key_at]) for row in rows}
        by_type: dict[str, list[str]] = {}
        for item_type, key in sorted(wanted):
            by_type.setdefault(item_type, []).append(key)
        c = sa_table.c
        columns = (
            c[table.primary_key],
            c.item_type,
            c.item_key,
            c.content_hash,
            c.version,
            c.first_seen_at,
            c.last_seen_at,
        )
        stored: dict[tuple[str, str], StoredItem] = {}
        last_seen: dict[Any, float | None] = {}
        for item_type, keys in by_type.items():
            for chunk in _chunks(keys, _KEYS_PER_QUERY):
                query = (
                    sa.select(*columns)
                    .where(c.item_type == item_type, c.item_key.in_(chunk))
                    .order_by(c.item_key)
                    .with_for_update()
                )
                for id_, found_type, key, content_hash, version, first, last in conn.execute(query):
                    if (found_type, key) not in wanted:
                        # the database's collation matched a key of the batch that differs
                        raise self._conflict(found_type, key, [(item_type, k) for k in chunk])
                    # NULL (a row not written by scrapy-ingest) stays NULL, as in PostgreSQL
                    first_seen: Any = None if first is None else _epoch(first)
                    stored[found_type, key] = StoredItem(id_, content_hash, version, first_seen)
                    last_seen[id_] = None if last is None else _epoch(last)
        return stored, last_seen

    def _conflict(
        self, stored_type: str, stored_key: str, asked: Sequence[tuple[str, str]]
    ) -> ItemKeyConflict:
        """The error for a stored key that the database found for another key in *asked*."""
        form = _mysql_form(stored_type, stored_key)
        item_type, key = next((k for k in asked if _mysql_form(*k) == form), asked[0])
        return ItemKeyConflict(
            f"the key {key!r} of a {item_type} item and the stored key {stored_key!r} of a "
            f"{stored_type} item " + _CONFLICT.format(where=f"the database at {self.url}")
        )

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
        self, table: TableSpec, job_id: str, values: Mapping[str, Any], *, unless_finished: bool
    ) -> None:
        assert self._engine is not None, "update_job() before open()"
        jobs = self._tables[table.name]
        stmt = jobs.update().where(jobs.c.job_id == job_id)
        if unless_finished:
            stmt = stmt.where(jobs.c.status != "finished")
        with self._engine.begin() as conn:
            conn.execute(stmt.values(self._convert_values(table, values)))

    def mark_crashed(self, table: TableSpec, stale_before: float, alive: str) -> list[str]:
        assert self._engine is not None, "mark_crashed() before open()"
        jobs = self._tables[table.name]
        stale = self._convert_values(table, {"updated_at": stale_before})["updated_at"]
        running = (
            (jobs.c.status == "running") & (jobs.c.updated_at < stale) & (jobs.c.job_id != alive)
        )
        with self._engine.begin() as conn:
            ids = [row[0] for row in conn.execute(sa.select(jobs.c.job_id).where(running))]
            if ids:
                conn.execute(
                    jobs.update()
                    .where(running & jobs.c.job_id.in_(ids))
                    .values(status="crashed", close_reason="crashed", finished_at=jobs.c.updated_at)
                )
        return ids


#: why two keys are one, for MySQL and MariaDB (and any database whose collations are as lax)
_CONFLICT = (
    "are one key to {where}, whose collations ignore trailing spaces (utf8mb4_bin, that of "
    "item keys) and case (the default one, that of item types). Fix: make keys differ by more "
    "than that (e.g. strip the key fields in the spider), and item class names by more than "
    "case"
)


def _keys_for_mysql(table: TableSpec, rows: Sequence[Row]) -> list[Row]:
    """*rows* with their item type and key as MySQL and MariaDB store them (:func:`safe_text`,
    and :func:`_bounded_key` for the key), so that the stored rows are found by them.

    Raise :class:`ItemKeyConflict` for two keys of the batch that these databases compare
    as equal though they differ: both would be inserted, and the unique index would refuse
    the second one on every attempt.
    """
    type_at, key_at = table.position("item_type"), table.position(_KEY_COLUMN)
    first_of: dict[tuple[str, str], tuple[str, str]] = {}
    stored: list[Row] = []
    for row in rows:
        item_type, key = safe_text(row[type_at]), _bounded_key(safe_text(row[key_at]))
        first = first_of.setdefault(_mysql_form(item_type, key), (item_type, key))
        if first != (item_type, key):
            raise ItemKeyConflict(
                f"the key {key!r} of a {item_type} item and the key {first[1]!r} of a "
                f"{first[0]} item of the same batch " + _CONFLICT.format(where="MySQL and MariaDB")
            )
        if item_type == row[type_at] and key == row[key_at]:
            stored.append(row)
        else:
            changed = list(row)
            changed[type_at], changed[key_at] = item_type, key
            stored.append(tuple(changed))
    return stored


def _mysql_form(item_type: str, key: str) -> tuple[str, str]:
    """What MySQL and MariaDB compare of an item type (default collation: case-insensitive)
    and an item key (``utf8mb4_bin``): both without trailing spaces (``PAD SPACE``)."""
    return item_type.casefold().rstrip(" "), key.rstrip(" ")


def _bounded_key(key: str) -> str:
    """*key*, or for one longer than MySQL's ``VARCHAR(255)`` its first 222 characters, ``~``
    and 32 hex digits of its BLAKE2b hash: 255 characters that still identify the item."""
    if len(key) <= _MYSQL_KEY_LENGTH:
        return key
    digest = hashlib.blake2b(key.encode(), digest_size=_KEY_HASH_DIGITS // 2).hexdigest()
    return f"{key[: _MYSQL_KEY_LENGTH - _KEY_HASH_DIGITS - 1]}~{digest}"


def _chunks(values: Sequence[_V], size: int) -> Iterator[Sequence[_V]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _create_indexes(conn: sa.Connection, table: sa.Table) -> None:
    """Create the missing indexes of *table*.

    MySQL, unlike MariaDB and SQLite, has no ``CREATE INDEX IF NOT EXISTS``: it is asked
    which indexes exist instead.
    """
    indexes = sorted(table.indexes, key=lambda i: str(i.name))
    dialect = conn.dialect
    if dialect.name in ("mysql", "mariadb") and not getattr(dialect, "is_mariadb", False):
        found = {index["name"] for index in sa.inspect(conn).get_indexes(table.name)}
        for index in indexes:
            if index.name not in found:
                conn.execute(CreateIndex(index))
        return
    for index in indexes:
        conn.execute(CreateIndex(index, if_not_exists=True))


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
