"""The interface every backend implements, and what the writer expects of it.

A backend is used from writer threads only, never from the reactor thread.
Its methods block. Rows follow the conventions of :mod:`scrapy_ingest.schema`.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import orjson

from scrapy_ingest._redact import redact_text
from scrapy_ingest.exceptions import BackendRefused, BackendUnavailable, SchemaError
from scrapy_ingest.schema import SCHEMA_VERSION, TABLE_KINDS, table_spec

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

    from scrapy_ingest.schema import ColumnKind, TableSpec
    from scrapy_ingest.spill import OpenOutcome, ReplayOutcome, SpillJournal

logger = logging.getLogger(__name__)

Row = tuple[Any, ...]
_T = TypeVar("_T")

_FIRST_RETRY_DELAY = 0.25
#: a batch that still conflicts after this many idempotent writes (a unique key another
#: writer was inserting at the same moment resolves in one) is split like a refused one
_MAX_DUPLICATE_RETRIES = 8
_MAX_RETRY_DELAY = 10.0


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
        :func:`plan_upsert` says; the return value is then its ``changes``.
        """

    def classify(self, exc: BaseException) -> Failure:
        """Say what *exc*, raised by any method, means: from the driver's own error codes,
        never the message text. A backend may also offer ``explain_refusal(exc) -> str``,
        the cause and the fix of a :attr:`Failure.PERMANENT` error in plain words (see
        :func:`refusal`)."""

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


@dataclass
class Batch:
    """Rows on their way to a backend.

    With a *payload*, the rows are packed: the last column of each holds the
    offset where its JSON ends in *payload* (see ``BatchWriter.append_json``),
    and :meth:`rows` cuts the JSON out again, off the reactor thread.
    """

    packed_rows: list[Row]
    payload: bytes | bytearray | memoryview | None = None

    def rows(self, *, text: bool = False) -> list[Row]:
        """The rows, each with its JSON in its last column: as bytes, or with *text* as str.

        As text, the payload is decoded once; when it is ASCII (orjson writes other text as
        UTF-8, so it is not when an item holds such text), byte offsets are character
        offsets, and each row's JSON is a slice of the decoded text.
        """
        payload = self.payload
        if payload is None:
            return self.packed_rows
        if text:
            decoded = str(payload, "utf-8")
            if len(decoded) == len(payload):
                return self._cut(decoded)
        rows = self._cut(bytes(payload))
        if text:
            return [(*row[:-1], row[-1].decode()) for row in rows]
        return rows

    def _cut(self, payload: bytes | str) -> list[Row]:
        rows: list[Row] = []
        start = 0
        for row in self.packed_rows:
            end = row[-1]
            rows.append((*row[:-1], payload[start:end]))
            start = end
        return rows


@dataclass
class WriteOutcome:
    """What became of one batch."""

    written: int = 0
    #: (row, reason) of each record the database refused
    dead: list[tuple[Row, str]] = field(default_factory=list)
    #: on replay, the records of ``dead`` that the dead-letter table refused too (or that have
    #: no dead-letter table), with the reasons: the journal keeps them in a ``refused-*`` file
    dead_refused: list[tuple[Any, str]] = field(default_factory=list)
    #: rows given up on when retries ran out (and no spill journal took them)
    lost: int = 0
    retries: int = 0
    #: the rows not written when retries ran out, in order (to spill them)
    unwritten: list[Row] = field(default_factory=list)
    #: why the last attempt failed, when rows were not written
    failure: str = ""
    #: the database refuses this crawl (a Failure.PERMANENT error): the cause and the fix
    refused: str = ""
    #: rows put in the spill journal, and the bytes of the journal's batches after that
    spilled: int = 0
    journal_bytes: int = 0
    #: the disk under the journal has less than its minimum free space: why (the crawl
    #: takes the journal for full)
    journal_low: str = ""
    #: the journal could not take the rows given up on (``lost``) either: why
    spill_failed: str = ""
    #: spilled batches (of any table) replayed into the database after this one was written
    replayed_batches: int = 0
    replayed_rows: int = 0
    #: keyed items: item type -> [new, changed, unchanged]
    changes: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class Outage:
    """When the backend started failing, shared by every batch of one host.

    Retries of all batches end ``retry_timeout`` after the outage began, not
    after each batch's own first attempt, so a long outage costs the crawl
    (and its close) ``retry_timeout`` once, not once per batch in flight.
    """

    since: float | None = None

    def deadline(self, retry_timeout: float) -> float:
        start = time.monotonic() if self.since is None else self.since
        return start + retry_timeout

    def failed(self) -> None:
        if self.since is None:
            self.since = time.monotonic()

    def recovered(self) -> None:
        self.since = None


