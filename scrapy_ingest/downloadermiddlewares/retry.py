"""Retries with exponential backoff and ``Retry-After``, per domain.

Enabled by the add-on with ``INGEST_RETRY_ENABLED = True``, in place of
Scrapy's RetryMiddleware (same order, 550); alone::

    DOWNLOADER_MIDDLEWARES = {
        "scrapy.downloadermiddlewares.retry.RetryMiddleware": None,
        "scrapy_ingest.downloadermiddlewares.retry.BackoffRetryMiddleware": 550,
    }

It is a subclass of Scrapy's RetryMiddleware: ``crawler.get_downloader_middleware(
RetryMiddleware)`` finds it, and what it retries, and how often, is Scrapy's: the
instance attributes ``max_retry_times``, ``retry_http_codes``,
``exceptions_to_retry``, ``priority_adjust`` (and, on Scrapy 2.17+,
``give_up_log_level``), which Scrapy's ``__init__`` sets from ``RETRY_TIMES``,
``RETRY_HTTP_CODES``, ``RETRY_EXCEPTIONS``, ``RETRY_PRIORITY_ADJUST``,
``RETRY_GIVE_UP_LOG_LEVEL`` and which a project may change on the instance; the
``RETRY_ENABLED`` setting; the ``dont_retry``, ``max_retry_times``,
``priority_adjust`` (and, on 2.17+, ``give_up_log_level``) meta keys. The retry
request comes from Scrapy's ``get_retry_request``, so the ``retry/*`` stats and
the "Retrying ..." and "Gave up retrying ..." log lines are Scrapy's, one per
retry; the delay is logged apart, at DEBUG, as "Backing off <host> for <n> s
...", which contains no "Retrying".

When it retries is ours. A domain (a request's hostname) has a *streak*, the
number of failure rounds since its last response that was not a failure.
A retried failure pauses the domain until ``now + delay``, the delay being
the response's ``Retry-After`` (seconds or an HTTP date, capped by
``INGEST_RETRY_AFTER_MAX``) or else full jitter,
``uniform(0, min(INGEST_RETRY_BACKOFF_MAX, INGEST_RETRY_BACKOFF_BASE * 2 ** (streak - 1)))``.
A failure that comes back while the domain is paused (a request that was in
flight when the pause began) belongs to the same round: it does not grow the
streak, and it can only lengthen the pause. While a domain is paused, its
retries and its fresh requests wait in
:class:`~scrapy_ingest.downloadermiddlewares._delay.DelayedRequests`, outside
the scheduler and the downloader: they hold no downloader slot, so other
domains keep their full speed, and the crawl does not end while they wait. A
request that never passes through the scheduler (``engine.download_async()``:
robots.txt, FilesPipeline and ImagesPipeline downloads) comes straight back
instead; it waits out the pause on a timer in ``process_request``.

Settings: ``INGEST_RETRY_BACKOFF_BASE``, ``INGEST_RETRY_BACKOFF_MAX``,
``INGEST_RETRY_AFTER_MAX`` and the ``RETRY_*`` ones above.

Stats: Scrapy's ``retry/count``, ``retry/reason_count/<reason>``,
``retry/max_reached``; ours ``ingest/retry/delayed`` (requests set aside to
wait: retries and fresh requests to a paused domain, each once per pause it
waits for), ``ingest/retry/delay_seconds`` (the seconds they were set aside
for, in total), ``ingest/retry/retry_after`` (retries whose delay a
``Retry-After`` header gave) and ``ingest/retry/waiting_dropped`` (still
waiting at close).
"""

from __future__ import annotations

import logging
import math
import random
import time
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

from scrapy.downloadermiddlewares.retry import RetryMiddleware, get_retry_request
from scrapy.utils.httpobj import urlparse_cached
from scrapy.utils.response import response_status_message

