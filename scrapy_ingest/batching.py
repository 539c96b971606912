"""The writer: buffer rows on the reactor thread, write batches from writer threads.

A :class:`BatchWriter` serves one table of one backend. The reactor thread
only appends rows to a list; a batch leaves when it reaches
``INGEST_BATCH_ROWS`` rows or ``INGEST_BATCH_BYTES`` bytes, when it is older
than ``INGEST_FLUSH_INTERVAL``, or at close. Writing happens in the backend's
thread pool, where a refused batch is retried with backoff (transient errors)
or split until the bad record is found (data errors), so one bad value never
costs the other rows of its batch.

A :class:`BufferBudget` is shared by all writers of a crawler: while the bytes
buffered or in flight exceed ``INGEST_MAX_BUFFER_BYTES``, producers wait.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.python.failure import Failure as TwistedFailure

from scrapy_ingest._redact import redact_text
from scrapy_ingest.backends.base import Failure

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from concurrent.futures import Future, ThreadPoolExecutor

    from scrapy_ingest.backends.base import Backend, Row
    from scrapy_ingest.schema import TableSpec

logger = logging.getLogger(__name__)

_FIRST_RETRY_DELAY = 0.25
_MAX_RETRY_DELAY = 10.0


def run_in_thread(executor: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """Run ``fn(*args)`` in *executor*; the returned Deferred fires on the reactor thread."""
    from twisted.internet import reactor

    d: Deferred[Any] = Deferred()

    def done(future: Future[Any]) -> None:
        reactor.callFromThread(_fire, d, future)  # type: ignore[attr-defined]

    executor.submit(fn, *args).add_done_callback(done)
    return d


def _fire(d: Deferred[Any], future: Future[Any]) -> None:
    exc = future.exception()
    if exc is None:
        d.callback(future.result())
    else:
        d.errback(TwistedFailure(exc))


class BufferBudget:
    """Bytes buffered or in flight across all writers of one crawler."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[Deferred[None]] = deque()

    @property
    def full(self) -> bool:
        return self.used >= self.limit

    def wait(self) -> Deferred[None]:
        """Return a Deferred that fires once the buffer is below its limit."""
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def release(self, size: int) -> None:
        self.used -= size
        while self._waiters and self.used < self.limit:
            self._waiters.popleft().callback(None)


@dataclass
class WriteOutcome:
    """What became of one batch."""

    written: int = 0
    #: (row, reason) of each record the database refused
    dead: list[tuple[Row, str]] = field(default_factory=list)
    #: rows given up on when retries ran out
    lost: int = 0
    retries: int = 0


class BatchWriter:
    """Buffer rows of one table and write them in batches, off the reactor thread."""

    def __init__(
        self,
        backend: Backend,
        table: TableSpec,
        *,
        executor: ThreadPoolExecutor,
        budget: BufferBudget,
        batch_rows: int,
        batch_bytes: int,
        retry_timeout: float,
        on_outcome: Callable[[TableSpec, WriteOutcome], None],
    ) -> None:
        self.backend = backend
        self.table = table
        self._executor = executor
        self._budget = budget
        self._batch_rows = batch_rows
        self._batch_bytes = batch_bytes
        self._retry_timeout = retry_timeout
        self._on_outcome = on_outcome
        self._rows: list[Row] = []
        self._bytes = 0
        self._first_at = 0.0
        self._inflight: set[Deferred[Any]] = set()

    def add(self, row: Row, size: int) -> None:
        """Buffer *row*, which takes about *size* bytes (reactor thread)."""
        rows = self._rows
        if not rows:
            self._first_at = time.monotonic()
        rows.append(row)
        self._bytes += size
        self._budget.used += size
        if len(rows) >= self._batch_rows or self._bytes >= self._batch_bytes:
            self.flush()

    def flush(self) -> None:
        """Send the buffered rows to a writer thread."""
        if not self._rows:
            return
        rows, size = self._rows, self._bytes
        self._rows, self._bytes = [], 0
        d = run_in_thread(self._executor, self._store, rows)
        self._inflight.add(d)
        d.addBoth(self._stored, d, len(rows), size)

    def flush_older_than(self, age: float) -> None:
        if self._rows and time.monotonic() - self._first_at >= age:
            self.flush()

    @property
    def pending(self) -> bool:
        return bool(self._rows or self._inflight)

    def drain(self) -> Deferred[Any]:
        """Flush, and return a Deferred that fires when every batch has been written."""
        self.flush()
        return DeferredList(list(self._inflight), consumeErrors=True)

    def _stored(
        self, result: WriteOutcome | TwistedFailure, d: Deferred[Any], count: int, size: int
    ) -> None:
        self._inflight.discard(d)
        self._budget.release(size)
        if isinstance(result, TwistedFailure):
            logger.error(
                "Writing %d rows to %s failed unexpectedly; the rows are lost",
                count,
                self.table.name,
                exc_info=(result.type, result.value, result.getTracebackObject()),
            )
            result = WriteOutcome(lost=count)
        self._on_outcome(self.table, result)

    # writer thread

    def _store(self, rows: Sequence[Row]) -> WriteOutcome:
        """Write *rows*: retry transient failures, split batches to isolate bad records."""
        outcome = WriteOutcome()
        pending: list[Sequence[Row]] = [rows]
        idempotent = False
        delay = _FIRST_RETRY_DELAY
        deadline = time.monotonic() + self._retry_timeout
        while pending:
            chunk = pending.pop()
            try:
                self.backend.write(self.table, chunk, idempotent=idempotent)
            except Exception as exc:
                kind = self.backend.classify(exc)
                if kind is Failure.DATA:
                    self._split(chunk, exc, pending, outcome)
                    continue
                # the outcome of the failed transaction may be unknown from here on
                idempotent = True
                if kind is Failure.DUPLICATE:
                    pending.append(chunk)
                    continue
                if time.monotonic() + delay > deadline:
                    outcome.lost += len(chunk) + sum(map(len, pending))
                    logger.error(
                        "Giving up on %d rows for %s at %s after %.0f s of retries: %s",
                        outcome.lost,
                        self.table.name,
                        self.backend.url,
                        self._retry_timeout,
                        _describe(exc),
                    )
                    return outcome
                logger.warning(
                    "Writing %d rows to %s at %s failed (%s); retrying in %.2f s",
                    len(chunk),
                    self.table.name,
                    self.backend.url,
                    _describe(exc),
                    delay,
                )
                outcome.retries += 1
                time.sleep(delay)
                delay = min(delay * 2, _MAX_RETRY_DELAY) * random.uniform(0.8, 1.2)
                pending.append(chunk)
            else:
                outcome.written += len(chunk)
        return outcome

    @staticmethod
    def _split(
        chunk: Sequence[Row],
        exc: Exception,
        pending: list[Sequence[Row]],
        outcome: WriteOutcome,
    ) -> None:
        if len(chunk) == 1:
            outcome.dead.append((chunk[0], _describe(exc)))
            return
        middle = len(chunk) // 2
        # pending is a stack: push the second half first so rows keep their order
        pending.append(chunk[middle:])
        pending.append(chunk[:middle])


def _describe(exc: BaseException) -> str:
    text = redact_text(str(exc).strip().splitlines()[0] if str(exc).strip() else "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
