"""``scrapy ingest check``: would a crawl with these settings store everything?

It connects to each database the settings name, reads its schema version, asks the
backend what a crawl needs that the connection may not do (privileges, missing tables),
and counts the batches waiting in the spill journal. It creates no table and writes no
row: the backends answer from the database's catalogue, or with statements that match no
row, in transactions rolled back.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from scrapy_ingest._redact import redact_text
from scrapy_ingest.backends import make_backend, url_scheme
from scrapy_ingest.commands._common import databases
from scrapy_ingest.exceptions import (
    BackendRefused,
    BackendUnavailable,
    IngestError,
    SchemaError,
)
from scrapy_ingest.schema import SCHEMA_VERSION
from scrapy_ingest.spill import database_identity, journal_dir, spilled_databases

if TYPE_CHECKING:
    import argparse
    from pathlib import Path

    from scrapy_ingest.commands._common import Context, Database

logger = logging.getLogger(__name__)

HELP = "tell whether a crawl would store everything (connections, schema, privileges, journal)"
DESCRIPTION = """\
Check, without changing anything, that a crawl with these settings would store everything.
The settings are validated first; then, for every database that INGEST_DATABASE_URL and
INGEST_ROUTES name:

- it connects (a stopped server, a wrong password or a missing database fail here);
- it reads the schema version of the tables, and compares it with this scrapy-ingestion's
  (no tables yet is fine when INGEST_CREATE_TABLES is True and the user may create them;
  with INGEST_CREATE_TABLES = False, missing or older tables are a problem: run
  `scrapy ingest migrate`, or have a DBA run what `scrapy ingest migrate --sql` prints);
- it checks that the user may write every table a crawl writes there (PostgreSQL's
  has_table_privilege, MySQL's answer to statements that match no row, ClickHouse's CHECK
  GRANT, a writable SQLite file), and create them where INGEST_CREATE_TABLES is True;
- it counts the batches waiting in the spill journal (`scrapy ingest replay` writes them).

Under scrapyd (SCRAPY_JOB set), a relative SQLite path gets a warning: each crawl resolves
it against its own working directory, which is scrapyd's, not the project's.

