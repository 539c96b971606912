"""The item pipeline: every item, as JSON, in the ``items`` table.

Settings: all ``INGEST_*`` settings of :mod:`scrapy_ingest.settings` (database,
batching, buffer). Enable it with the add-on, or alone::

    ITEM_PIPELINES = {"scrapy_ingest.IngestPipeline": 900}

A late position (900) stores items as the project's own pipelines left them.

Stats:

* ``ingest/items/queued``: items captured for storage
* ``ingest/items/stored``: items the database holds
* ``ingest/items/dead_letter``: items stored in the dead-letter table instead
* ``ingest/items/lost``: items given up on after ``INGEST_RETRY_TIMEOUT``
* ``ingest/buffer/waits``: times an item waited for buffer room (backpressure)
* ``ingest/items/rejected``: items dropped by ``INGEST_VALIDATION = "strict"``
* ``ingest/values/<kind>``: values converted to a stored form (``decimal``...)
* ``ingest/quality/<item type>/...``: the job's quality figures (``docs/validation.md``)
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from scrapy.exceptions import DropItem
from scrapy.utils.defer import maybe_deferred_to_future

from scrapy_ingest._compat import pipeline_hook
from scrapy_ingest._redact import redact_url
from scrapy_ingest._stats import stat_key
from scrapy_ingest.exceptions import IngestError
from scrapy_ingest.quality import Checked, ItemRejected
from scrapy_ingest.records import EncodeError
from scrapy_ingest.router import Route
from scrapy_ingest.runtime import ROW_OVERHEAD, IngestRuntime

if TYPE_CHECKING:
    from scrapy import Spider
    from scrapy.crawler import Crawler
    from typing_extensions import Self

    from scrapy_ingest.batching import BatchWriter

logger = logging.getLogger(__name__)

_QUEUED = stat_key("items", "queued")
_WAITS = stat_key("buffer", "waits")
_REJECTED = stat_key("items", "rejected")


class IngestPipeline:
    """Store each item in the ``items`` table, batched and off the reactor thread."""

    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        self._runtime = IngestRuntime.of(crawler)
        # counted here and published to the stats on each runtime tick: the
        # stats collector's attribute lookup is too slow for once per item
        self._queued = 0
        self._published = 0
        self._writer: BatchWriter | None = None
        self._open = False

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    # "spider" stays optional: Scrapy 2.13 passes it, later versions do not
    @pipeline_hook
    async def open_spider(self, spider: Spider | None = None) -> None:
        runtime = self._runtime
        try:
            await runtime.open()
        except IngestError as exc:
            # said here too: some Scrapy versions stop the crawl without logging why
            logger.error("Cannot store this crawl: %s", exc)
            raise
        assert runtime.router is not None and runtime.job is not None
        # with item_type rules or INGEST_ROUTER, each item is routed; else all go to one writer
        self._per_item = runtime.router.per_item
        if not self._per_item:
            self._writer = runtime.writer("items")
            self._append_json = self._writer.append_json
            self._add = self._writer.add
        self._open = True
        # bound once: process_item runs for every item, on the reactor thread
        self._job_id, self._spider_name = runtime.job.job_id, runtime.job.spider
        self._new_id = runtime.new_id
        self._take_source = runtime.item_sources.pop
        self._encode = runtime.encoder.encode_item
        self._budget = runtime.budget
        self._durable = runtime.config.durable
        #: INGEST_ITEM_SCHEMAS / INGEST_ITEM_KEYS, or None (no item is checked)
        self._checks = runtime.item_checks
        runtime.on_tick(self._publish_stats)

    @pipeline_hook
    async def close_spider(self, spider: Spider | None = None) -> None:
        self._runtime.closing = True
        if not self._open:  # the runtime failed to open; nothing was queued
            return
        self._publish_stats()
        # every item is written before the spider closes
        await self._runtime.drain("items")

    def _publish_stats(self) -> None:
        if self._queued != self._published:
            self._runtime.stats.inc_value(_QUEUED, self._queued - self._published)
            self._published = self._queued

    # async: Scrapy awaits the coroutine as it is, which costs less per item
    # than the wrapper it puts around a plain return value
    async def process_item(self, item: Any, spider: Spider | None = None) -> Any:
        source = self._take_source(id(item), None)
        url = source[1] if source is not None and source[0] is item else None
        checked: Checked | None = None
        try:
            if self._checks is None:
                data = self._encode(item)
            else:
                checked = self._checks.check(item)
                data = checked.data
        except (EncodeError, ItemRejected) as exc:
            self._reject(item, exc)
            return item
        if self._per_item:
            writer = await self._routed_writer(item)
            if writer is None:  # its database cannot be used: dead-lettered
                return item
            append_json, add = writer.append_json, writer.add
        else:
            writer = self._writer
            append_json, add = self._append_json, self._add
        now = time.time()
        end = append_json(data)
        if checked is None:
            key = digest = version = seen = errors = None
        else:
            key, digest, errors = checked.key, checked.content_hash, checked.errors
            if key is not None:  # keyed: version 1, seen now, until the database says more
                version, seen = 1, now
            else:
                version = seen = None
        row = (
            self._new_id(now),
            self._job_id,
            self._spider_name,
            type(item).__name__,
            url,
            now,
            key,
            digest,
            version,
            seen,
            seen,
            errors,
            end,
        )
        add(row, len(data) + ROW_OVERHEAD)
        self._queued += 1
        if self._durable and writer is not None:
            # INGEST_DURABLE: the item is in the journal before process_item returns
            await maybe_deferred_to_future(writer.acknowledged())
        budget = self._budget
        if budget.used >= budget.limit:
            # backpressure: the crawl waits here until the writers catch up
            self._runtime.stats.inc_value(_WAITS)
            await maybe_deferred_to_future(budget.wait())
        return item

    def _reject(self, item: Any, exc: EncodeError | ItemRejected) -> None:
        """Dead-letter *item* with the reason; drop it when it is invalid in strict mode."""
        runtime = self._runtime
        assert runtime.router is not None
        if isinstance(exc, EncodeError):
            reason = f"the item cannot be encoded: {exc}"
        else:
            reason = f"{type(item).__name__}: {exc}"
        url = runtime.router.item_route(item).url
        runtime.dead_letter("items", reason, _safe_repr(item), url)
        if isinstance(exc, ItemRejected) and exc.invalid:
            runtime.stats.inc_value(_REJECTED)
            raise DropItem(f"INGEST_VALIDATION = 'strict': {reason}")

    async def _routed_writer(self, item: Any) -> BatchWriter | None:
        runtime = self._runtime
        found = runtime.item_writer(item)
        if not isinstance(found, Route):
            return found
        # a database INGEST_ROUTER names for the first time
        try:
            await runtime.open_backend(found.url)
        except IngestError as exc:
            reason = f"its route ({redact_url(found.url)}) cannot be used: {exc}"
            runtime.dead_letter("items", reason, _safe_repr(item))
            return None
        return runtime.writer("items", found)


def _safe_repr(item: Any) -> str:
    try:
        return repr(item)
    except Exception as exc:  # a broken __repr__ must not lose the dead letter
        return f"<{type(item).__qualname__}: repr() failed: {exc!r}>"