def store_batch(
    backend: Backend,
    table: TableSpec,
    rows: Sequence[Row],
    retry_timeout: float,
    *,
    outage: Outage | None = None,
    abort: Callable[[], bool] | None = None,
    idempotent: bool = False,
) -> WriteOutcome:
    """Write *rows*: retry transient failures, split the batch to isolate refused records.

    A transient failure (connection lost, server restarting) is retried with
    randomised exponential backoff until *retry_timeout* seconds after the
    *outage* began; after the first one every write is idempotent, since the
    failed transaction may have committed. A data failure splits the batch in
    two until the single refused record is found; it is returned in ``dead``
    with the reason, and every other row is stored. *abort* is asked before
    each wait: true means nobody is left to write for. Rows not written when the
    time is up are in ``unwritten`` (and counted in ``lost``), for the caller to
    spill or give up on. *idempotent* from the first write: a replayed batch may
    be stored already.
    """
    outage = outage or Outage()
    outcome = WriteOutcome()
    pending: list[Sequence[Row]] = [rows]
    delay = _FIRST_RETRY_DELAY
    duplicates = 0
    while pending:
        chunk = pending.pop()
        try:
            changes = backend.write(table, chunk, idempotent=idempotent)
        except Exception as exc:
            kind = failure_of(backend, exc)
            if kind is Failure.DUPLICATE:
                duplicates += 1
                if duplicates > _MAX_DUPLICATE_RETRIES:  # not a race: a row that conflicts
                    kind = Failure.DATA
            if kind is Failure.DATA:
                _split(chunk, exc, pending, outcome)
                continue
            idempotent = True
            if kind is Failure.DUPLICATE:
                pending.append(chunk)
                continue
            refused = kind is Failure.PERMANENT
            if refused:  # no retry can heal it: give the rows back at once
                outcome.refused = refusal(backend, exc)
            else:
                outage.failed()
            if (
                refused
                or time.monotonic() + delay > outage.deadline(retry_timeout)
                or (abort and abort())
            ):
                outcome.unwritten = [*chunk]
                for later in reversed(pending):  # a stack: the last pushed comes first
                    outcome.unwritten.extend(later)
                outcome.lost = len(outcome.unwritten)
                outcome.failure = describe_error(exc)
                return outcome
            logger.warning(
                "Writing %d rows to %s at %s failed (%s); retrying in %.2f s",
                len(chunk),
                table.name,
                backend.url,
                describe_error(exc),
                delay,
            )
            outcome.retries += 1
            time.sleep(delay)
            delay = min(delay * 2, _MAX_RETRY_DELAY) * random.uniform(0.8, 1.2)
            pending.append(chunk)
        else:
            outage.recovered()
            outcome.written += len(chunk)
            if changes:
                add_changes(outcome.changes, changes)
    return outcome


def add_changes(total: dict[str, list[int]], more: Mapping[str, Sequence[int]]) -> None:
    """Add *more* new / changed / unchanged counts (by item type) to *total*."""
    for item_type, counts in more.items():
        found = total.setdefault(item_type, [0, 0, 0])
        for i in range(3):
            found[i] += counts[i]


@dataclass(frozen=True)
class StoredItem:
    """The current row of one item key, as the database holds it."""

    id: Any
    content_hash: str | None
    version: int
    first_seen_at: float
    #: the whole row, in column order, when the backend read it (ClickHouse, which cannot
    #: update a row in place, writes it again)
    row: Row | None = None


@dataclass
class UpsertPlan:
    """What to write for a batch of keyed items, given the rows stored for their keys."""

    #: rows of keys the database does not hold yet
    inserts: list[Row] = field(default_factory=list)
    #: stored rows that a new version replaces: to the history table first
    archive: list[StoredItem] = field(default_factory=list)
    #: rows of this batch that a later row of the batch replaces: to the history table
    archive_rows: list[Row] = field(default_factory=list)
    #: (stored row, the row that replaces it: same key, next version)
    replaces: list[tuple[StoredItem, Row]] = field(default_factory=list)
    #: (stored row, its new last_seen_at): seen again with the same content
    touches: list[tuple[StoredItem, float]] = field(default_factory=list)
    #: item type -> [new, changed, unchanged], one count per row of the batch
    changes: dict[str, list[int]] = field(default_factory=dict)


