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

The ``request_scheduled`` handler is connected on the first :meth:`defer`
only: a crawl in which nothing waits does not pay a signal receiver per
request.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from scrapy import signals
from scrapy.exceptions import DontCloseSpider, IgnoreRequest

from scrapy_ingest._stats import stat_key

if TYPE_CHECKING:
    from scrapy import Request
    from scrapy.crawler import Crawler
    from twisted.internet.base import DelayedCall


class DelayedRequests:
    """The requests one middleware set aside; *name* keeps each middleware's apart."""

    def __init__(self, crawler: Crawler, name: str) -> None:
        self.crawler = crawler
        self._key = f"_ingest_{name}_not_before"
        self._dropped_stat = stat_key(name, "waiting_dropped")
        self._waiting: dict[Request, DelayedCall] = {}
        self._connected = False
        crawler.signals.connect(self._idle, signal=signals.spider_idle)
        crawler.signals.connect(self._closed, signal=signals.spider_closed)

    def __len__(self) -> int:
        return len(self._waiting)

    def defer(self, request: Request, until: float) -> Request:
        """The request to return from a middleware so that *request* waits until *until*
        (a ``time.monotonic()`` value). It keeps its place in no queue meanwhile."""
        if not self._connected:
            self.crawler.signals.connect(self._scheduled, signal=signals.request_scheduled)
            self._connected = True
        # dont_filter: the dupefilter has seen this request already
        return request.replace(dont_filter=True, meta={**request.meta, self._key: until})

    def _scheduled(self, request: Request) -> None:
        until = request.meta.get(self._key)
        if until is None:
            return
        delay = until - time.monotonic()
        if delay <= 0:
            del request.meta[self._key]
            return
        from twisted.internet import reactor

        self._waiting[request] = reactor.callLater(delay, self._release, request)
        raise IgnoreRequest

    def _release(self, request: Request) -> None:
        del self._waiting[request]
        request.meta.pop(self._key, None)
        engine = self.crawler.engine
        if engine is not None and engine.running:
            engine.crawl(request)
        elif self.crawler.stats is not None:
            self.crawler.stats.inc_value(self._dropped_stat)

    def _idle(self) -> None:
        if self._waiting:
            raise DontCloseSpider

    def _closed(self) -> None:
        if self._waiting and self.crawler.stats is not None:
            self.crawler.stats.inc_value(self._dropped_stat, len(self._waiting))
        for call in self._waiting.values():
            call.cancel()
        self._waiting.clear()
