"""Items/s of the same 100,000-item crawl with no pipeline, a JSON Lines feed and the add-on.

    python bench/items.py [--items N] [--pairs 3]

Each crawl runs in a fresh process (bench/_crawl.py), in alternating order
(none, feed, ingest, none, feed, ingest, ...), each add-on crawl into a fresh
PostgreSQL database. PostgreSQL comes from SCRAPY_INGEST_BENCH_PG_DSN (or
SCRAPY_INGEST_TEST_PG_DSN), else a throwaway local server like the tests'.
Prints every run, then the medians and each mode's ratio to no pipeline.
The target (issue 2): ingest >= 0.90 of none, with every item stored.
Every run also has ``quiet``: no pipeline, with the log formatter that the
add-on sets (``scrapy_ingest.IngestLogFormatter``, which omits Scrapy's
per-item DEBUG message when no log handler would take it). The last column, each
mode's ratio to quiet, is the cost of the add-on's own per-item work alone.
With --metrics, the add-on runs with and without the Prometheus extension
(scraped every second while it runs); issue 5's target: metrics costs at most
3% more than ingest.
With --durable, the add-on runs with and without INGEST_DURABLE (each batch
journaled, fsync'd, before its items are acknowledged), to measure its cost.
With --keys, the add-on runs with and without INGEST_ITEM_KEYS (every item upserted by
its sku into a fresh database: ``keyed``), and once more into the database of the
``keyed`` run before it (every item found unchanged: ``rekeyed``); issue 8's target:
keyed >= 0.85 of none.
With --clickhouse, the add-on writes into a fresh chDB directory per run
instead (issue 4's target is the same 0.90).
With --backends postgres,sqlite,chdb, the add-on runs once per named backend in every round
(``ingest-postgres``, ``ingest-sqlite``, ``ingest-chdb``, each into a fresh database), beside
``none`` and ``quiet``: issue 26's targets are PostgreSQL >= 0.90 of quiet and at most 8 us of
CPU per item over quiet, SQLite and chDB >= 0.80 of quiet.

Every run's CPU time is measured from outside: user + system time of the crawl process and of
the children it waited for (the writer process), from ``os.wait4``. The summary prints each
mode's CPU per item over quiet, in microseconds: its CPU time less quiet's, over the items,
which counts the fixed cost of a crawl (the writer process's start-up, the add-on's imports)
as if it were paid per item.
With --sizes 50000,150000, every round runs every mode at each size, and the summary splits
that cost in two: per item (the slope of the CPU over quiet between the smallest and the
largest size, from the medians) and per crawl (what is left at zero items): the issue's
measure of what each item costs, "flat from 50,000 to 200,000 items, plus a fixed cost".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import services  # noqa: E402  (tests/services.py: the throwaway PostgreSQL)

MODES = ("none", "quiet", "feed", "ingest")
#: the modes that write into a database
WRITING = ("ingest", "buffer", "metrics", "durable", "keyed", "rekeyed")
PARTIAL = ("encode", "buffer")


def postgres(stack: contextlib.ExitStack) -> str:
    url = os.environ.get("SCRAPY_INGEST_BENCH_PG_DSN")
    return url or services.start_postgres(stack)[0]


def crawl(mode: str, items: int, url: str | None) -> dict[str, float]:
    """Run one crawl in a process of its own; its result, with the CPU time of its process tree."""
    args = [sys.executable, str(HERE / "_crawl.py"), mode, str(items)]
    if url:
        args.append(url)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = subprocess.Popen(args, stdout=out, stderr=err)
        # the crawl process's own CPU time and that of the children it waited for
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if child.returncode:
            sys.exit(f"{mode} crawl exited {child.returncode}:\n{err.read().decode()[-4000:]}")
        result = json.loads(out.read().decode().strip().splitlines()[-1])
    result["cpu"] = round(usage.ru_utime + usage.ru_stime, 3)
    return result


def backend_url(backend: str, admin: str, stack: contextlib.ExitStack) -> str:
    """A fresh database of *backend* for one run."""
    if backend == "chdb":
        return f"chdb://{stack.enter_context(tempfile.TemporaryDirectory())}/chdb"
    if backend == "sqlite":
        return f"sqlite:///{stack.enter_context(tempfile.TemporaryDirectory())}/items.sqlite3"
    return services.with_database(admin, services.create_database(admin))


def parse_options() -> tuple[argparse.Namespace, tuple[str, ...]]:
    """The command line's options, and the modes of each round, in order."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument(
        "--sizes",
        help="comma-separated item counts: run every mode at each, and split the CPU over "
        "quiet into a cost per item (the slope) and a cost per crawl",
    )
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="compare ingest with and without the Prometheus extension (scraped every second)",
    )
    parser.add_argument(
        "--clickhouse",
        action="store_true",
        help="write into ClickHouse (a fresh chDB directory per run) instead of PostgreSQL",
    )
    parser.add_argument(
        "--backends",
        help="comma-separated backends (postgres, sqlite, chdb): one add-on run each per round",
    )
    parser.add_argument(
        "--durable",
        action="store_true",
        help="run the add-on with and without INGEST_DURABLE",
    )
    parser.add_argument(
        "--keys",
        action="store_true",
        help="run the add-on with INGEST_ITEM_KEYS, into a fresh database and again into it",
    )
    parser.add_argument(
        "--partial",
        action="store_true",
        help="also run 'encode' and 'buffer', the partial stacks that bound any write path",
    )
    options = parser.parse_args()
    modes = (*MODES, *PARTIAL) if options.partial else MODES
    if options.metrics:
        modes = ("none", "quiet", "ingest", "metrics")
    if options.durable:
        modes = ("none", "quiet", "ingest", "durable")
    if options.keys:
        modes = ("none", "quiet", "ingest", "keyed", "rekeyed")
    options.sizes = [int(n) for n in options.sizes.split(",")] if options.sizes else [options.items]
    if len(set(options.sizes)) != len(options.sizes):
        parser.error("--sizes: each size once")
    options.items = max(options.sizes)
    options.backends = options.backends.split(",") if options.backends else []
    if options.backends:
        unknown = set(options.backends) - {"postgres", "sqlite", "chdb"}
        if unknown:
            parser.error(f"unknown backends {sorted(unknown)}: choose from postgres, sqlite, chdb")
        modes = ("none", "quiet", *(f"ingest-{backend}" for backend in options.backends))
    return options, modes


