"""Closing the spider from scrapy_ingest: when its rows cannot be kept, and before the first
request when the crawl cannot be stored at all."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from scrapy import signals

from scrapy_ingest._aio import Future, spawn
from scrapy_ingest._compat import close_spider, close_spider_before_start

if TYPE_CHECKING:
    from scrapy.crawler import Crawler

logger = logging.getLogger(__name__)


def close_soon(crawler: Crawler, reason: str) -> None:
    """Close the spider of *crawler* with *reason*, without waiting for that."""
    spawn(close_spider(crawler, reason)).add_done_callback(_log_not_closed)


def _log_not_closed(closed: Future[None]) -> None:
    if closed.exception() is not None:
        logger.error("Could not close the spider: %s", closed.exception())


def close_at_start(crawler: Crawler, reason: str) -> None:
    """Close the spider before its first request; the process then exits non-zero.

    Closed when the engine starts, not from the component that found the crawl cannot be
    stored: an error raised from a pipeline's open_spider, or a spider closed from a
    spider_opened handler, leaves tracebacks of Scrapy's own (2.13 to 2.19); once
    ``engine_started`` has been handled, the engine sends no request for a closed spider.
    """

    async def close(*_: Any) -> None:
        crawler.signals.disconnect(close, signal=signals.engine_started)
        await close_spider_before_start(crawler, reason)

    engine = crawler.engine
    if engine is not None and engine.running:  # found late, by a component that waited
        close_soon(crawler, reason)
    else:
        crawler.signals.connect(close, signal=signals.engine_started, weak=False)
