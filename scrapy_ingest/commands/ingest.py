"""``scrapy ingest replay``: write the spill journal into its databases.

Batches that a database could not take during a crawl wait in the spill
journal (see :mod:`scrapy_ingest.spill`); a crawl with the same database
replays them when it starts, and this command does so without a crawl::

    scrapy ingest replay                        # the databases of the project's settings
    scrapy ingest replay --url postgresql://... # one an INGEST_ROUTER class chose

The journal does not keep database passwords, so the databases come from the
settings (``INGEST_DATABASE_URL``, ``INGEST_ROUTES``) and ``--url``. Each is
written with the same idempotent writes a crawl uses: replaying twice stores
nothing twice. The exit code is 1 when batches are left (a database still
unavailable, or not named by the settings), else 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from scrapy.commands import ScrapyCommand
from scrapy.exceptions import UsageError

from scrapy_ingest.backends import local_host
from scrapy_ingest.config import IngestConfig
from scrapy_ingest.exceptions import IngestError
from scrapy_ingest.schema import all_tables
from scrapy_ingest.spill import journal_dir, spilled_databases

if TYPE_CHECKING:
    import argparse

ACTIONS = ("replay",)


class Command(ScrapyCommand):
    requires_project = False
    requires_crawler_process = False
    default_settings: ClassVar[dict[str, Any]] = {"LOG_LEVEL": "INFO"}

    def syntax(self) -> str:
        return "replay [--url URL ...]"

    def short_desc(self) -> str:
        return "Replay scrapy_ingest's spill journal into its databases"

    def long_desc(self) -> str:
        return (
            "Write the batches that databases could not take during crawls, kept in the spill "
            "journal (INGEST_SPILL_DIR), into those databases, oldest first, exactly once."
        )

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        super().add_options(parser)
        parser.add_argument(
            "--url",
            action="append",
            default=[],
            metavar="URL",
            help="a database URL the settings do not name (one an INGEST_ROUTER chose)",
        )

    def run(self, args: list[str], opts: argparse.Namespace) -> None:
        if args[:1] != ["replay"] or len(args) > 1:
            raise UsageError(f"say what to do: scrapy ingest {' | '.join(ACTIONS)}")
        assert self.settings is not None
        try:
            config = IngestConfig.from_settings(self.settings)
        except IngestError as exc:
            raise UsageError(str(exc)) from None
        self.exitcode = 1 if replay(config, opts.url) else 0


def replay(config: IngestConfig, extra_urls: list[str]) -> int:
    """Replay every journal under the spill directory; print what became of each; return the
    number of batches left."""
    root = config.spill_root()
    urls = [config.database_url, *(rule.url for rule in config.rules()), *extra_urls]
    known = {journal_dir(root, url): url for url in urls}
    left = found = 0
    for directory, shown, waiting in spilled_databases(root):
        if not waiting:
            continue
        found += 1
        url = known.get(directory)
        if url is None:
            print(
                f"{shown}: {waiting} batches wait in {directory}, but the settings do not name "
                "this database. Fix: run the command with the settings of the crawl that "
                "spilled them, or name the database with --url."
            )
            left += waiting
            continue
        host = local_host(
            url,
            all_tables(config.table_prefix),
            create_tables=config.create_tables,
            retry_timeout=config.retry_timeout,
            spill_dir=root,
            require_backend=True,
        )
        try:
            outcome = host.open().replayed
        except IngestError as exc:
            print(f"{shown}: {waiting} batches wait; the database is unavailable: {exc}")
            left += waiting
            continue
        try:
            host.close()
        except Exception as exc:  # the batches are written; a failed close changes nothing
            print(f"{shown}: closing the connection failed: {exc}")
        assert outcome is not None
        print(f"{shown}: replayed {outcome.batches} batches ({outcome.rows} rows)", end="")
        if outcome.dead:
            print(f"; {outcome.dead} rows refused, kept in refused-* files in {directory}", end="")
        print(f"; {outcome.left} batches left" if outcome.left else "")
        left += outcome.left
    if not found:
        print(f"Nothing to replay in {root}")
    return left