def run_rounds(
    options: argparse.Namespace, modes: tuple[str, ...]
) -> dict[str, list[dict[str, float]]]:
    """Every mode once per round, in order; each run's result, by mode."""
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    sizes = options.sizes
    keyed_url: str | None = None
    with contextlib.ExitStack() as stack:
        backends = options.backends
        needs_postgres = not options.clickhouse and (not backends or "postgres" in backends)
        admin = postgres(stack) if needs_postgres else ""
        for n in range(options.pairs):
            for items, mode in ((size, mode) for size in sizes for mode in modes):
                url = None
                if mode.startswith("ingest-"):
                    url = backend_url(mode.removeprefix("ingest-"), admin, stack)
                elif mode == "rekeyed":
                    url = keyed_url  # the keys of the run before: every item unchanged
                elif mode in WRITING and options.clickhouse:
                    url = f"chdb://{stack.enter_context(tempfile.TemporaryDirectory())}/chdb"
                elif mode in WRITING:
                    url = services.with_database(admin, services.create_database(admin))
                if mode == "keyed":
                    keyed_url = url
                crawl_mode = "keyed" if mode == "rekeyed" else mode.split("-")[0]
                result = crawl(crawl_mode, items, url)
                result["mode"] = mode
                if mode == "rekeyed" and result["unchanged"] != items:
                    sys.exit(f"rekeyed run {n}: {result['unchanged']} of {items} unchanged")
                writes = mode in WRITING or mode.startswith("ingest-")
                if writes and mode != "buffer" and result["stored"] != items:
                    sys.exit(f"ingest run {n}: stored {result['stored']} of {items}")
                runs.setdefault(_key(mode, items, sizes), []).append(result)
                print(f"run {n + 1} {_key(mode, items, sizes):<6} {json.dumps(result)}", flush=True)
    return runs


def _key(mode: str, items: int, sizes: list[int]) -> str:
    """How a mode's runs are named: with their size when there are several sizes."""
    return mode if len(sizes) == 1 else f"{mode}@{items}"


def print_summary(runs: dict[str, list[dict[str, float]]], items: int, suffix: str = "") -> None:
    """Each mode's medians: items/s and their ratios to none and to quiet, and CPU."""
    runs = {m.removesuffix(suffix): r for m, r in runs.items() if m.endswith(suffix)}
    base = statistics.median(r["items_per_s"] for r in runs["none"])
    base_wall = statistics.median(r["wall_items_per_s"] for r in runs["none"])
    quiet = statistics.median(r["items_per_s"] for r in runs["quiet"])
    quiet_cpu = statistics.median(r["cpu"] for r in runs["quiet"])
    width = max(8, *(len(mode) + 2 for mode in runs))
    print(
        f"{'mode':<{width}}{'items/s':>10}{'ratio':>8}{'wall items/s':>14}{'wall ratio':>12}"
        f"{'to quiet':>10}{'CPU s':>8}{'us/item over quiet':>20}"
    )
    for mode, results in runs.items():
        rate = statistics.median(r["items_per_s"] for r in results)
        wall = statistics.median(r["wall_items_per_s"] for r in results)
        cpu = statistics.median(r["cpu"] for r in results)
        per_item = (cpu - quiet_cpu) / items * 1e6
        print(
            f"{mode:<{width}}{rate:>10.0f}{rate / base:>8.3f}{wall:>14.0f}"
            f"{wall / base_wall:>12.3f}{rate / quiet:>10.3f}{cpu:>8.2f}{per_item:>20.1f}"
        )


def print_split(
    runs: dict[str, list[dict[str, float]]], modes: tuple[str, ...], sizes: list[int]
) -> None:
    """The CPU over quiet of each mode, split into a cost per item (the slope between the
    smallest and the largest size) and a cost per crawl (the rest, at zero items)."""
    small, large = min(sizes), max(sizes)

    def over_quiet(mode: str, size: int) -> float:
        cpu = statistics.median(r["cpu"] for r in runs[f"{mode}@{size}"])
        return cpu - statistics.median(r["cpu"] for r in runs[f"quiet@{size}"])

    print(f"CPU over quiet, split between {small:,} and {large:,} items (medians):")
    print(f"{'mode':<20}{'us per item':>14}{'s per crawl':>14}")
    for mode in modes:
        if mode in ("none", "quiet"):
            continue
        slope = (over_quiet(mode, large) - over_quiet(mode, small)) / (large - small)
        fixed = over_quiet(mode, small) - slope * small
        print(f"{mode:<20}{slope * 1e6:>14.1f}{fixed:>14.2f}")


def main() -> None:
    options, modes = parse_options()
    runs = run_rounds(options, modes)
    for size in options.sizes:
        print()
        if len(options.sizes) > 1:
            print(f"{size:,} items:")
        print_summary(runs, size, "" if len(options.sizes) == 1 else f"@{size}")
    if len(options.sizes) > 1:
        print()
        print_split(runs, modes, options.sizes)


if __name__ == "__main__":
    main()
