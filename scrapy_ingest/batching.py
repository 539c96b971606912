"""The writer: buffer rows on the reactor thread, write batches from writer threads.

A :class:`BatchWriter` serves one table of one backend. The reactor thread
only appends rows to a list; a batch leaves when it reaches
``INGEST_BATCH_ROWS`` rows or ``INGEST_BATCH_BYTES`` bytes, when it is older
than ``INGEST_FLUSH_INTERVAL``, or at close, to the backend's host (writer
threads or a writer process, see :mod:`scrapy_ingest.hosting`); see
:func:`scrapy_ingest.backends._retry.store_batch` for retries and for how a
batch with one bad record is split so that the others are stored.

A :class:`BufferBudget` is shared by all writers of a crawler: while the bytes
buffered or in flight exceed ``INGEST_MAX_BUFFER_BYTES``, the engine takes no new
request and the item pipeline waits.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from functools import partial
from typing import TYPE_CHECKING

from scrapy_ingest._aio import Future, call, in_thread, settle, spawn
from scrapy_ingest._compat import call_later
from scrapy_ingest._shapes import Batch, WriteOutcome
from scrapy_ingest.exceptions import NotKept

if TYPE_CHECKING:
    from collections.abc import Callable
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from scrapy_ingest._compat import Cancellable
    from scrapy_ingest._shapes import Row
    from scrapy_ingest.hosting import Host
    from scrapy_ingest.schema import TableSpec
    from scrapy_ingest.spill import SpillJournal

logger = logging.getLogger(__name__)

#: INGEST_DURABLE: how long rows wait for others before their batch is journaled (seconds)
GROUP_COMMIT = 0.01


class DurableLog:
    """``INGEST_DURABLE``: each batch goes to the spill journal (fsync'd, in a thread) before
    the items in it are acknowledged, and leaves it once the database has it. After a crash,
    the next start replays what is left, like any spilled batch."""

    def __init__(self, journal: SpillJournal, executor: ThreadPoolExecutor) -> None:
        self._journal = journal
        self._executor = executor

    def write(self, table: TableSpec, batch: Batch) -> Future[Path]:
        return in_thread(self._write, table, batch, executor=self._executor)

    def _write(self, table: TableSpec, batch: Batch) -> Path:
        return self._journal.spill_file(table, batch.rows())[0]

    def forget(self, path: Path) -> None:
        removed = in_thread(path.unlink, True, executor=self._executor)  # missing_ok: replayed
        removed.add_done_callback(partial(_log_not_removed, path))


def _log_not_removed(path: Path, removed: Future[None]) -> None:
    if removed.exception() is not None:
        logger.error("Could not remove %s: %s", path, removed.exception())


#: what acknowledged() gives before any row
_SAFE: Future[None] = Future.of(None)


class BufferBudget:
    """Bytes buffered or in flight across all writers of one crawler.

    Rows are counted from the moment they are buffered until their batch is answered (written,
    spilled or given up on): a batch handed to the writer process, which waits in a file in
    ``/dev/shm`` until then, counts too. When the count reaches three quarters of the limit
    (:attr:`high_water`), *on_full* is called (the runtime pauses the engine: no request is
    taken until there is room again), and *on_room* once it is back under it: the last quarter
    is for the items of the responses downloaded meanwhile, which are still parsed. At the
    limit, producers that can wait (the item pipeline) wait.
    """

    def __init__(
        self,
        limit: int,
        *,
        on_full: Callable[[], None] | None = None,
        on_room: Callable[[], None] | None = None,
    ) -> None:
        self.limit = limit
        #: where the engine is paused
        self.high_water = limit - limit // 4
        self.used = 0
        #: whether the high-water mark was reached and the buffer has not been under it since
        self.full = False
        self._on_full = on_full
        self._on_room = on_room
        self._waiters: deque[Future[None]] = deque()

    def wait(self) -> Future[None]:
        """A future set once the buffer is below its limit."""
        room: Future[None] = Future()
        self._waiters.append(room)
        return room

    def reached(self) -> None:
        """The buffer holds its high-water mark or more (the caller has checked; hot path)."""
        if not self.full:
            self.full = True
            if self._on_full is not None:
                self._on_full()

    def release(self, size: int) -> None:
        self.used -= size
        if self.used >= self.high_water:
            if self.used < self.limit:
                self._wake_waiters()
            return
        self._wake_waiters()
        if self.full:
            self.full = False
            if self._on_room is not None:
                self._on_room()

    def _wake_waiters(self) -> None:
        while self._waiters and self.used < self.limit:
            self._waiters.popleft().set_result(None)


class BatchWriter:
    """Buffer rows of one table and write them in batches, off the reactor thread."""

    def __init__(
        self,
        host: Host,
        table: TableSpec,
        *,
        budget: BufferBudget,
        batch_rows: int,
        batch_bytes: int,
        on_outcome: Callable[[TableSpec, WriteOutcome, float], None],
        durable: DurableLog | None = None,
    ) -> None:
        self.host = host
        self.table = table
        self._budget = budget
        self._batch_rows = batch_rows
        self._batch_bytes = batch_bytes
        self._on_outcome = on_outcome
        self._rows: list[Row] = []
        # the JSON of packed rows, end to end (see append_json)
        self._payload = bytearray()
        self._bytes = 0
        self._first_at = 0.0
        #: batches handed over and not answered yet -> when they were handed over (monotonic)
        self._inflight: dict[Future[WriteOutcome], float] = {}
        self._durable = durable
        #: with INGEST_DURABLE: the buffered rows' acknowledgement, and the last row's
        self._ack: Future[None] | None = None
        self._last_ack: Future[None] | None = None
        self._commit: Cancellable | None = None

    def append_json(self, data: bytes) -> int:
        """Append a row's JSON to the batch; return the offset to put in its JSON column.

        A packed row holds, in place of its JSON, where that JSON ends in one
        buffer shared by the batch; the writer cuts it out again
        (:meth:`Batch.rows`). Copying each record's JSON into one contiguous
        buffer, instead of keeping thousands of separate bytes objects alive,
        lets the next record's encoding reuse the same, cache-warm memory:
        measured, it makes encoding on the reactor thread 3x faster in a crawl.
        Call it just before :meth:`add` of the row.
        """
        payload = self._payload
        payload += data
        return len(payload)

    def add(self, row: Row, size: int) -> None:
        """Buffer *row*, which takes about *size* bytes (reactor thread)."""
        rows = self._rows
        if not rows:
            self._first_at = time.monotonic()
            if self._durable is not None:
                self._start_group()
        rows.append(row)
        self._bytes += size
        budget = self._budget
        budget.used += size
        if budget.used >= budget.high_water:
            budget.reached()
        if len(rows) >= self._batch_rows or self._bytes >= self._batch_bytes:
            self.flush()

    def _start_group(self) -> None:
        self._ack = self._last_ack = Future()
        self._commit = call_later(GROUP_COMMIT, self.flush)

    def acknowledged(self) -> Future[None]:
        """Set once the rows added so far are safe (INGEST_DURABLE: in the journal); its
        error, NotKept, if they could not be kept."""
        ack = self._last_ack
        return _SAFE if ack is None else ack

    def flush(self) -> None:
        """Hand the buffered rows to the host, which writes them off the reactor thread."""
        if not self._rows:
            return
        batch = Batch(self._rows, self._payload or None)
        size = self._bytes
        self._rows, self._payload, self._bytes = [], bytearray(), 0
        stored: Future[WriteOutcome]
        if self._durable is not None:
            ack, self._ack = self._ack, None
            if self._commit is not None:
                self._commit.cancel()  # done or not
            self._commit = None
            assert ack is not None
            stored = spawn(self._store_durably(batch, ack))
        else:
            # call: a hand-over that fails at once (say, /dev/shm full) is counted like any
            # failed batch, and its bytes go back to the budget
            stored = call(self.host.store, self.table, batch)
        self._inflight[stored] = time.monotonic()
        stored.add_done_callback(partial(self._stored, len(batch.packed_rows), size))

    async def _store_durably(self, batch: Batch, ack: Future[None]) -> WriteOutcome:
        """Journal the batch, acknowledge its rows, then store it. When the journal cannot
        take it (its disk is full), the rows are acknowledged only once the database (or,
        later, the journal) has them: never, if neither does."""
        assert self._durable is not None
        path: Path | None = None
        try:
            path = await self._durable.write(self.table, batch)
        except Exception as exc:
            logger.error(
                "INGEST_DURABLE: could not journal %d rows of %s (%s); their items wait "
                "until the database has them",
                len(batch.packed_rows),
                self.table.name,
                exc,
            )
        else:
            ack.set_result(None)
        outcome = await call(self.host.store, self.table, batch)
        if path is None:
            if outcome.lost:
                why = outcome.spill_failed or outcome.failure or outcome.refused or "not written"
                ack.set_exception(
                    NotKept(f"{outcome.lost} rows of its batch were given up on: {why}")
                )
            else:
                ack.set_result(None)
        elif not outcome.lost:
            self._durable.forget(path)  # in the database, or spilled by the writer
        return outcome

    def flush_older_than(self, age: float) -> None:
        if self._rows and time.monotonic() - self._first_at >= age:
            self.flush()

    async def drain(self) -> None:
        """Flush, and return once every batch has been answered."""
        self.flush()
        # their errors are the outcomes' (see _stored)
        await settle(list(self._inflight))

    def oldest_inflight(self) -> float | None:
        """When the oldest batch still unanswered was handed over (monotonic), if any."""
        return min(self._inflight.values(), default=None)

    def _stored(self, count: int, size: int, stored: Future[WriteOutcome]) -> None:
        seconds = time.monotonic() - self._inflight.pop(stored)
        self._budget.release(size)
        error = stored.exception()
        if error is None:
            outcome = stored.result()
        else:
            logger.error(
                "Writing %d rows to %s failed unexpectedly; the rows are lost",
                count,
                self.table.name,
                exc_info=error,
            )
            outcome = WriteOutcome(lost=count, failure=f"writing them failed: {error}")
        self._on_outcome(self.table, outcome, seconds)
