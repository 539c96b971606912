"""Rows/s of our ClickHouse write path against a plain clickhouse-connect insert of the same rows.

    python bench/clickhouse.py [--rows N] [--batch 2000] [--repeat 3]

The rows are the ones the pipeline captures for the bench crawl's items
(bench/write_path.py makes them). Each method writes them in batches into a
fresh chDB data directory (chDB runs the ClickHouse engine in-process and
allows one directory per process, so each method runs in a process of its
own, as the writer process of a crawl does):

* ``writer process``: what a crawl uses: ProcessHost, the ClickHouse backend
  in its child process (batch files, rows converted there, ``client.insert``);
* ``plain insert``: ``client.insert()`` of the same rows, converted to the
  values ClickHouse columns take before the clock starts;
* ``typed insert``: the same, given the column types (read once, before the
  clock), as our backend gives them: without them, clickhouse-connect runs a
  ``DESCRIBE TABLE`` before each insert. Shown to tell that saving apart from
  the rest; the target is against ``plain insert``.

Set SCRAPY_INGEST_BENCH_CH_URL (``clickhouse://user:pw@host:8123``) to measure
against a ClickHouse server instead of chDB. The target (issue 4): writer
process >= 0.8 of plain insert.
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from write_path import batches, make_rows, our_path  # noqa: E402

from scrapy_ingest._ids import format_uuid  # noqa: E402
from scrapy_ingest.schema import all_tables  # noqa: E402

#: an unkeyed item's row as our backend writes it: its id as item_key, version 0 (the other
#: columns are NULL)
COLUMNS = [
    "id",
    "job_id",
    "spider",
    "item_type",
    "url",
    "scraped_at",
    "item_key",
    "version",
    "data",
]


def target(tmp: Path, name: str) -> str:
    server = os.environ.get("SCRAPY_INGEST_BENCH_CH_URL")
    if server:
        import clickhouse_connect

        database = f"bench_{name}_{os.getpid()}_{time.monotonic_ns()}"
        clickhouse_connect.get_client(dsn=server).command(f"CREATE DATABASE {database}")
        return f"{server.rstrip('/')}/{database}"
    return f"chdb://{tmp / name}"


def plain_insert(url: str, rows_file: str, size: int, *, typed: bool = False) -> float:
    """In a process of its own: create the tables as we do, then time client.insert()."""
    import clickhouse_connect

    from scrapy_ingest.backends import local_host

    host = local_host(url, all_tables("ingest_"), create_tables=True, retry_timeout=0)
    host.open()
    host.close()
    rows = pickle.loads(Path(rows_file).read_bytes())
    values = []
    for r in rows:
        uuid = format_uuid(r[0])
        values.append(
            [uuid, r[1], r[2], r[3], r[4], round(r[5] * 1_000_000), uuid, 0, r[-1].decode()]
        )
    client = clickhouse_connect.get_client(dsn=url)
    types = None
    if typed:
        context = client.create_insert_context("ingest_items", COLUMNS)
        types = context.column_types
    started = time.perf_counter()
    for batch in batches(values, size):
        client.insert("ingest_items", batch, column_names=COLUMNS, column_types=types)
    seconds = time.perf_counter() - started
    client.close()
    return seconds


def writer_process(url: str, rows_file: str, size: int) -> float:
    """In a process of its own (its child is the writer process): time our write path."""
    from twisted.internet import defer, task

    from scrapy_ingest.hosting import ProcessHost

    rows = pickle.loads(Path(rows_file).read_bytes())
    host = ProcessHost(url, all_tables("ingest_"), create_tables=True, retry_timeout=10)
    result: list[float] = []

    async def run(reactor: object) -> None:
        result.append(await our_path(host, rows, size))

    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise
    return result[0]


def typed_insert(url: str, rows_file: str, size: int) -> float:
    return plain_insert(url, rows_file, size, typed=True)


METHODS = {
    "writer process": writer_process,
    "plain insert": plain_insert,
    "typed insert": typed_insert,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "URL", "ROWS_FILE"), help="internal")
    options = parser.parse_args()
    if options.one:
        method, url, rows_file = options.one
        print(METHODS[method](url, rows_file, options.batch))
        return
    with tempfile.TemporaryDirectory(prefix="bench_clickhouse_") as tmp_name:
        tmp = Path(tmp_name)
        rows_file = tmp / "rows.pickle"
        rows_file.write_bytes(pickle.dumps(make_rows(options.rows)))
        results: dict[str, list[float]] = {name: [] for name in METHODS}
        for n in range(options.repeat):
            for name in METHODS:
                url = target(tmp, f"{name.replace(' ', '_')}_{n}")
                out = subprocess.run(
                    [sys.executable, __file__, "--batch", str(options.batch), "--one", name,
                     url, str(rows_file)],
                    check=True, capture_output=True, text=True,
                )  # fmt: skip
                seconds = float(out.stdout.strip().splitlines()[-1])
                results[name].append(options.rows / seconds)
                print(f"{name:<15} {options.rows / seconds:>10.0f} rows/s", flush=True)
    print()
    plain = statistics.median(results["plain insert"])
    for name, rates in results.items():
        rate = statistics.median(rates)
        print(f"{name:<15} {rate:>10.0f} rows/s  {rate / plain:.2f} of plain insert")


if __name__ == "__main__":
    main()
