"""Differences between the Scrapy versions we support (2.13 and later)."""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any, ParamSpec

import scrapy
from scrapy.downloadermiddlewares.retry import get_retry_request
from scrapy.utils.conf import build_component_list
from scrapy.utils.defer import deferred_from_coro, maybe_deferred_to_future
from scrapy.utils.misc import load_object

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from scrapy.crawler import Crawler
    from scrapy.settings import BaseSettings

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


#: Scrapy 2.14 added ItemPipelineManager.process_item_async(item), which its scraper calls
#: instead of process_item(item, spider), which returns a Deferred (2.13)
ITEM_PROCESSOR_IS_ASYNC = _scrapy_version() >= (2, 14)


#: Scrapy 2.17 added RETRY_GIVE_UP_LOG_LEVEL, and get_retry_request()'s give_up_log_level
#: argument; 2.13 to 2.16 log a give-up as an error
GIVE_UP_LOG_LEVEL = "give_up_log_level" in inspect.signature(get_retry_request).parameters


def _scrapy_exceptions(*names: str) -> tuple[type[Exception], ...]:
    import scrapy.exceptions

    return tuple(
        getattr(scrapy.exceptions, name) for name in names if hasattr(scrapy.exceptions, name)
    )


#: Scrapy 2.19 raises exceptions of its own for failed downloads (DownloadConnectionRefusedError
#: and others) where 2.13 to 2.18 let Twisted's through
DOWNLOAD_CONNECTION_ERRORS = _scrapy_exceptions(
    "DownloadConnectionRefusedError",
    "DownloadFailedError",
    "CannotResolveHostError",
)


def _download_timeouts() -> tuple[type[Exception], ...]:
    from twisted.internet.error import TimeoutError as UserTimeoutError

    return (UserTimeoutError, *_scrapy_exceptions("DownloadTimeoutError"))


#: what DOWNLOAD_TIMEOUT raises: Twisted's TimeoutError (2.13 to 2.18), DownloadTimeoutError (2.19)
DOWNLOAD_TIMEOUTS = _download_timeouts()


def enabled_components(settings: BaseSettings, name: str) -> list[Any]:
    """The components a component priority dict setting (``DOWNLOADER_MIDDLEWARES``...) enables,
    in order, loaded. Scrapy 2.14+ merges the class and import-path keys of one component;
    2.13 does not, so there ``{RetryMiddleware: None}`` leaves the base's path key enabled."""
    with_base = getattr(settings, "get_component_priority_dict_with_base", None)
    components = with_base(name) if with_base is not None else settings.getwithbase(name)
    return [
        load_object(component) if isinstance(component, str) else component
        for component in build_component_list(components)
    ]


def requests_in_progress(crawler: Crawler) -> set[Any] | None:
    """The requests the engine has taken from the scheduler and not finished (downloaded, the
    callback or errback run, the items through the pipelines), or None when it has none open.

    Scrapy keeps them in its engine slot's ``inprogress`` set (2.13 to 2.19 at least) and has no
    public API or signal for "this request is done".
    """
    in_progress = getattr(_engine_slot(crawler), "inprogress", None)
    return in_progress if isinstance(in_progress, set) else None


def wake_engine(crawler: Crawler) -> None:
    """Make the engine ask the scheduler for requests now, rather than at its next heartbeat.

    The engine asks when one of its own downloads ends, or every 5 seconds; a worker whose
    requests are all done while the shared queue was empty would otherwise wait that long for
    the requests other workers push. Scrapy has no public API for it: the engine slot's
    ``nextcall`` (2.13 to 2.19 at least) is what it calls itself.
    """
    nextcall = getattr(_engine_slot(crawler), "nextcall", None)
    if nextcall is not None:
        nextcall.schedule()


def _engine_slot(crawler: Crawler) -> Any:
    """The engine's private slot (``inprogress``, ``nextcall``), or None while it has none."""
    return getattr(getattr(crawler, "engine", None), "_slot", None)
