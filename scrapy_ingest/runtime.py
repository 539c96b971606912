"""What scrapy_ingest holds for one crawler: its parts (the job row, :mod:`._job`; the databases
with their hosts and writers, :mod:`._databases`; the counters, :mod:`._counters`), wired.

Components share it through :meth:`IngestRuntime.of`, which keeps it on the crawler. Made as the
crawl starts, it starts the writer processes; it opens on the first component's request (every
database the settings name, at once) and closes on ``spider_closed``, after the pipeline has
drained its items: every writer drains, the job row closes with the reason, connections go."""

from __future__ import annotations

import contextlib
import logging
from functools import partial
from typing import TYPE_CHECKING, Any

from scrapy import signals
from scrapy.exceptions import NotConfigured

from scrapy_ingest._aio import Event
from scrapy_ingest._closing import close_at_start, close_soon
from scrapy_ingest._compat import fail_crawl, looping_call
from scrapy_ingest._counters import BACKEND_REFUSED, Counters
from scrapy_ingest._databases import ROW_OVERHEAD, Databases, EngineHold, RecordSink
from scrapy_ingest._ids import IdFactory
from scrapy_ingest._job import JobInfo, JobRow, make_job
from scrapy_ingest._redact import Redactor
from scrapy_ingest._stats import ProcessStats, stat_key
from scrapy_ingest.batching import BufferBudget
from scrapy_ingest.config import IngestConfig, skipped_command
from scrapy_ingest.exceptions import BackendRefused, IngestError
from scrapy_ingest.quality import ItemChecks
from scrapy_ingest.records import RecordEncoder
from scrapy_ingest.router import Router, custom_router
from scrapy_ingest.schema import all_tables

if TYPE_CHECKING:
    from collections.abc import Callable

    from scrapy.crawler import Crawler

    from scrapy_ingest._compat import Looping

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
            dead_letter=self._dead_letter,
            describe=lambda url: url if self.router is None else self.router.describe(url),
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
        #: happens once open (see open), None until then
        self._opened: Event | None = None
        #: happens once the spider has closed and the writers are drained (see wait_closed)
        self._closed = Event()
        self._flush_loop: Looping | None = None
        self._tickers: list[Callable[[], None]] = []
        self._closers: list[Callable[[], None]] = []
        crawler.signals.connect(self._spider_closed, signal=signals.spider_closed)
        if crawler.crawling and crawler.spider and config.router is None:  # as the crawl starts
            with contextlib.suppress(Exception):  # fails again at open, which says why
                self._prepare().start()

    async def open(self) -> None:
        """Open every database the settings name and insert the job row; once, however
        often called (later callers wait for the first, and raise its error)."""
        if self._opened is None:
            self._opened = Event()
            try:
                await self._open()
            except BaseException as exc:
                if isinstance(exc, IngestError):  # said once; the crawl stops, exits non-zero
                    logger.error("Cannot store this crawl: %s", exc)
                    refused = isinstance(exc, BackendRefused)
                    close_at_start(self.crawler, BACKEND_REFUSED if refused else "ingest_error")
                self._opened.fire(exc)
            self._opened.fire()  # the first call counts: no error, unless one was raised
        await self._opened.wait()

    async def opened(self) -> Databases | None:
        """Open; return the open databases, or None instead of raising an IngestError (which
        open() reports)."""
        try:
            await self.open()
        except IngestError:
            return None
        return self.databases

    def _prepare(self) -> Databases:
        config, crawler = self.config, self.crawler
        self.job = job = make_job(crawler, config, self.new_id)
        custom = custom_router(config.router, crawler)
        self.router = router = Router(config.rules(), config.database_url, job.spider, custom)
        self.job_row = JobRow(job, self.tables["jobs"], config.job_heartbeat, crawler.settings)
        self.databases = Databases(
            config,
            router,
            self.tables,
            self.job_row,
            counters=self.counters,
            hold=self.hold,
            budget=self.budget,
            new_id=self.new_id,
        )
        return self.databases

    async def _open(self) -> None:
        config, databases = self.config, self.databases or self._prepare()
        await databases.open_all(config.record_kinds())
        if self.item_checks is not None:
            self.on_tick(partial(self.item_checks.publish, self.stats))
        self._flush_loop = looping_call(self._flush_old)
        self._flush_loop.start(config.flush_interval / 4, now=False)

    def on_tick(self, callback: Callable[[], None]) -> None:
        """Call *callback* a few times per ``INGEST_FLUSH_INTERVAL`` and before the job closes."""
        self._tickers.append(callback)

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call *callback* when the spider closes, before the writers drain."""
        self._closers.append(callback)

    def _dead_letter(self, kind: str, reason: str, payload: str | None, url: str) -> None:
        assert self.databases is not None
        self.databases.dead_letter(kind, reason, payload, url)

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

    def _tick(self) -> None:
        for callback in self._tickers:
            callback()

    def _flush_old(self) -> None:
        self._tick()
        if self.databases is not None:
            self.databases.flush_older_than(self.config.flush_interval)

    async def _spider_closed(self, reason: str) -> None:
        self.closing = True
        self.hold.release(None)
        opened = self._opened
        if opened is not None and not opened.happened:
            # the spider closes while the databases open (Scrapy opens the pipelines side by
            # side, and another one failed): once open, they are closed as after a crawl
            with contextlib.suppress(Exception):  # open() reports its own error
                await opened.wait()
        if opened is None or not opened.happened or opened.error is not None:
            if opened is None and self.databases is not None:
                self.databases.discard_started()  # started early, never opened
            self._closed.fire()
            if opened is not None and opened.error is not None:
                fail_crawl(self.crawler)  # the crawl did not start: not a success
            return
        assert self.databases is not None
        if self._flush_loop is not None and self._flush_loop.running:
            self._flush_loop.stop()
        # components hand over what they hold (log records) before the writers drain
        for callback in self._closers:
            callback()
        self._tick()
        try:
            job_closed = await self.databases.finish(partial(self.update_job, reason=reason))
            if job_closed:  # written, or kept in the spill journal while the database is down
                self.stats.set_value(stat_key("jobs", "closed"), 1)
        finally:
            self._closed.fire()
            self.counters.report_losses()
            if self.counters.failed:
                fail_crawl(self.crawler)

    async def wait_closed(self) -> None:
        """Return once the spider has closed and every batch is written, spilled or given up
        (at once if the runtime never opened)."""
        if self._opened is not None:
            await self._closed.wait()