def split_keyed(table: TableSpec, rows: Sequence[Row]) -> tuple[Sequence[Row], list[Row]]:
    """*rows* as (rows inserted as they are, keyed items upserted as :func:`plan_upsert`
    says); a batch without keyed items comes back whole, uncopied.

    The keyed rows come back with their content hash: the pipeline leaves it to the writer
    (off the reactor thread), and the row's ``content_hash`` holds the fields the hash
    leaves out until then (see :func:`content_hash`).
    """
    if not table.unique:
        return rows, []
    key_at = table.position("item_key")
    if all(row[key_at] is None for row in rows):
        return rows, []
    hash_at = table.position("content_hash")
    return [r for r in rows if r[key_at] is None], [
        _with_hash(r, hash_at) if isinstance(r[hash_at], tuple) else r
        for r in rows
        if r[key_at] is not None
    ]


def content_hash(data: bytes | str, leave_out: tuple[str, ...] = ()) -> str:
    """The content hash of a record: BLAKE2b (128 bits, hex) of its canonical JSON.

    *data* is the record as :meth:`~scrapy_ingest.records.RecordEncoder.encode` gives it
    with ``sort_keys``; *leave_out* names top-level fields the hash ignores
    (``INGEST_HASH_EXCLUDE``), which are taken out and the rest encoded again. orjson reads
    back what it wrote exactly, so the hash is the one of the record encoded without those
    fields in the first place.
    """
    if leave_out:
        fields = orjson.loads(data)
        for name in leave_out:
            del fields[name]
        data = orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
    elif isinstance(data, str):
        data = data.encode()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _with_hash(row: Row, hash_at: int) -> Row:
    digest = content_hash(row[-1], row[hash_at])
    return (*row[:hash_at], digest, *row[hash_at + 1 :])


def plan_upsert(
    table: TableSpec, rows: Sequence[Row], stored: Mapping[tuple[str, str], StoredItem]
) -> UpsertPlan:
    """Decide, in the batch's order, what becomes of each keyed item row.

    *stored* holds the current row of each key the database has (read, and locked where
    the database can, in the same transaction as the writes). A row whose content hash is
    that of the current version only moves ``last_seen_at``; one with another hash is the
    next version (``version`` + 1, ``first_seen_at`` kept), and the version it replaces goes
    to the history. Several rows of one key in a batch are versions in their order.

    A batch written again after a failure whose outcome is unknown may be stored already:
    the rows of a key up to the one whose id is the stored row's were applied, and are
    counted unchanged, not applied twice.
    """
    at = table.position
    applied = _applied_rows(table, rows, stored)
    type_at, key_at, hash_at = at("item_type"), at("item_key"), at("content_hash")
    version_at, first_at, last_at = at("version"), at("first_seen_at"), at("last_seen_at")
    plan = UpsertPlan()
    # key -> [the current row (of this batch) or None, the stored row or None, last seen]
    state: dict[tuple[str, str], list[Any]] = {}
    for index, row in enumerate(rows):
        key = (row[type_at], row[key_at])
        counts = plan.changes.setdefault(row[type_at], [0, 0, 0])
        if index <= applied.get(key, -1):
            counts[2] += 1
            continue
        entry = state.get(key)
        if entry is None:
            found = stored.get(key)
            if found is None:
                state[key] = [row, None, row[last_at]]
                counts[0] += 1
                continue
            entry = state[key] = [None, found, None]
        current, found, _ = entry
        current_hash = found.content_hash if current is None else current[hash_at]
        if row[hash_at] == current_hash:
            counts[2] += 1
            if current is None:
                entry[2] = row[last_at]
            else:
                entry[0] = _replace(current, {last_at: row[last_at]})
            continue
        counts[1] += 1
        if current is None:
            plan.archive.append(found)
            version, first_seen = found.version, found.first_seen_at
        else:
            plan.archive_rows.append(current)
            version, first_seen = current[version_at], current[first_at]
        entry[0] = _replace(row, {version_at: version + 1, first_at: first_seen})
        entry[2] = None
    _plan_writes(plan, state.values())
    return plan


def _plan_writes(plan: UpsertPlan, final: Iterable[list[Any]]) -> None:
    """Fill *plan* from the final [row, stored row, last seen] of each key."""
    for current, found, seen in final:
        if current is None:
            if seen is not None:
                plan.touches.append((found, seen))
        elif found is None:
            plan.inserts.append(current)
        else:
            plan.replaces.append((found, current))


def _applied_rows(
    table: TableSpec, rows: Sequence[Row], stored: Mapping[tuple[str, str], StoredItem]
) -> dict[tuple[str, str], int]:
    """Key -> index of the batch row that the stored row is (an earlier write of this batch
    committed), for the keys where there is one."""
    if not stored:
        return {}
    type_at, key_at = table.position("item_type"), table.position("item_key")
    stored_ids = {_id_text(found.id): key for key, found in stored.items()}
    applied = {}
    for index, row in enumerate(rows):
        key = stored_ids.get(_id_text(row[0]))
        if key is not None and key == (row[type_at], row[key_at]):
            applied[key] = index
    return applied


