"""Every benchmark script runs to its end, on small sizes.

The scripts under ``bench/`` are not run by anything else, and a change to the rows or tables
can break one without a test noticing (``bench/clickhouse.py`` did). Each script also checks what
it measured (every item stored, every page fetched, nothing lost or stored twice) and exits with
an error otherwise, so a run here is a check of those too. Their speeds are not looked at.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import service_missing

BENCH = Path(__file__).resolve().parent.parent / "bench"

#: script, arguments, and a word its report must print
RUNS = {
    "items": (["items.py", "--items", "2000", "--pairs", "1", "--partial"], "buffer"),
    "items-keys": (["items.py", "--items", "2000", "--pairs", "1", "--keys"], "rekeyed"),
    "items-metrics": (["items.py", "--items", "2000", "--pairs", "1", "--metrics"], "metrics"),
    "items-durable": (["items.py", "--items", "2000", "--pairs", "1", "--durable"], "durable"),
    "items-clickhouse": (["items.py", "--items", "2000", "--pairs", "1", "--clickhouse"], "ingest"),
    "items-backends": (
        ["items.py", "--items", "2000", "--pairs", "1", "--backends", "postgres,sqlite,chdb"],
        "ingest-chdb",
    ),
    "items-sizes": (
        ["items.py", "--sizes", "1000,3000", "--pairs", "1", "--backends", "postgres"],
        "us per item",
    ),
    "pages": (["pages.py", "--pages", "200", "--pairs", "1"], "ingest"),
    "retry": (["retry.py", "--pages", "200", "--pairs", "1"], "backoff"),
    "write-path": (["write_path.py", "--rows", "4000", "--repeat", "1"], "plain COPY"),
    "clickhouse": (["clickhouse.py", "--rows", "4000", "--repeat", "1"], "of plain insert"),
    "redact": (["redact.py", "--rounds", "1", "--number", "200"], "log line"),
    "chaos": (["chaos.py", "--items", "2000", "--scenario", "down-whole"], "down-whole"),
    "locked-table": (
        ["locked_table.py", "--pages", "1000", "--buffer-mib", "4", "--lock-seconds", "3"],
        "ratio",
    ),
    "distributed": (
        ["distributed.py", "--pages", "60", "--latency-ms", "5", "--rounds", "1"],
        "scaling",
    ),
    "disk-full": (["disk_full.py", "--pages", "600", "--stop-after", "2"], "ingest_spill_full"),
    "empty-crawl": (["empty_crawl.py", "--pairs", "1", "--fresh"], "difference"),
    "empty-crawl-postgres": (
        ["empty_crawl.py", "--pairs", "1", "--backend", "postgres"],
        "difference",
    ),
}


@pytest.mark.postgres
@pytest.mark.parametrize("name", RUNS)
def test_the_benchmark_runs(name: str, postgres_dsn: str, request: pytest.FixtureRequest) -> None:
    argv, expected = RUNS[name]
    if name == "distributed":  # it starts a redis-server of its own: skip (or fail) without one
        request.getfixturevalue("redis_server_url")
    if name == "disk-full" and os.geteuid() != 0:  # it mounts a tmpfs
        service_missing("bench/disk_full.py mounts a tmpfs: it needs root")
    env = {**os.environ, "SCRAPY_INGEST_BENCH_PG_DSN": postgres_dsn}
    done = subprocess.run(
        [sys.executable, str(BENCH / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert expected in done.stdout, output[-3000:]
