"""The databases of one crawler: one entry per URL with its host and tables, the writers of
each route and table, and the engine held while rows have nowhere to go.

Every database the settings name (``INGEST_DATABASE_URL``, ``INGEST_ROUTES``) is opened at
spider open, all at once (:meth:`Databases.open_all`); one only ``INGEST_ROUTER`` names is
opened on its first record, in a task of its own that the record waits for
(:meth:`Databases.open`). Either way, each is opened once: its host started, its tables
prepared, its spill journal replayed and the job row inserted. The writer process of a
database the settings name is started earlier, as the crawl starts (:meth:`Databases.start`),
so that it opens the database while Scrapy builds its engine; what it answers is taken, and
reported, at spider open all the same.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from scrapy_ingest._aio import Event, settle, spawn
from scrapy_ingest._compat import wake_engine
from scrapy_ingest._redact import redact_url
from scrapy_ingest._stats import stat_key
from scrapy_ingest.backends import check_driver, check_url, is_best_effort
from scrapy_ingest.backends.base import cut_payload
from scrapy_ingest.batching import BatchWriter, DurableLog
from scrapy_ingest.exceptions import IngestError
from scrapy_ingest.hosting import create_host
from scrapy_ingest.router import Route
from scrapy_ingest.schema import table_spec
from scrapy_ingest.spill import SpillJournal

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Coroutine, Iterable

    from scrapy.crawler import Crawler
    from scrapy.statscollectors import StatsCollector

    from scrapy_ingest._counters import Counters
    from scrapy_ingest._ids import IdFactory
    from scrapy_ingest._job import JobRow
    from scrapy_ingest._shapes import Row
    from scrapy_ingest.batching import BufferBudget
    from scrapy_ingest.config import IngestConfig
    from scrapy_ingest.hosting import Host
    from scrapy_ingest.router import Router
    from scrapy_ingest.schema import TableSpec

logger = logging.getLogger(__name__)

#: rough per-row overhead (ids, tuple, strings) added to the JSON size for the buffer budget
ROW_OVERHEAD = 256


class EngineHold:
    """Pause the engine while the buffer is full, or a database and its journal take no rows.

    Pausing the engine is what Scrapy offers for this (its telnet console's
    ``engine.pause()``): the engine stops taking requests from the scheduler, the
    downloads in flight end, their responses (and those already waiting for the scraper,
    which Scrapy bounds with ``SCRAPER_SLOT_MAX_ACTIVE_SIZE``) are parsed, and their items
    fill the buffer's last quarter, or wait in front of the pipeline. So what comes after
    the pause is bounded by the responses downloaded and not parsed yet, not by the
    crawl's pace. An engine paused by someone else is left to them.
    """

    def __init__(
        self, crawler: Crawler, stats: StatsCollector, closing: Callable[[], bool]
    ) -> None:
        self._crawler = crawler
        self._stats = stats
        self._closing = closing
        #: why the engine is paused by us: "buffer" (full), or the URL of a database whose
        #: host neither writes nor spills rows (see host_stuck)
        self._holds: set[str] = set()
        #: when the engine was paused by us (monotonic), if it is
        self._held_since: float | None = None

    def hold(self, why: str) -> None:
        holds = self._holds
        if why in holds:
            return
        holds.add(why)
        engine = self._crawler.engine
        if len(holds) > 1 or engine is None or self._closing():
            return
        if engine.paused:  # paused by someone else (the telnet console): theirs to resume
            holds.clear()
            return
        engine.pause()
        self._held_since = time.monotonic()
        self._stats.inc_value(stat_key("buffer", "pauses"))

    def release(self, why: str | None = None) -> None:
        """What held the engine is over (*why*; None: all of it): it takes requests again."""
        if why is None:
            self._holds.clear()
        else:
            self._holds.discard(why)
        since = self._held_since
        if self._holds or since is None:
            return
        self._held_since = None
        key = stat_key("buffer", "paused_seconds")
        paused = self._stats.get_value(key, 0.0) + time.monotonic() - since
        self._stats.set_value(key, round(paused, 3))
        engine = self._crawler.engine
        if engine is not None:
            engine.unpause()
            wake_engine(self._crawler)

    def host_stuck(self, url: str, stuck: bool) -> None:
        """The host of *url* holds rows that neither its database nor its journal takes (it
        tries both for INGEST_RETRY_TIMEOUT): the crawl stops taking work meanwhile."""
        if stuck:
            self.hold(url)
        else:
            self.release(url)


@dataclass
class Database:
    """An open database of one crawler."""

    url: str
    host: Host
    #: the tables prepared at open, by name (others are created on their first write)
    tables: dict[str, TableSpec]
    #: whether the job row has been inserted there
    has_job: bool = False


@dataclass(frozen=True)
class RecordSink:
    """What a component needs to make and buffer the rows of one table."""

    job_id: str
    spider: str
    #: make a record id from a capture time (epoch seconds)
    new_id: IdFactory
    #: buffer a row of about *size* bytes: ``add(row, size)``
    add: Callable[[Row, int], None]


class Databases:
    """The open databases of one crawler and their writers.

    *tables* holds the default table of each kind; *job* is the job row each database gets
    (and its id, with *new_id*, each row a component makes). *counters* count each batch
    answered and each spill journal replayed; *hold* holds the engine while a database and
    its journal take no rows; *budget* bounds the bytes buffered.
    """

    def __init__(
        self,
        config: IngestConfig,
        router: Router,
        tables: dict[str, TableSpec],
        job: JobRow,
        *,
        counters: Counters,
        hold: EngineHold,
        budget: BufferBudget,
        new_id: IdFactory,
    ) -> None:
        self._config = config
        self._router = router
        self._tables = tables
        self._job = job
        self._stats = counters.stats
        self._new_id = new_id
        self._budget = budget
        #: the kinds whose tables count rows from 0 at open (see open_all)
        self._kinds = {"dead_letters"}
        self._start_table = counters.start_table
        self._on_outcome = counters.count_outcome
        self._on_replayed = counters.count_replayed
        self._on_stuck = hold.host_stuck
        #: open databases by URL, in the order of the router's URLs
        self._open: dict[str, Database] = {}
        #: databases that could not be opened during the crawl, with the error
        self._unusable: dict[str, IngestError] = {}
        #: databases being opened during the crawl -> who waits for that
        self._opening: dict[str, Event] = {}
        self._writers: dict[tuple[str, str], BatchWriter] = {}
        self._durable_executor: ThreadPoolExecutor | None = None
        #: hosts started ahead of their open (see start), with their tables, by URL
        self._started: dict[str, tuple[Host, dict[str, TableSpec]]] = {}

    # opening

    def start(self) -> None:
        """Start the host of each database the settings name now (see Host.start), for
        :meth:`open_all` to open later. A database whose host cannot be made or started is
        left to open_all, which tries again and reports why."""
        for url in self._router.static_urls():
            try:  # create_host checks the URL and driver
                tables = self._tables_for(url)
                host = self._create_host(url, tables)
                host.start()
            except Exception:
                continue
            self._started[url] = (host, tables)

    async def open_all(self, kinds: Iterable[str]) -> None:
        """Open the databases the settings name together; when one fails, close the others
        and raise its error (the first in the router's order). The job row goes in once all
        are open. The tables of *kinds* (the kinds stored) count their rows from 0."""
        self._kinds.update(kinds)
        urls = self._router.static_urls()
        failed = await _settle([self._start(url) for url in urls])
        if failed is None:
            failed = await _settle([self._join(url) for url in urls])
        if failed is not None:
            await self.close()
            raise failed
        self._open = {url: self._open[url] for url in urls}
        # what the log of a crawl has said since the first release (docs/quickstart.md)
        logging.getLogger("scrapy_ingest.runtime").info(
            "Storing crawl data in %s (job_id %s); spill journal: %s",
            self.where(),
            self._job.info.job_id,
            self._config.spill_root(),
        )

    async def open(self, url: str) -> None:
        """Open *url*, which only ``INGEST_ROUTER`` names, once: the first caller starts
        that in a task of its own, and every caller waits for it. A database that cannot be
        opened is not tried again for every record: its error is kept and raised again."""
        if url not in self._open and url not in self._unusable:
            opening = self._opening.get(url)
            if opening is None:
                self._opening[url] = opening = Event()
                spawn(self._open_late(url))
            await opening.wait()
        known = self._unusable.get(url)
        if known is not None:
            raise known

    async def _open_late(self, url: str) -> None:
        error: BaseException | None = None
        try:
            await self._start(url)
            await self._join(url)
        except BaseException as exc:
            error = exc
            entry = self._open.pop(url, None)
            if entry is not None:
                await _close_host(entry.host)
            if isinstance(exc, IngestError):
                self._unusable[url] = exc
        self._opening.pop(url).fire(error)

    async def _start(self, url: str) -> None:
        """Start the host of *url*: connect, prepare its tables, replay its journal."""
        source = self._router.describe(url)
        check_url(url, source)
        check_driver(url, source)
        if is_best_effort(url):
            logger.warning(
                "%s: %s is not one of the databases scrapy_ingest is tested with (SQLite, "
                "PostgreSQL, ClickHouse, MySQL/MariaDB); writing to it through SQLAlchemy, on a "
                "best-effort basis",
                source,
                redact_url(url),
            )
        started = self._started.pop(url, None)
        if started is None:
            tables = self._tables_for(url)
            host = self._create_host(url, tables)
        else:
            host, tables = started
        try:
            opened = await host.open()
        except IngestError as exc:
            raise type(exc)(f"{exc} (the database of {source})") from None
        if opened.unavailable is not None:
            logger.error(
                "The database of %s is unavailable at start (%s). The crawl goes on: what it "
                "scrapes for that database goes to the spill journal in %s, and is written "
                "when the database answers (INGEST_REQUIRE_BACKEND = True refuses to start "
                "instead)",
                source,
                opened.unavailable,
                opened.journal,
            )
        if opened.replayed is not None:
            self._on_replayed(opened.replayed.batches, opened.replayed.rows)
        self._open[url] = Database(url, host, tables)

    def _create_host(self, url: str, tables: dict[str, TableSpec]) -> Host:
        config = self._config
        return create_host(
            url,
            list(tables.values()),
            create_tables=config.create_tables,
            retry_timeout=config.retry_timeout,
            writer_process=config.writer_process,
            spill_dir=config.spill_root(),
            require_backend=config.require_backend,
            spill_min_free=config.spill_min_free_bytes,
            on_stuck=partial(self._on_stuck, url),
        )

    async def _join(self, url: str) -> None:
        """Insert the job row in the open database of *url*, and mark its crashed jobs."""
        database = self._open[url]
        try:
            await self._job.insert(database.host)
        except IngestError as exc:  # a refused INSERT: which database it was
            raise type(exc)(f"{exc} (the database of {self._router.describe(url)})") from None
        database.has_job = True
        for spec in database.tables.values():
            if spec.kind in self._kinds:
                self._start_table(url, spec.name)
        await self._job.mark_crashed_at_start(database.host)

    def _tables_for(self, url: str) -> dict[str, TableSpec]:
        """The tables to prepare at *url*: its routed tables, plus jobs and dead letters."""
        router = self._router
        specs = [self._tables[kind] for kind in ("jobs", "dead_letters", "schema_version")]
        if url == router.default.url:
            # the kinds of which some records may fall through to the default
            for kind in ("items", "requests", "logs"):
                if router.falls_through(kind):
                    specs.append(self._tables[kind])
        for rule in router.rules:
            if rule.url == url and rule.kind != "jobs":
                specs.append(self._table(rule.kind, rule.table))
        # the history of an items table is prepared with it
        specs += [spec.history for spec in specs if spec.history is not None]
        return {spec.name: spec for spec in specs}

    def _table(self, kind: str, name: str | None) -> TableSpec:
        """The table of *kind*, by default the one named with the prefix."""
        spec = self._tables[kind]
        if name is None or name == spec.name:
            return spec
        keep_versions = self._config.keep_versions
        return table_spec(kind, self._config.table_prefix, name, keep_versions=keep_versions)

    def where(self) -> str:
        """The open databases, for the log: redacted, SQLite files with their full path."""
        return ", ".join(_where(url, entry.host.url) for url, entry in self._open.items())

    def hosts_with_job(self) -> list[Host]:
        return [entry.host for entry in list(self._open.values()) if entry.has_job]

    # writing

    def writer(self, kind: str, route: Route | None = None) -> BatchWriter:
        """The writer of *route* (by default, the route of the *kind*) for rows of *kind*.

        The database of the route must be open (see :meth:`item_writer`).
        """
        if route is None:
            route = self._router.route(kind) if kind != "dead_letters" else self._router.default
        spec = self._table(kind, route.table)
        writer = self._writers.get((route.url, spec.name))
        if writer is None:
            config = self._config
            writer = self._writers[route.url, spec.name] = BatchWriter(
                self._open[route.url].host,
                spec,
                budget=self._budget,
                batch_rows=config.batch_rows,
                batch_bytes=config.batch_bytes,
                on_outcome=partial(self._on_outcome, route.url),
                durable=self._durable_log(route.url) if kind == "items" else None,
            )
        return writer

    def _durable_log(self, url: str) -> DurableLog | None:
        """With INGEST_DURABLE, items are journaled before they are acknowledged."""
        if not self._config.durable:
            return None
        if self._durable_executor is None:
            self._durable_executor = ThreadPoolExecutor(1, thread_name_prefix="scrapy_ingest")
        return DurableLog(SpillJournal(self._config.spill_root(), url), self._durable_executor)

    def item_writer(self, item: Any) -> BatchWriter | Route:
        """The writer for *item*; or its route, when that database is not open yet."""
        route = self._router.item_route(item)
        if route.url not in self._open:
            return route
        return self.writer("items", route)

    def sink(self, kind: str) -> RecordSink:
        """The job, the id factory and the writer of the *kind* table."""
        info = self._job.info
        return RecordSink(info.job_id, info.spider, self._new_id, self.writer(kind).add)

    def dead_letter(
        self,
        kind: str,
        reason: str,
        payload: str | None,
        url: str | None = None,
        *,
        warn: bool = True,
    ) -> None:
        """Store a record that cannot be stored where it belongs, with the reason: in the
        database it was meant for (*url*), by default ``INGEST_DATABASE_URL``'s. Each one is
        logged as a WARNING, unless *warn* is false (the caller warns once for many)."""
        if payload is not None:
            payload = cut_payload(payload)
        row = (self._new_id(), self._job.info.job_id, kind, reason, payload, time.time())
        if url not in self._open:
            url = self._router.default.url
            if url not in self._open:  # every kind is routed elsewhere
                url = next(iter(self._open))
        writer = self.writer("dead_letters", Route(url))
        writer.add(row, len(payload or "") + ROW_OVERHEAD)
        self._stats.inc_value(stat_key(kind, "dead_letter"))
        if warn:
            logger.warning("A record of kind %s went to the dead-letter table: %s", kind, reason)

    async def drain(self, kind: str) -> None:
        """Write every buffered row of *kind*, to whichever database it is routed."""
        for writer in [w for w in self._writers.values() if w.table.kind == kind]:
            await writer.drain()

    async def drain_all(self) -> None:
        """Write every buffered row; dead letters last: draining the others can produce some
        (and create their writer)."""
        for writer in [w for w in self._writers.values() if w.table.kind != "dead_letters"]:
            await writer.drain()
        await self.drain("dead_letters")

    def flush_older_than(self, seconds: float) -> None:
        for writer in list(self._writers.values()):
            writer.flush_older_than(seconds)

    def oldest_pending_write(self) -> float | None:
        """When the oldest batch not yet answered by its database was handed over, if any."""
        return min(
            (t for w in list(self._writers.values()) if (t := w.oldest_inflight()) is not None),
            default=None,
        )

    # closing

    async def finish(self, close_job: Callable[[], Awaitable[None]]) -> bool:
        """At the spider's close: write every buffered row, close the job row with
        *close_job*, then release every database. Return whether the job row was closed
        (written, or kept in the spill journal while its database is down)."""
        await self.recover()  # a database down during the crawl gets one more try
        await self.drain_all()
        try:
            await close_job()
        except Exception:
            logger.exception("Could not close the job row of %s", self._job.info)
            closed = False
        else:
            closed = True
        # the job row's write may be what found a database up again, and replayed its
        # journal: that replay is counted now (no batch is left to report it with)
        await self.recover()
        await self.close()
        return closed

    async def recover(self) -> None:
        """A database that went down during the crawl gets one more try before the last
        batches: if it answers, they are written, and the spill journal is replayed."""
        for entry in list(self._open.values()):
            try:
                replayed = await entry.host.recover()
            except Exception:
                logger.exception("Could not reach %s again", entry.host.url)
                continue
            if replayed is not None:
                self._on_replayed(replayed.batches, replayed.rows)

    async def close(self) -> None:
        """Release every connection (and the INGEST_DURABLE thread, whose last removals
        still run)."""
        self.discard_started()
        entries, self._open = list(self._open.values()), {}
        for entry in entries:
            await _close_host(entry.host)
        if self._durable_executor is not None:
            self._durable_executor.shutdown(wait=False)

    def discard_started(self) -> None:
        """Stop the hosts started (see start) that no open took: the crawl did not open."""
        started, self._started = self._started, {}
        for host, _ in started.values():
            host.discard()


async def _close_host(host: Host) -> None:
    try:
        await host.close()
    except Exception:
        logger.exception("Could not close the connection to %s", host.url)


async def _settle(coros: list[Coroutine[Any, Any, None]]) -> BaseException | None:
    """Run *coros* together until each has ended; return the first one's error, if any."""
    return await settle([spawn(coro) for coro in coros])


def _where(url: str, shown: str) -> str:
    """*shown* (the redacted *url*), with the absolute path of an SQLite file given by a
    relative one, which is resolved against the working directory (under scrapyd, scrapyd's).

    Read as SQLAlchemy reads an SQLite URL (``sqlite[+driver]:///path?query``), without
    importing it: the crawl process leaves SQLAlchemy to the writer process."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+", 1)[0].lower() != "sqlite" or not rest.startswith("/"):
        return shown
    path = unquote(rest[1:].partition("?")[0])
    if not path or path == ":memory:" or path.startswith("file:") or os.path.isabs(path):
        return shown  # in memory; an SQLite URI (uri=true); absolute
    return f"{shown} (file {os.path.abspath(path)})"
