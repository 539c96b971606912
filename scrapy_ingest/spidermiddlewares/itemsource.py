"""Remember which response each item came from, for the ``url`` column of items.

Item pipelines are not given the response, so this middleware notes the
response URL of each item the spider yields, and :class:`IngestPipeline`
takes it when the item arrives. Enabled by the add-on; alone::

    SPIDER_MIDDLEWARES = {"scrapy_ingest.ItemSourceMiddleware": 10}

A low number puts it next to the engine, so it sees the items that the
other spider middlewares let through. An item that a pipeline before
IngestPipeline replaces by a new object is stored with a null ``url``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scrapy import Request

from scrapy_ingest.runtime import IngestRuntime

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from scrapy import Spider
    from scrapy.crawler import Crawler
    from scrapy.http import Response
    from typing_extensions import Self


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
                sources[id(output)] = url
            yield output

    async def process_spider_output_async(
        self, response: Response, result: AsyncIterator[Any], spider: Spider | None = None
    ) -> AsyncIterator[Any]:
        url, sources = response.url, self._sources
        async for output in result:
            if not isinstance(output, Request):
                sources[id(output)] = url
            yield output
