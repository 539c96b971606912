"""Requests set aside until a time, outside the scheduler and the downloader.

A request that waits inside a downloader middleware (an ``async``
``process_request`` that sleeps) counts in the downloader's active requests,
which ``CONCURRENT_REQUESTS`` caps for every domain at once: sixteen requests
waiting for one slow domain would stop the whole crawl. So a middleware that
wants a request to wait returns ``delayed.defer(request, until)`` from
``process_request``/``process_response`` instead. Scrapy hands a returned
request to the engine, whose ``request_scheduled`` signal this class answers
with ``IgnoreRequest`` (the engine's documented way to keep a request out of
the scheduler), keeping the request here until its time and then giving it back
to the engine. While requests wait, ``spider_idle`` is answered with
``DontCloseSpider``, so a crawl whose last requests wait does not end early.
At close, requests still waiting are dropped and counted in
``ingest/<name>/waiting_dropped``.

That holds for requests the scheduler feeds. A request downloaded with
``engine.download_async()`` (``engine.download()`` on Scrapy 2.13): robots.txt
under ``ROBOTSTXT_OBEY``, the downloads of FilesPipeline and ImagesPipeline, never
passes through the scheduler: the engine hands a request a middleware returns
straight back to the downloader, so a middleware that kept deferring it would
spin until its time came. Such a request is told apart by identity: a request
:meth:`defer` returned is remembered (weakly) until ``request_scheduled`` sees
it; one that reaches the downloader again while remembered did not go through
the scheduler (:meth:`came_back`). It then waits (:meth:`wait`) inside the
downloader, on a timer: no spinning, and no downloader slot of its domain is
held (``process_request`` runs before the request joins its slot), only one of
the ``CONCURRENT_REQUESTS``, as Scrapy's own requests waiting for a robots.txt
do.
By identity, not by the meta key: a request that carries the key from
elsewhere (a copy of a request's meta, a request another worker handed to a
shared queue with its not-before time) was never handed back by this process.

The ``request_scheduled`` handler is connected on the first :meth:`defer`
only: a crawl in which nothing waits does not pay a signal receiver per
request.

A request set aside here lives in this process's memory only. The signals
:data:`request_held` (it is set aside) and :data:`request_released` (it is in
the scheduler again) let a scheduler keep it safe meanwhile:
:class:`~scrapy_ingest.scheduler.RedisLeaseScheduler` leases it, so that a
worker killed during the wait loses nothing.
"""

from __future__ import annotations

import time
import weakref
from typing import TYPE_CHECKING

from scrapy import signals
from scrapy.exceptions import DontCloseSpider, IgnoreRequest

from scrapy_ingest._aio import Future
from scrapy_ingest._compat import Cancellable, call_later
from scrapy_ingest._stats import stat_key

if TYPE_CHECKING:
    from scrapy import Request
    from scrapy.crawler import Crawler

#: sent with ``request=`` when a request is set aside until its time, without its not-before
#: meta key (its timer keeps the time, which is this process's clock: meaningless elsewhere)
request_held = object()
#: sent with ``request=`` once a request set aside is back in the scheduler (its queue has it)
request_released = object()


class DelayedRequests:
    """The requests one middleware set aside; *name* keeps each middleware's apart."""

    def __init__(self, crawler: Crawler, name: str) -> None:
        self.crawler = crawler
        self._key = f"_ingest_{name}_not_before"
        self._dropped_stat = stat_key(name, "waiting_dropped")
        self._waiting: dict[Request, Cancellable] = {}
        #: requests defer() returned that request_scheduled has not seen (yet)
        self._handed_back: weakref.WeakSet[Request] = weakref.WeakSet()
        #: the timers of the requests that wait() inside the downloader
        self._sleeping: dict[Future[None], Cancellable] = {}
        self._connected = False
        crawler.signals.connect(self._idle, signal=signals.spider_idle)
        crawler.signals.connect(self._closed, signal=signals.spider_closed)

    def __len__(self) -> int:
        return len(self._waiting) + len(self._sleeping)

    def defer(self, request: Request, until: float) -> Request:
        """The request to return from a middleware so that *request* waits until *until*
        (a ``time.monotonic()`` value). It keeps its place in no queue meanwhile."""
        if not self._connected:
            self.crawler.signals.connect(self._scheduled, signal=signals.request_scheduled)
            self._connected = True
        # dont_filter: the dupefilter has seen this request already
        deferred = request.replace(dont_filter=True, meta={**request.meta, self._key: until})
        self._handed_back.add(deferred)
        return deferred

    def came_back(self, request: Request) -> bool:
        """Whether *request*, returned by :meth:`defer`, reached the downloader again without
        passing through the scheduler (``engine.download_async()``): it must :meth:`wait`."""
        return request in self._handed_back

    async def wait(self, request: Request, until: float) -> None:
        """Wait until *until* (a ``time.monotonic()`` value) on a timer, for a request that
        :meth:`came_back`; raise IgnoreRequest if the spider closes meanwhile."""
        delay = until - time.monotonic()
        if delay > 0:
            done: Future[None] = Future()
            self._sleeping[done] = call_later(delay, done.set_result, None)
            try:
                await done
            finally:
                self._sleeping.pop(done, None)
        self._handed_back.discard(request)
        request.meta.pop(self._key, None)

    def _scheduled(self, request: Request) -> None:
        self._handed_back.discard(request)
        # the key leaves the request here: the timer keeps its time from now on
        until = request.meta.pop(self._key, None)
        if until is None:
            return
        delay = until - time.monotonic()
        if delay <= 0:
            return
        self._waiting[request] = call_later(delay, self._release, request)
        self.crawler.signals.send_catch_log(request_held, request=request)
        raise IgnoreRequest

    def _release(self, request: Request) -> None:
        del self._waiting[request]
        engine = self.crawler.engine
        if engine is not None and engine.running:
            engine.crawl(request)
            self.crawler.signals.send_catch_log(request_released, request=request)
        elif self.crawler.stats is not None:
            self.crawler.stats.inc_value(self._dropped_stat)

    def _idle(self) -> None:
        if self._waiting:
            raise DontCloseSpider

    def _closed(self) -> None:
        if len(self) and self.crawler.stats is not None:
            self.crawler.stats.inc_value(self._dropped_stat, len(self))
        for call in self._waiting.values():
            call.cancel()
        self._waiting.clear()
        sleeping, self._sleeping = self._sleeping, {}
        for done, call in sleeping.items():
            call.cancel()
            # its timer may have fired in this loop iteration, before the request resumed
            if not done.done():
                done.set_exception(IgnoreRequest("the spider closed while the request waited"))
