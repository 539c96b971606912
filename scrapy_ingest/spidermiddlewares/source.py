"""Note where items and requests come from: the ``url`` of items, the ``parent_id`` of requests.

Item pipelines are not given the response, so this middleware notes the
response URL of each item the spider yields, and :class:`IngestPipeline`
takes it when the item arrives. For each request the spider yields, it sets
``request.meta["ingest_parent_id"]`` to the row id of the download attempt
whose response produced it (``response.meta["ingest_request_id"]``, set by
:class:`~scrapy_ingest.downloadermiddlewares.requestlog.RequestLogMiddleware`),
so that ``parent_id`` links the ``requests`` table into the crawl tree.
Enabled by the add-on; alone::

    SPIDER_MIDDLEWARES = {"scrapy_ingest.SourceMiddleware": 10}

A low number puts it next to the engine, so it sees the items and requests
that the other spider middlewares let through. An item that a pipeline
before IngestPipeline replaces by a new object is stored with a null ``url``.

Each entry holds the item itself, so that no other object can take its
``id()`` while it waits. Entries are removed when the pipeline takes them or
the item is dropped; the oldest go once there are ``MAX_PENDING``, so that
items which never reach the pipeline (replaced by another pipeline, or a
crawl without IngestPipeline) cannot grow memory without bound.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

from scrapy import Request, signals

from scrapy_ingest.runtime import IngestRuntime

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from scrapy import Spider
    from scrapy.crawler import Crawler
    from scrapy.http import Response
    from typing_extensions import Self


#: items noted and not yet taken; more than Scrapy processes at once with its defaults
#: (CONCURRENT_ITEMS 100 per response, CONCURRENT_REQUESTS 16)
MAX_PENDING = 5_000
_NO_LINK = object()


class SourceMiddleware:
    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        runtime = IngestRuntime.of(crawler)
        self._sources = runtime.item_sources
        self._redact = runtime.redact
        # without the request log there are no attempt ids to link
        self._link_requests = runtime.config.requests_enabled
        # an item that never reaches IngestPipeline is not taken: forget it
        crawler.signals.connect(self._forget, signal=signals.item_dropped)
        crawler.signals.connect(self._forget, signal=signals.item_error)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    def _forget(self, item: Any) -> None:
        self._sources.pop(id(item), None)

    # one loop per kind of iterable, kept tight: it runs once per item and request
    def process_spider_output(
        self, response: Response, result: Iterator[Any], spider: Spider | None = None
    ) -> Iterator[Any]:
        url, sources = self._redact(response.url), self._sources
        parent = response.meta.get("ingest_request_id") if self._link_requests else _NO_LINK
        for output in result:
            if isinstance(output, Request):
                if parent is not _NO_LINK:
                    output.meta["ingest_parent_id"] = parent
            else:
                sources[id(output)] = (output, url)
                if len(sources) > MAX_PENDING:
                    _forget_oldest(sources)
            yield output

    async def process_spider_output_async(
        self, response: Response, result: AsyncIterator[Any], spider: Spider | None = None
    ) -> AsyncIterator[Any]:
        url, sources = self._redact(response.url), self._sources
        parent = response.meta.get("ingest_request_id") if self._link_requests else _NO_LINK
        async for output in result:
            if isinstance(output, Request):
                if parent is not _NO_LINK:
                    output.meta["ingest_parent_id"] = parent
            else:
                sources[id(output)] = (output, url)
                if len(sources) > MAX_PENDING:
                    _forget_oldest(sources)
            yield output


def _forget_oldest(sources: dict[int, tuple[Any, str]]) -> None:
    # dicts keep insertion order: drop the oldest tenth at once
    for key in list(itertools.islice(sources, MAX_PENDING // 10)):
        del sources[key]
