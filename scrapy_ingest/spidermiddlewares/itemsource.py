"""Remember which response each item came from, for the ``url`` column of items.

Item pipelines are not given the response, so this middleware notes the
response URL of each item the spider yields, and :class:`IngestPipeline`
takes it when the item arrives. Enabled by the add-on; alone::

    SPIDER_MIDDLEWARES = {"scrapy_ingest.ItemSourceMiddleware": 10}

A low number puts it next to the engine, so it sees the items that the
other spider middlewares let through. An item that a pipeline before
IngestPipeline replaces by a new object is stored with a null ``url``.

Each entry holds the item itself, so that no other object can take its
``id()`` while it waits. Entries are removed when the pipeline takes them or
the item is dropped; the oldest go once there are ``MAX_PENDING``, so that
items which never reach the pipeline (replaced by another pipeline, or a
crawl without IngestPipeline) cannot grow memory without bound.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

from scrapy import Request

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


class ItemSourceMiddleware:
    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        self._sources = IngestRuntime.of(crawler).item_sources

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    # one loop per kind of iterable, kept tight: it runs once per item and request
    def process_spider_output(
        self, response: Response, result: Iterator[Any], spider: Spider | None = None
    ) -> Iterator[Any]:
        url, sources = response.url, self._sources
        for output in result:
            if not isinstance(output, Request):
                sources[id(output)] = (output, url)
                if len(sources) > MAX_PENDING:
                    _forget_oldest(sources)
            yield output

    async def process_spider_output_async(
        self, response: Response, result: AsyncIterator[Any], spider: Spider | None = None
    ) -> AsyncIterator[Any]:
        url, sources = response.url, self._sources
        async for output in result:
            if not isinstance(output, Request):
                sources[id(output)] = (output, url)
                if len(sources) > MAX_PENDING:
                    _forget_oldest(sources)
            yield output


def _forget_oldest(sources: dict[int, tuple[Any, str]]) -> None:
    # dicts keep insertion order: drop the oldest tenth at once
    for key in list(itertools.islice(sources, MAX_PENDING // 10)):
        del sources[key]
