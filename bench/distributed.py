"""Pages/s of a distributed crawl with 1, 2 and 4 worker processes on one scrapy-redis frontier.

    python bench/distributed.py [--pages 2000] [--latency-ms 100] [--concurrency 8] [--rounds 1]

The site (bench/_site.py) answers each page after ``--latency-ms`` milliseconds, so the crawl is
I/O bound, as crawls of remote sites are: one worker, at ``--concurrency`` requests at a time,
cannot go faster than concurrency / latency pages/s, and more workers add to that until the
machine's cores run out. Each run starts the workers (bench/_distributed_crawl.py: a RedisSpider
with the add-on) against a throwaway ``redis-server`` (tests/services.py) and a fresh PostgreSQL
database (SCRAPY_INGEST_BENCH_PG_DSN or SCRAPY_INGEST_TEST_PG_DSN, else a throwaway local server
like the tests'), and checks that every page was stored once. The rate is measured from the
database: pages / (last download's end - first download's start), so process start-up and the
idle wait before the workers close are left out. Prints every run, then the medians and the
scaling factor against one worker. The target (issue 9): 4 workers >= 3x one, on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import services  # noqa: E402  (tests/services.py: the throwaway PostgreSQL and Redis)

WORKERS = (1, 2, 4)


def postgres(stack: contextlib.ExitStack) -> str:
    url = os.environ.get("SCRAPY_INGEST_BENCH_PG_DSN")
    return url or services.start_postgres(stack)[0]


def site(stack: contextlib.ExitStack, pages: int, latency_ms: float) -> str:
    process = subprocess.Popen(
        [sys.executable, str(HERE / "_site.py"), str(pages), str(latency_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )
    stack.callback(process.wait)
    stack.callback(process.terminate)
    assert process.stdout is not None
    return f"http://127.0.0.1:{process.stdout.readline().strip()}"


def crawl(
    workers: int, redis_url: str, db_url: str, base_url: str, concurrency: int
) -> tuple[int, int, int, float]:
    """Run one crawl with *workers* processes; return its downloads, distinct URLs downloaded,
    items stored and pages/s."""
    import psycopg
    import redis

    prefix = f"bench{secrets.token_hex(4)}"
    client = redis.Redis.from_url(redis_url)
    client.lpush(f"{prefix}:pages:start_urls", json.dumps({"url": f"{base_url}/page/0"}))
    command = [sys.executable, str(HERE / "_distributed_crawl.py"), redis_url, prefix, db_url]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    processes = [
        subprocess.Popen([*command, str(concurrency)], env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(workers)
    ]
    for process in processes:
        _, errors = process.communicate(timeout=600)
        if process.returncode != 0:
            sys.exit(f"a worker failed:\n{errors[-4000:]}")
    client.delete(*client.scan_iter(f"{prefix}:*"))
    client.close()
    with psycopg.connect(db_url) as conn:
        (pages, keys, first, last) = conn.execute(
            "SELECT count(*), count(DISTINCT url), extract(epoch FROM min(started_at)),"
            " extract(epoch FROM max(started_at + latency_ms * interval '1 millisecond'))"
            " FROM ingest_requests"
        ).fetchone()  # type: ignore[misc]
        items = conn.execute("SELECT count(*) FROM ingest_items").fetchone()[0]  # type: ignore[index]
    return pages, keys, items, float(pages) / float(last - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=2_000)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    options = parser.parse_args()
    rates: dict[int, list[float]] = {n: [] for n in WORKERS}
    with contextlib.ExitStack() as stack:
        admin = postgres(stack)
        redis_url = services.start_redis(stack)[0]
        base_url = site(stack, options.pages, options.latency_ms)
        for round_ in range(options.rounds):
            for workers in WORKERS:
                db_url = services.with_database(admin, services.create_database(admin))
                started = time.monotonic()
                pages, urls, items, rate = crawl(
                    workers, redis_url, db_url, base_url, options.concurrency
                )
                if not pages == urls == items == options.pages:
                    sys.exit(
                        f"{workers} workers: {pages} downloads of {urls} pages, {items} items, "
                        f"for a site of {options.pages} pages"
                    )
                rates[workers].append(rate)
                print(
                    f"round {round_ + 1} workers {workers}: {rate:7.1f} pages/s "
                    f"({time.monotonic() - started:.1f} s with start-up and idle close)",
                    flush=True,
                )
    print()
    base = statistics.median(rates[1])
    print(f"{'workers':<8}{'pages/s':>10}{'scaling':>9}")
    for workers in WORKERS:
        rate = statistics.median(rates[workers])
        print(f"{workers:<8}{rate:>10.1f}{rate / base:>9.2f}")


if __name__ == "__main__":
    main()
