"""How much memory a crawl takes while its database does not take rows (issue 23).

    python bench/locked_table.py [--pages 600] [--lock-seconds 20] [--buffer-mib 8]

The test suite's site and spider, ``--pages`` pages of ``--per-page`` items of about 0.8 KB
of JSON (``--size`` bytes of padding), 8 pages at a time, into a fresh database of
PostgreSQL (SCRAPY_INGEST_BENCH_PG_DSN or SCRAPY_INGEST_TEST_PG_DSN, else a throwaway local
server like the tests'), with ``INGEST_MAX_BUFFER_BYTES`` = ``--buffer-mib``. Once items are
stored and 2 s more have passed, another connection holds ``LOCK TABLE ingest_items IN
ACCESS EXCLUSIVE MODE`` for ``--lock-seconds``: every write to the table waits.

The crawl's memory is sampled from this process every 50 ms (tests/_memory.py): the RSS of
the crawl process, of its writer process (and any other descendant), and the bytes of its
batches waiting in ``/dev/shm``, which are RAM that neither process's RSS shows. Prints each
one's peak from the lock to the crawl's end, the peak of their sum over its mean in the 2 s
before the lock (the growth), the setting and their ratio; the items yielded per second
before the lock and in each half of the lock; the engine's pauses; the items stored after
the release. Exits with an error unless every item is stored exactly once and none spilled.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import services  # noqa: E402  (tests/services.py: the site and the throwaway PostgreSQL)
from _memory import MIB, run_locked_table  # noqa: E402


def postgres(stack: contextlib.ExitStack) -> str:
    """The URL of a fresh database."""
    admin = os.environ.get("SCRAPY_INGEST_BENCH_PG_DSN") or services.start_postgres(stack)[0]
    return services.with_database(admin, services.create_database(admin))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=600)
    parser.add_argument("--per-page", type=int, default=100)
    parser.add_argument("--size", type=int, default=700, help="bytes of padding per item")
    parser.add_argument("--buffer-mib", type=int, default=8)
    parser.add_argument("--lock-seconds", type=float, default=20)
    options = parser.parse_args()
    buffer = options.buffer_mib * MIB
    items = options.pages * options.per_page
    with contextlib.ExitStack() as stack:
        url = postgres(stack)
        site = services.LocalSite()
        site.start()
        stack.callback(site.stop)
        workdir = Path(tempfile.mkdtemp(prefix="bench-locked-table-"))
        run = run_locked_table(
            site.base_url,
            url,
            workdir,
            buffer=buffer,
            pages=options.pages,
            per_page=options.per_page,
            size=options.size,
            lock_seconds=options.lock_seconds,
        )
    stats = run.result.stats
    peaks, baseline = run.peaks, run.baseline
    first, second = run.lock_halves
    print(f"locked table: {items} items, lock held {run.lock_end - run.lock_start:.1f} s")
    print(f"{'':<24} {'baseline':>9} {'peak':>9}")
    for name, before, peak in (
        ("crawl process RSS", baseline.crawl, peaks.crawl),
        ("writer process RSS", baseline.children, peaks.children),
        ("/dev/shm batches", baseline.shm, peaks.shm),
        ("sum", baseline.total, peaks.total),
    ):
        print(f"{name:<24} {before / MIB:>6.1f}Mi {peak / MIB:>6.1f}Mi")
    print(
        f"growth {run.growth / MIB:.1f} MiB over the baseline; INGEST_MAX_BUFFER_BYTES "
        f"{buffer / MIB:.0f} MiB; ratio {run.growth / buffer:.2f}x the setting "
        f"({peaks.samples} samples)"
    )
    print(f"growth during the lock itself {run.growth_during_lock / MIB:.1f} MiB")
    print(
        f"items yielded: {run.rate_before:.0f}/s before the lock; {first} in its first half, "
        f"{second} in its second half"
    )
    print(
        f"engine pauses {stats.get('ingest/buffer/pauses', 0)} "
        f"({stats.get('ingest/buffer/paused_seconds', 0)} s); buffer waits "
        f"{stats.get('ingest/buffer/waits', 0)}"
    )
    print(f"stored after the release: {run.stored} rows, {run.distinct} distinct items")
    if run.result.returncode != 0:
        sys.exit(f"the crawl failed: {run.result.describe()}")
    if not run.stored == run.distinct == stats.get("item_scraped_count") == items:
        sys.exit(f"expected {items} items stored once: {run.describe()}")
    if stats.get("ingest/items/spilled"):
        sys.exit(f"items spilled during a lock: {run.describe()}")


if __name__ == "__main__":
    main()
