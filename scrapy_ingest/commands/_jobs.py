"""``scrapy ingest jobs``: the latest jobs, from the job table of every database."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from scrapy_ingest.backends.base import describe_error
from scrapy_ingest.commands._common import databases, open_backend
from scrapy_ingest.exceptions import IngestError

if TYPE_CHECKING:
    from scrapy_ingest.commands._common import Context, Database

HELP = "list the latest jobs: status, duration, items, requests and errors"
DESCRIPTION = """\
List the latest jobs (crawls), the latest started first, from the job table of every
database the settings name (INGEST_DATABASE_URL, INGEST_ROUTES). A crawl writes its job row
to each database it stores into; the freshest copy of each job is shown once.

Columns: job id, spider, status (running, finished, crashed), start time (UTC), duration
(so far, for a running job; until its last refresh, for a crashed one), items stored,
requests made, errors logged (ERROR and CRITICAL records).

--json prints one JSON object per line (JSON Lines) instead, with times in ISO 8601 (UTC)
and the duration in seconds, for scripts.

Exit code 1 when a database cannot be read (the jobs of the others are still shown), else 0."""

#: what --json prints of each job, in this order (times as ISO 8601 text)
_JSON_FIELDS = (
    "job_id",
    "crawl_id",
    "spider",
    "status",
    "close_reason",
    "started_at",
    "updated_at",
    "finished_at",
    "duration_seconds",
    "items_count",
    "requests_count",
    "errors_count",
    "hostname",
    "pid",
)
_TIMES = ("started_at", "updated_at", "finished_at")
_HEADERS = (
    "JOB ID",
    "SPIDER",
    "STATUS",
    "STARTED (UTC)",
    "DURATION",
    "ITEMS",
    "REQUESTS",
    "ERRORS",
)
#: the columns aligned right (numbers)
_RIGHT = frozenset({"DURATION", "ITEMS", "REQUESTS", "ERRORS"})


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--running", action="store_true", help="only the jobs still running")
    parser.add_argument("--spider", metavar="NAME", help="only the jobs of this spider")
    parser.add_argument(
        "--limit",
        type=_positive,
        default=20,
        metavar="N",
        help="show at most N jobs, the latest started first (default: 20)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per job and line (JSON Lines), times in ISO 8601 (UTC)",
    )


def run(context: Context) -> int:
    opts = context.opts
    found: dict[str, dict[str, Any]] = {}
    failed = 0
    for database in databases(context.config):
        try:
            jobs = _read_jobs(database, running=opts.running, spider=opts.spider, limit=opts.limit)
        except Exception as exc:
            failed += 1
            reason = str(exc) if isinstance(exc, IngestError) else describe_error(exc)
            print(
                f"Cannot read the jobs of {database.shown} ({database.source}): {reason}",
                file=sys.stderr,
            )
            continue
        for job in jobs:
            known = found.get(job["job_id"])
            # the freshest copy: a database that was down during the crawl lags behind
            if known is None or (job["updated_at"] or 0) > (known["updated_at"] or 0):
                found[job["job_id"]] = job
    latest = sorted(found.values(), key=lambda job: (-job["started_at"], job["job_id"]))
    latest = latest[: opts.limit]
    now = time.time()
    if opts.json:
        for job in latest:
            print(json.dumps(_as_json(job, now), ensure_ascii=False))
    elif latest:
        print(_table(latest, now))
    elif not failed:
        print(
            "No jobs found"
            + (" running" if opts.running else "")
            + (f" for spider {opts.spider!r}" if opts.spider else "")
        )
    return 1 if failed else 0


def _read_jobs(
    database: Database, *, running: bool, spider: str | None, limit: int
) -> list[dict[str, Any]]:
    table = database.table("jobs")
    if table is None:
        return []
    backend = open_backend(database)
    try:
        return backend.recent_jobs(table, running=running, spider=spider, limit=limit)
    finally:
        backend.close()


def _duration(job: dict[str, Any], now: float) -> float:
    """Seconds the job ran: until it finished (a crashed job: its last refresh), or so far."""
    end = job.get("finished_at")
    if end is None:
        end = now if job["status"] == "running" else job["updated_at"]
    return max(0.0, float(end) - float(job["started_at"]))


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat()


def _as_json(job: dict[str, Any], now: float) -> dict[str, Any]:
    shown = {name: job.get(name) for name in _JSON_FIELDS}
    for name in _TIMES:
        shown[name] = _iso(job.get(name))
    shown["duration_seconds"] = round(_duration(job, now), 3)
    return shown


def _human_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s"


def _count(value: Any) -> str:
    return "-" if value is None else f"{value:,}"


def _table(jobs: list[dict[str, Any]], now: float) -> str:
    rows = [
        (
            job["job_id"],
            job["spider"],
            job["status"],
            dt.datetime.fromtimestamp(job["started_at"], dt.timezone.utc).strftime(
                "%Y-%m-%d %H:%M:%S"
            ),
            _human_duration(_duration(job, now)),
            _count(job.get("items_count")),
            _count(job.get("requests_count")),
            _count(job.get("errors_count")),
        )
        for job in jobs
    ]
    widths = [max(len(str(cells[i])) for cells in [_HEADERS, *rows]) for i in range(len(_HEADERS))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            cell.rjust(width) if header in _RIGHT else cell.ljust(width)
            for cell, width, header in zip(cells, widths, _HEADERS, strict=True)
        ).rstrip()

    return "\n".join(line(cells) for cells in [_HEADERS, *rows])
