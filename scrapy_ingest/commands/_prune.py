"""``scrapy ingest prune``: delete the rows older than a retention period."""

from __future__ import annotations

import argparse
import re
import time
from typing import TYPE_CHECKING

from scrapy_ingest._time import utc_from_epoch
from scrapy_ingest.backends.base import describe_error
from scrapy_ingest.commands._common import Progress, databases, open_backend
from scrapy_ingest.exceptions import IngestError

if TYPE_CHECKING:
    from scrapy_ingest.backends import Backend
    from scrapy_ingest.commands._common import Context, Database
    from scrapy_ingest.schema import TableSpec

#: what --kinds takes, and prunes by default (item versions go with items)
KINDS = ("requests", "logs", "items", "jobs", "dead_letters")
_BATCH_ROWS = 5000
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+)([smhdw])")

HELP = "delete the rows older than a retention period (--older-than 30d), in small batches"
DESCRIPTION = f"""\
Delete, in every database the settings name, the rows older than --older-than: requests by
started_at, logs by logged_at, items (and their previous versions, INGEST_KEEP_VERSIONS) by
when they were last seen (last_seen_at, else scraped_at), dead letters by created_at, and
job rows of finished or crashed jobs by finished_at; a running job's row is never deleted.

Rows go in transactions of at most --batch-rows rows (default {_BATCH_ROWS:,}), picked by
primary key, so a crawl writing to the same tables meanwhile is never blocked for long. On
ClickHouse, each table gets one lightweight DELETE (the engine masks the rows at once and
drops them at its next merges); docs/commands.md shows the TTL that lets ClickHouse do it
by itself.

Exit code 1 when a database could not be pruned (unavailable, no tables of scrapy_ingest's,
a failed delete), else 0."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--older-than",
        required=True,
        type=_duration,
        metavar="AGE",
        help="delete what is older than AGE: a number and a unit, s m h d w (45m, 12h, 30d, 2w)",
    )
    parser.add_argument(
        "--kinds",
        type=_kinds,
        default=KINDS,
        metavar="KIND,...",
        help=f"which records (default: all of {','.join(KINDS)})",
    )
    parser.add_argument(
        "--batch-rows",
        type=_positive,
        default=_BATCH_ROWS,
        metavar="N",
        help=f"rows deleted per transaction (default: {_BATCH_ROWS})",
    )


def run(context: Context) -> int:
    opts = context.opts
    cutoff = time.time() - opts.older_than
    kinds = set(opts.kinds)
    if "items" in kinds:
        kinds.add("item_versions")
    print(f"Deleting rows from before {utc_from_epoch(cutoff):%Y-%m-%d %H:%M:%S} UTC")
    failed = False
    for database in databases(context.config):
        tables = [t for t in database.tables if t.kind in kinds]
        if tables and not _prune(database, tables, cutoff, opts.batch_rows):
            failed = True
    return 1 if failed else 0


def _prune(database: Database, tables: list[TableSpec], cutoff: float, batch_rows: int) -> bool:
    """Prune *tables* of *database*, printing what went; False when not all could be."""
    print(f"{database.shown} ({database.source}):")
    try:
        backend = open_backend(database)
    except IngestError as exc:
        print(f"  not pruned: {exc}")
        return False
    try:
        return all([_prune_table(backend, table, cutoff, batch_rows) for table in tables])
    finally:
        backend.close()


def _prune_table(backend: Backend, table: TableSpec, cutoff: float, batch_rows: int) -> bool:
    progress = Progress(f"Deleting from {table.name}")
    try:
        for count in backend.prune(table, cutoff, batch_rows=batch_rows):
            progress.add(count)
    except Exception as exc:  # the driver's own errors: one table's failure is reported
        progress.done()
        print(f"  {table.name}: {progress.count:,} rows deleted, then: {describe_error(exc)}")
        return False
    progress.done()
    print(f"  {table.name}: {progress.count:,} rows deleted")
    return True


def _duration(text: str) -> float:
    match = _DURATION.fullmatch(text.strip())
    if match is None or int(match[1]) == 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an age: give a positive number and a unit, s, m, h, d or w "
            "(45m, 12h, 30d, 2w)"
        )
    return int(match[1]) * _UNITS[match[2]]


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"unknown kind(s) {', '.join(unknown) or text!r}: choose among {','.join(KINDS)}"
        )
    return kinds


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)
