"""Remember which response each item came from, for the ``url`` column of items.

Item pipelines are not given the response, so this middleware notes the
response URL of each item the spider yields, and :class:`IngestPipeline`
takes it when the item arrives. Enabled by the add-on; alone::

    SPIDER_MIDDLEWARES = {"scrapy_ingest.ItemSourceMiddleware": 10}

A low number puts it next to the engine, so it sees the items that the
other spider middlewares let through.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scrapy.spidermiddlewares.base import BaseSpiderMiddleware

from scrapy_ingest.runtime import IngestRuntime

if TYPE_CHECKING:
    from scrapy.crawler import Crawler
    from scrapy.http import Response


class ItemSourceMiddleware(BaseSpiderMiddleware):
    def __init__(self, crawler: Crawler) -> None:
        super().__init__(crawler)
        self._sources = IngestRuntime.of(crawler).item_sources

    def get_processed_item(self, item: Any, response: Response | None) -> Any:
        if response is not None:
            self._sources[id(item)] = response.url
        return item
