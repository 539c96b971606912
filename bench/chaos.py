"""The fault scenarios of the reliability issue, against a real PostgreSQL, side by side.

    python bench/chaos.py [--items 20000]

Each scenario runs the same local crawl (the test suite's site and spider,
``--items`` items on pages of 100, 4 pages at a time with 20 ms per page) into a
fresh database of a throwaway PostgreSQL that the script stops and starts:

- ``no-fault``: nothing happens (the reference for wall time);
- ``restart``: PostgreSQL stopped and started again (1 s) once items are stored;
- ``down-middle``: PostgreSQL refuses connections for the middle half of the crawl;
- ``down-whole``: PostgreSQL down for the whole crawl, then ``scrapy ingest replay``;
- ``locked``: the items table locked for 10 s mid-crawl.

Prints, per scenario: items scraped, stored, duplicates, left in the spill
journal, peak RSS of the crawl process (Scrapy's ``memusage/max``), and wall
time against ``no-fault``. Needs PostgreSQL's binaries (``apt-get install -y
postgresql``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import services  # noqa: E402  (tests/services.py: the site and the throwaway PostgreSQL)
from _helpers import Crawl, CrawlResult, ingest_replay, stored_items  # noqa: E402

SCENARIOS = ("no-fault", "restart", "down-middle", "down-whole", "locked")


def crawl_args(site: services.LocalSite, url: str, spill: Path, items: int) -> dict[str, Any]:
    return {
        "base_url": site.base_url,
        "pages": items // 100,
        "per_page": 100,
        "delay_ms": 20,
        "settings": {
            "INGEST_DATABASE_URL": url,
            "INGEST_SPILL_DIR": str(spill),
            "INGEST_RETRY_TIMEOUT": 2,
            "CONCURRENT_REQUESTS": 4,
            "LOG_LEVEL": "WARNING",
        },
    }


def wait_for_items(url: str, crawl: Crawl) -> None:
    while crawl.running and stored_items(url)[0] == 0:
        time.sleep(0.05)


def run(
    name: str, server: services.LocalPostgres, admin: str, site: services.LocalSite, items: int
) -> tuple[CrawlResult, str, Path, float]:
    url = services.with_database(admin, services.create_database(admin))
    spill = Path(tempfile.mkdtemp(prefix="chaos-spill-"))
    args = crawl_args(site, url, spill, items)
    workdir = Path(tempfile.mkdtemp(prefix=f"chaos-{name}-"))
    if name == "down-whole":
        server.pause()
    started = time.monotonic()
    crawl = Crawl(args, workdir)
    try:
        if name == "restart":
            wait_for_items(url, crawl)
            server.pause()
            time.sleep(1)
            server.resume()
        elif name == "down-middle":
            expected = items / 100 / 4 * 0.03 + 3  # pages / concurrency * (20 ms + overhead)
            time.sleep(expected / 4)
            server.pause()
            time.sleep(expected / 2)
            server.resume()
        elif name == "locked":
            import psycopg

            wait_for_items(url, crawl)
            with psycopg.connect(url) as locker, locker.transaction():
                locker.execute("LOCK TABLE ingest_items IN ACCESS EXCLUSIVE MODE")
                time.sleep(10)
        result = crawl.wait(timeout=600)
    finally:
        crawl.kill()
    took = time.monotonic() - started
    if name == "down-whole":
        server.resume()
        settings = {"INGEST_DATABASE_URL": url, "INGEST_SPILL_DIR": spill}
        replayed = ingest_replay(settings, workdir)
        if replayed.returncode:
            sys.exit(f"scrapy ingest replay failed:\n{replayed.stdout}{replayed.stderr}")
    return result, url, spill, took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--scenario", choices=SCENARIOS, action="append")
    options = parser.parse_args()
    bindir = services.find_pg_bindir()
    if bindir is None:
        sys.exit("no PostgreSQL binaries: apt-get install -y postgresql")
    names = options.scenario or list(SCENARIOS)
    if "no-fault" not in names:
        names.insert(0, "no-fault")
    header = (
        f"{'scenario':<12} {'scraped':>8} {'stored':>8} {'dupes':>6} {'spilled':>8} "
        f"{'in spill':>8} {'peak RSS':>9} {'wall':>7} {'vs none':>7}"
    )
    print(header)
    reference = None
    with contextlib.ExitStack() as stack:
        server = services.LocalPostgres(bindir)
        stack.callback(server.stop)
        admin = server.start()
        site = services.LocalSite()
        site.start()
        stack.callback(site.stop)
        for name in names:
            result, url, spill, took = run(name, server, admin, site, options.items)
            rows, distinct = stored_items(url)
            left = len(list(spill.rglob("*.batch")))
            stats = result.stats
            reference = reference or took
            print(
                f"{name:<12} {stats.get('item_scraped_count', 0):>8} {distinct:>8} "
                f"{rows - distinct:>6} {stats.get('ingest/items/spilled', 0):>8} {left:>8} "
                f"{stats.get('memusage/max', 0) / 2**20:>7.0f}Mi {took:>6.1f}s "
                f"{took / reference:>6.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
