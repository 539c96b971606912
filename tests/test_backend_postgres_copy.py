"""PostgreSQL's COPY text, formatted by the backend itself (a compiled row loop, and each
packed batch's JSON copied from its payload): every value is stored exactly as psycopg's own
``copy.write_row`` stores it, hostile values included, and a refused row costs only itself."""

from __future__ import annotations

import math
import random
import time
from typing import TYPE_CHECKING, Any

import orjson
import psycopg
import pytest
from psycopg import sql

from scrapy_ingest._shapes import Batch
from scrapy_ingest._time import TimestampFormatter
from scrapy_ingest.backends._retry import store_batch
from scrapy_ingest.backends.postgres import PostgresBackend
from scrapy_ingest.schema import all_tables

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from scrapy_ingest._shapes import Row
    from scrapy_ingest.schema import TableSpec

#: the same tables twice: written by the backend ("new_"), and by psycopg's write_row ("ref_")
TABLES = all_tables("new_") + all_tables("ref_")

TEXTS = [
    "plain",
    "tab\there",
    "new\nline",
    "carriage\rreturn",
    "back\\slash",
    "nul\x00byte",
    "lone \ud800 surrogate",
    "é € 日本",
    "\b\f\v",
]
#: epochs: rounding up to the next second, ties, before 1970, small, and an int
EPOCHS = [
    1765100000.123456,
    1765100000.9999996,
    1e9 + 0.0000005,
    8191.0000005,
    1.5,
    0.25,
    -1.5,
    1765100001,
]
DOCUMENTS = [
    {"title": "plain"},
    {"quote": 'say "hi"', "slash": "a\\b", "tab": "\t", "nl": "\n"},
    {"text": "é € 日本", "n": [1, 2.5, None, True]},
    {"control": "\x01\x1f\x7f"},
]


def _table(name: str) -> TableSpec:
    return next(t for t in TABLES if t.name == name)


@pytest.fixture
def backend(pg_url: str) -> Iterator[PostgresBackend]:
    backend = PostgresBackend(pg_url, TABLES, create_tables=True)
    backend.open()
    yield backend
    backend.close()


def _item_rows(count: int) -> Batch:
    """A packed batch of items with hostile texts, ids as ints and as text, odd timestamps."""
    rows: list[Row] = []
    payload = bytearray()
    for i in range(count):
        payload += orjson.dumps(DOCUMENTS[i % len(DOCUMENTS)])
        text = TEXTS[i % len(TEXTS)]
        epoch = EPOCHS[i % len(EPOCHS)]
        row_id: Any = (0x0190_0000 << 96) + i if i % 4 else f"{i:08d}-0000-7000-8000-000000000000"
        errors = orjson.dumps({"error": TEXTS[i % 4]}) if i % 5 == 0 else None
        rows.append(
            (
                row_id,
                "job-1",
                text,
                "dict",
                None if i % 2 else f"http://example.com/{text}",
                epoch,
                None,  # keyed items are upserted: test_crawl_keyed and others
                None if i % 3 else text,
                None if i % 3 else i,
                None if i % 3 else epoch,
                None if i % 3 else EPOCHS[(i + 1) % len(EPOCHS)],
                errors,
                len(payload),
            )
        )
    return Batch(rows, memoryview(bytes(payload)))


def _request_rows(count: int) -> list[Row]:
    latencies = [1.5, 0.1, 1e300, math.nan, math.inf, -math.inf, 3, None]
    return [
        (
            (0x0190_0000 << 96) + i,
            "job-1",
            "spider",
            f"http://example.com/{TEXTS[i % len(TEXTS)]}",
            "GET",
            None if i % 3 == 0 else 200 + i,
            EPOCHS[i % len(EPOCHS)],
            latencies[i % len(latencies)],
            None if i % 2 else 2**40 + i,
            None if i % 2 else (0x0190_0000 << 96) + i + 1000,
            i,
            0,
            None,
            None if i % 2 else TEXTS[i % len(TEXTS)],
            "fingerprint",
            i % 2 == 0,
            orjson.dumps({"Accept": TEXTS[i % 4]}) if i % 3 else None,
        )
        for i in range(count)
    ]


def _write_row_by_row(backend: PostgresBackend, table: TableSpec, rows: Sequence[Row]) -> None:
    """The reference: the backend's conversions, then psycopg's own ``copy.write_row``."""
    conversions = dict(backend._conversions[table.kind])
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table.name), sql.SQL(", ").join(map(sql.Identifier, table.column_names))
    )
    assert backend._pool is not None
    with backend._pool.connection() as conn, conn.cursor() as cur, cur.copy(statement) as copy:
        for row in rows:
            copy.write_row(
                [
                    value if value is None or i not in conversions else conversions[i](value)
                    for i, value in enumerate(row)
                ]
            )


def _stored(url: str, table: str) -> list[str]:
    with psycopg.connect(url) as conn:
        query = sql.SQL("SELECT t::text FROM {} t ORDER BY id").format(sql.Identifier(table))
        return [text for (text,) in conn.execute(query)]


def _same_as_reference(url: str, kind: str, count: int) -> None:
    new, ref = _stored(url, f"new_{kind}"), _stored(url, f"ref_{kind}")
    assert len(new) == count
    assert new == ref


