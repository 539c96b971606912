"""``scrapy ingest replay``: write the spill journal into its databases."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

from scrapy_ingest.backends import local_host, url_scheme
from scrapy_ingest.commands._common import Progress, databases
from scrapy_ingest.exceptions import BackendRefused, BackendUnavailable, IngestError
from scrapy_ingest.spill import database_identity, journal_dir, spilled_databases

if TYPE_CHECKING:
    import argparse
    from pathlib import Path

    from scrapy_ingest._shapes import OpenOutcome, ReplayOutcome
    from scrapy_ingest.backends._local import LocalHost
    from scrapy_ingest.commands._common import Context, Database
    from scrapy_ingest.config import IngestConfig

HELP = "write the batches waiting in the spill journal into their databases"
DESCRIPTION = """\
Write the batches that databases could not take during crawls, kept in the spill journal,
into those databases, oldest first, exactly once (a crawl with the same database also replays
them when it starts).

The journal is INGEST_SPILL_DIR, by default .scrapy/ingest-spill in the project directory
(beside scrapy.cfg), or in the working directory of the crawl where there is no scrapy.cfg
(under scrapyd: the directory scrapyd runs in); every crawl logs its absolute path at start.
The journal keeps no password, so the databases come from the settings (INGEST_DATABASE_URL,
INGEST_ROUTES) and --url.

Rows a database refuses for their content (a value too large for its column, JSON it does
not take) never stop the replay: every other row of their batch is stored, and they go to
the database's dead-letter table, with the reason, or where that refuses them too, to
refused-* files beside the journal; the replay says how many, where and why.

Exit code 1 when batches are left (a database still unavailable, refusing the replay, or not
named by the settings), else 0: every batch was stored, dead-lettered or set aside."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--spill-dir",
        metavar="DIR",
        help="the spill journal to replay (default: INGEST_SPILL_DIR, or the project's)",
    )
    parser.add_argument(
        "--url",
        action="append",
        default=[],
        metavar="URL",
        help="a database URL the settings do not name (one an INGEST_ROUTER chose)",
    )


def run(context: Context) -> int:
    return 1 if replay(context, context.opts.url) else 0


def replay(context: Context, extra_urls: list[str]) -> int:
    """Replay every journal under the spill directory; print what became of each; return the
    number of batches left."""
    config = context.config
    root = context.opts.spill_dir or config.spill_root()
    known = {database_identity(db.url): db for db in databases(config, tuple(extra_urls))}
    # journals of one database (one written before the journal was named without the
    # password, say) are replayed together
    waiting: dict[str, tuple[str, int, list[Path]]] = {}
    for directory, shown, count in spilled_databases(root):
        if count:
            _, total, dirs = waiting.get(database_identity(shown), (shown, 0, []))
            waiting[database_identity(shown)] = (shown, total + count, [*dirs, directory])
    left = 0
    for identity, (shown, count, dirs) in waiting.items():
        database = known.get(identity)
        if database is None:
            print(
                f"{shown}: {count} batches wait in {', '.join(map(str, dirs))}, but the "
                "settings do not name this database. Fix: run the command with the settings "
                "of the crawl that spilled them, or name the database with --url."
            )
            left += count
            continue
        left += _replay_database(database, root, config, count)
    if not waiting:
        print(f"Nothing to replay in {root}")
    return left


def _replay_database(database: Database, root: str, config: IngestConfig, waiting: int) -> int:
    """Replay the journal of *database*; print what became of it; return the files left."""
    shown = database.shown
    progress = Progress(f"{shown}: rows replayed")
    host = local_host(
        database.url,
        database.tables,
        create_tables=config.create_tables,
        retry_timeout=config.retry_timeout,
        spill_dir=str(root),
        require_backend=True,
        on_replayed=progress.add,
    )
    try:
        # chDB: one process at a time may open its directory; another replay may have it
        wait = config.retry_timeout if url_scheme(database.url) == "chdb" else 0.0
        outcome = _open(host, wait).replayed
    except IngestError as exc:
        print(f"{shown}: {waiting} batches wait; the database is unavailable: {exc}")
        return waiting
    finally:
        progress.done()
    try:
        host.close()
    except Exception as exc:  # the batches are written; a failed close changes nothing
        print(f"{shown}: closing the connection failed: {exc}")
    assert outcome is not None
    _report(shown, journal_dir(root, database.url), database, outcome)
    return outcome.left


def _open(host: LocalHost, wait: float) -> OpenOutcome:
    """Open *host* (which replays its journal), trying again for up to *wait* seconds while
    the database is unavailable."""
    deadline = time.monotonic() + wait
    delay = 0.25
    while True:
        try:
            return host.open()
        except BackendRefused:
            raise  # no wait can fix it: the message says what does
        except BackendUnavailable:
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _report(shown: str, directory: Path, database: Database, outcome: ReplayOutcome) -> None:
    """What the replay did: rows stored, rows set aside (where, and why), files left."""
    line = f"{shown}: replayed {outcome.batches} batches ({outcome.rows} rows)"
    if outcome.set_aside:
        dead_letters = database.table("dead_letters")
        letters = dead_letters.name if dead_letters is not None else "the dead-letter table"
        line += (
            f"; {outcome.set_aside} rows refused for their content: {outcome.dead_lettered} "
            f"dead-lettered in {letters}, {outcome.kept} kept in refused-* files in {directory}"
        )
    if outcome.left:
        line += f"; {outcome.left} batches left"
    print(line)
    if outcome.set_aside:
        why = "; ".join(f"{rows} rows: {reason}" for reason, rows in outcome.reasons.items())
        print(
            f"ERROR: {shown} refused {outcome.set_aside} replayed rows for their content "
            f"({why}); every other row was stored. They are set aside: "
            f"{outcome.dead_lettered} in the dead-letter table, {outcome.kept} in refused-* "
            f"files in {directory}",
            file=sys.stderr,
        )
    if outcome.refused:
        print(
            f"ERROR: {shown} refuses the replay: {outcome.refused}. {outcome.left} batches "
            "wait; run `scrapy ingest replay` again once that is fixed",
            file=sys.stderr,
        )
