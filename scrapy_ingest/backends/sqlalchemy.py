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
batch, as :func:`~scrapy_ingest.backends._upsert.plan_upsert` says: the current
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
import importlib
import json
import logging
import os
import re
import sqlite3
import time
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.schema import CreateIndex, CreateTable

from scrapy_ingest._ids import format_uuid
from scrapy_ingest._redact import redact_text, redact_url
from scrapy_ingest._time import TimestampFormatter, utc_from_epoch
from scrapy_ingest.backends._retry import add_changes
from scrapy_ingest.backends._upsert import StoredItem, plan_upsert, split_keyed
from scrapy_ingest.backends.base import (
    PRUNED_JOB_STATUSES,
    Failure,
    describe_error,
    is_same_job,
    log_migration,
    needs_migration,
    retention_columns,
    safe_text,
)
from scrapy_ingest.exceptions import BackendRefused, BackendUnavailable, SchemaError
from scrapy_ingest.schema import SCHEMA_VERSION, TABLE_KINDS, table_spec

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

    from scrapy_ingest._shapes import Row
    from scrapy_ingest.schema import ColumnKind, TableSpec

logger = logging.getLogger(__name__)

_V = TypeVar("_V")

_BUSY_TIMEOUT_MS = 30_000
#: keys per lookup of stored items, and rows per last_seen_at update: well under the 999
#: parameters of old SQLite versions
_KEYS_PER_QUERY = 500
_TOUCHES_PER_QUERY = 300
#: rows fetched at a time by the reads of the ``scrapy ingest`` commands (job_items)
_READ_ROWS = 1000
#: the column of an item's key
_KEY_COLUMN = "item_key"
#: the longest item key MySQL and MariaDB store as it is (the length of its VARCHAR)
_MYSQL_KEY_LENGTH = 255
_KEY_HASH_DIGITS = 32
#: the dialects whose unique index on the item key leaves out the rows without a key
_PARTIAL_INDEXES = frozenset({"sqlite", "postgresql", "mssql"})


class ItemKeyConflict(ValueError):
    """Two different item keys that the database compares as equal (MySQL's collations).

    A ValueError, so that the writer takes it for a refused value: the batch is split
    until the item is alone, and that item goes to the dead-letter table.
    """


class PacketTooLarge(ValueError):
    """A row larger than MySQL's or MariaDB's ``max_allowed_packet`` takes in one statement.

    Raised before the row is sent (the server would drop the connection); a ValueError, so
    that the row goes to the dead-letter table with the reason and the rest of its batch is
    stored.
    """