def test_packed_batch_stored_as_write_row_stores_it(backend: PostgresBackend, pg_url: str) -> None:
    batch = _item_rows(40)
    backend.write(_table("new_items"), batch, idempotent=False)
    _write_row_by_row(backend, _table("ref_items"), batch.rows())
    _same_as_reference(pg_url, "items", 40)


def test_halves_and_plain_rows_stored_as_write_row_stores_them(
    backend: PostgresBackend, pg_url: str
) -> None:
    # a batch split to find a refused row is written in slices of it, which start inside
    # its payload; rows replayed from the spill journal come as plain rows
    batch = _item_rows(30)
    backend.write(_table("new_items"), batch[:7], idempotent=False)
    backend.write(_table("new_items"), batch[7:20], idempotent=True)
    backend.write(_table("new_items"), batch.rows()[20:], idempotent=False)
    _write_row_by_row(backend, _table("ref_items"), batch.rows())
    _same_as_reference(pg_url, "items", 30)


def test_non_ascii_payload(backend: PostgresBackend, pg_url: str) -> None:
    rows, payload = [], bytearray()
    for i in range(5):
        payload += orjson.dumps({"name": f"café n°{i}", "quote": '"'})
        rows.append(
            ((0x0190_0000 << 96) + i, "job", "s", "dict", None, 1.7e9 + i / 3)
            + (None,) * 6
            + (len(payload),)
        )
    batch = Batch(rows, bytes(payload))
    backend.write(_table("new_items"), batch, idempotent=False)
    _write_row_by_row(backend, _table("ref_items"), batch.rows())
    _same_as_reference(pg_url, "items", 5)


def test_requests_stored_as_write_row_stores_them(backend: PostgresBackend, pg_url: str) -> None:
    rows = _request_rows(24)
    backend.write(_table("new_requests"), rows, idempotent=False)
    _write_row_by_row(backend, _table("ref_requests"), rows)
    _same_as_reference(pg_url, "requests", 24)


def test_timestamps_as_the_formatter_writes_them(backend: PostgresBackend, pg_url: str) -> None:
    """The inline rounding of the row loop against TimestampFormatter, on many epochs."""
    epochs = [1.7e9 + k * 0.0000001 for k in range(0, 2_000_000, 997)]
    epochs += [2**30 + k / 2**21 for k in range(500)] + [8192 + k / 2**40 for k in range(500)]
    # exact ties: m/128 s is 7812.5 µs times m, rounded half to even
    epochs += [second + m / 128 for second in (1, 8192, 1765100000) for m in range(128)]
    rows = [
        ((0x0190_0000 << 96) + i, "job", "s", "dict", None, epoch) + (None,) * 6 + (b"{}",)
        for i, epoch in enumerate(epochs)
    ]
    backend.write(_table("new_items"), rows, idempotent=False)
    format_ts = TimestampFormatter()
    with psycopg.connect(pg_url) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        stored = [
            text for (text,) in conn.execute("SELECT scraped_at::text FROM new_items ORDER BY id")
        ]
        expected = [
            text
            for (text,) in conn.execute(
                "SELECT t::timestamptz::text FROM unnest(%s::text[]) WITH ORDINALITY u(t, n) "
                "ORDER BY n",
                [[format_ts(epoch) for epoch in epochs]],
            )
        ]
    assert stored == expected


def test_a_refused_row_costs_only_itself(backend: PostgresBackend, pg_url: str) -> None:
    rows, payload = [], bytearray()
    for i in range(9):
        # jsonb refuses an escaped NUL: the 6th row
        payload += b'{"n": "\\u0000"}' if i == 5 else b'{"n": %d}' % i
        rows.append(
            ((0x0190_0000 << 96) + i, "job", "s", "dict", None, 1.7e9 + i)
            + (None,) * 6
            + (len(payload),)
        )
    outcome = store_batch(backend, _table("new_items"), Batch(rows, bytes(payload)), 5)
    assert outcome.written == 8
    [(row, reason)] = outcome.dead
    assert row[0] == (0x0190_0000 << 96) + 5
    assert row[-1] == b'{"n": "\\u0000"}'
    assert "UntranslatableCharacter" in reason
    assert len(_stored(pg_url, "new_items")) == 8


def _modf_timestamp(epoch: float) -> str:
    """TimestampFormatter as it was: math.modf, rounded, carried, formatted with %06d."""
    fraction, whole = math.modf(epoch)
    second, micros = int(whole), round(fraction * 1e6)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    elif micros < 0:
        second, micros = second - 1, micros + 1_000_000
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(second))}.{micros:06d}+00:00"


def test_timestamp_formatter_rounds_as_modf_does() -> None:
    """The formatter's fast path (int() and a subtraction, digits from a table) against
    math.modf's, on many epochs, ties and carries into the next second included."""
    rand = random.Random(26)
    epochs = [rand.uniform(1, 4e9) for _ in range(50_000)]
    epochs += [rand.uniform(-1e6, 10) for _ in range(10_000)]
    epochs += [1765100000 + k * 1e-7 for k in range(50_000)]
    epochs += [1.0, 0.9999999, 1.9999995, 8192.0000005, 2**30 + 0.5 / 2**21, 5, -3, 0]
    # exact ties: m/128 s is 7812.5 µs times m, rounded half to even
    epochs += [second + m / 128 for second in (1, 8192, 1765100000, -5) for m in range(128)]
    format_ts = TimestampFormatter()
    assert [format_ts(epoch) for epoch in epochs] == [_modf_timestamp(e) for e in epochs]
