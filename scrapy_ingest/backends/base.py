"""The interface every backend implements, and the helpers the backends share.

A backend is used from writer threads only, never from the reactor thread.
Its methods block. Rows follow the conventions of :mod:`scrapy_ingest.schema`.
Writing with retries is :mod:`scrapy_ingest.backends._retry`'s, keyed items are
planned by :mod:`scrapy_ingest.backends._upsert`, and the host that runs a backend
with its spill journal is :class:`scrapy_ingest.backends._local.LocalHost`.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from scrapy_ingest._redact import redact_text
from scrapy_ingest.exceptions import SchemaError
from scrapy_ingest.schema import SCHEMA_VERSION, TABLE_KINDS, table_spec

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

    from scrapy_ingest._shapes import Row
    from scrapy_ingest.schema import ColumnKind, TableSpec

logger = logging.getLogger(__name__)


class Failure(enum.Enum):
    """What a failed write means for the batch that was being written."""

    #: a value in the batch was refused: split the batch to find the record
    DATA = "data"
    #: a record id exists already: write the batch again, skipping existing ids
    DUPLICATE = "duplicate"
    #: the database is unreachable, busy or restarting: wait and try again
    TRANSIENT = "transient"
    #: the database refuses this connection or statement for a reason no retry can heal
    #: (authentication, unknown database, missing privilege, table or column, read-only):
    #: stop trying it, spill what is left, say what to fix (docs/reliability.md lists the codes)
    PERMANENT = "permanent"


class Backend(Protocol):
    #: the database URL with credentials redacted, for messages
    url: str
    #: how many threads may write to it at once
    threads: int
    #: whether :meth:`write` takes JSON as ``str`` (decoded once per batch) rather than as
    #: ``bytes``; it must take both, since rows spilled by the crawl process hold bytes
    json_as_text: bool
    #: whether :meth:`write` takes the packed :class:`~scrapy_ingest._shapes.Batch` itself
    #: (a sequence of its rows, each cut from the payload only when asked for) rather than
    #: the rows cut out of it
    takes_batches: bool

    def open(self) -> None:
        """Connect, and create or check the tables. Raise BackendUnavailable or SchemaError."""

    def close(self) -> None:
        """Release connections."""

    def create_table(self, table: TableSpec) -> None:
        """Create *table* if it is missing (unless tables may not be created)."""

    def write(
        self, table: TableSpec, rows: Sequence[Row], *, idempotent: bool
    ) -> dict[str, list[int]] | None:
        """Store *rows* in one transaction; with *idempotent*, skip ids that exist.

        Keyed items (rows of an items table with an ``item_key``) are upserted as
        :func:`~scrapy_ingest.backends._upsert.plan_upsert` says; the return value is then
        its ``changes``.
        """

    def classify(self, exc: BaseException) -> Failure:
        """Say what *exc*, raised by any method, means: from the driver's own error codes,
        never the message text. A backend may also offer ``explain_refusal(exc) -> str``,
        the cause and the fix of a :attr:`Failure.PERMANENT` error in plain words (see
        :func:`~scrapy_ingest.backends._retry.refusal`)."""

    def insert_job(self, table: TableSpec, row: Mapping[str, Any]) -> bool:
        """Insert a job row; return False when its ``job_id`` exists already."""

    def update_job(
        self, table: TableSpec, job_id: str, values: Mapping[str, Any], *, unless_finished: bool
    ) -> None:
        """Update columns of a job row (only while its status is not ``finished`` if asked:
        a heartbeat revives a row another process took for crashed, never a closed one)."""

    def mark_crashed(
        self, table: TableSpec, stale_before: float, alive: str, crawl_id: str | None = None
    ) -> list[str]:
        """Set status and close reason ``crashed`` (and ``finished_at`` to its last refresh) on
        each ``running`` job row last refreshed before *stale_before*, except *alive* (the job
        of the crawl asking), only those of *crawl_id* if given; return their ids."""

    # what the ``scrapy ingest`` commands ask of a database (scrapy_ingest.commands)

    def schema_version(self) -> int | None:
        """The schema version recorded in the database (None: no tables of ours yet).

        Called on a backend opened with ``create_tables=False``: it changes nothing."""

    def check_privileges(self, tables: Sequence[TableSpec]) -> list[str]:
        """What a crawl needs of *tables* that this connection may not do: one message per
        missing privilege or table, each naming the fix (the GRANT, or the DDL to run); []
        when a crawl can store everything. Leaves no row behind."""

    def recent_jobs(
        self, table: TableSpec, *, running: bool, spider: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """At most *limit* job rows, the latest started first (only ``running`` ones with
        *running*, only *spider*'s with *spider*), as dicts of the job table's columns,
        with times as epoch seconds (float) and JSON columns decoded."""

    def job_items(self, table: TableSpec, job_id: str) -> Iterator[str]:
        """The JSON text of each stored item of job *job_id* (its ``data``), in the order
        they were scraped, read in chunks (never the whole job in memory)."""

    def prune(self, table: TableSpec, older_than: float, *, batch_rows: int) -> Iterator[int]:
        """Delete the rows of *table* from before *older_than* (epoch seconds; for jobs,
        only finished ones), in transactions of at most *batch_rows* rows, so that a crawl
        writing at the same time is never blocked for long; yield each transaction's count."""

    def create_statements(self, tables: Sequence[TableSpec]) -> list[str]:
        """The statements that create *tables* (indexes and the schema version row
        included) as :meth:`open` would, for a DBA to run where ``INGEST_CREATE_TABLES`` is
        False; each a complete statement without a trailing semicolon."""


#: the longest payload a dead letter keeps, in characters
DEAD_LETTER_PAYLOAD_MAX = 1_000_000


def row_payload(kind: str, row: Row) -> str:
    """What a dead letter keeps of *row*: an item's JSON (its last column), else the row."""
    last = row[-1]
    if kind == "items" and isinstance(last, (bytes, bytearray)):
        return bytes(last).decode("utf-8", "replace")
    if kind == "items" and isinstance(last, str):  # a backend with json_as_text
        return last
    return repr(row)


def cut_payload(payload: str) -> str:
    """*payload* cut to :data:`DEAD_LETTER_PAYLOAD_MAX` characters."""
    if len(payload) > DEAD_LETTER_PAYLOAD_MAX:
        return payload[:DEAD_LETTER_PAYLOAD_MAX] + "...[truncated]"
    return payload


def dead_letter_row(table: TableSpec, record: Any, reason: str) -> Row:
    """The dead-letter row of a replayed *record* of *table* (a row, or a job row's dict)
    refused for its content, as a crawl writes one. Its id comes from the record's, so that
    a batch replayed again stores it once."""
    if isinstance(record, dict):  # a job row
        key, job_id, payload = record.get("job_id"), record.get("job_id"), repr(dict(record))
    else:
        job_id = record[table.position("job_id")] if "job_id" in table.column_names else ""
        key, payload = record[0], row_payload(table.kind, record)
    payload = cut_payload(payload)
    digest = hashlib.blake2b(f"{table.name}\0{key!r}".encode(), digest_size=16).digest()
    letter_id = int.from_bytes(digest, "big")
    text = f"the database refused it: {reason} (replayed from the spill journal)"
    return (letter_id, safe_text(str(job_id or "")), table.kind, text, payload, time.time())


def clean_job_row(table: TableSpec, row: Mapping[str, Any]) -> dict[str, Any]:
    """*row* (a job row) with each text made storable (:func:`safe_text`) and each JSON value
    that is not valid JSON, or holds an escaped NUL (which PostgreSQL's jsonb refuses), left
    out (NULL): what a job row written by an older version, or another tool, may need."""
    cleaned = dict(row)
    for name, value in row.items():
        if name not in table.column_names or value is None:
            continue
        kind = table.column_kind(name)
        if kind == "text" and isinstance(value, str):
            cleaned[name] = safe_text(value)
        elif kind == "json" and isinstance(value, (bytes, bytearray, str)):
            try:
                orjson.loads(value)
            except orjson.JSONDecodeError:
                cleaned[name] = None
            else:
                text = value if isinstance(value, str) else bytes(value).decode()
                if "\\u0000" in text:
                    cleaned[name] = None
    return cleaned


def is_same_job(row: Mapping[str, Any], hostname: Any, pid: Any, started_at: float) -> bool:
    """Whether an existing job row is *row* itself, inserted by an earlier attempt.

    An insert whose commit went through but whose answer was lost (a dropped
    connection, a writer process that died) is tried again and finds its own
    row: that is no conflict.
    """
    return bool(
        hostname == row["hostname"]
        and pid == row["pid"]
        and abs(started_at - row["started_at"]) < 0.001
    )


def needs_migration(current: int | None, url: str, *, create_tables: bool) -> bool:
    """Whether tables at schema version *current* (None: new tables) need the current one.

    Raise :class:`SchemaError` for tables newer than this package, or older
    ones it may not change (``INGEST_CREATE_TABLES = False``).
    """
    if current == SCHEMA_VERSION:
        return False
    if current is not None and current > SCHEMA_VERSION:
        raise SchemaError(
            f"the tables in {url} have schema version {current}, newer than this "
            f"scrapy-ingestion knows ({SCHEMA_VERSION}). Fix: upgrade scrapy-ingestion."
        )
    if current is not None and not create_tables:
        raise SchemaError(
            f"the tables in {url} have schema version {current}, older than this "
            f"scrapy-ingestion's ({SCHEMA_VERSION}), and INGEST_CREATE_TABLES is False. "
            "Fix: run one crawl with INGEST_CREATE_TABLES = True (it adds the missing "
            "tables and columns), or apply the changes docs/tables.md lists."
        )
    return True


def conversions_by_kind(
    conversion: Callable[[ColumnKind], Callable[[Any], Any] | None],
) -> dict[str, list[tuple[int, Callable[[Any], Any]]]]:
    """For each record kind, the (column index, conversion) of the columns that need one.

    By kind: tables of one kind have the same columns, whatever their name.
    """
    return {
        kind: [
            (i, convert)
            for i, column in enumerate(table_spec(kind, "").columns)
            if (convert := conversion(column.kind)) is not None
        ]
        for kind in TABLE_KINDS
    }


def safe_text(value: str) -> str:
    """Text every database can store: no NUL, no lone surrogate (both become U+FFFD)."""
    if value.isascii() and "\x00" not in value:
        return value
    value = value.replace("\x00", "\ufffd")
    return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def log_migration(url: str, old: int) -> None:
    logger.info("Migrated the tables in %s from schema version %s to %s", url, old, SCHEMA_VERSION)


#: the statuses of the job rows that ``prune`` deletes (never a running job's)
PRUNED_JOB_STATUSES = ("finished", "crashed")


def retention_columns(table: TableSpec) -> tuple[str, ...]:
    """The timestamp columns whose first non-null value dates a row of *table* for ``prune``:
    when an item was last seen (else scraped), when a job finished (else was last refreshed),
    else the record's own time (``started_at``, ``logged_at``, ``created_at``)."""
    if table.kind in ("items", "item_versions"):
        return ("last_seen_at", "scraped_at")
    if table.kind == "jobs":
        return ("finished_at", "updated_at")
    if table.kind == "schema_version":
        raise ValueError("the schema version table is never pruned")
    return (next(c.name for c in table.columns if c.kind == "timestamp" and not c.nullable),)


def describe_error(exc: BaseException) -> str:
    """``ClassName: first line of the message``, credentials redacted."""
    text = str(exc).strip()
    first = redact_text(text.splitlines()[0]) if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
