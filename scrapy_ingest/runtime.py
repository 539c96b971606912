"""What scrapy_ingest holds for one crawler: config, backend, writers and the job row.

Components (the pipeline, the jobs extension, the spider middleware) share it
through :meth:`IngestRuntime.of`, which keeps it on the crawler, so two
crawlers in one process never share state. It opens on the first component's
request and closes on ``spider_closed``, after the pipeline has drained its
items: every writer is drained, the job row is closed with the reason, then
connections are released.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from scrapy import signals
from scrapy.exceptions import NotConfigured
from scrapy.utils.defer import deferred_from_coro, maybe_deferred_to_future
from scrapy.utils.misc import build_from_crawler, load_object
from twisted.internet.defer import Deferred

from scrapy_ingest import settings as defaults
from scrapy_ingest._compat import (
    Looping,
    close_spider,
    close_spider_before_start,
    fail_crawl,
    looping_call,
    wake_engine,
)
from scrapy_ingest._ids import IdFactory, format_uuid
from scrapy_ingest._redact import Redactor, redact_url, redact_value
from scrapy_ingest._redis import redis_crawl_id
from scrapy_ingest._stats import ProcessStats, stat_key
from scrapy_ingest.backends import check_driver, check_url, is_best_effort
from scrapy_ingest.backends.base import cut_payload, row_payload, safe_text
from scrapy_ingest.batching import BatchWriter, BufferBudget, DurableLog
from scrapy_ingest.config import IngestConfig, skipped_command
from scrapy_ingest.exceptions import BackendRefused, ConfigError, IngestError, JobIdConflict
from scrapy_ingest.hosting import create_host
from scrapy_ingest.quality import ItemChecks
from scrapy_ingest.records import RecordEncoder
from scrapy_ingest.router import Route, Router
from scrapy_ingest.schema import all_tables, table_spec
from scrapy_ingest.spill import SpillJournal

if TYPE_CHECKING:
    from collections.abc import Callable

    from scrapy.crawler import Crawler
    from scrapy.settings import BaseSettings

    from scrapy_ingest.backends import Row, WriteOutcome
    from scrapy_ingest.hosting import Host
    from scrapy_ingest.schema import TableSpec

logger = logging.getLogger(__name__)

#: a running job whose row has not been refreshed for this many heartbeats is crashed
STALE_HEARTBEATS = 3
#: the close reason when the spill journal outgrows INGEST_SPILL_MAX_BYTES
SPILL_FULL = "ingest_spill_full"
#: the close reason when a database refuses the crawl mid-way (a Failure.PERMANENT error)
BACKEND_REFUSED = "ingest_backend_refused"
#: the close reason when rows were given up on because the spill journal failed too (its
#: disk full, say) for INGEST_RETRY_TIMEOUT
SPILL_FAILED = "ingest_spill_failed"
#: the close reason when rows were given up on for another reason (the writer process died
#: again and again, the dead-letter table refused a record)
ROWS_LOST = "ingest_rows_lost"

#: the longest spider name stored (an indexed column: VARCHAR(255) on MySQL)
MAX_SPIDER_NAME = 255

#: rough per-row overhead (ids, tuple, strings) added to the JSON size for the buffer budget
ROW_OVERHEAD = 256


@dataclass(frozen=True)
class RecordSink:
    """What a component needs to make and buffer the rows of one table."""

    job_id: str
    spider: str
    #: make a record id from a capture time (epoch seconds)
    new_id: IdFactory
    #: buffer a row of about *size* bytes: ``add(row, size)``
    add: Callable[[Row, int], None]


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    crawl_id: str
    spider: str
    hostname: str
    pid: int
    started_at: float


def _where(url: str, shown: str) -> str:
    """*shown* (the redacted *url*), with the absolute path of an SQLite file given by a
    relative one, which is resolved against the working directory (under scrapyd, scrapyd's)."""
    if not url.startswith("sqlite"):
        return shown
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return shown
    path = parsed.database
    if parsed.get_backend_name() != "sqlite" or not path or path == ":memory:":
        return shown
    if path.startswith("file:") or os.path.isabs(path):  # an SQLite URI (uri=true); absolute
        return shown
    return f"{shown} (file {os.path.abspath(path)})"


class IngestRuntime:
    """Per-crawler state shared by scrapy_ingest's components."""

    _ATTRIBUTE = "_scrapy_ingest_runtime"

    @classmethod
    def of(cls, crawler: Crawler) -> IngestRuntime:
        """Return the crawler's runtime, creating it on first use.

        Raise NotConfigured when ``INGEST_ENABLED`` is false and ConfigError
        when a setting is invalid.
        """
        runtime: IngestRuntime | None = crawler.__dict__.get(cls._ATTRIBUTE)
        if runtime is None:
            runtime = cls(crawler)
            setattr(crawler, cls._ATTRIBUTE, runtime)
        return runtime

    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        self.config = config = IngestConfig.from_settings(crawler.settings)
        if not config.enabled:
            raise NotConfigured("INGEST_ENABLED is False")
        if skipped_command(crawler.settings) is not None:
            raise NotConfigured  # not a crawl (INGEST_SKIP_COMMANDS): off on purpose, silently
        assert crawler.stats is not None
        self.stats = crawler.stats
        #: what this process counted, for the job row and the metrics: with a stats collector
        #: shared by many processes (scrapy-redis's), crawler.stats reads the whole crawl's
        self.process_stats = ProcessStats(crawler.stats)
        #: the default table of each kind, named with INGEST_TABLE_PREFIX
        self.tables = {
            t.kind: t for t in all_tables(config.table_prefix, keep_versions=config.keep_versions)
        }
        #: open databases by URL, the default (INGEST_DATABASE_URL) first
        self._backends: dict[str, _Backend] = {}
        #: databases that could not be opened during the crawl, with the error
        self._unusable: dict[str, IngestError] = {}
        self._spill_full = False
        #: a database refused the crawl mid-way: the spider closes, the process exits non-zero
        self._refused = False
        #: why rows were given up on -> how many: the spider closes at the first, and the
        #: process exits non-zero
        self._losses: dict[str, int] = {}
        #: kind -> rows given up on, by this process
        self._lost_kinds: dict[str, int] = {}
        self._closing_for_loss = False
        self._durable_executor: ThreadPoolExecutor | None = None
        #: fired once the spider has closed and the writers are drained (see wait_closed);
        #: None once that has happened
        self._close_waiters: list[Deferred[None]] | None = []
        #: databases being opened -> who waits for that
        self._opening: dict[str, list[Deferred[None]]] = {}
        self.router: Router | None = None
        self.budget = BufferBudget(
            config.max_buffer_bytes,
            on_full=partial(self._hold_engine, "buffer"),
            on_room=partial(self._release_engine, "buffer"),
        )
        #: why the engine is paused by us: "buffer" (full), or the URL of a database whose
        #: host neither writes nor spills rows (see _host_stuck)
        self._holds: set[str] = set()
        #: when the engine was paused by us (monotonic), if it is
        self._held_since: float | None = None
        self.new_id = IdFactory()
        #: hides the secrets of every URL and log message stored (INGEST_REDACT_QUERY_PARAMS)
        self.redact = Redactor(config.redact_query_params)
        self.encoder = RecordEncoder(on_value=self._count_value)
        # for our own job rows, whose conversions are not the spider's values to count
        self._job_encoder = RecordEncoder()
        #: INGEST_ITEM_SCHEMAS / INGEST_ITEM_KEYS and the job's quality figures, if set
        self.item_checks = ItemChecks.from_config(config, self.encoder)
        #: id(item) -> (item, URL of the response it came from), by SourceMiddleware
        self.item_sources: dict[int, tuple[Any, str]] = {}
        self.job: JobInfo | None = None
        self.items_stored = 0
        #: download attempts captured, by RequestLogMiddleware (None: it is not enabled)
        self.requests_count: int | None = None
        #: log records seen per level name, by the logs extension (None: it is not enabled)
        self.log_counts: dict[str, int] | None = None
        self._writers: dict[tuple[str, str], BatchWriter] = {}
        self._state = "new"  # new -> opening -> open -> closed (or failed)
        self._open_error: BaseException | None = None
        self._open_waiters: list[Deferred[None]] = []
        self._flush_loop: Looping | None = None
        self._tickers: list[Callable[[], None]] = []
        self._closers: list[Callable[[], None]] = []
        self._outcome_observers: list[Callable[[str, TableSpec, WriteOutcome, float], None]] = []
        #: (database URL, table name) -> [rows written, rows refused or lost]
        self._write_counts: dict[tuple[str, str], list[int]] = {}
        #: whether the spider is closing (the engine stops; writers drain)
        self.closing = False
        crawler.signals.connect(self._spider_closed, signal=signals.spider_closed)
        crawler.signals.connect(self._forget_item, signal=signals.item_dropped)
        crawler.signals.connect(self._forget_item, signal=signals.item_error)

    # opening

    async def open(self) -> None:
        """Connect, prepare the tables and insert the job row; once, however often called."""
        if self._state == "open":
            return
        if self._state in ("opening", "failed", "closed"):
            if self._state == "opening":
                waiter: Deferred[None] = Deferred()
                self._open_waiters.append(waiter)
                await maybe_deferred_to_future(waiter)
            if self._open_error is not None:
                raise self._open_error
            return
        self._state = "opening"
        try:
            await self._open()
        except BaseException as exc:
            self._state, self._open_error = "failed", exc
            if isinstance(exc, IngestError):
                self._refuse_to_start(exc)
            raise
        else:
            self._state = "open"
        finally:
            waiters, self._open_waiters = self._open_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _refuse_to_start(self, exc: IngestError) -> None:
        """Say why this crawl cannot be stored, once, and close the spider before its first
        request; the process then exits non-zero (see _spider_closed).

        Closed when the engine starts, not from the component that opened the runtime: an
        error raised from a pipeline's open_spider, or a spider closed from a spider_opened
        handler, leaves tracebacks of Scrapy's own (2.13 to 2.19); once ``engine_started``
        has been handled, the engine sends no request for a closed spider.
        """
        logger.error("Cannot store this crawl: %s", exc)
        reason = BACKEND_REFUSED if isinstance(exc, BackendRefused) else "ingest_error"

        async def close(*_: Any) -> None:
            self.crawler.signals.disconnect(close, signal=signals.engine_started)
            await close_spider_before_start(self.crawler, reason)

        engine = self.crawler.engine
        if engine is not None and engine.running:  # opened late, by a component that waited
            deferred_from_coro(close_spider(self.crawler, reason)).addErrback(
                lambda failure: logger.error("Could not close the spider: %s", failure.value)
            )
        else:
            self.crawler.signals.connect(close, signal=signals.engine_started, weak=False)

    async def opened(self) -> bool:
        """Open (see :meth:`open`); return False, instead of raising, when opening failed.

        For components that have nothing to add to the error, which the
        pipeline and the jobs extension report.
        """
        try:
            await self.open()
        except IngestError:
            return False
        return True

    async def _open(self) -> None:
        self.job = self._make_job()
        self.router = router = Router(
            self.config.rules(), self.config.database_url, self.job.spider, self._custom_router()
        )
        try:
            for url in router.static_urls():
                await self.open_backend(url)
        except BaseException:
            await self._close_backends()
            raise
        urls = ", ".join(_where(url, backend.host.url) for url, backend in self._backends.items())
        logger.info(
            "Storing crawl data in %s (job_id %s); spill journal: %s",
            urls,
            self.job.job_id,
            self.config.spill_root(),
        )
        if self.item_checks is not None:
            self.on_tick(partial(self.item_checks.publish, self.stats))
        self._flush_loop = looping_call(self._flush_old)
        self._flush_loop.start(self.config.flush_interval / 4, now=False)

    def _custom_router(self) -> Any:
        path = self.config.router
        if path is None:
            return None
        try:
            cls = load_object(path) if isinstance(path, str) else path
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigError(
                f"INGEST_ROUTER ({path!r}) is invalid: it cannot be imported ({exc}). Fix: give "
                "the import path of a class with a route(kind, record) method."
            ) from None
        router = build_from_crawler(cls, self.crawler) if hasattr(cls, "from_crawler") else cls()
        if not callable(getattr(router, "route", None)):
            raise ConfigError(
                f"INGEST_ROUTER ({path!r}) is invalid: it has no route(kind, record) method. "
                "Fix: give it one that returns a scrapy_ingest.router.Route or None."
            )
        return router

    async def open_backend(self, url: str) -> None:
        """Start the host of *url*, prepare its tables and insert the job row there (once).

        A database that cannot be opened during the crawl (one only ``INGEST_ROUTER`` names)
        is not tried again for every record: the error is kept and raised again.
        """
        if url in self._backends:
            return
        known = self._unusable.get(url)
        if known is not None:
            raise known
        waiters = self._opening.get(url)
        if waiters is not None:  # being opened for another record: wait for that
            waiter: Deferred[None] = Deferred()
            waiters.append(waiter)
            await maybe_deferred_to_future(waiter)
            await self.open_backend(url)  # open now, or known to be unusable
            return
        self._opening[url] = []
        try:
            await self._open_backend(url)
        except IngestError as exc:
            if self._state == "open":
                self._unusable[url] = exc
            raise
        finally:
            for waiter in self._opening.pop(url):
                waiter.callback(None)

    async def _open_backend(self, url: str) -> None:
        assert self.job is not None and self.router is not None
        source = self.router.describe(url)
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
        tables = self._tables_for(url)
        host = create_host(
            url,
            list(tables.values()),
            create_tables=self.config.create_tables,
            retry_timeout=self.config.retry_timeout,
            writer_process=self.config.writer_process,
            spill_dir=self.config.spill_root(),
            require_backend=self.config.require_backend,
            spill_min_free=self.config.spill_min_free_bytes,
            on_stuck=partial(self._host_stuck, url),
        )
        try:
            opened = await maybe_deferred_to_future(host.open())
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
            self._count_replayed(opened.replayed.batches, opened.replayed.rows)
        try:
            inserted = await maybe_deferred_to_future(
                host.insert_job(self.tables["jobs"], self._job_row())
            )
        except BaseException as exc:
            await maybe_deferred_to_future(host.close())
            if isinstance(exc, IngestError):  # a refused INSERT: which database it was
                raise type(exc)(f"{exc} (the database of {source})") from None
            raise
        if not inserted:
            await maybe_deferred_to_future(host.close())
            raise JobIdConflict(
                f"a job with job_id {self.job.job_id!r} exists already in "
                f"{self.tables['jobs'].name} at {host.url}: storing this crawl under "
                "it would merge two crawls. Fix: leave INGEST_JOB_ID unset (a fresh id per "
                "crawl), or give each crawl its own INGEST_JOB_ID; use INGEST_CRAWL_ID to group "
                "the jobs of one crawl."
            )
        self._backends[url] = _Backend(url, host, tables, has_job=True)
        # the tables it takes rows for count from 0, so their metrics have a sample from the start
        kinds = {*self.record_kinds(), "dead_letters"}
        for spec in tables.values():
            if spec.kind in kinds:
                self._write_counts.setdefault((url, spec.name), [0, 0])
        await self._mark_crashed(host)

    async def _mark_crashed(self, host: Host) -> None:
        """Jobs left ``running`` by a process that died (their row not refreshed for three
        heartbeats) become ``crashed``."""
        try:
            await self._find_crashed(host)
        except Exception as exc:
            logger.warning("Could not look for crashed jobs in %s: %s", host.url, exc)

    async def mark_crashed_jobs(self) -> None:
        """Run the crashed-job check of the start again for the jobs of this crawl (its
        ``crawl_id``), in every database with this crawl's job row: one ``UPDATE`` each,
        nothing while a database is down (its host skips it).

        The jobs extension calls it at each heartbeat, so that the live workers of a
        distributed crawl mark a killed worker's row ``crashed`` without waiting for a
        process to start. Only this crawl's jobs: they share its heartbeat, where another
        crawl's may be slower (it would be taken for crashed at every beat, and revive at its
        own). Every database is tried; the first failure is raised then (the caller decides
        how loudly to say so)."""
        if self.closing:  # the databases are closing: the next crawl looks again
            return
        assert self.job is not None
        failure: BaseException | None = None
        for backend in list(self._backends.values()):
            if not backend.has_job:
                continue
            try:
                await self._find_crashed(backend.host, self.job.crawl_id)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    async def _find_crashed(self, host: Host, crawl_id: str | None = None) -> None:
        assert self.job is not None
        stale_before = time.time() - STALE_HEARTBEATS * self.config.job_heartbeat
        crashed = await maybe_deferred_to_future(
            host.mark_crashed(self.tables["jobs"], stale_before, self.job.job_id, crawl_id)
        )
        for job_id in crashed:
            logger.warning(
                "Job %s in %s was left running by a process that stopped refreshing it: it is "
                "marked crashed",
                job_id,
                host.url,
            )

    def _tables_for(self, url: str) -> dict[str, TableSpec]:
        """The tables to prepare at *url*: its routed tables, plus jobs and dead letters."""
        assert self.router is not None
        names = ["jobs", "dead_letters", "schema_version"]
        specs = [self.tables[kind] for kind in names]
        rules = self.router.rules
        if url == self.router.default.url:
            # the kinds of which some records may fall through to the default
            for kind in ("items", "requests", "logs"):
                if self.router.falls_through(kind):
                    specs.append(self.tables[kind])
        for rule in rules:
            if rule.url == url and rule.kind != "jobs":
                specs.append(self._table(rule.kind, rule.table))
        # the history of an items table is prepared with it
        specs += [spec.history for spec in specs if spec.history is not None]
        return {spec.name: spec for spec in specs}

    def _table(self, kind: str, name: str | None) -> TableSpec:
        """The table of *kind*, by default the one named with the prefix."""
        spec = self.tables[kind]
        if name is None or name == spec.name:
            return spec
        keep_versions = self.config.keep_versions
        return table_spec(kind, self.config.table_prefix, name, keep_versions=keep_versions)

    def _job_row(self) -> dict[str, Any]:
        assert self.job is not None
        return {
            "job_id": self.job.job_id,
            "crawl_id": self.job.crawl_id,
            "spider": self.job.spider,
            "hostname": self.job.hostname,
            "pid": self.job.pid,
            "status": "running",
            "started_at": self.job.started_at,
            # not started_at: opening the database may have taken longer than a heartbeat
            "updated_at": time.time(),
            "items_count": 0,
            "requests_count": 0,
            "errors_count": 0,
            "log_counts": self._job_encoder.encode({}),
            "settings": self._job_encoder.encode(settings_snapshot(self.crawler.settings)),
        }

    def _make_job(self) -> JobInfo:
        spider = self.crawler.spider
        assert spider is not None
        # scrapyd passes its job id as the _job spider argument (1.3 and older: SCRAPY_JOB too)
        job_id = (
            self.config.job_id
            or os.environ.get("SCRAPY_JOB")
            or getattr(spider, "_job", None)
            or format_uuid(self.new_id())
        )
        # the processes of a scrapy-redis crawl share its queue key
        crawl_id = self.config.crawl_id or redis_crawl_id(self.crawler.settings, spider.name)
        return JobInfo(
            job_id=str(job_id),
            crawl_id=crawl_id or str(job_id),
            spider=_spider_name(spider.name),
            hostname=socket.gethostname(),
            pid=os.getpid(),
            started_at=time.time(),
        )

    # writing

    def writer(self, kind: str, route: Route | None = None) -> BatchWriter:
        """The writer of *route* (by default, the route of the *kind*) for rows of *kind*.

        The database of the route must be open: the routes known from the
        settings are opened with the runtime, others by :meth:`open_backend`.
        """
        assert self.router is not None, "writer() before open()"
        if route is None:
            route = self.router.route(kind) if kind != "dead_letters" else self.router.default
        spec = self._table(kind, route.table)
        writer = self._writers.get((route.url, spec.name))
        if writer is None:
            config = self.config
            writer = self._writers[route.url, spec.name] = BatchWriter(
                self._backends[route.url].host,
                spec,
                budget=self.budget,
                batch_rows=config.batch_rows,
                batch_bytes=config.batch_bytes,
                on_outcome=partial(self._count_outcome, route.url),
                durable=self._durable_log(route.url) if kind == "items" else None,
            )
        return writer

    def _durable_log(self, url: str) -> DurableLog | None:
        """With INGEST_DURABLE, items are journaled before they are acknowledged."""
        if not self.config.durable:
            return None
        if self._durable_executor is None:
            self._durable_executor = ThreadPoolExecutor(1, thread_name_prefix="scrapy_ingest")
        return DurableLog(SpillJournal(self.config.spill_root(), url), self._durable_executor)

    async def drain(self, kind: str) -> None:
        """Write every buffered row of *kind*, to whichever database it is routed."""
        for writer in [w for w in self._writers.values() if w.table.kind == kind]:
            await maybe_deferred_to_future(writer.drain())

    def item_writer(self, item: Any) -> BatchWriter | Route:
        """The writer for *item*; or its route, when that database is not open yet."""
        assert self.router is not None, "item_writer() before open()"
        route = self.router.item_route(item)
        if route.url not in self._backends:
            return route
        return self.writer("items", route)

    def sink(self, kind: str) -> RecordSink:
        """The job, the id factory and the writer of the *kind* table, once open."""
        assert self.job is not None, "sink() before open()"
        return RecordSink(self.job.job_id, self.job.spider, self.new_id, self.writer(kind).add)

    def dead_letter(
        self,
        kind: str,
        reason: str,
        payload: str | None,
        url: str | None = None,
        *,
        warn: bool = True,
    ) -> None:
        """Store a record that cannot be stored where it belongs, with the reason.

        It goes to the database the record was meant for (*url*), by default
        to ``INGEST_DATABASE_URL``'s. Each one is logged as a WARNING, unless
        *warn* is false (the caller warns once for many).
        """
        assert self.job is not None and self.router is not None
        if payload is not None:
            payload = cut_payload(payload)
        row = (self.new_id(), self.job.job_id, kind, reason, payload, time.time())
        if url not in self._backends:
            url = self.router.default.url
            if url not in self._backends:  # every kind is routed elsewhere
                url = next(iter(self._backends))
        self.writer("dead_letters", Route(url)).add(row, len(payload or "") + ROW_OVERHEAD)
        self.stats.inc_value(stat_key(kind, "dead_letter"))
        if warn:
            logger.warning("A record of kind %s went to the dead-letter table: %s", kind, reason)

    def _count_outcome(
        self, url: str, table: TableSpec, outcome: WriteOutcome, seconds: float
    ) -> None:
        stats, kind = self.stats, table.kind
        counts = self._write_counts.setdefault((url, table.name), [0, 0])
        counts[0] += outcome.written
        counts[1] += outcome.lost + len(outcome.dead)
        for observer in self._outcome_observers:
            observer(url, table, outcome, seconds)
        if outcome.changes and self.item_checks is not None:
            self.item_checks.count_changes(outcome.changes)
        if outcome.written:
            stats.inc_value(stat_key(kind, "stored"), outcome.written)
            stats.inc_value(stat_key("batches", "written"))
            if kind == "items":
                self.items_stored += outcome.written
        if outcome.retries:
            stats.inc_value(stat_key("batches", "retries"), outcome.retries)
        if outcome.spilled:
            self._count_spilled(kind, outcome)
        if outcome.replayed_batches:
            self._count_replayed(outcome.replayed_batches, outcome.replayed_rows)
        if outcome.lost:
            stats.inc_value(stat_key(kind, "lost"), outcome.lost)
            why = outcome.spill_failed or outcome.failure or outcome.refused
            self._rows_lost(kind, outcome.lost, why)
        if outcome.refused:
            self._backend_refused(url, outcome.refused)
        for row, reason in outcome.dead:
            if kind == "dead_letters":
                stats.inc_value(stat_key(kind, "lost"))
                logger.error("A dead-letter record was refused too (%s); it is lost", reason)
                why = f"the dead-letter table refused a record: {reason}"
                self._rows_lost(kind, 1, why, close=False)  # one record: the crawl goes on
            else:
                payload = row_payload(kind, row)
                self.dead_letter(kind, f"the database refused it: {reason}", payload, url)

    def _count_spilled(self, kind: str, outcome: WriteOutcome) -> None:
        stats = self.stats
        if kind == "items":  # the job row's items_count: safe in the database or the journal
            self.items_stored += outcome.spilled
        stats.inc_value(stat_key(kind, "spilled"), outcome.spilled)
        stats.inc_value(stat_key("spill", "batches"))
        stats.inc_value(stat_key("spill", "rows"), outcome.spilled)
        stats.set_value(stat_key("spill", "bytes"), outcome.journal_bytes)
        limit = self.config.spill_max_bytes
        if self._spill_full:
            return
        if outcome.journal_bytes > limit:
            why = (
                f"the spill journal holds {outcome.journal_bytes} bytes, more than "
                f"INGEST_SPILL_MAX_BYTES ({limit})"
            )
        elif outcome.journal_low:
            why = outcome.journal_low
        else:
            return
        self._spill_full = True
        logger.error(
            "%s: closing the spider (%s) rather than lose what it scrapes. What it holds "
            "still goes to the journal; run `scrapy ingest replay` once the database answers "
            "again",
            why[0].upper() + why[1:],
            SPILL_FULL,
        )
        self._close_spider(SPILL_FULL)

    def _rows_lost(self, kind: str, rows: int, why: str, *, close: bool = True) -> None:
        """*rows* of *kind* were given up on: the process will exit non-zero, saying how many
        and why; with *close*, the spider closes (the crawl stops taking work it cannot keep)."""
        why = why or "the write failed"
        self._losses[why] = self._losses.get(why, 0) + rows
        self._lost_kinds[kind] = self._lost_kinds.get(kind, 0) + rows
        if close and not self._closing_for_loss and not self.closing:
            self._closing_for_loss = True
            self._close_spider(SPILL_FAILED if "spill journal" in why else ROWS_LOST)

    def _close_spider(self, reason: str) -> None:
        deferred_from_coro(close_spider(self.crawler, reason)).addErrback(
            lambda failure: logger.error("Could not close the spider: %s", failure.value)
        )

    def _backend_refused(self, url: str, refusal: str) -> None:
        """A database refuses the crawl for good (its password changed, a grant was revoked):
        say so once, and close the spider; its host spills what is left."""
        if self._refused:
            return
        self._refused = True
        assert self.router is not None
        self.stats.set_value(stat_key("backend", "refused"), 1)
        logger.error(
            "The database of %s refuses this crawl: %s. Closing the spider (%s); what it "
            "scraped for that database is in the spill journal under %s. Once that is fixed, "
            "run `scrapy ingest replay` with the corrected settings to store it",
            self.router.describe(url),
            refusal,
            BACKEND_REFUSED,
            self.config.spill_root(),
        )
        self._close_spider(BACKEND_REFUSED)

    def _count_replayed(self, batches: int, rows: int) -> None:
        if batches:
            self.stats.inc_value(stat_key("spill", "replayed_batches"), batches)
            self.stats.inc_value(stat_key("spill", "replayed_rows"), rows)

    def _count_value(self, kind: str) -> None:
        self.stats.inc_value(stat_key("values", kind))

    # backpressure

    def _hold_engine(self, why: str) -> None:
        """The buffer is full, or a database and its journal take no rows: the engine takes
        no new request until that is over.

        Pausing the engine is what Scrapy offers for this (its telnet console's
        ``engine.pause()``): the engine stops taking requests from the scheduler, the
        downloads in flight end, their responses (and those already waiting for the scraper,
        which Scrapy bounds with ``SCRAPER_SLOT_MAX_ACTIVE_SIZE``) are parsed, and their items
        fill the buffer's last quarter, or wait in front of the pipeline. So what comes after
        the pause is bounded by the responses downloaded and not parsed yet, not by the
        crawl's pace. An engine paused by someone else is left to them.
        """
        holds = self._holds
        if why in holds:
            return
        holds.add(why)
        engine = self.crawler.engine
        if len(holds) > 1 or engine is None or self.closing:
            return
        if engine.paused:  # paused by someone else (the telnet console): theirs to resume
            holds.clear()
            return
        engine.pause()
        self._held_since = time.monotonic()
        self.stats.inc_value(stat_key("buffer", "pauses"))

    def _release_engine(self, why: str | None = None) -> None:
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
        paused = self.stats.get_value(key, 0.0) + time.monotonic() - since
        self.stats.set_value(key, round(paused, 3))
        engine = self.crawler.engine
        if engine is not None:
            engine.unpause()
            wake_engine(self.crawler)

    def _host_stuck(self, url: str, stuck: bool) -> None:
        """The host of *url* holds rows that neither its database nor its journal takes (it
        tries both for INGEST_RETRY_TIMEOUT): the crawl stops taking work meanwhile."""
        if stuck:
            self._hold_engine(url)
        else:
            self._release_engine(url)

    def on_tick(self, callback: Callable[[], None]) -> None:
        """Call *callback* a few times per ``INGEST_FLUSH_INTERVAL`` and before the job closes."""
        self._tickers.append(callback)

    def on_outcome(self, callback: Callable[[str, TableSpec, WriteOutcome, float], None]) -> None:
        """Call ``callback(url, table, outcome, seconds)`` for each batch answered."""
        self._outcome_observers.append(callback)

    def oldest_pending_write(self) -> float | None:
        """When the oldest batch not yet answered by its database was handed over, if any.

        A batch is answered once written, or given up on: one that stays unanswered for long
        means its database is failing (its host is retrying).
        """
        return min(
            (t for w in list(self._writers.values()) if (t := w.oldest_inflight()) is not None),
            default=None,
        )

    def record_kinds(self) -> tuple[str, ...]:
        """The kinds of records this crawl stores (items, and requests and logs if enabled)."""
        config = self.config
        enabled = {"items": True, "requests": config.requests_enabled, "logs": config.logs_enabled}
        return tuple(kind for kind, on in enabled.items() if on)

    def write_counts(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(database URL, credentials redacted; table) -> (rows written, rows not written),
        from (0, 0) for each table an open database takes rows for (see _open_backend)."""
        return {
            (redact_url(url), table): (counts[0], counts[1])
            for (url, table), counts in list(self._write_counts.items())
        }

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call *callback* when the spider closes, before the writers drain."""
        self._closers.append(callback)

    def _tick(self) -> None:
        for callback in self._tickers:
            callback()

    def _flush_old(self) -> None:
        self._tick()
        for writer in list(self._writers.values()):
            writer.flush_older_than(self.config.flush_interval)

    def _forget_item(self, item: Any) -> None:
        self.item_sources.pop(id(item), None)

    # the job row

    async def update_job(self, *, reason: str | None = None) -> None:
        """Refresh the job row; with *reason*, close it (status ``finished``)."""
        assert self.job is not None
        self._tick()
        now = time.time()
        stats = self.process_stats.get_stats()
        log_counts = self.log_counts
        if log_counts is None:  # without the logs extension, Scrapy's own counts
            prefix = "log_count/"
            log_counts = {k[len(prefix) :]: v for k, v in stats.items() if k.startswith(prefix)}
        requests = self.requests_count
        if requests is None:
            requests = stats.get("downloader/request_count", 0)
        values: dict[str, Any] = {
            "updated_at": now,
            "items_count": self.items_stored,
            "requests_count": requests,
            "errors_count": log_counts.get("ERROR", 0) + log_counts.get("CRITICAL", 0),
            "log_counts": self._job_encoder.encode(log_counts),
            # a stats value may hold a URL (a last error, a third-party extension's)
            "stats": self.redact(self._job_encoder.encode(stats).decode()).encode(),
        }
        checks = self.item_checks
        if checks is not None:
            values["quality"] = self._job_encoder.encode(checks.as_dict())
        if reason is not None:
            values.update(status="finished", close_reason=reason, finished_at=now)
        else:
            # alive: a row another crawl took for crashed (its heartbeats were late, say behind
            # a slow database) is running again
            values.update(status="running", close_reason=None, finished_at=None)
        # a late heartbeat must not overwrite the final row; every database with the row
        # gets the update, even when another one fails
        failure: BaseException | None = None
        for backend in list(self._backends.values()):
            if not backend.has_job:
                continue
            update = backend.host.update_job(
                self.tables["jobs"], self.job.job_id, values, unless_finished=reason is None
            )
            try:
                await maybe_deferred_to_future(update)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    # closing

    async def _spider_closed(self, reason: str) -> None:
        self.closing = True
        self._release_engine(None)
        if self._state != "open":
            self._all_closed()
            if self._state == "failed":  # the crawl did not start: not a success
                fail_crawl(self.crawler)
            return
        self._state = "closed"
        if self._flush_loop is not None and self._flush_loop.running:
            self._flush_loop.stop()
        # components hand over what they hold (log records) before the writers drain
        for callback in self._closers:
            callback()
        self._tick()
        await self._recover_backends()
        # dead letters last: draining the others can produce some (and create their writer)
        for writer in [w for w in self._writers.values() if w.table.kind != "dead_letters"]:
            await maybe_deferred_to_future(writer.drain())
        await self.drain("dead_letters")
        try:
            await self.update_job(reason=reason)
        except Exception:
            logger.exception("Could not close the job row of %s", self.job)
        # the job row's write may be what found a database up again, and replayed its journal:
        # that replay is counted now (no batch is left to report it with)
        await self._recover_backends()
        try:
            await self._close_backends()
        finally:
            if self._durable_executor is not None:
                self._durable_executor.shutdown(wait=False)  # the last removals still run
            self._all_closed()
            if self._losses:
                self._report_losses()
            if self._refused or self._losses:
                fail_crawl(self.crawler)

    def _report_losses(self) -> None:
        """The last word of a crawl that lost rows: how many, of which kinds, and why."""
        total = sum(self._losses.values())
        logger.error(
            "%d rows could not be kept (%s): %s. They are in no database and in no spill "
            "journal; the stats (ingest/<kind>/lost) and the job row's stats count them",
            total,
            ", ".join(f"{kind} {n}" for kind, n in self._lost_kinds.items()),
            "; ".join(f"{n} because {why}" for why, n in self._losses.items()),
        )

    async def wait_closed(self) -> None:
        """Return once the spider has closed and every batch is written, spilled or given up
        (at once if the runtime never opened)."""
        if self._state == "new" or self._close_waiters is None:
            return
        waiter: Deferred[None] = Deferred()
        self._close_waiters.append(waiter)
        await maybe_deferred_to_future(waiter)

    def _all_closed(self) -> None:
        waiters, self._close_waiters = self._close_waiters or [], None
        for waiter in waiters:
            waiter.callback(None)

    async def _recover_backends(self) -> None:
        """A database that went down during the crawl gets one more try before the last
        batches: if it answers, they are written, and the spill journal is replayed."""
        for backend in list(self._backends.values()):
            try:
                replayed = await maybe_deferred_to_future(backend.host.recover())
            except Exception:
                logger.exception("Could not reach %s again", backend.host.url)
                continue
            if replayed is not None:
                self._count_replayed(replayed.batches, replayed.rows)

    async def _close_backends(self) -> None:
        backends, self._backends = list(self._backends.values()), {}
        for backend in backends:
            try:
                await maybe_deferred_to_future(backend.host.close())
            except Exception:
                logger.exception("Could not close the connection to %s", backend.host.url)


@dataclass
class _Backend:
    """An open database of one crawler."""

    url: str
    host: Host
    #: the tables prepared at open, by name (others are created on their first write)
    tables: dict[str, TableSpec]
    #: whether the job row has been inserted there
    has_job: bool = False


def _spider_name(name: str) -> str:
    """The spider's name as every row stores it: cleaned like any text (a NUL or a lone
    surrogate becomes U+FFFD); refused when it is longer than its indexed column takes."""
    if len(name) > MAX_SPIDER_NAME:
        raise ConfigError(
            f"the spider's name is {len(name):,} characters long ({name[:40]!r}...), and "
            f"scrapy_ingest stores at most {MAX_SPIDER_NAME}: the spider column is indexed in "
            "every table (VARCHAR(255) on MySQL and MariaDB). Fix: give the spider a shorter "
            "name."
        )
    return safe_text(name)


def settings_snapshot(settings: BaseSettings) -> dict[str, Any]:
    """The settings a project changed (and all INGEST_* ones), credentials redacted."""
    snapshot: dict[str, Any] = {}
    for name in sorted(settings):
        priority = settings.getpriority(name) or 0
        if priority <= 0 and not name.startswith("INGEST_"):
            continue
        value = settings[name]
        if hasattr(value, "copy_to_dict"):
            value = value.copy_to_dict()
        snapshot[name] = _jsonable(redact_value(name, value))
    for name in dir(defaults):
        if name.startswith("INGEST_") and name not in snapshot:
            snapshot[name] = _jsonable(redact_value(name, getattr(defaults, name)))
    return snapshot


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):  # redact_value has made its keys text
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return str(value)
