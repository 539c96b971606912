"""A distributed crawl on one machine: Redis, N worker processes, one database, then SQL.

    python examples/distributed/run.py [--workers 3] [--database-url postgresql://...]

Starts a throwaway ``redis-server`` on 127.0.0.1 (a free port, nothing saved to disk), serves
the demo bookshop (``examples/demo/site``) on 127.0.0.1, seeds its start URL in Redis, runs
``scrapy crawl books`` in N processes of the ``bookshop`` project next to this file (scrapy-redis
shares their queue and dupefilter), waits for them to finish, then prints one row per crawl and
one per worker job, from the database (by default ``ingest.sqlite3`` in the current directory,
where the workers' logs go too: ``worker-<n>.log``).

Needs ``pip install "scrapy-ingestion[redis]"`` (plus ``[postgres]`` for PostgreSQL) and
Debian's ``redis-server`` (``apt-get install -y redis-server``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SITE = HERE.parent / "demo" / "site"

#: one row per crawl: the job rows of all its workers, added up (docs/distributed.md)
CRAWL_QUERY = """
SELECT crawl_id, count(*) AS jobs, sum(items_count) AS items,
       sum(requests_count) AS requests, sum(errors_count) AS errors
FROM ingest_jobs GROUP BY crawl_id
"""
JOBS_QUERY = """
SELECT hostname, pid, status, items_count, requests_count FROM ingest_jobs ORDER BY started_at
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{what} exited at start (code {process.returncode})")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    sys.exit(f"{what} did not listen on 127.0.0.1:{port} within 20 s")


def start(stack: contextlib.ExitStack, command: list[str], port: int, what: str) -> None:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(process.wait)
    stack.callback(process.terminate)
    wait_for_port(port, process, what)


def start_redis(stack: contextlib.ExitStack) -> str:
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(server):
        sys.exit("redis-server is not installed. Fix: apt-get install -y redis-server")
    port, workdir = free_port(), tempfile.mkdtemp(prefix="redis-")
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    command = [server, "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
    start(stack, [*command, "--appendonly", "no", "--dir", workdir], port, "redis-server")
    return f"redis://127.0.0.1:{port}/0"


def serve_site(stack: contextlib.ExitStack) -> str:
    port = free_port()
    command = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1"]
    start(stack, [*command, "--directory", str(SITE), str(port)], port, "the demo site")
    return f"http://127.0.0.1:{port}/"


def seed(redis_url: str, start_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    client.lpush("books:start_urls", json.dumps({"url": start_url}))
    client.close()


def crawl(workers: int, redis_url: str, database_url: str) -> None:
    command = [sys.executable, "-m", "scrapy.cmdline", "crawl", "books", "-s", "LOG_LEVEL=INFO"]
    command += ["-s", f"REDIS_URL={redis_url}", "-s", f"INGEST_DATABASE_URL={database_url}"]
    # the bookshop has 25 pages: a few requests at a time each, so that every worker gets some
    command += ["-s", "CONCURRENT_REQUESTS=2"]
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    env.pop("SCRAPY_SETTINGS_MODULE", None)
    print(f"+ {workers} x scrapy crawl books (logs: worker-<n>.log)", flush=True)
    processes = []
    for number in range(workers):
        with Path(f"worker-{number}.log").open("wb") as log:
            processes.append(
                subprocess.Popen(command, cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
    failed = [n for n, process in enumerate(processes) if process.wait() != 0]
    if failed:
        sys.exit(f"workers {failed} failed: see worker-<n>.log")


def query(database_url: str, sql: str) -> tuple[list[str], list[tuple[object, ...]]]:
    if database_url.startswith("sqlite:///"):
        import sqlite3

        with contextlib.closing(sqlite3.connect(database_url[len("sqlite:///") :])) as db:
            cursor = db.execute(sql)
            return [c[0] for c in cursor.description], cursor.fetchall()
    import psycopg

    with psycopg.connect(database_url) as db:
        cursor = db.execute(sql)  # type: ignore[arg-type]
        return [c.name for c in cursor.description or ()], cursor.fetchall()


def show(database_url: str, sql: str) -> None:
    header, rows = query(database_url, sql)
    cells = [[str(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(header)]
    print("\n" + " ".join(sql.split()))
    for line in (header, ["-" * w for w in widths], *cells):
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--database-url", help="default: sqlite:///$PWD/ingest.sqlite3")
    options = parser.parse_args()
    if options.database_url is None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"ingest.sqlite3{suffix}").unlink(missing_ok=True)
        # absolute: the workers run in the project's directory
        options.database_url = f"sqlite:///{Path('ingest.sqlite3').resolve()}"
    with contextlib.ExitStack() as stack:
        redis_url = start_redis(stack)
        site_url = serve_site(stack)
        seed(redis_url, site_url)
        crawl(options.workers, redis_url, options.database_url)
    show(options.database_url, CRAWL_QUERY)
    show(options.database_url, JOBS_QUERY)


if __name__ == "__main__":
    main()