Output: one line per database (URL without its password, the settings that name it, the
schema version, then OK or each problem with its fix), then a summary. Exit code 0 when a
crawl would store everything, 1 when a problem was found, 2 for invalid settings."""


@dataclass
class _Report:
    """What was found about one database."""

    version: str = "not read"
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--spill-dir",
        metavar="DIR",
        help="the spill journal to look into (default: INGEST_SPILL_DIR, or the project's)",
    )


def run(context: Context) -> int:
    config = context.config
    try:
        named = databases(config)
    except IngestError as exc:
        print(f"Invalid settings: {exc}")
        return 2
    root = os.path.abspath(context.opts.spill_dir or config.spill_root())
    # the replay must be told of a journal other than the settings'
    replay = "scrapy ingest replay" + (f" --spill-dir {root}" if context.opts.spill_dir else "")
    # by what names the database, not the directory: a journal named the old way (by the
    # whole URL, password included) belongs to its database too
    waiting: dict[str, tuple[str, int, Path]] = {}
    for path, shown, count in spilled_databases(root):
        if count:
            identity = database_identity(shown)
            total = waiting.get(identity, (shown, 0, path))[1]
            waiting[identity] = (shown, total + count, path)
    failed = 0
    for database in named:
        report = check_database(database, create_tables=config.create_tables)
        count = waiting.pop(database_identity(database.url), ("", 0, None))[1]
        if count:
            journal = journal_dir(root, database.url)
            report.problems.append(
                f"{count} spilled batches wait in the spill journal {journal}. Fix: {replay}"
            )
        _print_report(database, report)
        failed += bool(report.problems)
    for shown, count, journal in waiting.values():
        print(f"{shown} (not named by the settings)")
        print(
            f"  - {count} spilled batches wait in the spill journal {journal}. Fix: {replay} "
            "--url URL (the database's URL, with its password)"
        )
    failed += len(waiting)
    total = len(named) + len(waiting)
    print(f"Spill journal: {root}")
    if failed:
        print(f"{failed} of {total} database(s) with problems: a crawl would not store everything.")
        return 1
    print(f"{total} database(s) OK: a crawl would store everything.")
    return 0


def check_database(database: Database, *, create_tables: bool) -> _Report:
    """Connect to *database*, read its schema version and what a crawl may not do there."""
    report = _Report()
    relative = _relative_sqlite_path(database.url)
    if relative is not None:
        report.notes.append(
            f"the SQLite file {relative!r} is relative to the working directory: here "
            f"{os.path.abspath(relative)}; a crawl under scrapyd resolves it against "
            "scrapyd's working directory"
        )
    if relative is not None and os.environ.get("SCRAPY_JOB"):
        report.warnings.append(
            f"{database.source} names the SQLite file {relative!r} by a relative path, and "
            "SCRAPY_JOB is set (scrapyd): each crawl resolves it against its working "
            "directory, which is scrapyd's, not the project's. Fix: an absolute path, e.g. "
            "'sqlite:////var/lib/scrapyd/ingest.sqlite3'"
        )
    try:
        backend = make_backend(database.url, database.tables, create_tables=create_tables)
    except IngestError as exc:
        report.problems.append(str(exc))
        return report
    try:
        unreadable = None
        try:
            version = backend.schema_version()
        except SchemaError as exc:
            version, unreadable = None, exc
            report.version = "unknown"
        else:
            report.version = _describe_version(version, create_tables, report.problems)
        report.problems += backend.check_privileges(database.tables)
        if unreadable is not None and not report.problems:
            report.problems.append(str(unreadable))
    except BackendRefused as exc:  # classified by the backend: it names cause and fix
        report.problems.append(" ".join(str(exc).split()))
    except BackendUnavailable as exc:
        reason = " ".join(str(exc).split()).rstrip(".")
        report.problems.append(f"{reason}. Fix: {_connection_fix(reason, database.source)}")
    except Exception as exc:  # a message for this database; the others are still checked
        logger.debug("Checking %s failed", database.shown, exc_info=True)
        report.problems.append(f"checking failed: {redact_text(f'{type(exc).__name__}: {exc}')}")
    finally:
        backend.close()
    return report


def _describe_version(version: int | None, create_tables: bool, problems: list[str]) -> str:
    if version is None:
        return "no tables yet" + (" (a crawl creates them)" if create_tables else "")
    if version > SCHEMA_VERSION:
        problems.append(
            f"the tables have schema version {version}, newer than this scrapy-ingestion "
            f"knows ({SCHEMA_VERSION}). Fix: upgrade scrapy-ingestion"
        )
    elif version < SCHEMA_VERSION:
        if not create_tables:
            problems.append(
                f"the tables have schema version {version}, older than this "
                f"scrapy-ingestion's ({SCHEMA_VERSION}), and INGEST_CREATE_TABLES is False. "
                "Fix: run `scrapy ingest migrate`, or have a DBA run the changes"
            )
        return f"schema version {version} (a crawl migrates it to {SCHEMA_VERSION})"
    return f"schema version {version}"


def _print_report(database: Database, report: _Report) -> None:
    status = "OK" if not report.problems else f"{len(report.problems)} problem(s)"
    print(f"{database.shown} ({database.source}): {report.version}: {status}")
    for problem in report.problems:
        print(f"  - {problem}")
    for warning in report.warnings:
        print(f"  warning: {warning}")
    for note in report.notes:
        print(f"  note: {note}")


#: (what an error message says, the fix): the first match wins
_FIXES = (
    (
        ("password authentication failed", "access denied", "authentication failed", 'role "'),
        "correct the user name and password in {source}",
    ),
    (
        ("does not exist", "unknown database"),
        "create the database, or correct its name in {source}",
    ),
    (
        ("unable to open database file",),
        "correct the path of the SQLite file in {source}, or create its directory",
    ),
)


def _connection_fix(message: str, source: str) -> str:
    lowered = message.lower()
    for needles, fix in _FIXES:
        if any(needle in lowered for needle in needles):
            return fix.format(source=source)
    return f"start the database server, or correct the host and port in {source}"


def _relative_sqlite_path(url: str) -> str | None:
    """The path of a SQLite URL when it is relative (``sqlite:///ingest.sqlite3``)."""
    if url_scheme(url) != "sqlite":
        return None
    path = url.split("://", 1)[-1][1:].split("?", 1)[0]
    if not path or path == ":memory:" or os.path.isabs(path):
        return None
    return path
