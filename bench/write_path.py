"""Rows/s of our PostgreSQL write path against a plain psycopg COPY of the same rows.

    python bench/write_path.py [--rows N] [--batch 2000]

The rows are the ones the pipeline captures for the bench crawl's items
(ids, timestamps, orjson-encoded data). Each method writes them in batches,
into fresh tables of the same shape and indexes, in a fresh database:

* ``writer process``: what a crawl uses, ProcessHost (batch files, child
  process, rows through psycopg's ``write_row``);
* ``in thread``: the same backend in a writer thread (INGEST_WRITER_PROCESS=False);
* ``plain COPY``: psycopg's ``copy.write_row()`` of the same values;
* ``binary COPY``: the same rows as COPY BINARY built in Python, to compare
  the text format we use with the binary one.

The target (issue 2): writer process >= 0.7 of plain COPY.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import statistics
import struct
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

import psycopg  # noqa: E402
import services  # noqa: E402
from _crawl import make_item  # noqa: E402
from twisted.internet import defer, task  # noqa: E402

from scrapy_ingest._ids import IdFactory, format_uuid  # noqa: E402
from scrapy_ingest.backends import Batch, local_host  # noqa: E402
from scrapy_ingest.hosting import ProcessHost, ThreadHost  # noqa: E402
from scrapy_ingest.records import RecordEncoder  # noqa: E402
from scrapy_ingest.schema import all_tables  # noqa: E402

_EPOCH_2000 = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc).timestamp()


#: the columns of an items row between scraped_at and data, for an item without a key
_UNKEYED = (None,) * 6


def make_rows(count: int) -> list[tuple[object, ...]]:
    encoder, ids = RecordEncoder(), IdFactory()
    rows = []
    for i in range(count):
        item = make_item(i, "http://127.0.0.1:8000/")
        now = time.time()
        data = encoder.encode(item)
        rows.append(
            (ids(now), "job", "bench", "dict", "http://127.0.0.1:8000/", now, *_UNKEYED, data)
        )
    return rows


def batches(rows: list[tuple[object, ...]], size: int) -> list[list[tuple[object, ...]]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def fresh_database(admin: str) -> str:
    return services.with_database(admin, services.create_database(admin))


def packed(rows: list[tuple[object, ...]]) -> Batch:
    """The batch as BatchWriter hands it over: JSON in one buffer, rows hold its end offsets."""
    payload = bytearray()
    packed_rows = []
    for row in rows:
        payload += row[-1]  # type: ignore[operator]
        packed_rows.append((*row[:-1], len(payload)))
    return Batch(packed_rows, payload)


async def our_path(host: object, rows: list, size: int) -> float:
    tables = {t.kind: t for t in all_tables("ingest_")}
    await host.open()  # type: ignore[attr-defined]
    batches_ = [packed(batch) for batch in batches(rows, size)]
    started = time.perf_counter()
    # as in a crawl: batches are handed over as they fill, answers come back later
    stored = [host.store(tables["items"], batch) for batch in batches_]  # type: ignore[attr-defined]
    outcomes = [await one for one in stored]
    seconds = time.perf_counter() - started
    assert sum(o.written for o in outcomes) == len(rows), outcomes
    await host.close()  # type: ignore[attr-defined]
    return seconds


def plain_copy(url: str, rows: list, size: int) -> float:
    host = local_host(url, all_tables("ingest_"), create_tables=True, retry_timeout=0)
    host.open()  # creates the same tables and indexes
    host.close()
    values = [
        (
            format_uuid(r[0]),
            r[1],
            r[2],
            r[3],
            r[4],
            dt.datetime.fromtimestamp(r[5], dt.timezone.utc),
            r[-1].decode(),  # the JSON: the last column
        )
        for r in rows
    ]
    columns = "id, job_id, spider, item_type, url, scraped_at, data"
    with psycopg.connect(url) as conn:
        started = time.perf_counter()
        for batch in batches(values, size):
            with conn.cursor().copy(f"COPY ingest_items ({columns}) FROM STDIN") as copy:
                for row in batch:
                    copy.write_row(row)
            conn.commit()
        return time.perf_counter() - started


def binary_copy(url: str, rows: list, size: int) -> float:
    host = local_host(url, all_tables("ingest_"), create_tables=True, retry_timeout=0)
    host.open()
    host.close()
    columns = "id, job_id, spider, item_type, url, scraped_at, data"
    head, field_count = struct.Struct(">h"), 7
    with psycopg.connect(url) as conn:
        started = time.perf_counter()
        for batch in batches(rows, size):
            parts = [b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)]
            for r in batch:
                text = [s.encode() for s in r[1:5]]
                micros = int((r[5] - _EPOCH_2000) * 1_000_000)
                parts.append(head.pack(field_count))
                parts.append(struct.pack(">i", 16) + r[0].to_bytes(16, "big"))
                for t in text:
                    parts.append(struct.pack(">i", len(t)) + t)
                parts.append(struct.pack(">iq", 8, micros))
                parts.append(struct.pack(">ib", len(r[-1]) + 1, 1) + r[-1])
            parts.append(head.pack(-1))
            with conn.cursor().copy(
                f"COPY ingest_items ({columns}) FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.write(b"".join(parts))
            conn.commit()
        return time.perf_counter() - started


async def measure(reactor: object, options: argparse.Namespace) -> None:
    rows = make_rows(options.rows)
    tables = all_tables("ingest_")

    def thread_host(url: str) -> ThreadHost:
        return ThreadHost(local_host(url, tables, create_tables=True, retry_timeout=10))

    def process_host(url: str) -> ProcessHost:
        return ProcessHost(url, tables, create_tables=True, retry_timeout=10)

    methods = {
        "writer process": lambda url: our_path(process_host(url), rows, options.batch),
        "in thread": lambda url: our_path(thread_host(url), rows, options.batch),
        "plain COPY": lambda url: _now(plain_copy(url, rows, options.batch)),
        "binary COPY": lambda url: _now(binary_copy(url, rows, options.batch)),
    }
    results: dict[str, list[float]] = {name: [] for name in methods}
    with contextlib.ExitStack() as stack:
        admin = services.start_postgres(stack)[0]
        for _ in range(options.repeat):
            for name, method in methods.items():
                seconds = await method(fresh_database(admin))
                results[name].append(options.rows / seconds)
                print(f"{name:<15} {options.rows / seconds:>10.0f} rows/s", flush=True)
    print()
    plain = statistics.median(results["plain COPY"])
    for name, rates in results.items():
        rate = statistics.median(rates)
        print(f"{name:<15} {rate:>10.0f} rows/s  {rate / plain:.2f} of plain COPY")


async def _now(value: float) -> float:
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(measure(reactor, options)))


if __name__ == "__main__":
    main()
