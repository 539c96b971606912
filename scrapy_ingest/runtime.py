"""What scrapy_ingest holds for one crawler: its parts, wired, and their surface.

The parts: the job row (:mod:`~scrapy_ingest._job`), the databases with their hosts and
writers (:mod:`~scrapy_ingest._databases`), the counters (:mod:`~scrapy_ingest._counters`).
Components share the runtime through :meth:`IngestRuntime.of`, which keeps it on the
crawler. It opens on the first component's request (every database the settings name, at
once) and closes on ``spider_closed``, after the pipeline has drained its items: every
writer is drained, the job row is closed with the reason, then connections are released.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Any

from scrapy import signals
from scrapy.exceptions import NotConfigured
from scrapy.utils.defer import maybe_deferred_to_future
from twisted.internet.defer import Deferred

from scrapy_ingest._closing import close_at_start, close_soon
from scrapy_ingest._compat import fail_crawl, looping_call
from scrapy_ingest._counters import BACKEND_REFUSED, Counters
from scrapy_ingest._databases import ROW_OVERHEAD, Databases, EngineHold, RecordSink
from scrapy_ingest._ids import IdFactory
from scrapy_ingest._job import JobInfo, JobRow, make_job
from scrapy_ingest._redact import Redactor
from scrapy_ingest._stats import ProcessStats, stat_key
from scrapy_ingest.batching import BatchWriter, BufferBudget
from scrapy_ingest.config import IngestConfig, skipped_command
from scrapy_ingest.exceptions import BackendRefused, IngestError
from scrapy_ingest.quality import ItemChecks
from scrapy_ingest.records import RecordEncoder
from scrapy_ingest.router import Route, Router, custom_router
from scrapy_ingest.schema import all_tables

if TYPE_CHECKING:
    from collections.abc import Callable

    from scrapy.crawler import Crawler

    from scrapy_ingest._compat import Looping
    from scrapy_ingest._counters import OutcomeObserver

__all__ = ["ROW_OVERHEAD", "IngestRuntime", "RecordSink"]

logger = logging.getLogger(__name__)


class IngestRuntime:
    """Per-crawler state shared by scrapy_ingest's components."""

    _ATTRIBUTE = "_scrapy_ingest_runtime"

    @classmethod
    def of(cls, crawler: Crawler) -> IngestRuntime:
        """The crawler's runtime, made on first use (NotConfigured: INGEST_ENABLED is False;
        ConfigError: a setting is invalid)."""
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
        #: whether the spider is closing (the engine stops; writers drain)
        self.closing = False
        self.counters = Counters(
            self.stats,
            spill_max_bytes=config.spill_max_bytes,
            spill_root=config.spill_root,
            close_spider=partial(close_soon, crawler),
            dead_letter=self.dead_letter,
            describe=self._describe,
            closing=lambda: self.closing,
        )
        self.hold = EngineHold(crawler, self.stats, closing=lambda: self.closing)
        self.budget = BufferBudget(
            config.max_buffer_bytes,
            on_full=partial(self.hold.hold, "buffer"),
            on_room=partial(self.hold.release, "buffer"),
        )
        self.new_id = IdFactory()
        #: hides the secrets of every URL and log message stored (INGEST_REDACT_QUERY_PARAMS)
        self.redact = Redactor(config.redact_query_params)
        self.encoder = RecordEncoder(on_value=self.counters.count_value)
        #: INGEST_ITEM_SCHEMAS / INGEST_ITEM_KEYS and the job's quality figures, if set
        self.item_checks = self.counters.item_checks = ItemChecks.from_config(config, self.encoder)
        #: id(item) -> (item, URL of the response it came from), by SourceMiddleware
        self.item_sources: dict[int, tuple[Any, str]] = {}
        #: download attempts captured, by RequestLogMiddleware (None: it is not enabled)
        self.requests_count: int | None = None
        #: log records seen per level name, by the logs extension (None: it is not enabled)
        self.log_counts: dict[str, int] | None = None
        self.job: JobInfo | None = None
        self.job_row: JobRow | None = None
        self.router: Router | None = None
        self.databases: Databases | None = None
        self._state = "new"  # new -> opening -> open -> closed (or failed)
        self._open_error: BaseException | None = None
        self._open_waiters: list[Deferred[None]] = []
        #: fired once the spider has closed and the writers are drained (see wait_closed);
        #: None once that has happened
        self._close_waiters: list[Deferred[None]] | None = []
        self._flush_loop: Looping | None = None
        self._tickers: list[Callable[[], None]] = []
        self._closers: list[Callable[[], None]] = []
        crawler.signals.connect(self._spider_closed, signal=signals.spider_closed)
        crawler.signals.connect(self._forget_item, signal=signals.item_dropped)
        crawler.signals.connect(self._forget_item, signal=signals.item_error)

    # opening

    async def open(self) -> None:
        """Open every database the settings name and insert the job row; once, however
        often called."""
        if self._state == "opening":
            waiter: Deferred[None] = Deferred()
            self._open_waiters.append(waiter)
            await maybe_deferred_to_future(waiter)
        if self._state != "new":
            if self._open_error is not None:
                raise self._open_error
            return
        self._state = "opening"
        try:
            await self._open()
        except BaseException as exc:
            self._state, self._open_error = "failed", exc
            if isinstance(exc, IngestError):  # said once; the process exits non-zero
                logger.error("Cannot store this crawl: %s", exc)
                refused = isinstance(exc, BackendRefused)
                close_at_start(self.crawler, BACKEND_REFUSED if refused else "ingest_error")
            raise
        else:
            self._state = "open"
        finally:
            waiters, self._open_waiters = self._open_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    async def opened(self) -> bool:
        """Open; return False instead of raising an IngestError (which open() reports)."""
        try:
            await self.open()
        except IngestError:
            return False
        return True

    async def _open(self) -> None:
        config = self.config
        self.job = job = self._make_job()
        custom = custom_router(config.router, self.crawler)
        self.router = router = Router(config.rules(), config.database_url, job.spider, custom)
        self.job_row = JobRow(job, self.tables["jobs"], config.job_heartbeat, self.crawler.settings)
        self.databases = databases = Databases(
            config,
            router,
            self.tables,
            self.job_row,
            counters=self.counters,
            hold=self.hold,
            budget=self.budget,
            new_id=self.new_id,
        )
        await databases.open_all(router.static_urls(), self.record_kinds())
        logger.info(
            "Storing crawl data in %s (job_id %s); spill journal: %s",
            databases.where(),
            job.job_id,
            config.spill_root(),
        )
        if self.item_checks is not None:
            self.on_tick(partial(self.item_checks.publish, self.stats))
        self._flush_loop = looping_call(self._flush_old)
        self._flush_loop.start(config.flush_interval / 4, now=False)

    def _make_job(self) -> JobInfo:
        return make_job(self.crawler, self.config, self.new_id)

    async def open_backend(self, url: str) -> None:
        """Open *url*, a database only ``INGEST_ROUTER`` names, once (see Databases.open)."""
        assert self.databases is not None, "open_backend() before open()"
        await self.databases.open(url)

    # the surface of the parts

    def writer(self, kind: str, route: Route | None = None) -> BatchWriter:
        """The writer of *route* (by default, the route of the *kind*) for rows of *kind*."""
        assert self.databases is not None, "writer() before open()"
        return self.databases.writer(kind, route)

    def item_writer(self, item: Any) -> BatchWriter | Route:
        """The writer for *item*; or its route, when that database is not open yet."""
        assert self.databases is not None, "item_writer() before open()"
        return self.databases.item_writer(item)

    async def drain(self, kind: str) -> None:
        """Write every buffered row of *kind*, to whichever database it is routed."""
        if self.databases is not None:
            await self.databases.drain(kind)

    def oldest_pending_write(self) -> float | None:
        """When the oldest batch not yet answered by its database was handed over, if any."""
        return None if self.databases is None else self.databases.oldest_pending_write()

    def write_counts(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(database URL, redacted; table) -> (rows written, rows not written)."""
        return self.counters.write_counts()

    def on_outcome(self, callback: OutcomeObserver) -> None:
        """Call ``callback(url, table, outcome, seconds)`` for each batch answered."""
        self.counters.on_outcome(callback)

    def on_tick(self, callback: Callable[[], None]) -> None:
        """Call *callback* a few times per ``INGEST_FLUSH_INTERVAL`` and before the job closes."""
        self._tickers.append(callback)

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call *callback* when the spider closes, before the writers drain."""
        self._closers.append(callback)

    def record_kinds(self) -> tuple[str, ...]:
        """The kinds of records this crawl stores (items, and requests and logs if enabled)."""
        config = self.config
        enabled = {"items": True, "requests": config.requests_enabled, "logs": config.logs_enabled}
        return tuple(kind for kind, on in enabled.items() if on)

    def sink(self, kind: str) -> RecordSink:
        """The job, the id factory and the writer of the *kind* table, once open."""
        assert self.databases is not None, "sink() before open()"
        return self.databases.sink(kind)

    def dead_letter(
        self,
        kind: str,
        reason: str,
        payload: str | None,
        url: str | None = None,
        *,
        warn: bool = True,
    ) -> None:
        """Store a record in the dead-letter table of *url* (see Databases.dead_letter)."""
        assert self.databases is not None, "dead_letter() before open()"
        self.databases.dead_letter(kind, reason, payload, url, warn=warn)

    # the job row

    async def update_job(self, *, reason: str | None = None) -> None:
        """Refresh the job row in every database; with *reason*, close it (``finished``)."""
        assert self.job_row is not None and self.databases is not None
        self._tick()
        checks = self.item_checks
        values = self.job_row.values(
            self.process_stats.get_stats(),
            items=self.counters.items_stored,
            requests=self.requests_count,
            log_counts=self.log_counts,
            quality=None if checks is None else checks.as_dict(),
            redact=self.redact,
            reason=reason,
        )
        await self.job_row.update(self.databases.hosts_with_job(), values)

    async def mark_crashed_jobs(self) -> None:
        """Mark crashed the stale jobs of this crawl (see JobRow.mark_crawl_crashed)."""
        if self.closing:  # the databases are closing: the next crawl looks again
            return
        assert self.job_row is not None and self.databases is not None
        await self.job_row.mark_crawl_crashed(self.databases.hosts_with_job())

    # ticks and closing

    def _tick(self) -> None:
        for callback in self._tickers:
            callback()

    def _flush_old(self) -> None:
        self._tick()
        if self.databases is not None:
            self.databases.flush_older_than(self.config.flush_interval)

    def _forget_item(self, item: Any) -> None:
        self.item_sources.pop(id(item), None)

    def _describe(self, url: str) -> str:
        return url if self.router is None else self.router.describe(url)

    async def _spider_closed(self, reason: str) -> None:
        self.closing = True
        self.hold.release(None)
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
        databases = self.databases
        assert databases is not None
        await databases.recover()  # a database down during the crawl gets one more try
        await databases.drain_all()
        try:
            await self.update_job(reason=reason)
        except Exception:
            logger.exception("Could not close the job row of %s", self.job)
        else:  # written, or kept in the spill journal while the database is down
            self.stats.set_value(stat_key("jobs", "closed"), 1)
        # the job row's write may be what found a database up again, and replayed its journal:
        # that replay is counted now (no batch is left to report it with)
        await databases.recover()
        try:
            await databases.close()
        finally:
            self._all_closed()
            self.counters.report_losses()
            if self.counters.failed:
                fail_crawl(self.crawler)

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