def _id_text(value: Any) -> str:
    # ids come as ints (capture), uuid.UUID or text (with or without dashes) from databases
    return f"{value:032x}" if isinstance(value, int) else str(value).replace("-", "").lower()


def _replace(row: Row, values: Mapping[int, Any]) -> Row:
    changed = list(row)
    for index, value in values.items():
        changed[index] = value
    return tuple(changed)


def retry_call(
    backend: Backend,
    call: Callable[[], _T],
    what: str,
    retry_timeout: float,
    *,
    outage: Outage,
    abort: Callable[[], bool] | None = None,
) -> _T:
    """Run *call*, retrying transient failures like :func:`store_batch`; re-raise the last.

    A permanent failure is not retried: it is raised as :class:`BackendRefused`, with the
    cause and the fix."""
    delay = _FIRST_RETRY_DELAY
    while True:
        try:
            result = call()
        except Exception as exc:
            kind = failure_of(backend, exc)
            if kind is Failure.PERMANENT:
                if isinstance(exc, BackendRefused):
                    raise
                raise BackendRefused(refusal(backend, exc)) from None
            if kind is not Failure.TRANSIENT:
                raise
            outage.failed()
            if time.monotonic() + delay > outage.deadline(retry_timeout) or (abort and abort()):
                raise
            logger.warning(
                "%s at %s failed (%s); retrying in %.2f s",
                what,
                backend.url,
                describe_error(exc),
                delay,
            )
            time.sleep(delay)
            delay = min(delay * 2, _MAX_RETRY_DELAY) * random.uniform(0.8, 1.2)
        else:
            outage.recovered()
            return result


def failure_of(backend: Backend, exc: BaseException) -> Failure:
    """What *exc* means (:meth:`Backend.classify`); a :class:`BackendRefused` the backend
    raised itself (at open) is permanent."""
    if isinstance(exc, BackendRefused):
        return Failure.PERMANENT
    return backend.classify(exc)


def refusal(backend: Backend, exc: BaseException) -> str:
    """The cause and the fix of a permanent failure, in plain words, naming the database."""
    if isinstance(exc, BackendRefused):
        return str(exc)
    explain: Callable[[BaseException], str] | None = getattr(backend, "explain_refusal", None)
    if explain is not None:
        return explain(exc)
    return (
        f"{backend.url} refuses this crawl ({describe_error(exc)}): no retry can fix that. "
        "Fix: see docs/reliability.md for what this error needs"
    )


def _split(
    chunk: Sequence[Row], exc: Exception, pending: list[Sequence[Row]], outcome: WriteOutcome
) -> None:
    if len(chunk) == 1:
        outcome.dead.append((chunk[0], describe_error(exc)))
        return
    middle = len(chunk) // 2
    # pending is a stack: push the second half first so rows keep their order
    pending.append(chunk[middle:])
    pending.append(chunk[:middle])


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


