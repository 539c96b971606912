"""Differences between the Scrapy versions we support (2.13 and later)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from scrapy.utils.defer import maybe_deferred_to_future

if TYPE_CHECKING:
    from scrapy.crawler import Crawler


async def close_spider(crawler: Crawler, reason: str) -> None:
    """Close the crawler's spider with *reason*."""
    engine = crawler.engine
    assert engine is not None
    if hasattr(engine, "close_spider_async"):  # Scrapy 2.14+
        await engine.close_spider_async(reason=reason)
    else:
        assert crawler.spider is not None
        await maybe_deferred_to_future(engine.close_spider(crawler.spider, reason))
