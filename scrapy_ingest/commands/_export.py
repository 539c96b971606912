"""``scrapy ingest export``: a job's stored items, through Scrapy's own feed exporters."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast
from urllib.parse import urlparse

from scrapy import Spider
from scrapy.crawler import Crawler
from scrapy.exceptions import NotConfigured, UsageError
from scrapy.settings import Settings
from scrapy.utils.conf import (
    feed_complete_default_values_from_settings,
    feed_process_params_from_cli,
)
from scrapy.utils.misc import build_from_crawler, load_object
from scrapy.utils.python import without_none_values
from w3lib.url import file_uri_to_path

from scrapy_ingest.backends.base import describe_error
from scrapy_ingest.commands._common import Progress, databases, open_backend
from scrapy_ingest.exceptions import IngestError

if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterator

    from scrapy.exporters import BaseItemExporter
    from scrapy.settings import BaseSettings

    from scrapy_ingest.backends import Backend
    from scrapy_ingest.commands._common import Context, Database

HELP = "write a job's items to a file, through Scrapy's feed exporters (any FEED_EXPORTERS format)"
DESCRIPTION = """\
Write the items of job JOB_ID, as they were stored, to FILE through Scrapy's own feed
exporters, as `scrapy crawl -O/-o` would have: every format of FEED_EXPORTERS works (jsonl,
json, csv, xml, marshal, pickle and the project's own), chosen by the file extension, by
FILE:FORMAT, or by -t FORMAT. FEED_EXPORT_ENCODING, FEED_EXPORT_FIELDS, FEED_EXPORT_INDENT
and a FEEDS entry for the same file apply as in a crawl. FILE "-" is standard output.

Items come in the order they were scraped (table after table when the settings route them
to several), read in chunks, from the items tables of every database the settings name
(INGEST_DATABASE_URL, INGEST_ROUTES). List the jobs with `scrapy ingest jobs`.

Exit code 1 when the job is unknown or a database cannot be read, else 0."""

#: latest jobs looked through for a job that has no items (is it known at all?)
_KNOWN_JOBS = 10_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job_id", metavar="JOB_ID", help="the job (see `scrapy ingest jobs`)")
    output = parser.add_mutually_exclusive_group(required=True)
    output.add_argument(
        "-O",
        "--overwrite-output",
        metavar="FILE",
        help="write the items to FILE, replacing its content (FILE:FORMAT to name the format)",
    )
    output.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="append the items to FILE (FILE:FORMAT to name the format)",
    )
    parser.add_argument(
        "-t",
        "--output-format",
        metavar="FORMAT",
        help="the format (a FEED_EXPORTERS key: jsonl, json, csv, xml...), if not the file's",
    )


def run(context: Context) -> int:
    opts = context.opts
    settings = context.settings
    uri, options = _feed(settings, opts)
    exporter_class = _exporter_class(settings, options["format"])
    opened: list[tuple[Database, Backend]] = []
    try:
        for database in databases(context.config):
            try:
                opened.append((database, open_backend(database)))
            except IngestError as exc:
                reason = str(exc).rstrip(".")
                print(
                    f"Cannot read {database.shown} ({database.source}): {reason}. Nothing was "
                    "exported: the job's items may be there.",
                    file=sys.stderr,
                )
                return 1
        return _export(context, opened, uri, options, exporter_class)
    finally:
        for _, backend in opened:
            with contextlib.suppress(Exception):
                backend.close()


def _feed(settings: BaseSettings, opts: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The output URI and its feed options, as ``scrapy crawl -O/-o`` makes them."""
    target = opts.overwrite_output or opts.output
    if opts.output_format:
        target = f"{target}:{opts.output_format}"
    try:
        if opts.overwrite_output:
            feeds = feed_process_params_from_cli(settings, [], overwrite_output=[target])
        else:
            feeds = feed_process_params_from_cli(settings, [target])
    except UsageError as exc:
        raise UsageError(str(exc), print_help=False) from None
    uri, options = next(iter(feeds.items()))  # the others are the project's FEEDS
    scheme = urlparse(uri).scheme
    if len(scheme) > 1 and scheme not in ("file", "stdout"):  # one letter: a Windows drive
        raise UsageError(
            f"export writes to a local file or to standard output (-), not to {uri}. Fix: "
            "export to a file, then copy it there.",
            print_help=False,
        )
    # the format from the file's extension where none was given (Scrapy 2.13 takes no uri)
    options.setdefault("format", Path(uri).suffix.removeprefix("."))
    return uri, feed_complete_default_values_from_settings(options, settings)


def _exporter_class(settings: BaseSettings, format_: str) -> type[BaseItemExporter]:
    exporters = without_none_values(cast("dict[str, str]", settings.getwithbase("FEED_EXPORTERS")))
    if format_ not in exporters:
        raise UsageError(
            f"Unknown feed format {format_!r}: FEED_EXPORTERS has {', '.join(exporters)}. "
            "Fix: name one as FILE:FORMAT or with -t FORMAT.",
            print_help=False,
        )
    try:
        return cast("type[BaseItemExporter]", load_object(exporters[format_]))
    except NotConfigured as exc:
        raise UsageError(
            f"The {format_} exporter is not available: {exc}", print_help=False
        ) from None


def _export(
    context: Context,
    opened: list[tuple[Database, Backend]],
    uri: str,
    options: dict[str, Any],
    exporter_class: type[BaseItemExporter],
) -> int:
    job_id = context.opts.job_id
    items = _stored_items(opened, job_id)
    try:
        first = next(items, None)
        if first is None and not _known(opened, job_id):
            shown = ", ".join(database.shown for database, _ in opened)
            print(
                f"No job {job_id!r} in {shown}: no items of it, and it is not among the "
                f"latest {_KNOWN_JOBS:,} jobs. Fix: list the jobs with `scrapy ingest jobs` "
                "(run with the settings of the crawl: the same INGEST_DATABASE_URL and "
                "INGEST_ROUTES).",
                file=sys.stderr,
            )
            return 1
    except _ReadError as exc:
        print(exc, file=sys.stderr)
        return 1
    to_stdout = urlparse(uri).scheme == "stdout"
    report = sys.stderr if to_stdout else sys.stdout
    progress = Progress(f"Exporting job {job_id}")
    with _open(uri, append=not options.get("overwrite", False)) as file:
        crawler = Crawler(Spider, _as_settings(context.settings))
        exporter = build_from_crawler(
            exporter_class,
            crawler,
            file,
            fields_to_export=options["fields"],
            encoding=options["encoding"],
            indent=options["indent"],
            **options["item_export_kwargs"],
        )
        exporter.start_exporting()
        try:
            if first is not None:
                exporter.export_item(json.loads(first))
                progress.add(1)
                for data in items:
                    exporter.export_item(json.loads(data))
                    progress.add(1)
        except _ReadError as exc:
            progress.done()
            print(f"{exc}; the file has the first {progress.count:,} items only", file=sys.stderr)
            return 1
        finally:
            exporter.finish_exporting()
    progress.done()
    where = "standard output" if to_stdout else _path(uri)
    print(
        f"Exported {progress.count:,} items of job {job_id} to {where} ({options['format']})",
        file=report,
    )
    return 0


class _ReadError(Exception):
    """Reading the items of a database failed (the message says which and why)."""


def _stored_items(opened: list[tuple[Database, Backend]], job_id: str) -> Iterator[str]:
    """The JSON of each item of *job_id*, items table after items table."""
    for database, backend in opened:
        for table in database.tables:
            if table.kind != "items":
                continue
            try:
                yield from backend.job_items(table, job_id)
            except Exception as exc:
                raise _ReadError(
                    f"Reading the items of job {job_id} from {table.name} in {database.shown} "
                    f"failed: {describe_error(exc)}"
                ) from None


def _known(opened: list[tuple[Database, Backend]], job_id: str) -> bool:
    """Whether *job_id* is among the latest jobs of a database (a job without items)."""
    for database, backend in opened:
        table = database.table("jobs")
        if table is None:
            continue
        try:
            jobs = backend.recent_jobs(table, running=False, spider=None, limit=_KNOWN_JOBS)
        except Exception as exc:
            raise _ReadError(
                f"Reading the jobs of {database.shown} failed: {describe_error(exc)}"
            ) from None
        if any(job["job_id"] == job_id for job in jobs):
            return True
    return False


def _path(uri: str) -> str:
    return file_uri_to_path(uri) if uri.startswith("file://") else uri


@contextlib.contextmanager
def _open(uri: str, *, append: bool) -> Iterator[IO[bytes]]:
    """The file *uri* names (a path, a file:// URI, or stdout:), opened as Scrapy's feed
    storages open it (its directory created)."""
    if urlparse(uri).scheme == "stdout":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    path = Path(_path(uri))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab" if append else "wb") as file:
        yield file


def _as_settings(settings: BaseSettings) -> Settings:
    return settings if isinstance(settings, Settings) else Settings(settings)