class LocalHost:
    """Runs a backend's work in the calling thread (a writer thread, or the writer process).

    With a spill *journal*, rows the database does not take within the retry
    timeout go to the journal instead of being given up on, and the host goes
    *down*: it no longer waits for the database, it spills each batch at once,
    and tries the database once per backoff step (a *probe*: one write, or one
    connection attempt). The first write that goes through brings it back up,
    and the journal is replayed. A database that cannot be opened at start
    sends the host down at once, unless *require_backend*.

    A database that *refuses* the crawl (:attr:`Failure.PERMANENT`: a refused password, a
    missing database or privilege) is never retried: at start, :meth:`open` and
    :meth:`insert_job` raise :class:`BackendRefused` whatever *require_backend* says; during
    the crawl the host is *refused* from then on: every batch and job row state goes to the
    journal at once (or is given up, without one), with ``refused`` set in the outcome.
    """

    def __init__(
        self,
        backend: Backend,
        retry_timeout: float,
        *,
        abort: Callable[[], bool] | None = None,
        tables: Sequence[TableSpec] = (),
        journal: SpillJournal | None = None,
        require_backend: bool = True,
        on_stuck: Callable[[bool], None] | None = None,
    ) -> None:
        self.backend = backend
        #: called with True when neither the database nor the journal takes rows (the crawl
        #: must stop taking work), with False once one of them does again
        self._on_stuck = on_stuck
        #: names of the tables prepared by open(); others are created at their first write
        self._ready = {table.name for table in tables}
        #: where replayed records refused for their content go
        self._dead_letters = next((t for t in tables if t.kind == "dead_letters"), None)
        self.url = backend.url
        self.threads = backend.threads
        self._retry_timeout = retry_timeout
        self._abort = abort
        self._outage = Outage()
        self._opened = False
        self._journal = journal
        self._require = require_backend or journal is None
        #: the latest state of each job row written through this host, to spill it whole
        self._jobs: dict[str, tuple[TableSpec, dict[str, Any]]] = {}
        self._down = False
        #: why the database refuses this crawl (the cause and the fix), once it has
        self._refused: str | None = None
        self._next_probe = 0.0
        self._probe_delay = _FIRST_RETRY_DELAY
        #: (batches, rows) replayed and not reported yet in a store() outcome or by recover()
        self._unreported = (0, 0)
        #: a replay stopped part way while the database answered again (it failed once more):
        #: tried again at the next probe time, and at the end of the crawl
        self._replay_pending = False
        #: since when neither the database nor the journal takes rows (monotonic), if so
        self._stuck_since: float | None = None

    # lifecycle

    def open(self) -> OpenOutcome:
        """Connect, prepare the tables, and replay the spill journal. Raise BackendUnavailable
        (when the database must be there) or SchemaError."""
        from scrapy_ingest.spill import OpenOutcome

        try:
            self.backend.open()
        except BackendRefused:
            raise  # no journal can help: nothing it holds would ever be written
        except BackendUnavailable as exc:
            if self._require:
                raise
            assert self._journal is not None
            self._go_down()
            return OpenOutcome(unavailable=str(exc), journal=str(self._journal.dir))
        self._opened = True
        return OpenOutcome(replayed=self._replay())

    def close(self) -> None:
        self.backend.close()

    def recover(self) -> ReplayOutcome | None:
        """At the end of a crawl: a database that is down gets a try now, whatever the probe
        schedule (the journal is replayed if it answers), and so do the batches drained next."""
        from scrapy_ingest.spill import ReplayOutcome

        batches, rows = self._unreported
        self._unreported = (0, 0)
        unreported = ReplayOutcome(batches, rows)
        if self._journal is None or self._refused is not None:
            return unreported
        if not self._down:
            if self._replay_pending:  # up again, but a replay stopped part way: once more
                self._replay_again()
                more_batches, more_rows = self._unreported
                self._unreported = (0, 0)
                unreported.batches += more_batches
                unreported.rows += more_rows
            return unreported
        self._next_probe = 0.0
        try:
            self._ensure_open()
        except Exception:
            return unreported
        outcome = self._replay()
        if outcome is None:
            return unreported
        if outcome.batches and not outcome.failed:
            self._down = False
            self._outage.recovered()
        outcome.batches += batches
        outcome.rows += rows
        return outcome

    def _ensure_open(self) -> None:
        # a writer process restarted while the database was down opens it at its next call
        if self._opened:
            return
        if self._down:
            self.backend.open()  # a probe: one attempt
            self._opened = True
            return
        retry_call(
            self.backend,
            self.backend.open,
            "Opening the database",
            self._retry_timeout,
            outage=self._outage,
            abort=self._abort,
        )
        self._opened = True

    def _retry(self, call: Callable[[], _T], what: str) -> _T:
        self._ensure_open()
        return retry_call(
            self.backend, call, what, self._retry_timeout, outage=self._outage, abort=self._abort
        )

    # down and up again

    def _go_down(self) -> None:
        if not self._down:
            self._down = True
            self._probe_delay = _FIRST_RETRY_DELAY
        self._outage.failed()
        self._next_probe = time.monotonic() + self._probe_delay
        self._probe_delay = min(self._probe_delay * 2, _MAX_RETRY_DELAY)

    def _probe_due(self) -> bool:
        return time.monotonic() >= self._next_probe

    def _came_back(self) -> None:
        logger.info("The database at %s answers again; replaying the spill journal", self.url)
        self._probe_delay = _FIRST_RETRY_DELAY
        self._down = False
        self._outage.recovered()
        self._replay_again()

    def _replay_again(self) -> None:
        """Replay the journal; what it replays is reported with the next batch's outcome, or by
        recover(). If the database fails again part way, the rest waits for the next probe."""
        replayed = self._replay()
        if replayed is None:
            return
        batches, rows = self._unreported
        self._unreported = (batches + replayed.batches, rows + replayed.rows)
        self._replay_pending = replayed.failed
        if replayed.failed:
            self._next_probe = time.monotonic() + self._probe_delay

    def _replay(self) -> ReplayOutcome | None:
        journal = self._journal
        if journal is None:
            return None
        return journal.replay(self._store_replayed, self._replay_job)

    def _store_replayed(self, table: TableSpec, rows: Sequence[Row]) -> WriteOutcome:
        """Write a spilled batch: split until the rows refused for their content are found,
        which go to the dead-letter table (as a crawl's would); the rest is stored. A batch
        the database does not take at all comes back ``lost``, to stay in the journal."""
        try:
            self._prepare(table)
            outcome = store_batch(
                self.backend,
                table,
                rows,
                0,  # no waiting: a batch the database does not take stays in the journal
                outage=Outage(),
                abort=self._abort,
                idempotent=True,
            )
            if outcome.dead and not outcome.lost:
                outcome.dead_refused = self._dead_letter(table, outcome.dead)
        except Exception as exc:
            return self._not_replayed(len(rows), exc)
        return outcome

    def _replay_job(self, table: TableSpec, row: Mapping[str, Any]) -> WriteOutcome:
        """Write a spilled job row; one refused for its content is written again with its
        values cleaned (:func:`clean_job_row`), else dead-lettered: it never blocks."""
        try:
            try:
                self._write_job(table, row)
            except Exception as exc:
                if failure_of(self.backend, exc) is not Failure.DATA:
                    raise
                cleaned = clean_job_row(table, row)
                if cleaned == row:
                    raise
                self._write_job(table, cleaned)
                logger.warning(
                    "The database at %s refused the spilled job row of %s (%s); it was "
                    "written with its text and JSON cleaned",
                    self.url,
                    row.get("job_id"),
                    describe_error(exc),
                )
        except Exception as exc:
            if failure_of(self.backend, exc) is not Failure.DATA:
                return self._not_replayed(1, exc)
            dead: list[tuple[Any, str]] = [(dict(row), describe_error(exc))]
            try:
                kept = self._dead_letter(table, dead)
            except Exception as later:
                return self._not_replayed(1, later)
            return WriteOutcome(dead=dead, dead_refused=kept)
        return WriteOutcome(written=1)

    def _write_job(self, table: TableSpec, row: Mapping[str, Any]) -> None:
        self.backend.insert_job(table, row)
        self.backend.update_job(table, row["job_id"], row, unless_finished=False)

    def _not_replayed(self, rows: int, exc: BaseException) -> WriteOutcome:
        """*rows* a replay could not write, because of *exc* (the database is unavailable,
        or refuses the replay)."""
        outcome = WriteOutcome(lost=rows, failure=describe_error(exc))
        if failure_of(self.backend, exc) is Failure.PERMANENT:
            outcome.refused = refusal(self.backend, exc)
        return outcome

    def _dead_letter(
        self, table: TableSpec, dead: Sequence[tuple[Any, str]]
    ) -> list[tuple[Any, str]]:
        """Put the replayed records in *dead*, refused for their content, in the dead-letter
        table; return those it refuses too (or all, without one), with both reasons. Raise
        when the database is unavailable (the batch stays in the journal: written again,
        nothing is stored twice, the dead letters' ids being those of their records)."""
        letters_table = self._dead_letters
        if letters_table is None or table.kind == "dead_letters":
            return list(dead)
        letters = [dead_letter_row(table, record, reason) for record, reason in dead]
        self._prepare(letters_table)
        result = store_batch(
            self.backend, letters_table, letters, 0, outage=Outage(), idempotent=True
        )
        if result.lost and not result.refused:
            raise BackendUnavailable(result.failure)
        refused = {letter[0]: why for letter, why in result.dead}
        refused.update((letter[0], result.refused) for letter in result.unwritten)
        return [
            (record, f"{reason}; the dead-letter table refused it too: {refused[letter[0]]}")
            for (record, reason), letter in zip(dead, letters, strict=True)
            if letter[0] in refused
        ]

    # writing

    def store(self, table: TableSpec, batch: Batch) -> WriteOutcome:
        rows = batch.rows(text=self.backend.json_as_text)
        if self._refused is not None:
            return self._set_aside(table, rows, WriteOutcome(refused=self._refused))
        was_down = self._down
        if was_down and not self._probe_due():
            return self._spill(table, rows, WriteOutcome(), "the database is still unavailable")
        try:
            self._ensure_open()
            self._prepare(table)
        except Exception as exc:
            return self._not_ready(table, rows, exc)
        outcome = store_batch(
            self.backend,
            table,
            rows,
            0 if was_down else self._retry_timeout,
            outage=self._outage,
            abort=self._abort,
            idempotent=was_down,
        )
        if outcome.unwritten or outcome.refused:
            return self._not_written(table, outcome)
        if was_down:
            self._came_back()
        elif self._replay_pending and self._probe_due():
            self._replay_again()
        # replays since the last answer (a job row write may have brought the host back)
        outcome.replayed_batches, outcome.replayed_rows = self._unreported
        self._unreported = (0, 0)
        return outcome

    def _not_ready(self, table: TableSpec, rows: list[Row], exc: Exception) -> WriteOutcome:
        """*rows* when the database could not be opened, or the table prepared, for them."""
        if failure_of(self.backend, exc) is Failure.PERMANENT:
            self._refused = refusal(self.backend, exc)
            return self._set_aside(table, rows, WriteOutcome(refused=self._refused))
        if self._journal is None or not self._transient(exc):
            return self._give_up(table, rows, describe_error(exc))
        self._go_down()
        return self._spill(table, rows, WriteOutcome(), describe_error(exc))

    def _not_written(self, table: TableSpec, outcome: WriteOutcome) -> WriteOutcome:
        """The rows a write gave back: refused, or not written within the retry timeout."""
        if outcome.refused:
            self._refused = outcome.refused
            return self._set_aside(table, outcome.unwritten, outcome)
        if self._journal is None:
            return self._give_up(table, outcome.unwritten, outcome.failure, outcome)
        self._go_down()
        return self._spill(table, outcome.unwritten, outcome, outcome.failure)

    def _transient(self, exc: Exception) -> bool:
        if isinstance(exc, BackendRefused):
            return False
        return isinstance(exc, BackendUnavailable) or self.backend.classify(exc) is (
            Failure.TRANSIENT
        )

    def _set_aside(self, table: TableSpec, rows: list[Row], outcome: WriteOutcome) -> WriteOutcome:
        """The rows of a refused database: to the journal, where `scrapy ingest replay` finds
        them once the cause is fixed (or given up, without a journal)."""
        if self._journal is None:
            return self._give_up(table, rows, outcome.refused, outcome)
        return self._spill(table, rows, outcome, "the database refuses this crawl")

    def _prepare(self, table: TableSpec) -> None:
        if table.history is not None:
            self._prepare(table.history)
        if table.name not in self._ready:
            self._retry(lambda: self.backend.create_table(table), f"Creating {table.name}")
            self._ready.add(table.name)

    def _spill(
        self, table: TableSpec, rows: list[Row], outcome: WriteOutcome, reason: str
    ) -> WriteOutcome:
        try:
            return self._spill_now(table, rows, outcome, reason)
        except OSError as exc:
            return self._keep(table, rows, outcome, reason, exc)

    def _spill_now(
        self, table: TableSpec, rows: list[Row], outcome: WriteOutcome, reason: str
    ) -> WriteOutcome:
        """Put *rows* in the journal; raise OSError when it cannot take them."""
        journal = self._journal
        assert journal is not None
        size = journal.spill(table, rows)
        journal.keep_reserve()
        self._unstuck()
        outcome.lost = 0
        outcome.unwritten = []
        outcome.spilled += len(rows)
        outcome.journal_bytes = journal.add_bytes(size)
        outcome.journal_low = journal.low_on_space() or ""
        logger.warning(
            "Spilled %d rows for %s to %s (%s)", len(rows), table.name, journal.dir, reason
        )
        return outcome

    def _keep(
        self,
        table: TableSpec,
        rows: list[Row],
        outcome: WriteOutcome,
        reason: str,
        error: OSError,
    ) -> WriteOutcome:
        """Neither the database nor the journal takes *rows* (its disk is full, say): try both
        again, with backoff, until ``retry_timeout`` after the journal first failed.

        The batch waits meanwhile, and the batches behind it: the crawl's buffer fills and
        its engine pauses, so the crawl stops taking work instead of dropping it. The time
        counts once for all batches: once it is up, each batch gets one try of each, and
        what neither takes is given up on (``lost``, with ``spill_failed`` saying why)."""
        assert self._journal is not None
        if self._stuck_since is None:
            self._stuck_since = time.monotonic()
            if self._on_stuck is not None:
                self._on_stuck(True)
            logger.error(
                "Neither the database at %s (%s) nor the spill journal in %s (%s) takes rows: "
                "the crawl waits, and tries both again for up to %s s (INGEST_RETRY_TIMEOUT)",
                self.url,
                reason,
                self._journal.dir,
                error,
                self._retry_timeout,
            )
        deadline = self._stuck_since + self._retry_timeout
        delay = _FIRST_RETRY_DELAY
        while time.monotonic() + delay <= deadline and not (self._abort and self._abort()):
            time.sleep(delay)
            delay = min(delay * 2, _MAX_RETRY_DELAY)
            rows = self._try_database(table, rows, outcome)
            if not rows:
                self._unstuck()
                return outcome
            try:
                return self._spill_now(table, rows, outcome, reason)
            except OSError as exc:
                error = exc
        outcome.spill_failed = f"the spill journal in {self._journal.dir} failed too: {error}"
        return self._give_up(table, rows, f"{reason}; {outcome.spill_failed}", outcome)

    def _unstuck(self) -> None:
        if self._stuck_since is not None:
            self._stuck_since = None
            if self._on_stuck is not None:
                self._on_stuck(False)

    def _try_database(self, table: TableSpec, rows: list[Row], outcome: WriteOutcome) -> list[Row]:
        """One attempt to write *rows* (no waiting), added to *outcome*; return those not
        written. A database that answers again gets its journal replayed."""
        if self._refused is not None:
            return rows
        try:
            self._ensure_open()
            self._prepare(table)
        except Exception:
            return rows
        result = store_batch(
            self.backend, table, rows, 0, outage=Outage(), abort=self._abort, idempotent=True
        )
        outcome.written += result.written
        outcome.dead.extend(result.dead)
        outcome.retries += result.retries
        add_changes(outcome.changes, result.changes)
        if result.refused:
            self._refused = outcome.refused = result.refused
            return result.unwritten
        if result.written and self._down:
            self._came_back()
            outcome.replayed_batches, outcome.replayed_rows = self._unreported
            self._unreported = (0, 0)
        return result.unwritten

    def _give_up(
        self, table: TableSpec, rows: list[Row], reason: str, outcome: WriteOutcome | None = None
    ) -> WriteOutcome:
        outcome = outcome or WriteOutcome()
        outcome.unwritten = []
        outcome.lost = len(rows)
        logger.error(
            "Giving up on %d rows for %s at %s: %s", len(rows), table.name, self.url, reason
        )
        return outcome

    # the job row

    def insert_job(self, table: TableSpec, row: Mapping[str, Any]) -> bool:
        self._jobs[row["job_id"]] = (table, dict(row))
        # at start: a refusal is raised (the crawl does not start), never spilled
        return bool(
            self._job_call(
                row["job_id"],
                lambda: self.backend.insert_job(table, row),
                "Inserting",
                True,
                refusable=False,
            )
        )

    def update_job(
        self, table: TableSpec, job_id: str, values: Mapping[str, Any], *, unless_finished: bool
    ) -> None:
        known = self._jobs.get(job_id)
        if known is not None:
            known[1].update(values)
        self._job_call(
            job_id,
            lambda: self.backend.update_job(table, job_id, values, unless_finished=unless_finished),
            "Updating",
            None,
        )

    def _job_call(
        self,
        job_id: str,
        call: Callable[[], _T],
        verb: str,
        spilled: _T,
        *,
        refusable: bool = True,
    ) -> _T:
        """Write the job row, or, while the database is down (or, if *refusable*, refuses
        this crawl), keep its latest state in the journal (written back before the batches)
        and return *spilled*."""
        known = self._jobs.get(job_id)
        spillable = self._journal is not None and known is not None
        if self._refused is not None and spillable and refusable:
            self._save_job(job_id)
            return spilled
        if self._down and spillable and not self._probe_due():
            self._save_job(job_id)
            return spilled
        try:
            if self._down:
                self._ensure_open()
                result = call()  # a probe
            else:
                result = self._retry(call, f"{verb} the job row")
        except Exception as exc:
            if spillable and refusable and failure_of(self.backend, exc) is Failure.PERMANENT:
                self._refused = refusal(self.backend, exc)
                self._save_job(job_id)
                return spilled
            if not spillable or not self._transient(exc):
                if self._down and failure_of(self.backend, exc) is Failure.PERMANENT:
                    raise BackendRefused(refusal(self.backend, exc)) from None
                raise
            self._go_down()
            self._save_job(job_id)
            return spilled
        if self._down:
            self._came_back()
        return result

    def mark_crashed(
        self, table: TableSpec, stale_before: float, alive: str, crawl_id: str | None = None
    ) -> list[str]:
        if self._down or self._refused is not None:
            return []  # the next crawl will see them
        return self._retry(
            lambda: self.backend.mark_crashed(table, stale_before, alive, crawl_id),
            "Marking crashed jobs",
        )

    def _save_job(self, job_id: str) -> None:
        assert self._journal is not None
        table, row = self._jobs[job_id]
        self._journal.save_job(table, job_id, row)
