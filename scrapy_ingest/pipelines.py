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
* ``ingest/buffer/pauses``, ``ingest/buffer/paused_seconds``: the engine paused meanwhile
* ``ingest/items/rejected``: items dropped by ``INGEST_VALIDATION = "strict"``
* ``ingest/items/not_an_item``: values that are not items (None, a str...), passed on
  unchanged and dead-lettered; the first one of the crawl is logged as a WARNING
* ``ingest/values/<kind>``: values converted to a stored form (``decimal``...)
* ``ingest/quality/<item type>/...``: the job's quality figures (``docs/validation.md``)
"""

from __future__ import annotations

import logging
from time import time as _time
from typing import TYPE_CHECKING, Any

from itemadapter import ItemAdapter
from scrapy.exceptions import DropItem
from scrapy.pipelines import ItemPipelineManager
from scrapy.utils.defer import deferred_from_coro

from scrapy_ingest._compat import ITEM_PROCESSOR_IS_ASYNC, drop_last_process_item, pipeline_hook
from scrapy_ingest._redact import redact_url
from scrapy_ingest._stats import stat_key
from scrapy_ingest.exceptions import IngestError, NotKept
from scrapy_ingest.quality import Checked, ItemRejected
from scrapy_ingest.records import EncodeError
from scrapy_ingest.router import Route
from scrapy_ingest.runtime import ROW_OVERHEAD, IngestRuntime

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from scrapy import Spider
    from scrapy.crawler import Crawler
    from twisted.internet.defer import Deferred
    from typing_extensions import Self

    from scrapy_ingest._databases import Databases
    from scrapy_ingest.batching import BatchWriter

logger = logging.getLogger(__name__)

_QUEUED = stat_key("items", "queued")
_WAITS = stat_key("buffer", "waits")
_REJECTED = stat_key("items", "rejected")
_NOT_AN_ITEM = stat_key("items", "not_an_item")


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
        self._databases: Databases | None = None
        self._warned_not_an_item = False

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    # "spider" stays optional: Scrapy 2.13 passes it, later versions do not
    @pipeline_hook
    async def open_spider(self, spider: Spider | None = None) -> None:
        runtime = self._runtime
        self._databases = databases = await runtime.opened()
        if databases is None:
            return  # the runtime has said why, and closes the spider before its first request
        assert runtime.router is not None and runtime.job is not None
        # with item_type rules or INGEST_ROUTER, each item is routed (no one writer); else all
        # go to one writer
        if not runtime.router.per_item:
            self._writer = databases.writer("items")
        # bound once: process_item runs for every item, on the reactor thread
        self._job_id, self._spider_name = runtime.job.job_id, runtime.job.spider
        self._new_id = runtime.new_id
        self._take_source = runtime.item_sources.pop
        self._encode = runtime.encoder.encode_item
        self._budget = runtime.budget
        self._durable = runtime.config.durable
        #: INGEST_ITEM_SCHEMAS / INGEST_ITEM_KEYS, or None (no item is checked, only encoded)
        self._checks = runtime.item_checks
        runtime.on_tick(self._publish_stats)

    @pipeline_hook
    async def close_spider(self, spider: Spider | None = None) -> None:
        self._runtime.closing = True
        if self._databases is None:  # the runtime failed to open; nothing was queued
            return
        self._publish_stats()
        # every item is written before the spider closes
        await self._databases.drain("items")

    def _publish_stats(self) -> None:
        if self._queued != self._published:
            self._runtime.stats.inc_value(_QUEUED, self._queued - self._published)
            self._published = self._queued

    async def process_item(self, item: Any, spider: Spider | None = None) -> Any:
        pending = self.capture(item)
        if pending is not None:
            await pending
        return item

    def capture(self, item: Any) -> Awaitable[None] | None:
        """Queue *item* for storage; return what the crawl must await first, if anything.

        The synchronous core of :meth:`process_item`, which
        :class:`IngestItemProcessor` calls directly, and the one path of every item:
        checked (schemas and keys, or only encoded), given its writer, queued. The
        awaitable, when there is one, is what must happen before the item is done:
        its database opened (a route that only ``INGEST_ROUTER`` names, the first
        time), its batch journaled (``INGEST_DURABLE``), or room in the buffer
        (backpressure). An item that ``INGEST_VALIDATION = "strict"`` rejects raises
        DropItem, here or from the awaitable.
        """
        source = self._take_source(id(item), None)
        try:
            if self._checks is None:
                data, key, leave_out, errors = self._encode(item), None, None, None
            else:
                data, key, leave_out, errors = self._checks.check(item)
        except (EncodeError, ItemRejected) as exc:
            self._reject(item, exc)
            return None
        except TypeError:
            # ItemAdapter refuses a value that is not an item: asked only here, the check
            # costs the items nothing
            if ItemAdapter.is_item(item):
                raise
            self._not_an_item(item)
            return None
        url = source[1] if source is not None and source[0] is item else None
        writer = self._writer
        if writer is None:  # routed per item (item_type rules, INGEST_ROUTER)
            assert self._databases is not None
            found = self._databases.item_writer(item)
            if isinstance(found, Route):  # its database is not open yet
                checked = Checked(data, key, leave_out, errors)
                return self._queue_once_open(found, item, url, checked)
            writer = found
        self._queue(writer, item, url, data, key=key, leave_out=leave_out, errors=errors)
        if self._durable:
            return self._acknowledged(writer)
        budget = self._budget
        if budget.used >= budget.limit:
            return self._wait_for_room()
        return None

    def _queue(
        self,
        writer: BatchWriter,
        item: Any,
        url: str | None,
        data: bytes,
        *,
        key: str | None,
        leave_out: tuple[str, ...] | None,
        errors: bytes | None,
    ) -> None:
        """Add the row of a checked item to *writer*'s batch: the one place an item's row is
        made (the columns of ``items``, in order: :class:`~scrapy_ingest.schema.ItemRow`)."""
        now = _time()
        # keyed: version 1, seen now, until the database says more; the content hash is
        # computed by the writer (backends._upsert.split_keyed), leaving out the fields named
        version, seen = (None, None) if key is None else (1, now)
        writer.add(
            (
                self._new_id(now),
                self._job_id,
                self._spider_name,
                type(item).__name__,
                url,
                now,
                key,
                leave_out,
                version,
                seen,
                seen,
                errors,
                writer.append_json(data),
            ),
            len(data) + ROW_OVERHEAD,
        )
        self._queued += 1

    async def _wait_for_room(self) -> None:
        # backpressure: the crawl waits here until the writers catch up
        self._runtime.stats.inc_value(_WAITS)
        await self._budget.wait()

    async def _acknowledged(self, writer: BatchWriter) -> None:
        # INGEST_DURABLE: the item is in the journal (or the database) before process_item
        # returns; one that neither could keep is dropped, never acknowledged
        try:
            await writer.acknowledged()
        except NotKept as exc:
            raise DropItem(f"INGEST_DURABLE: the item could not be kept: {exc}") from None
        budget = self._budget
        if budget.used >= budget.limit:
            await self._wait_for_room()

    async def _queue_once_open(
        self, route: Route, item: Any, url: str | None, checked: Checked
    ) -> None:
        """Open the database that ``INGEST_ROUTER`` names for the first time, then queue
        *item* into it; dead-letter the item when that database cannot be used."""
        databases = self._databases
        assert databases is not None
        try:
            await databases.open(route.url)
        except IngestError as exc:
            reason = f"its route ({redact_url(route.url)}) cannot be used: {exc}"
            databases.dead_letter("items", reason, _safe_repr(item))
            return
        writer = databases.writer("items", route)
        data, key, leave_out, errors = checked
        self._queue(writer, item, url, data, key=key, leave_out=leave_out, errors=errors)
        if self._durable:
            await self._acknowledged(writer)
            return
        budget = self._budget
        if budget.used >= budget.limit:
            await self._wait_for_room()

    def _reject(self, item: Any, exc: EncodeError | ItemRejected) -> None:
        """Dead-letter *item* with the reason; drop it when it is invalid in strict mode."""
        runtime, databases = self._runtime, self._databases
        assert runtime.router is not None and databases is not None
        if isinstance(exc, EncodeError):
            reason = f"the item cannot be encoded: {exc}"
        else:
            reason = f"{type(item).__name__}: {exc}"
        url = runtime.router.item_route(item).url
        databases.dead_letter("items", reason, _safe_repr(item), url)
        if isinstance(exc, ItemRejected) and exc.invalid:
            runtime.stats.inc_value(_REJECTED)
            raise DropItem(f"INGEST_VALIDATION = 'strict': {reason}")

    def _not_an_item(self, value: Any) -> None:
        """Dead-letter *value*, which is not an item; warn about the first one of the crawl.

        Plain Scrapy hands any value a spider yields, and any value an item pipeline returns
        (None included), to the next pipeline and then to ``item_scraped``; so does this
        pipeline, having no row to make of it.
        """
        runtime, databases = self._runtime, self._databases
        assert databases is not None
        type_name = _type_name(value)
        cause = _LIKELY_CAUSE_NONE if value is None else _LIKELY_CAUSE_OTHER
        # each one is counted (the stat) and kept (the dead letter); the WARNING is once
        databases.dead_letter(
            "items",
            f"not an item but a {type_name}; likely cause: {cause}",
            _safe_repr(value),
            warn=False,
        )
        runtime.stats.inc_value(_NOT_AN_ITEM)
        if self._warned_not_an_item:
            return
        self._warned_not_an_item = True
        logger.warning(
            "IngestPipeline received a value that is not an item but a %s; likely cause: %s. "
            "It is passed on unchanged and stored in the dead-letter table "
            "(ingest_dead_letters), not in ingest_items; the stat %s counts such values. "
            "This warning is not repeated in this crawl.",
            type_name,
            cause,
            _NOT_AN_ITEM,
        )


class IngestItemProcessor(ItemPipelineManager):
    """Scrapy's item pipeline manager, which calls :class:`IngestPipeline` directly.

    The add-on makes it the ``ITEM_PROCESSOR``, unless the project set one.
    It runs the item pipelines as Scrapy's does; when the last one with a
    ``process_item`` is IngestPipeline (the add-on places it at 900), and
    that ``process_item`` is IngestPipeline's own, it calls the pipeline's
    :meth:`IngestPipeline.capture` itself rather than through Scrapy's
    generic chain, which for every item formats the
    method's name, wraps its result and awaits one more coroutine: in a
    crawl that does nothing but yield items, that chain cost about 7% of
    the items per second (docs/performance.md). An IngestPipeline followed
    by other pipelines, or a subclass that overrides ``process_item``, is
    called through the chain, like any other pipeline: the override runs
    for every item.
    """

    def __init__(self, *middlewares: Any, **kwargs: Any) -> None:
        super().__init__(*middlewares, **kwargs)
        self._capture: Callable[[Any], Awaitable[None] | None] | None = None
        #: whether Scrapy's chain of process_item methods has any left to run
        self._chain = True
        last = next((mw for mw in reversed(middlewares) if hasattr(mw, "process_item")), None)
        # not isinstance() alone: a subclass's own process_item must be called
        if (
            isinstance(last, IngestPipeline)
            and getattr(last.process_item, "__func__", None) is IngestPipeline.process_item
        ):
            self._chain = drop_last_process_item(self)
            self._capture = last.capture

    async def process_item_async(self, item: Any) -> Any:
        if self._chain:
            item = await super().process_item_async(item)
        capture = self._capture
        if capture is not None:
            pending = capture(item)
            if pending is not None:
                await pending
        return item

    if not ITEM_PROCESSOR_IS_ASYNC:  # Scrapy 2.13 calls this instead of process_item_async

        def process_item(self, item: Any, spider: Spider) -> Deferred[Any]:
            d: Deferred[Any] = super().process_item(item, spider)
            if self._capture is not None:
                d.addCallback(self._captured)
            return d

        def _captured(self, item: Any) -> Any:
            assert self._capture is not None
            pending = self._capture(item)
            if pending is None:
                return item
            return deferred_from_coro(_then(pending, item))


async def _then(pending: Awaitable[None], item: Any) -> Any:
    await pending
    return item


_LIKELY_CAUSE_NONE = "an item pipeline before IngestPipeline returned nothing (no `return item`)"
_LIKELY_CAUSE_OTHER = "the spider yielded a value that is not an item"


def _type_name(value: Any) -> str:
    cls = type(value)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _safe_repr(item: Any) -> str:
    try:
        return repr(item)
    except Exception as exc:  # a broken __repr__ must not lose the dead letter
        return f"<{type(item).__qualname__}: repr() failed: {exc!r}>"