class _JsonText(sa.types.UserDefinedType[str]):
    """A ``JSON`` column that takes our JSON text as it is (SQLAlchemy's JSON would encode it
    again)."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "JSON"


def _sa_type(
    kind: ColumnKind, indexed: bool, *, exact: bool = False, mysql: bool = False
) -> sa.types.TypeEngine[Any]:
    """The column type of *kind*; *indexed*: in an index (MySQL needs a bounded type then);
    *exact*: compared byte for byte on MySQL too, not by its case-insensitive collation
    (item keys, see :func:`_bounded_key` for the longer ones); *mysql*: with the types MySQL
    and MariaDB take (their dialect, imported only then, costs a SQLite crawl's start)."""
    types: dict[ColumnKind, sa.types.TypeEngine[Any]] = {
        "uuid": sa.String(36),
        "text": sa.Text(),
        "int": sa.Integer(),
        "bigint": sa.BigInteger(),
        "float": sa.Float(),
        "bool": sa.Boolean(),
        # text in SQLite, so that the offset is kept and date functions read it
        "timestamp": sa.DateTime(timezone=True).with_variant(sa.String(32), "sqlite"),
        "json": sa.Text(),
    }
    if not mysql:
        return types[kind]
    from sqlalchemy.dialects import mysql as dialect

    text = (
        dialect.VARCHAR(_MYSQL_KEY_LENGTH, charset="utf8mb4", collation="utf8mb4_bin")
        if exact
        else dialect.VARCHAR(255)
    )
    variants: dict[ColumnKind, sa.types.TypeEngine[Any]] = {
        "float": dialect.DOUBLE(),
        "timestamp": dialect.DATETIME(fsp=6),
        "json": _JsonText(),
    }
    if indexed:
        variants["text"] = text  # MySQL indexes no TEXT column without a prefix length
    variant = variants.get(kind)
    return types[kind] if variant is None else types[kind].with_variant(variant, "mysql", "mariadb")


class SqlAlchemyBackend:
    threads = 1  # SQLite takes one writer at a time anyway
    json_as_text = False
    takes_batches = False

    def __init__(self, url: str, tables: Sequence[TableSpec], *, create_tables: bool) -> None:
        # mysql:// and mariadb:// with no driver: PyMySQL, which the [mysql] extra installs
        self._url = re.sub(r"^(mysql|mariadb)://", r"\1+pymysql://", url)
        self._is_mysql = self._url.startswith(("mysql", "mariadb"))
        self.url = redact_url(url)
        self._versions = next(t for t in tables if t.kind == "schema_version")
        self._create_tables = create_tables
        self._metadata = sa.MetaData()
        #: by table name
        self._tables = {t.name: self._sa_table(t) for t in tables}
        self._engine: sa.Engine | None = None
        self._format_ts = TimestampFormatter()
        self._converters: dict[str, list[Callable[[Any], Any]]] = {}
        self._value_converters: dict[str, list[tuple[str, int, Callable[[Any], Any]]]] = {}
        #: SQLite: the plain INSERT of each table, by name (see _sqlite_insert)
        self._sqlite_inserts: dict[str, str] = {}
        #: MySQL and MariaDB: the server's max_allowed_packet, read by each new connection
        self._max_packet: int | None = None
        #: MySQL and MariaDB: the account of the connections (``'user'@'host'``), for messages
        self._account: str | None = None
        #: by record kind: the positions of the text and JSON columns (what makes a row large)
        self._sized: dict[str, list[int]] = {}
        #: MySQL and MariaDB: the bytes the payload column of each dead-letter table holds
        self._payload_bytes: dict[str, int] = {}

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
                        mysql=self._is_mysql,
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
            # only the URL's dialect: naming another makes SQLAlchemy import it (postgresql and
            # mssql cost a SQLite crawl tens of milliseconds at start)
            dialect = self._url.split(":", 1)[0].split("+", 1)[0]
            where: dict[str, Any] = (
                {f"{dialect}_where": keyed} if dialect in _PARTIAL_INDEXES else {}
            )
            sa.Index(
                spec.index_name(spec.unique),
                *(table.c[name] for name in spec.unique),
                unique=True,
                **where,
            )
        return table

    # lifecycle

    def open(self) -> None:
        is_sqlite = self._url.startswith("sqlite")
        connect_args: dict[str, Any] = {}
        if is_sqlite:
            connect_args["check_same_thread"] = False
            self._make_sqlite_directory()
        elif self._is_mysql:
            connect_args["charset"] = "utf8mb4"  # all of Unicode, not MySQL's 3-byte utf8
        engine = sa.create_engine(self._url, connect_args=connect_args, pool_pre_ping=not is_sqlite)
        if is_sqlite:
            event.listen(engine, "connect", _sqlite_pragmas)
            event.listen(engine, "begin", _begin_immediate)
        elif self._is_mysql:
            event.listen(engine, "connect", self._read_packet_limit)
        self._engine = engine
        self._sized = {
            kind: [
                i for i, c in enumerate(table_spec(kind, "").columns) if c.kind in ("text", "json")
            ]
            for kind in TABLE_KINDS
        }
        # by kind: tables of one kind have the same columns, whatever their name
        self._converters = {
            kind: [
                self._converter(c.kind, engine.dialect.name) for c in table_spec(kind, "").columns
            ]
            for kind in TABLE_KINDS
        }
        #: by kind: (name, index, conversion) of each column whose values are converted
        self._value_converters = {
            kind: [
                (c.name, i, convert)
                for i, c in enumerate(table_spec(kind, "").columns)
                if (convert := self._value_converter(c.kind, engine.dialect.name)) is not None
            ]
            for kind in TABLE_KINDS
        }
        try:
            with engine.begin() as conn:
                if self._is_mysql:
                    self._account = _mysql_user(conn)[1]
                self._prepare_schema(conn)
                if self._is_mysql:
                    self._payload_bytes = _mysql_payload_bytes(conn)
        except sa.exc.DBAPIError as exc:
            if self.classify(exc) is Failure.PERMANENT:
                raise BackendRefused(self.explain_refusal(exc)) from None
            if not isinstance(exc, sa.exc.OperationalError):
                raise
            raise BackendUnavailable(
                f"cannot open the database at {self.url}: {redact_text(str(exc.orig))}"
            ) from None

    def _make_sqlite_directory(self) -> None:
        """Create the directory of the SQLite file if it is missing, as SQLite creates the
        file (not when tables may not be created: the file must be there then)."""
        path = self._sqlite_path()
        if path is None or not self._create_tables:
            return
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise BackendRefused(
                f"cannot create the directory {directory} of the SQLite file of {self.url} "
                f"({exc.strerror}). Fix: create it, or name a file in a directory that exists "
                "and is writable by the user running the crawl"
            ) from None

    def _read_packet_limit(self, dbapi_connection: Any, connection_record: Any) -> None:
        """Read ``max_allowed_packet`` on each new connection (a server restarted with another
        value, or ``SET GLOBAL``, gives new connections the new one)."""
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SELECT @@max_allowed_packet")
            found = cursor.fetchone()
        finally:
            cursor.close()
        if found and found[0]:
            self._max_packet = int(found[0])

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
        conn.execute(self._version_row(conn.dialect.name))
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
        sa_table = self._tables[table.name]
        packets = [rows] if self._max_packet is None else self._packets(table, rows)
        changes: dict[str, list[int]] = {}
        try:
            with self._engine.begin() as conn:
                for packet in packets:
                    plain, keyed = split_keyed(table, packet)
                    if plain:
                        self._insert(conn, table, sa_table, plain, idempotent=idempotent)
                    if keyed:
                        add_changes(changes, self._upsert(conn, table, sa_table, keyed))
        except sa.exc.OperationalError as exc:
            too_large = self._packet_refused(exc, table, packets)
            if too_large is None:
                raise
            raise too_large from exc
        return changes or None

    def _packets(self, table: TableSpec, rows: Sequence[Row]) -> list[Sequence[Row]]:
        """*rows* cut so that no INSERT of them is larger than ``max_allowed_packet`` (PyMySQL
        cuts a batch into statements of about 1 MB itself: this matters for rows larger than
        that, or a server whose limit is smaller). A row that is too large on its own raises
        :class:`PacketTooLarge` before anything is sent; a dead letter that is has its payload
        cut to fit."""
        assert self._max_packet is not None
        budget = self._max_packet - _MYSQL_STATEMENT_MARGIN
        if table.kind == "dead_letters":
            rows = [self._fit_payload(table, row) for row in rows]
        sizes = [self._size_bound(table, row) for row in rows]
        if sum(sizes) <= budget:
            return [rows]
        packets: list[Sequence[Row]] = []
        packet: list[Row] = []
        total = 0
        for original, bound in zip(rows, sizes, strict=True):
            row = original
            size = bound if bound <= budget else self._statement_size(table, row)
            if size > budget and table.kind == "dead_letters":
                row, size = self._cut_dead_letter(table, row, size - budget)
            if size > budget:
                raise PacketTooLarge(self._too_large(size))
            if packet and total + size > budget:
                packets.append(packet)
                packet, total = [], 0
            packet.append(row)
            total += size
        packets.append(packet)
        return packets

    def _size_bound(self, table: TableSpec, row: Row) -> int:
        """At least the bytes *row* takes in an INSERT: escaping at most doubles an ASCII
        character, and a character takes at most 4 bytes in UTF-8."""
        size = _MYSQL_VALUE_MARGIN * len(row)
        for at in self._sized[table.kind]:
            value = row[at]
            if isinstance(value, (bytes, bytearray, memoryview)):
                size += 2 * len(value)
            elif isinstance(value, str):
                size += (2 if value.isascii() else 4) * len(value)
        return size

    def _statement_size(self, table: TableSpec, row: Row) -> int:
        """The bytes *row* takes in an INSERT, as PyMySQL escapes its values (the bound of
        :meth:`_size_bound` without PyMySQL)."""
        try:  # the [mysql] extra
            escape_item = importlib.import_module("pymysql.converters").escape_item
        except ImportError:
            return self._size_bound(table, row)
        [params] = self._params(table, [row])
        return sum(len(escape_item(value, "utf8mb4").encode()) + 2 for value in params.values())

    def _fit_payload(self, table: TableSpec, row: Row) -> Row:
        """*row*, a dead letter, with its payload cut to what its column holds (``TEXT``:
        65,535 bytes), rather than the dead letter refused too."""
        at = table.position("payload")
        payload = row[at]
        room = self._payload_bytes.get(table.name, _MYSQL_TEXT_BYTES)
        if not isinstance(payload, str) or len(payload) * 4 <= room:
            return row
        encoded = payload.encode()
        if len(encoded) <= room:
            return row
        keep = encoded[: room - len(_CUT_MARK)].decode("utf-8", "ignore")
        return (*row[:at], keep + _CUT_MARK, *row[at + 1 :])

    def _cut_dead_letter(self, table: TableSpec, row: Row, excess: int) -> tuple[Row, int]:
        """*row*, a dead letter *excess* bytes over the limit, with its payload cut to fit
        (each character cut takes at least one byte off)."""
        at = table.position("payload")
        payload = row[at]
        if not isinstance(payload, str):
            return row, self._statement_size(table, row)
        keep = max(0, len(payload) - excess - 2 * len(_CUT_MARK))
        cut = (*row[:at], payload[:keep] + _CUT_MARK, *row[at + 1 :])
        return cut, self._statement_size(table, cut)

    def _too_large(self, size: int) -> str:
        limit = self._max_packet or 0
        wanted = 1 << (size + _MYSQL_STATEMENT_MARGIN).bit_length()
        return (
            f"the row takes {size:,} bytes in an INSERT, more than the server at {self.url} "
            f"accepts in one statement (max_allowed_packet = {limit:,} bytes). Fix: SET "
            f"GLOBAL max_allowed_packet = {wanted} (and max_allowed_packet = {wanted} in the "
            "[mysqld] section of the server's configuration, so that it stays), or store a "
            "smaller item (leave large fields out, or store a reference to them)"
        )

    def _packet_refused(
        self, exc: sa.exc.OperationalError, table: TableSpec, packets: list[Sequence[Row]]
    ) -> PacketTooLarge | None:
        """Whether *exc* (the server dropped the connection, or refused a packet) came from a
        statement larger than the server takes: then a refusal of the rows, not an outage.

        The packets were cut to the limit read when the connection was made; a server whose
        limit has been lowered since drops the connection (2006, 2013) on a larger one: the
        limit is read again on a new connection (if none can be made, it is an outage)."""
        code = _mysql_code(exc)
        largest = max(sum(self._size_bound(table, row) for row in p) for p in packets)
        if code == _ER_NET_PACKET_TOO_LARGE:
            return PacketTooLarge(self._too_large(largest))
        if code not in _MYSQL_CONNECTION_LOST or self._max_packet is None:
            return None
        assert self._engine is not None
        before = self._max_packet
        try:
            with self._engine.connect() as conn:  # what new connections get
                found = conn.exec_driver_sql("SELECT @@GLOBAL.max_allowed_packet").scalar()
        except sa.exc.DBAPIError:
            return None  # the server does not answer: an outage
        self._max_packet = int(found or before)
        if self._max_packet >= before or largest <= self._max_packet - _MYSQL_STATEMENT_MARGIN:
            return None
        return PacketTooLarge(self._too_large(largest))

    def _insert(
        self,
        conn: sa.Connection,
        table: TableSpec,
        sa_table: sa.Table,
        rows: Sequence[Row],
        *,
        idempotent: bool,
    ) -> None:
        dialect = conn.dialect.name
        if dialect == "sqlite":
            # the driver's executemany, given each row's values as they are stored: SQLAlchemy's
            # executemany of the same Insert spent more per row than SQLite itself (its
            # parameters: a dict per row, each value looked up and processed again)
            conn.exec_driver_sql(self._sqlite_insert(table), self._values(table, rows))
            return
        params = self._params(table, rows)
        if dialect in ("mysql", "mariadb") or not idempotent:
            conn.execute(self._insert_ignoring_duplicates(sa_table, dialect), params)
            return
        # no portable "skip existing": insert row by row, skipping ids that exist
        for param in params:
            with conn.begin_nested(), contextlib.suppress(sa.exc.IntegrityError):
                conn.execute(sa_table.insert(), [param])

    def _sqlite_insert(self, table: TableSpec) -> str:
        """``INSERT INTO`` *table* ``... ON CONFLICT DO NOTHING`` with a ``?`` per column, in
        the order of its rows: made once per table."""
        statement = self._sqlite_inserts.get(table.name)
        if statement is None:
            assert self._engine is not None
            quote = self._engine.dialect.identifier_preparer.quote
            names = ", ".join(quote(name) for name in table.column_names)
            marks = ", ".join("?" * len(table.column_names))
            statement = self._sqlite_inserts[table.name] = (
                f"INSERT INTO {quote(table.name)} ({names}) VALUES ({marks}) ON CONFLICT DO NOTHING"
            )
        return statement

    def _values(self, table: TableSpec, rows: Sequence[Row]) -> Sequence[Sequence[Any]]:
        """*rows* with their values converted for the database, in column order."""
        converted = self._value_converters[table.kind]
        if not converted:
            return rows
        values = []
        for row in rows:
            row_values = list(row)
            for _, index, convert in converted:
                value = row_values[index]
                if value is not None:
                    row_values[index] = convert(value)
            values.append(tuple(row_values))
        return values

    def _params(self, table: TableSpec, rows: Sequence[Row]) -> list[dict[str, Any]]:
        """*rows* as statement parameters, their values converted for the database."""
        names = table.column_names
        # only the columns whose values change: a call per value costs more than the rest
        converted = self._value_converters[table.kind]
        params = []
        for row in rows:
            param = dict(zip(names, row, strict=True))
            for name, index, convert in converted:
                value = row[index]
                if value is not None:
                    param[name] = convert(value)
            params.append(param)
        return params

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
            from sqlalchemy.dialects import sqlite

            return sqlite.insert(table).on_conflict_do_nothing()
        if dialect in ("mysql", "mariadb"):
            from sqlalchemy.dialects import mysql

            statement = mysql.insert(table)
            key = table.primary_key.columns[0]
            return statement.on_duplicate_key_update({key.name: key})
        return table.insert()

    # retention and DDL (scrapy ingest prune, migrate)

    def prune(self, table: TableSpec, older_than: float, *, batch_rows: int) -> Iterator[int]:
        """Each transaction picks the next *batch_rows* rows to go by primary key (after the
        last id of the one before, so each batch walks on through the index) and deletes
        them by id, the condition checked again (a row seen again meanwhile stays)."""
        assert self._engine is not None, "prune() before open()"
        sa_table = self._tables.get(table.name)
        if sa_table is None:
            sa_table = self._tables[table.name] = self._sa_table(table)
        with self._engine.connect() as conn:
            if not sa.inspect(conn).has_table(table.name):
                return
        times = retention_columns(table)
        cutoff = self._converter("timestamp", self._engine.dialect.name)(older_than)
        dated = [sa_table.c[name] for name in times]
        condition = (dated[0] if len(dated) == 1 else sa.func.coalesce(*dated)) < cutoff
        if table.kind == "jobs":
            condition &= sa_table.c.status.in_(PRUNED_JOB_STATUSES)
        pk = sa_table.c[table.primary_key]
        first = pick = sa.select(pk).where(condition).order_by(pk).limit(batch_rows)
        while True:
            with self._engine.begin() as conn:
                ids = list(conn.scalars(pick))
                if not ids:
                    return
                deleted = 0
                for chunk in _chunks(ids, _KEYS_PER_QUERY):
                    result = conn.execute(sa_table.delete().where(pk.in_(chunk), condition))
                    deleted += result.rowcount
            yield deleted
            if len(ids) < batch_rows:
                return
            pick = first.where(pk > ids[-1])

    def create_statements(self, tables: Sequence[TableSpec]) -> list[str]:
        """What :meth:`open` runs on an empty database, compiled for the URL's dialect
        without a connection (a ``mysql://`` URL gets MySQL's ``CREATE INDEX`` without
        ``IF NOT EXISTS``; a MariaDB server, known as such once connected, gets it)."""
        dialect = sa.engine.make_url(self._url).get_dialect()()
        sa_tables = []
        for spec in tables:
            sa_table = self._tables.get(spec.name)
            if sa_table is None:
                sa_table = self._tables[spec.name] = self._sa_table(spec)
            sa_tables.append(sa_table)
        statements: list[Any] = [CreateTable(t, if_not_exists=True) for t in sa_tables]
        statements += [s for t in sa_tables for s in _index_statements(t, dialect)]
        statements.append(self._version_row(dialect.name))
        return [
            str(s.compile(dialect=dialect, compile_kwargs={"literal_binds": True})).strip()
            for s in statements
        ]

    def _version_row(self, dialect: str) -> sa.Insert:
        """The statement that records the current schema version."""
        applied_at = self._converter("timestamp", dialect)(time.time())
        versions = self._tables[self._versions.name]
        return self._insert_ignoring_duplicates(versions, dialect).values(
            version=SCHEMA_VERSION, applied_at=applied_at
        )

    def _converter(self, kind: ColumnKind, dialect: str) -> Callable[[Any], Any]:
        convert = self._value_converter(kind, dialect)
        if convert is None:
            return _identity
        return lambda v: None if v is None else convert(v)

    def _value_converter(self, kind: ColumnKind, dialect: str) -> Callable[[Any], Any] | None:
        """What turns a value (not None) of a column of *kind* into what the database takes:
        None when it takes it as it is."""
        if kind == "json":
            return _decode
        if kind == "uuid":
            return format_uuid
        if kind == "timestamp":
            if dialect == "sqlite":
                return self._format_ts
            # MySQL's DATETIME has no time zone: UTC, by convention
            return _naive_utc if dialect in ("mysql", "mariadb") else utc_from_epoch
        if kind == "text" and dialect in ("mysql", "mariadb"):
            return safe_text
        return None

    def _convert_values(self, table: TableSpec, values: Mapping[str, Any]) -> dict[str, Any]:
        converters = dict(zip(table.column_names, self._converters[table.kind], strict=True))
        return {name: converters[name](value) for name, value in values.items()}

    # what `scrapy ingest check` asks: on an engine of its own, without the SQLite pragmas
    # (which switch a file to WAL), so that it works before open() and changes nothing

    def _inspection_engine(self) -> sa.Engine:
        connect_args = {"charset": "utf8mb4"} if self._url.startswith(("mysql", "mariadb")) else {}
        return sa.create_engine(self._url, connect_args=connect_args, poolclass=sa.pool.NullPool)

    def _sqlite_path(self) -> str | None:
        """The SQLite file of the URL (None: not SQLite, or in memory)."""
        if not self._url.startswith("sqlite"):
            return None
        path = sa.engine.make_url(self._url).database
        return None if not path or path == ":memory:" else path

    def _unavailable(self, exc: sa.exc.DBAPIError) -> BackendUnavailable:
        return BackendUnavailable(
            f"cannot open the database at {self.url}: {redact_text(str(exc.orig))}"
        )

    def schema_version(self) -> int | None:
        path = self._sqlite_path()
        if path is not None and not os.path.exists(path):
            return None  # and connecting would create the file
        versions = self._tables[self._versions.name]
        engine = self._inspection_engine()
        try:
            with engine.connect() as conn:
                if not sa.inspect(conn).has_table(versions.name):
                    return None
                try:
                    found = conn.execute(sa.select(sa.func.max(versions.c.version))).scalar()
                except sa.exc.ProgrammingError as exc:  # MySQL: SELECT command denied
                    raise SchemaError(
                        f"cannot read the table {versions.name} in {self.url}: "
                        f"{redact_text(str(exc.orig))}. Fix: GRANT SELECT on it to the user "
                        "of the URL"
                    ) from None
        except sa.exc.DBAPIError as exc:
            raise self._unavailable(exc) from None
        finally:
            engine.dispose()
        return None if found is None else int(found)

    def check_privileges(self, tables: Sequence[TableSpec]) -> list[str]:
        """SQLite: the file (or, while there is none, its directory) is writable. MySQL and
        MariaDB: SELECT, INSERT and UPDATE on each table, tried with statements that match
        no row, in a transaction rolled back; with ``create_tables``, the CREATE and INDEX
        privileges (a crawl runs ``CREATE TABLE/INDEX IF NOT EXISTS`` at start), as
        ``information_schema`` lists them. Other databases: the tables only."""
        specs = list({t.name: t for t in tables}.values())
        path = self._sqlite_path()
        problems = [] if path is None else _sqlite_file_problems(path)
        if path is not None and not os.path.exists(path):
            return problems + self._missing_tables([t.name for t in specs])
        engine = self._inspection_engine()
        try:
            with engine.connect() as conn:
                found = set(sa.inspect(conn).get_table_names())
                missing = [t.name for t in specs if t.name not in found]
                if conn.dialect.name not in ("mysql", "mariadb"):
                    return problems + self._missing_tables(missing)
                existing = [t for t in specs if t.name in found]
                problems += _mysql_write_problems(conn, [self._sa_check_table(t) for t in existing])
                if not self._create_tables:
                    return problems + self._missing_tables(missing)
                return problems + _mysql_create_problems(conn, [t.name for t in existing], missing)
        except sa.exc.DBAPIError as exc:
            raise self._unavailable(exc) from None
        finally:
            engine.dispose()

    def _sa_check_table(self, spec: TableSpec) -> sa.Table:
        found = self._tables.get(spec.name)
        return found if found is not None else self._sa_table(spec)

    def _missing_tables(self, missing: list[str]) -> list[str]:
        if self._create_tables or not missing:
            return []
        return [
            f"the table(s) {', '.join(missing)} do not exist in {self.url}, and "
            "INGEST_CREATE_TABLES is False. Fix: run `scrapy ingest migrate`, or have a DBA "
            "run what `scrapy ingest migrate --sql` prints"
        ]

    def classify(self, exc: BaseException) -> Failure:  # noqa: PLR0911 - one per kind
        """By MySQL's error number or SQLite's result code (docs/reliability.md has the
        tables); what is not known is transient."""
        if isinstance(exc, (ValueError, OverflowError)):  # refused before it was sent
            return Failure.DATA
        if not isinstance(exc, sa.exc.StatementError):
            return Failure.TRANSIENT
        if not isinstance(exc, sa.exc.DBAPIError):  # a value SQLAlchemy could not convert
            return Failure.DATA
        code = _mysql_code(exc) if self._is_mysql else None
        if code is not None:
            return _mysql_failure(code, exc)
        sqlite_code = getattr(exc.orig, "sqlite_errorcode", None)
        if isinstance(sqlite_code, int):
            return _sqlite_failure(sqlite_code)
        # no code: a value the driver could not bind (sqlite3's own errors), or another
        # database (a unique key is written again, skipping stored ids, then split)
        if isinstance(exc, sa.exc.IntegrityError):
            return Failure.DUPLICATE
        if isinstance(exc, sa.exc.DataError) or (
            isinstance(exc.orig, (sqlite3.ProgrammingError, sqlite3.InterfaceError))
        ):
            return Failure.DATA
        return Failure.TRANSIENT

    def explain_refusal(self, exc: BaseException) -> str:
        """The cause of a permanent failure and its fix, in plain words (no password)."""
        if isinstance(exc, sa.exc.DBAPIError) and self._is_mysql:
            return self._explain_mysql(exc)
        if isinstance(exc, sa.exc.DBAPIError):
            code = getattr(exc.orig, "sqlite_errorcode", None)
            if isinstance(code, int):
                return self._explain_sqlite(code & 0xFF, exc)
        return (
            f"{self.url} refuses this crawl ({describe_error(exc)}). Fix: see docs/reliability.md"
        )

    def _explain_mysql(self, exc: sa.exc.DBAPIError) -> str:  # noqa: PLR0911 - one per cause
        code = _mysql_code(exc)
        url = sa.engine.make_url(self._url)
        user = url.username or "?"
        account = self._account or f"'{user}'@'%'"
        database = url.database or "?"
        quoted = f"`{database.replace('`', '``')}`"
        where = f"the MySQL/MariaDB server at {self.url}"
        error = describe_error(exc.orig or exc)
        if code in _MYSQL_LOGIN_REFUSED:
            return (
                f"{where} refused the login of user {user!r} ({error}): a wrong password, or "
                "no such user for this host. Fix: correct the user or password in the "
                "database URL"
            )
        if code == _ER_BAD_DB:
            return (
                f"database {database!r} does not exist on {where}. Fix: create it (CREATE "
                f"DATABASE {quoted}), or fix the database name in the URL"
            )
        if code == _ER_DBACCESS_DENIED:
            return (
                f"user {user!r} may not use database {database!r} on {where}, or it does not "
                f"exist. Fix: fix the database name in the URL; or create it (CREATE DATABASE "
                f"{quoted}) and GRANT {', '.join(_WRITE_PRIVILEGES)}, "
                f"{', '.join(_CREATE_PRIVILEGES)}, ALTER ON {quoted}.* TO {account}"
            )
        if code in _MYSQL_DENIED and _is_ddl(exc):
            return (
                f"user {user!r} may not create the tables of this crawl in database "
                f"{database!r} on {where} ({error}). Fix: GRANT "
                f"{', '.join(_CREATE_PRIVILEGES)}, ALTER ON {quoted}.* TO {account}; or set "
                "INGEST_CREATE_TABLES = False and have a user that may run the DDL that "
                "`scrapy ingest migrate --sql` prints"
            )
        if code in _MYSQL_DENIED:
            return (
                f"user {user!r} may not write the tables of this crawl in database "
                f"{database!r} on {where} ({error}). Fix: GRANT "
                f"{', '.join(_WRITE_PRIVILEGES)} ON {quoted}.* TO {account}"
            )
        if code in _MYSQL_MISSING:
            return (
                f"a table or column of this crawl is missing in database {database!r} on "
                f"{where} ({error}). Fix: run `scrapy ingest migrate` (or one crawl with "
                "INGEST_CREATE_TABLES = True); where that is not allowed, have a user that "
                "may run the DDL that `scrapy ingest migrate --sql` prints"
            )
        if code in _MYSQL_READ_ONLY_CODES:
            return (
                f"{where} is read-only ({error}). Fix: point the database URL at the primary "
                "server, or SET GLOBAL read_only = OFF"
            )
        if code in _MYSQL_ACCOUNT_EXPIRED:
            return (
                f"the account of user {user!r} on {where} is locked or its password expired "
                f"({error}). Fix: ALTER USER {account} ACCOUNT UNLOCK, or set a new password "
                "(ALTER USER ... IDENTIFIED BY ...) and put it in the database URL"
            )
        return f"{where} refuses this crawl ({error}). Fix: see docs/reliability.md"

    def _explain_sqlite(self, code: int, exc: sa.exc.DBAPIError) -> str:
        path = self._sqlite_path()
        where = os.path.abspath(path) if path else self.url
        error = describe_error(exc.orig or exc)
        directory = os.path.dirname(where)
        fixes = {
            _SQLITE_READONLY: (
                f"the SQLite file {where} is read-only for this process ({error}): its "
                "permissions or owner, a read-only mount, or an immutable file. Fix: make the "
                f"file and its directory {directory} writable by the user running the crawl, "
                "or name another file in INGEST_DATABASE_URL"
            ),
            _SQLITE_CANTOPEN: (
                f"SQLite cannot open the file {where} ({error}): its directory is missing or "
                "not writable by this user, or it is a directory. Fix: create the directory "
                "(with INGEST_CREATE_TABLES = True the crawl creates it), make it writable, "
                "or fix the path in INGEST_DATABASE_URL"
            ),
            _SQLITE_NOTADB: (
                f"{where} is not an SQLite database ({error}). Fix: name an SQLite file, or "
                "a file that does not exist yet, in INGEST_DATABASE_URL"
            ),
            _SQLITE_CORRUPT: (
                f"the SQLite file {where} is damaged ({error}). Fix: restore it from a "
                f"backup, or recover it (sqlite3 {where} .recover), or name another file"
            ),
            _SQLITE_ERROR: (
                f"a table or column of this crawl is missing in the SQLite file {where} "
                f"({error}). Fix: run `scrapy ingest migrate` (or one crawl with "
                "INGEST_CREATE_TABLES = True)"
            ),
        }
        found = fixes.get(code)
        if found is not None:
            return found
        return (
            f"the operating system denies access to the SQLite file {where} ({error}). Fix: "
            "let the user running the crawl read and write it, or name another file"
        )

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

    def mark_crashed(
        self, table: TableSpec, stale_before: float, alive: str, crawl_id: str | None = None
    ) -> list[str]:
        assert self._engine is not None, "mark_crashed() before open()"
        jobs = self._tables[table.name]
        stale = self._convert_values(table, {"updated_at": stale_before})["updated_at"]
        running = (
            (jobs.c.status == "running") & (jobs.c.updated_at < stale) & (jobs.c.job_id != alive)
        )
        if crawl_id is not None:
            running = running & (jobs.c.crawl_id == crawl_id)
        with self._engine.begin() as conn:
            ids = [row[0] for row in conn.execute(sa.select(jobs.c.job_id).where(running))]
            if ids:
                conn.execute(
                    jobs.update()
                    .where(running & jobs.c.job_id.in_(ids))
                    .values(status="crashed", close_reason="crashed", finished_at=jobs.c.updated_at)
                )
        return ids

    def recent_jobs(
        self, table: TableSpec, *, running: bool, spider: str | None, limit: int
    ) -> list[dict[str, Any]]:
        jobs = self._tables[table.name]
        query = (
            sa.select(*(jobs.c[name] for name in table.column_names))
            .order_by(jobs.c.started_at.desc(), jobs.c.job_id)
            .limit(limit)
        )
        if running:
            query = query.where(jobs.c.status == "running")
        if spider is not None:
            query = query.where(jobs.c.spider == spider)
        kinds = [c.kind for c in table.columns]
        return [
            {
                name: _read_value(kind, value)
                for name, kind, value in zip(table.column_names, kinds, row, strict=True)
            }
            for row in self._read(query, limit)
        ]

    def job_items(self, table: TableSpec, job_id: str) -> Iterator[str]:
        items = self._tables[table.name]
        query = (
            sa.select(items.c.data)
            .where(items.c.job_id == job_id)
            .order_by(items.c.scraped_at, items.c[table.primary_key])
        )
        for (data,) in self._read(query, _READ_ROWS):
            yield data.decode() if isinstance(data, bytes) else data

    def _read(self, query: sa.Select[Any], chunk: int) -> Iterator[Sequence[Any]]:
        """The rows of *query*, fetched *chunk* at a time, by a read that holds no lock a
        crawl's writes wait for: streamed (unbuffered) on MySQL and MariaDB; on SQLite outside
        the ``BEGIN IMMEDIATE`` that every transaction of ours begins with (a WAL reader)."""
        assert self._engine is not None, "reading before open()"
        if self._engine.dialect.name != "sqlite":
            with self._engine.connect() as conn:
                streamed = conn.execution_options(stream_results=True, yield_per=chunk)
                for rows in streamed.execute(query).partitions():
                    yield from rows
            return
        compiled = query.compile(dialect=self._engine.dialect)
        names = getattr(compiled, "positiontup", None) or ()
        params = [compiled.params[name] for name in names]
        connection = self._engine.raw_connection()
        try:
            cursor = connection.cursor()
            cursor.execute(str(compiled), params)
            while rows := cursor.fetchmany(chunk):
                yield from rows
            cursor.close()
        finally:
            connection.close()


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


#: MySQL's errors for a command denied on a table or a column, and for a read-only server
_MYSQL_DENIED = (1142, 1143)
_MYSQL_READ_ONLY = 1290
#: what a crawl does to each table: read stored rows, insert, update (jobs, keyed items,
#: and ``ON DUPLICATE KEY UPDATE`` when a batch is written again)
_WRITE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE")
#: what ``CREATE TABLE IF NOT EXISTS`` and ``CREATE INDEX IF NOT EXISTS`` need, tables or not
_CREATE_PRIVILEGES = ("CREATE", "INDEX")

# MySQL and MariaDB error numbers (docs/reliability.md has the table)
_ER_DBACCESS_DENIED = 1044
_ER_BAD_DB = 1049
_ER_DUP_ENTRY = 1062
_ER_NET_PACKET_TOO_LARGE = 1153
#: access denied (a wrong password, or no such user for the host); 1698: without a password
_MYSQL_LOGIN_REFUSED = frozenset({1045, 1698})
#: unknown table, unknown column
_MYSQL_MISSING = frozenset({1146, 1054})
#: --read-only (1290), super_read_only or a read-only transaction (1836, 1792)
_MYSQL_READ_ONLY_CODES = frozenset({_MYSQL_READ_ONLY, 1836, 1792})
#: password expired (1820, 1862), account locked (MySQL 3118, MariaDB 4151)
_MYSQL_ACCOUNT_EXPIRED = frozenset({1820, 1862, 3118, 4151})
_MYSQL_PERMANENT = (
    _MYSQL_LOGIN_REFUSED
    | _MYSQL_MISSING
    | _MYSQL_READ_ONLY_CODES
    | _MYSQL_ACCOUNT_EXPIRED
    | {_ER_DBACCESS_DENIED, _ER_BAD_DB, *_MYSQL_DENIED}
)
#: a value refused: too long (1406), incorrect (1366, 1292, 1265, 1367), out of range (1264,
#: 1690), invalid JSON (MySQL 3140; MariaDB's JSON_VALID check: 4025, MySQL's 3819), invalid
#: UTF-8 (1300), NULL (1048), a row over the row size (1118), a packet over the limit (1153)
_MYSQL_DATA = frozenset(
    {1406, 1366, 1292, 1265, 1367, 1264, 1690, 3140, 4025, 3819, 1300, 1048, 1118, 1153}
)
#: the server closed or lost the connection: server gone (2006), lost during a query (2013)
_MYSQL_CONNECTION_LOST = frozenset({2006, 2013})
#: what a statement adds to the values of its rows (its text, the column list, the packet's
#: header), and what each value adds (quotes, comma; numbers, times and ids, not measured)
_MYSQL_STATEMENT_MARGIN = 8192
_MYSQL_VALUE_MARGIN = 48
#: the end of a dead letter's payload cut to fit its column or max_allowed_packet
_CUT_MARK = "...[truncated to fit the database]"
#: what a ``TEXT`` column holds in MySQL and MariaDB
_MYSQL_TEXT_BYTES = 65_535


def _mysql_payload_bytes(conn: sa.Connection) -> dict[str, int]:
    """The bytes the ``payload`` column of each table of the database holds (by table)."""
    found = conn.execute(
        sa.text(
            "SELECT TABLE_NAME, CHARACTER_OCTET_LENGTH FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = DATABASE() AND COLUMN_NAME = 'payload'"
        )
    )
    return {str(name): int(size) for name, size in found if size}


# SQLite's primary result codes (an extended code's low byte)
_SQLITE_ERROR = 1
_SQLITE_PERM = 3
_SQLITE_READONLY = 8
_SQLITE_CORRUPT = 11
_SQLITE_CANTOPEN = 14
_SQLITE_CONSTRAINT = 19
_SQLITE_AUTH = 23
_SQLITE_NOTADB = 26
#: SQLITE_CONSTRAINT_PRIMARYKEY, SQLITE_CONSTRAINT_UNIQUE
_SQLITE_DUPLICATE = frozenset({1555, 2067})
#: no retry heals: SQLITE_ERROR (a missing table or column), a read-only, missing,
#: forbidden or damaged file
_SQLITE_PERMANENT = frozenset(
    {
        _SQLITE_ERROR,
        _SQLITE_PERM,
        _SQLITE_READONLY,
        _SQLITE_CORRUPT,
        _SQLITE_CANTOPEN,
        _SQLITE_AUTH,
        _SQLITE_NOTADB,
    }
)
#: SQLITE_TOOBIG, SQLITE_CONSTRAINT (other than a duplicate id), SQLITE_MISMATCH, SQLITE_RANGE
_SQLITE_DATA = frozenset({18, _SQLITE_CONSTRAINT, 20, 25})


def _mysql_code(exc: sa.exc.DBAPIError) -> int | None:
    """MySQL's error number of *exc* (the first argument of the driver's exception)."""
    args = getattr(exc.orig, "args", None)
    return args[0] if args and isinstance(args[0], int) and args[0] > 0 else None


def _mysql_failure(code: int, exc: sa.exc.DBAPIError) -> Failure:
    if code == _ER_DUP_ENTRY:
        return Failure.DUPLICATE
    if code in _MYSQL_PERMANENT:
        return Failure.PERMANENT
    if code in _MYSQL_DATA or isinstance(exc, (sa.exc.DataError, sa.exc.IntegrityError)):
        return Failure.DATA  # a number of ours or, by the driver's class, a refused value
    return Failure.TRANSIENT  # lost connections (2003, 2006, 2013), 1040, 1205, 1213, 1927...


def _sqlite_failure(code: int) -> Failure:
    if code in _SQLITE_DUPLICATE:
        return Failure.DUPLICATE
    primary = code & 0xFF
    if primary in _SQLITE_PERMANENT:
        return Failure.PERMANENT
    if primary in _SQLITE_DATA:
        return Failure.DATA
    return Failure.TRANSIENT  # SQLITE_BUSY, SQLITE_LOCKED, SQLITE_IOERR, SQLITE_FULL...


def _is_ddl(exc: sa.exc.DBAPIError) -> bool:
    """Whether *exc* came from one of our CREATE or ALTER statements (the statement we sent,
    not the error's text)."""
    return (exc.statement or "").lstrip()[:6].upper() in ("CREATE", "ALTER ")


def _sqlite_file_problems(path: str) -> list[str]:
    """What keeps a crawl from writing the SQLite file *path* (or from creating it)."""
    where = os.path.abspath(path)
    directory = os.path.dirname(where)
    if not os.path.isdir(directory):
        return [
            f"the directory {directory} of the SQLite file does not exist. Fix: create it, or "
            "name a file in a directory that exists"
        ]
    problems = []
    if os.path.exists(where) and not os.access(where, os.R_OK | os.W_OK):
        problems.append(
            f"the SQLite file {where} is not writable by this user. Fix: make it writable "
            "(chmod, chown), or name another file"
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        problems.append(
            f"the directory {directory} is not writable by this user, and SQLite creates the "
            "file and its journal (-wal, -shm) there. Fix: make it writable, or name a file "
            "in a writable directory"
        )
    return problems


def _mysql_user(conn: sa.Connection) -> tuple[str, str]:
    """The account of the connection, as (``user@host``, ``'user'@'host'``)."""
    user = str(conn.execute(sa.text("SELECT CURRENT_USER()")).scalar())
    name, _, host = user.rpartition("@")
    return user, f"'{name}'@'{host}'"


def _mysql_write_problems(conn: sa.Connection, tables: list[sa.Table]) -> list[str]:
    """Try SELECT, INSERT and UPDATE on each table with statements that match no row, in a
    transaction rolled back: MySQL checks the privileges (and ``read_only``) all the same."""
    if not tables:
        return []
    user, grantee = _mysql_user(conn)
    database = str(conn.execute(sa.text("SELECT DATABASE()")).scalar())
    database = conn.dialect.identifier_preparer.quote(database)
    lacking: dict[str, list[str]] = {}
    problems: list[str] = []
    conn.rollback()  # what the inspector began: the statements below get a transaction of their own
    try:
        for table in tables:
            key = next(iter(table.primary_key.columns))
            nothing: list[sa.Label[Any]] = [
                sa.literal_column("NULL").label(c.name) for c in table.columns
            ]
            statements: dict[str, sa.Executable] = {
                "SELECT": sa.select(sa.literal_column("1")).select_from(table).where(sa.false()),
                "INSERT": table.insert().from_select(
                    [c.name for c in table.columns], sa.select(*nothing).where(sa.false())
                ),
                "UPDATE": table.update().where(sa.false()).values({key.name: key}),
            }
            for privilege, statement in statements.items():
                try:
                    conn.execute(statement)
                except sa.exc.DBAPIError as exc:
                    code = exc.orig.args[0] if exc.orig and exc.orig.args else None
                    if code in _MYSQL_DENIED:
                        lacking.setdefault(table.name, []).append(privilege)
                    elif code == _MYSQL_READ_ONLY and not problems:
                        problems.append(
                            f"the server refuses writes ({redact_text(str(exc.orig))}). Fix: "
                            "connect to the primary server, or SET GLOBAL read_only = OFF"
                        )
                    elif code != _MYSQL_READ_ONLY:
                        raise
    finally:
        conn.rollback()
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, denied in lacking.items():
        groups.setdefault(tuple(denied), []).append(name)
    for group, names in groups.items():
        problems.append(
            f"user {user} may not {' or '.join(group)} the table(s) {', '.join(names)}. "
            f"Fix: GRANT {', '.join(_WRITE_PRIVILEGES)} ON {database}.* TO {grantee}"
        )
    return problems


def _mysql_create_problems(
    conn: sa.Connection, existing: list[str], missing: list[str]
) -> list[str]:
    """With INGEST_CREATE_TABLES, a crawl runs ``CREATE TABLE/INDEX IF NOT EXISTS`` on every
    table, which MySQL checks the CREATE and INDEX privileges of before it looks whether the
    table exists: are they granted (``information_schema``; no grants to ask a server
    started with ``--skip-grant-tables``, which allows everything)?"""
    skip = conn.execute(sa.text("SHOW VARIABLES LIKE 'skip_grant_tables'")).first()
    if skip is not None and str(skip[1]).upper() == "ON":
        return []
    user, grantee = _mysql_user(conn)
    database = str(conn.execute(sa.text("SELECT DATABASE()")).scalar())
    granted = {
        str(row[0])
        for row in conn.execute(
            sa.text(
                "SELECT PRIVILEGE_TYPE FROM information_schema.USER_PRIVILEGES "
                "WHERE GRANTEE = :grantee UNION SELECT PRIVILEGE_TYPE FROM "
                "information_schema.SCHEMA_PRIVILEGES WHERE GRANTEE = :grantee "
                "AND DATABASE() LIKE TABLE_SCHEMA"
            ),
            {"grantee": grantee},
        )
    }
    per_table: dict[str, set[str]] = {}
    for name, privilege in conn.execute(
        sa.text(
            "SELECT TABLE_NAME, PRIVILEGE_TYPE FROM information_schema.TABLE_PRIVILEGES "
            "WHERE GRANTEE = :grantee AND TABLE_SCHEMA = DATABASE()"
        ),
        {"grantee": grantee},
    ):
        per_table.setdefault(str(name), set()).add(str(privilege))
    lacking = set(_CREATE_PRIVILEGES) - granted
    if not missing:
        lacking = {p for name in existing for p in lacking - per_table.get(name, set())}
    if not lacking:
        return []
    what = f"creates {', '.join(missing)} and runs" if missing else "runs"
    other_fix = (
        "run `scrapy ingest migrate` as a user that may, then set INGEST_CREATE_TABLES = False"
        if missing
        else "set INGEST_CREATE_TABLES = False (the tables are there)"
    )
    quoted = conn.dialect.identifier_preparer.quote(database)
    return [
        f"with INGEST_CREATE_TABLES = True a crawl {what} CREATE TABLE and CREATE INDEX IF NOT "
        f"EXISTS, which need the {' and '.join(sorted(lacking))} privilege(s) that user "
        f"{user} lacks in {database}. Fix: GRANT CREATE, INDEX, ALTER ON {quoted}.* TO "
        f"{grantee}, or {other_fix}"
    ]


def _chunks(values: Sequence[_V], size: int) -> Iterator[Sequence[_V]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _create_indexes(conn: sa.Connection, table: sa.Table) -> None:
    """Create the missing indexes of *table*.

    MySQL, unlike MariaDB and SQLite, has no ``CREATE INDEX IF NOT EXISTS``: it is asked
    which indexes exist instead.
    """
    statements = _index_statements(table, conn.dialect)
    if _lacks_index_if_not_exists(conn.dialect):
        found = {index["name"] for index in sa.inspect(conn).get_indexes(table.name)}
        statements = [s for s in statements if s.element.name not in found]
    for statement in statements:
        conn.execute(statement)


def _index_statements(table: sa.Table, dialect: sa.Dialect) -> list[CreateIndex]:
    """The statements that create *table*'s indexes (``IF NOT EXISTS`` where there is one)."""
    if_not_exists = not _lacks_index_if_not_exists(dialect)
    return [
        CreateIndex(index, if_not_exists=if_not_exists)
        for index in sorted(table.indexes, key=lambda i: str(i.name))
    ]


def _lacks_index_if_not_exists(dialect: sa.Dialect) -> bool:
    """MySQL proper (known as MariaDB once connected, or from a ``mariadb://`` URL)."""
    return dialect.name in ("mysql", "mariadb") and not getattr(dialect, "is_mariadb", False)


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


def _decode(value: bytes) -> str:
    return value.decode()


def _identity(value: Any) -> Any:
    return value


def _read_value(kind: ColumnKind, value: Any) -> Any:
    """A stored value as :meth:`SqlAlchemyBackend.recent_jobs` gives it: timestamps as epoch
    seconds, JSON decoded."""
    if value is None:
        return None
    if kind == "timestamp":
        return _epoch(value)
    if kind == "json" and isinstance(value, (str, bytes)):
        return json.loads(value)
    return value


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    # transactions are begun by _begin_immediate, not by the sqlite3 module
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
    _switch_to_wal(cursor)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
