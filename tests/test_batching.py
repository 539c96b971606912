"""The flush rules of BatchWriter, by the batches they produce: rows, bytes and age.

Each test drives one writer with a real SQLite backend (its host stores each batch at once,
on the calling thread) and reads the size of every batch from the outcome the backend gives
for it, then the rows from the database. The age rule reads a clock the test moves by hand,
so that a batch exactly as old as ``INGEST_FLUSH_INTERVAL`` can be asked about.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest
from _helpers import Database, item_row

from scrapy_ingest import batching
from scrapy_ingest._aio import Future
from scrapy_ingest._ids import IdFactory
from scrapy_ingest.backends import Batch, LocalHost, WriteOutcome, local_host
from scrapy_ingest.batching import BatchWriter, BufferBudget
from scrapy_ingest.records import RecordEncoder
from scrapy_ingest.schema import all_tables

if TYPE_CHECKING:
    from collections.abc import Iterator

    from scrapy_ingest.schema import TableSpec

TABLES = all_tables("ingest_")
ITEMS = next(t for t in TABLES if t.kind == "items")
LARGE = 1 << 40  # a limit that is never reached


class StoreNow:
    """A host that stores each batch in the calling thread and answers at once."""

    def __init__(self, local: LocalHost) -> None:
        self.local = local

    def store(self, table: TableSpec, batch: Batch) -> Future[WriteOutcome]:
        return Future.of(self.local.store(table, batch))


class Writer:
    """A BatchWriter of ingest_items and the size of each batch it wrote, in order."""

    def __init__(self, host: StoreNow, *, rows: int = LARGE, bytes_: int = LARGE) -> None:
        self.batches: list[int] = []
        self.writer = BatchWriter(
            host,  # type: ignore[arg-type]
            ITEMS,
            budget=BufferBudget(LARGE),
            batch_rows=rows,
            batch_bytes=bytes_,
            on_outcome=self._answered,
        )
        self._encoder, self._ids, self._n = RecordEncoder(), IdFactory(), 0

    def _answered(self, table: TableSpec, outcome: WriteOutcome, seconds: float) -> None:
        assert (outcome.lost, outcome.dead, outcome.failure) == (0, [], ""), outcome
        self.batches.append(outcome.written)

    def add(self, count: int = 1, *, size: int = 1) -> None:
        """Add *count* rows of *size* bytes each."""
        for _ in range(count):
            now, self._n = time.time(), self._n + 1
            data = self._encoder.encode({"n": self._n})
            row = item_row(self._ids(now), "job", "spider", "dict", "http://x/", now, data)
            self.writer.add(row, size)

    def drain(self) -> None:
        drained = self.writer.drain()
        with pytest.raises(StopIteration):  # every batch was answered: nothing to wait for
            drained.send(None)


@pytest.fixture
def host(sqlite_url: str) -> Iterator[StoreNow]:
    local = local_host(sqlite_url, TABLES, create_tables=True, retry_timeout=30)
    local.open()
    try:
        yield StoreNow(local)
    finally:
        local.close()


class Clock:
    """``time.monotonic`` for :mod:`scrapy_ingest.batching`, moved by the test."""

    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(batching, "time", clock)
    return clock


def test_a_batch_leaves_when_it_has_batch_rows_rows(host: StoreNow, sqlite_url: str) -> None:
    writer = Writer(host, rows=1000)
    writer.add(999)
    assert writer.batches == []
    writer.add()  # the 1,000th row
    assert writer.batches == [1000]
    writer.add(1500)
    assert writer.batches == [1000, 1000]  # the last 500 wait for more
    writer.drain()
    assert writer.batches == [1000, 1000, 500]
    assert Database(sqlite_url).count("ingest_items") == 2500


def test_a_batch_of_one_row_each_when_batch_rows_is_1(host: StoreNow) -> None:
    writer = Writer(host, rows=1)
    writer.add(3)
    assert writer.batches == [1, 1, 1]


def test_a_batch_leaves_with_the_row_that_makes_it_reach_batch_bytes(
    host: StoreNow, sqlite_url: str
) -> None:
    writer = Writer(host, bytes_=900)
    writer.add(2, size=300)
    assert writer.batches == []  # 600 bytes
    writer.add(size=300)  # 900: reached
    assert writer.batches == [3]
    writer.add(2, size=300)
    writer.add(size=400)  # 1,000: past the limit, this row goes with the batch
    assert writer.batches == [3, 3]
    writer.add(size=2000)  # one row over the limit on its own
    assert writer.batches == [3, 3, 1]
    writer.add(size=899)
    writer.drain()
    assert writer.batches == [3, 3, 1, 1]
    assert Database(sqlite_url).count("ingest_items") == 8


def test_whichever_of_rows_and_bytes_is_reached_first_closes_the_batch(host: StoreNow) -> None:
    writer = Writer(host, rows=4, bytes_=1000)
    writer.add(4, size=100)  # 4 rows, 400 bytes
    writer.add(2, size=500)  # 2 rows, 1,000 bytes
    writer.add(3, size=100)
    writer.drain()
    assert writer.batches == [4, 2, 3]


def test_a_batch_leaves_on_the_tick_once_its_first_row_is_flush_interval_old(
    host: StoreNow, clock: Clock, sqlite_url: str
) -> None:
    interval = 1.0
    writer = Writer(host)
    writer.add()  # at 100.0
    clock.now = 100.5
    writer.writer.flush_older_than(interval)
    assert writer.batches == []
    writer.add()  # at 100.5: the batch's age is still its first row's
    clock.now = 100.875
    writer.writer.flush_older_than(interval)
    assert writer.batches == []
    clock.now = 101.0  # the first row is exactly the interval old
    writer.writer.flush_older_than(interval)
    assert writer.batches == [2]
    assert Database(sqlite_url).count("ingest_items") == 2
    # the next batch's age starts with its own first row, not the previous batch's
    clock.now = 101.5
    writer.add()
    clock.now = 102.25
    writer.writer.flush_older_than(interval)
    assert writer.batches == [2]
    clock.now = 102.5
    writer.writer.flush_older_than(interval)
    assert writer.batches == [2, 1]
    writer.writer.flush_older_than(interval)  # nothing buffered: no empty batch
    writer.drain()
    assert writer.batches == [2, 1]
