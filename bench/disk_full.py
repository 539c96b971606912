"""A full disk under the spill journal while the database is down (issue 23), with the
free-space guard off and at its default.

    sudo python bench/disk_full.py [--pages 400] [--stop-after 6] [--disk 2m]

Needs root: the spill journal is on a tmpfs of ``--disk`` (2 MB) that the script mounts (and
unmounts); without root it exits with a message. Needs PostgreSQL's binaries too: the script
starts a throwaway server of its own, as the tests do, since it stops and starts it.

The test suite's site and spider, ``--pages`` pages of 100 items, 8 pages at a time with
100 ms per page, ``INGEST_RETRY_TIMEOUT = 2``, into a fresh database; PostgreSQL is stopped
``--stop-after`` seconds after the crawl starts and started again once the crawl has ended,
and then ``scrapy ingest replay`` runs. Once with ``INGEST_SPILL_MIN_FREE_BYTES = 0`` (the
guard off: the disk fills up) and once at its default (the larger of 1% of the disk and
256 MiB, so the first spilled batch closes the spider).

Prints, for each: items yielded (``item_scraped_count``), stored during the crawl, spilled,
stored by the replay, lost (``ingest/items/lost``), the crawl's exit code and close reason,
and the job row's status and close reason after the replay. Exits with an error when a yielded
item is neither in the table nor counted lost, or one is stored twice.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import services  # noqa: E402  (tests/services.py: the site and the throwaway PostgreSQL)
from _helpers import Crawl, Database, ingest_replay, stored_items  # noqa: E402

GUARDS = {"off": 0, "default": None}


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Any:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def run(
    guard: str,
    server: services.LocalPostgres,
    admin: str,
    site: services.LocalSite,
    options: argparse.Namespace,
) -> dict[str, Any]:
    url = services.with_database(admin, services.create_database(admin))
    workdir = Path(tempfile.mkdtemp(prefix=f"disk-full-{guard}-"))
    spill = workdir / "spill"
    spill.mkdir()
    settings: dict[str, Any] = {
        "INGEST_DATABASE_URL": url,
        "INGEST_SPILL_DIR": str(spill),
        "INGEST_RETRY_TIMEOUT": 2,
        "INGEST_FLUSH_INTERVAL": 0.2,
        "LOG_LEVEL": "WARNING",
    }
    if GUARDS[guard] is not None:
        settings["INGEST_SPILL_MIN_FREE_BYTES"] = GUARDS[guard]
    args = {
        "base_url": site.base_url,
        "pages": options.pages,
        "per_page": 100,
        "delay_ms": 100,
        "settings": settings,
    }
    with tmpfs(spill, options.disk):
        crawl = Crawl(args, workdir)
        try:
            time.sleep(options.stop_after)
            server.pause()
            try:
                result = crawl.wait(timeout=600)
            finally:
                server.resume()
        finally:
            crawl.kill()
        before = stored_items(url)[0]
        replayed = ingest_replay({"INGEST_DATABASE_URL": url, "INGEST_SPILL_DIR": spill}, workdir)
        if replayed.returncode:
            sys.exit(f"scrapy ingest replay failed:\n{replayed.stdout}{replayed.stderr}")
        rows, distinct = stored_items(url)
    stats = result.stats
    jobs = Database(url).jobs()
    job = jobs[0] if jobs else {}
    figures = {
        "yielded": stats.get("item_scraped_count", 0),
        "stored": stats.get("ingest/items/stored", 0),
        "spilled": stats.get("ingest/items/spilled", 0),
        "replayed": rows - before,
        "lost": stats.get("ingest/items/lost", 0),
        "exit": result.returncode,
        "reason": stats.get("finish_reason", "?"),
        "job": f"{job.get('status')}/{job.get('close_reason')}",
        "in table": distinct,
    }
    if rows != distinct:
        sys.exit(f"{guard}: {rows - distinct} items stored twice")
    if distinct + figures["lost"] != figures["yielded"]:
        sys.exit(f"{guard}: items unaccounted for: {figures}\n{result.output[-3000:]}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=400)
    parser.add_argument("--stop-after", type=float, default=6.0, help="seconds")
    parser.add_argument("--disk", default="2m", help="size of the tmpfs (mount -o size=)")
    parser.add_argument("--guard", choices=GUARDS, action="append")
    options = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/disk_full.py mounts a tmpfs for the spill journal: run it as root")
    bindir = services.find_pg_bindir()
    if bindir is None:
        sys.exit("no PostgreSQL binaries: apt-get install -y postgresql")
    print(
        f"{'guard':<8} {'yielded':>8} {'stored':>8} {'spilled':>8} {'replayed':>8} "
        f"{'lost':>7} {'exit':>4}  {'close reason':<20} job row (after replay)"
    )
    with contextlib.ExitStack() as stack:
        server = services.LocalPostgres(bindir)
        stack.callback(server.stop)
        admin = server.start()
        site = services.LocalSite()
        site.start()
        stack.callback(site.stop)
        for guard in options.guard or list(GUARDS):
            f = run(guard, server, admin, site, options)
            print(
                f"{guard:<8} {f['yielded']:>8} {f['stored']:>8} {f['spilled']:>8} "
                f"{f['replayed']:>8} {f['lost']:>7} {f['exit']:>4}  {f['reason']:<20} {f['job']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
