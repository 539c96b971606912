"""Differences between the Scrapy versions we support (2.13 and later)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, ParamSpec

import scrapy
from scrapy.utils.defer import deferred_from_coro, maybe_deferred_to_future

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from scrapy.crawler import Crawler

_P = ParamSpec("_P")


async def close_spider(crawler: Crawler, reason: str) -> None:
    """Close the crawler's spider with *reason*."""
    engine = crawler.engine
    assert engine is not None
    if hasattr(engine, "close_spider_async"):  # Scrapy 2.14+
        await engine.close_spider_async(reason=reason)
    else:
        assert crawler.spider is not None
        await maybe_deferred_to_future(engine.close_spider(crawler.spider, reason))


def _scrapy_version() -> tuple[int, int]:
    major, minor = scrapy.__version__.split(".")[:2]
    return int(major), int(minor)


#: Scrapy 2.13 awaits a Deferred, but not a coroutine, returned by a pipeline's
#: open_spider() and close_spider(); 2.14 and later await coroutines and warn
#: about Deferreds.
PIPELINE_HOOKS_RETURN_DEFERREDS = _scrapy_version() < (2, 14)


def pipeline_hook(method: Callable[_P, Coroutine[Any, Any, None]]) -> Callable[_P, Any]:
    """Make an ``async def`` open_spider/close_spider of a pipeline work on every Scrapy."""
    if not PIPELINE_HOOKS_RETURN_DEFERREDS:
        return method

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> Any:
        return deferred_from_coro(method(*args, **kwargs))

    return wrapper