from scrapy_ingest._compat import GIVE_UP_LOG_LEVEL, enabled_components
from scrapy_ingest._stats import stat_key
from scrapy_ingest.config import IngestConfig
from scrapy_ingest.downloadermiddlewares._delay import DelayedRequests
from scrapy_ingest.exceptions import ConfigError

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from scrapy import Request, Spider
    from scrapy.crawler import Crawler
    from scrapy.http import Response
    from scrapy.settings import BaseSettings
    from scrapy.statscollectors import StatsCollector
    from typing_extensions import Self

logger = logging.getLogger(__name__)

_DELAYED = stat_key("retry", "delayed")
_DELAY_SECONDS = stat_key("retry", "delay_seconds")
_RETRY_AFTER = stat_key("retry", "retry_after")
#: 2 ** 64 seconds is beyond any INGEST_RETRY_BACKOFF_MAX; a bigger power would not be a float
_MAX_EXPONENT = 64


class BackoffRetryMiddleware(RetryMiddleware):
    """Scrapy's RetryMiddleware, each retry after an exponential backoff (or ``Retry-After``)
    per domain."""

    crawler: Crawler
    _stats: StatsCollector
    _delayed: DelayedRequests

    def __init__(self, settings: BaseSettings) -> None:
        super().__init__(settings)  # NotConfigured without RETRY_ENABLED; the retry attributes
        # ConfigError on a wrong value, INGEST_RETRY_BACKOFF_BASE > INGEST_RETRY_BACKOFF_MAX too
        config = IngestConfig.from_settings(settings)
        _refuse_scrapy_retry(settings, type(self))
        self._base = config.retry_backoff_base
        self._max = config.retry_backoff_max
        self._after_max = config.retry_after_max
        #: hostname -> time.monotonic() until which its requests wait
        self._paused: dict[str, float] = {}
        #: hostname -> failure rounds since its last response that was not a failure
        self._streaks: dict[str, int] = {}
        self._delay_seconds = 0.0

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        mw = cls(crawler.settings)
        mw.crawler = crawler
        assert crawler.stats is not None
        mw._stats = crawler.stats
        mw._delayed = DelayedRequests(crawler, "retry")
        return mw

    # downloader middleware methods (once per request: the path without failures is kept cheap)

    def process_request(
        self, request: Request, spider: Spider | None = None
    ) -> Request | Coroutine[Any, Any, None] | None:
        paused = self._paused
        if not paused:
            return None
        host = urlparse_cached(request).hostname or ""
        until = paused.get(host)
        if until is None:
            return None
        now = time.monotonic()
        if until <= now:
            del paused[host]
            return None
        if self._delayed.came_back(request):
            # Set aside already, and handed straight back by engine.download_async() (robots.txt,
            # media pipelines), which bypasses the scheduler: deferring it again would spin until
            # the pause ends, so it waits here, on a timer (see _delay.py).
            return self._wait(request, host, until)
        return self._defer(request, until, now)

    def process_response(
        self, request: Request, response: Response, spider: Spider | None = None
    ) -> Request | Response:
        if response.status not in self.retry_http_codes:
            if self._streaks:
                self._streaks.pop(urlparse_cached(request).hostname or "", None)
            return response
        if request.meta.get("dont_retry", False):
            return response
        reason = response_status_message(response.status)
        return self._retry_later(request, reason, response) or response

    def process_exception(
        self, request: Request, exception: Exception, spider: Spider | None = None
    ) -> Request | None:
        if isinstance(exception, self.exceptions_to_retry) and not request.meta.get(
            "dont_retry", False
        ):
            return self._retry_later(request, exception, None)
        return None

    # the retry path

    def _retry_later(
        self, request: Request, reason: str | Exception, response: Response | None
    ) -> Request | None:
        meta = request.meta
        extra: dict[str, Any] = {}
        if GIVE_UP_LOG_LEVEL:
            extra["give_up_log_level"] = meta.get("give_up_log_level", self.give_up_log_level)
        assert self.crawler.spider is not None
        retry = get_retry_request(
            request,
            spider=self.crawler.spider,
            reason=reason,
            max_retry_times=meta.get("max_retry_times", self.max_retry_times),
            priority_adjust=meta.get("priority_adjust", self.priority_adjust),
            **extra,
        )
        if retry is None:
            return None
        host = urlparse_cached(request).hostname or ""
        now = time.monotonic()
        paused_until = self._paused.get(host, 0.0)
        streak = self._streaks.get(host, 0)
        if paused_until <= now or not streak:
            # a new round; a failure while paused was in flight when the pause began
            streak += 1
            self._streaks[host] = streak
        delay = self._retry_after(response) if response is not None else None
        source = "Retry-After"
        if delay is None:
            source = f"backoff, failure round {streak}"
            ceiling = self._base * 2 ** min(streak - 1, _MAX_EXPONENT)
            delay = random.uniform(0, min(self._max, ceiling))
        until = max(paused_until, now + delay)
        self._paused[host] = until
        # Scrapy's get_retry_request() logged "Retrying ...": this line must not read like a
        # second one to whoever counts those
        logger.debug(
            "Backing off %(host)s for %(delay).2f s (%(source)s): %(request)s waits until then",
            {"request": request, "delay": until - now, "source": source, "host": host},
            extra={"spider": self.crawler.spider},
        )
        return self._defer(retry, until, now)

    def _retry_after(self, response: Response) -> float | None:
        """The delay the response's ``Retry-After`` asks for, capped; None without a valid one."""
        value = response.headers.get(b"Retry-After")
        if not value:
            return None
        delay = parse_retry_after(value.decode("latin-1"), time.time())
        if delay is None:
            return None
        self._stats.inc_value(_RETRY_AFTER)
        return min(delay, self._after_max)

    def _defer(self, request: Request, until: float, now: float) -> Request:
        self._count(until - now)
        return self._delayed.defer(request, until)

    async def _wait(self, request: Request, host: str, until: float) -> None:
        """Wait until the end of *host*'s pause, which may grow meanwhile; counted when it grew
        (the wait until *until* was counted when the request was set aside)."""
        while True:
            await self._delayed.wait(request, until)
            until = self._paused.get(host, 0.0)
            now = time.monotonic()
            if until <= now:
                self._paused.pop(host, None)
                return
            self._count(until - now)  # the domain failed again meanwhile: a second wait

    def _count(self, seconds: float) -> None:
        self._stats.inc_value(_DELAYED)
        self._delay_seconds += seconds
        self._stats.set_value(_DELAY_SECONDS, round(self._delay_seconds, 3))


def parse_retry_after(value: str, now: float) -> float | None:
    """Seconds to wait from *now* (epoch seconds) for a ``Retry-After`` value, or None.

    The value is a number of seconds (``"120"``; a fraction is accepted too) or
    an HTTP date (``"Wed, 21 Oct 2015 07:28:00 GMT"``); a date in the past means
    0. Anything else (negative, not a number nor a date) is None.
    """
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, says RFC 5322
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now)


def _refuse_scrapy_retry(settings: BaseSettings, own: type) -> None:
    """Raise ConfigError when Scrapy's RetryMiddleware (or another subclass of it) is enabled
    next to *own*: each failure would be retried twice, once without backoff."""
    components = enabled_components(settings, "DOWNLOADER_MIDDLEWARES")
    if own not in components:
        return  # built on its own (a test, a wrapper): nothing to compare with
    for cls in components:
        if cls is not own and isinstance(cls, type) and issubclass(cls, RetryMiddleware):
            raise ConfigError(
                f"DOWNLOADER_MIDDLEWARES enables both {cls.__module__}.{cls.__qualname__} "
                f"and {own.__qualname__}: every failure would be retried by both. Fix: set "
                f"'{cls.__module__}.{cls.__qualname__}': None in DOWNLOADER_MIDDLEWARES (the "
                "add-on does so for Scrapy's RetryMiddleware with INGEST_RETRY_ENABLED = True)."
            )
