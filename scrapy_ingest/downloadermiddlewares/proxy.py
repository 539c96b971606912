"""Proxy rotation with ban detection, for plain and scrapy-playwright requests.

:class:`ProxyMiddleware` runs at 740, just before Scrapy's
``HttpProxyMiddleware`` (750), which turns the ``meta["proxy"]`` it sets into
a ``Proxy-Authorization`` header. The add-on places it when a proxy list or
file is set.

Settings: ``INGEST_PROXY_LIST``, ``INGEST_PROXY_FILE`` (re-read when it
changes), ``INGEST_PROXY_POLICY``, ``INGEST_PROXY_STICKY``,
``INGEST_PROXY_EXCLUSIVE``, ``INGEST_PROXY_SESSION_IDLE``,
``INGEST_PROXY_BAN_CODES``, ``INGEST_PROXY_BAN_POLICY``,
``INGEST_PROXY_MAX_TRIES``, ``INGEST_PROXY_BACKOFF_BASE``,
``INGEST_PROXY_BACKOFF_MAX``, ``INGEST_PROXY_ALL_DEAD_TIMEOUT``.

Request meta: ``ingest_proxy`` (a proxy URL: use it, whatever the pool says;
``False``: no proxy for this request). A request whose ``meta["proxy"]`` the
project set itself is left alone.

Requests with ``meta["playwright"]`` get their proxy as a Playwright context
of its own (``playwright_context`` and ``playwright_context_kwargs["proxy"]``),
since scrapy-playwright ignores ``meta["proxy"]``; their headers never carry a
``Proxy-Authorization`` that the browser would pass on to the site.

A banned request is retried through another proxy, up to
``INGEST_PROXY_MAX_TRIES`` tries; a proxy that is banned or fails to connect is
benched (see :mod:`scrapy_ingest.downloadermiddlewares._proxypool`). A 429 or
503 with a valid ``Retry-After`` is a rate limit of the site, never a ban,
whatever the ban policy says: the proxy is not benched. With
:class:`~scrapy_ingest.downloadermiddlewares.retry.BackoffRetryMiddleware`
enabled (``INGEST_RETRY_ENABLED``), which sees the response next (550 < 740),
the response is left to it: it pauses the domain for what the server asked.
Without it, this middleware retries the request itself once the
``Retry-After`` time (capped by ``INGEST_RETRY_AFTER_MAX``) is over, the
request waiting outside the downloader meanwhile, within the same
``INGEST_PROXY_MAX_TRIES``. Every retry it makes comes from Scrapy's
``get_retry_request``: ``retry_times`` grows, and Scrapy's ``retry/*`` stats
count it. When no
proxy can take a request, it waits outside the downloader for the first
reanimation (a request that bypasses the scheduler, robots.txt or a media
pipeline's download, waits in the downloader on a timer); when every proxy has been benched for
``INGEST_PROXY_ALL_DEAD_TIMEOUT`` seconds, the spider closes with reason
``ingest_no_proxies``. A request is never sent without a proxy unless
``ingest_proxy=False`` says so.

Stats (``ingest/proxy/...``): ``requests``, ``good`` (responses that were not
bans), ``bans/<status or exception>``, ``benched``, ``reanimated``,
``retried``, ``rate_limited`` (429 or 503 with ``Retry-After``; also per proxy),
``gave_up``, ``waited``, ``bypassed``, ``pinned``, the gauges
``state/good``, ``state/unchecked`` and ``state/benched``, and per proxy
``ingest/proxy/<proxy>/{good,benched,reanimated,bans/<status>}``, where
``<proxy>`` is its URL without the password.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from scrapy import signals
from scrapy.core.downloader.handlers.http11 import TunnelError
from scrapy.downloadermiddlewares.retry import get_retry_request
from scrapy.exceptions import IgnoreRequest
from scrapy.utils.defer import deferred_from_coro
from scrapy.utils.httpobj import urlparse_cached
from scrapy.utils.misc import build_from_crawler, load_object
from scrapy.utils.response import response_status_message
from twisted.internet.error import ConnectError, ConnectionLost
from twisted.web.client import ResponseNeverReceived

from scrapy_ingest._compat import (
    DOWNLOAD_CONNECTION_ERRORS,
    DOWNLOAD_TIMEOUTS,
    close_spider,
    looping_call,
)
from scrapy_ingest._stats import stat_key
from scrapy_ingest.config import IngestConfig
from scrapy_ingest.downloadermiddlewares._delay import DelayedRequests
from scrapy_ingest.downloadermiddlewares._proxypool import (
    Proxy,
    ProxyPool,
    check_proxy_url,
    proxy_name,
)
from scrapy_ingest.downloadermiddlewares.retry import BackoffRetryMiddleware, parse_retry_after
from scrapy_ingest.exceptions import ConfigError

if TYPE_CHECKING:
    from collections.abc import Coroutine, Hashable

    from scrapy import Request, Spider
    from scrapy.crawler import Crawler
    from scrapy.http import Response
    from typing_extensions import Self

logger = logging.getLogger(__name__)

CLOSE_REASON = "ingest_no_proxies"
#: seconds between two looks at the pool (reanimations, gauges) and at INGEST_PROXY_FILE
TICK = 1.0
#: connection-level failures: through a proxy, the connection is to the proxy. Not a download
#: timeout (DOWNLOAD_TIMEOUT): a slow page says nothing about the proxy
_PROXY_FAILURES = (
    ConnectError,
    ConnectionLost,
    ResponseNeverReceived,
    TunnelError,
    *DOWNLOAD_CONNECTION_ERRORS,
)
#: what Chromium says when the proxy, not the site, failed
_BROWSER_PROXY_ERRORS = ("ERR_PROXY", "ERR_TUNNEL_CONNECTION_FAILED", "ERR_NO_SUPPORTED_PROXIES")
#: what a copy keeps of the proxy it was sent through. HttpProxyMiddleware's own record of the
#: proxy whose credentials are in the header it set, which it compares with meta["proxy"], is
#: left to it: with the header gone, it sets the new proxy's, or none
_META_KEYS = ("proxy", "_ingest_proxy")
#: statuses that, with a valid Retry-After, are the site's rate limit rather than a ban
RATE_LIMIT_CODES = frozenset({429, 503})


class BanPolicy:
    """The default ban detection: a status of ``INGEST_PROXY_BAN_CODES``, or a failure to
    connect through the proxy. Subclass it and name the subclass in
    ``INGEST_PROXY_BAN_POLICY``, or define the same methods on the spider."""

    def __init__(self, ban_codes: frozenset[int]) -> None:
        self.ban_codes = ban_codes

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(IngestConfig.from_settings(crawler.settings).proxy_ban_codes)

    def response_is_ban(self, request: Request, response: Response) -> bool:
        return response.status in self.ban_codes

    def exception_is_ban(self, request: Request, exception: BaseException) -> bool:
        if isinstance(exception, DOWNLOAD_TIMEOUTS):
            return False  # Twisted's TimeoutError is a ConnectError too
        if isinstance(exception, _PROXY_FAILURES):
            return True
        # scrapy-playwright passes on the browser's error: "net::ERR_PROXY_CONNECTION_FAILED"
        text = str(exception)
        return "net::ERR_" in text and any(code in text for code in _BROWSER_PROXY_ERRORS)


class ProxyMiddleware:
    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        config = IngestConfig.from_settings(crawler.settings)
        if not config.proxy_list and not config.proxy_file:
            raise ConfigError(
                "ProxyMiddleware is enabled, but INGEST_PROXY_LIST and INGEST_PROXY_FILE are "
                "both empty. Fix: set one of them, or remove ProxyMiddleware from "
                "DOWNLOADER_MIDDLEWARES."
            )
        self.config = config
        self.pool = ProxyPool(
            policy=config.proxy_policy,
            exclusive=config.proxy_exclusive,
            backoff_base=config.proxy_backoff_base,
            backoff_max=config.proxy_backoff_max,
            session_idle=config.proxy_session_idle,
        )
        self._file_mtime: float | None = None
        self._file_urls: list[str] = []
        if config.proxy_file:
            self._read_file(at_start=True)
        self._set_urls(at_start=True)
        self._policy = _load_policy(crawler, config.proxy_ban_policy)
        #: scrapy-playwright's named contexts, whose options a per-proxy context copies
        self._playwright_contexts = crawler.settings.getdict("PLAYWRIGHT_CONTEXTS")
        self._delayed = DelayedRequests(crawler, "proxy")
        #: requests in the downloader with a proxy of ours, their sticky session, and when
        #: they got the proxy (time.monotonic())
        self._assigned: dict[Request, tuple[Proxy, Hashable | None, float]] = {}
        #: the retry middleware that waits out Retry-After per domain, if enabled
        self._backoff_retry: BackoffRetryMiddleware | None = None
        self._dead_since: float | None = None
        self._closing = False
        self._ticks = looping_call(self._tick)
        crawler.signals.connect(self._spider_opened, signal=signals.spider_opened)
        crawler.signals.connect(self._spider_closed, signal=signals.spider_closed)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    # sources

    def _read_file(self, *, at_start: bool = False) -> bool:
        """Read INGEST_PROXY_FILE if it changed; return whether it did."""
        path = self.config.proxy_file
        assert path is not None
        try:
            mtime = os.stat(path).st_mtime_ns
            if mtime == self._file_mtime:
                return False
            with open(path, encoding="utf-8") as file:
                lines = file.read().splitlines()
        except OSError as exc:
            if at_start:
                raise ConfigError(
                    f"INGEST_PROXY_FILE ({path!r}) is invalid: it cannot be read "
                    f"({exc.strerror}). Fix: set it to the path of a text file with one proxy "
                    "URL per line."
                ) from None
            logger.error("Cannot read INGEST_PROXY_FILE %s (%s); keeping its proxies", path, exc)
            return False
        self._file_mtime = mtime
        urls = []
        for number, line in enumerate(lines, 1):
            url = line.split("#", 1)[0].strip()
            if not url:
                continue
            if reason := check_proxy_url(url):
                message = (
                    f"INGEST_PROXY_FILE ({path!r}) line {number} ({proxy_name_or_text(url)!r}) "
                    f"is invalid: {reason}. Fix: write one proxy per line as "
                    "scheme://[user:password@]host:port, '#' starts a comment."
                )
                if at_start:
                    raise ConfigError(message)
                logger.error("%s The line is left out.", message)
                continue
            urls.append(url)
        self._file_urls = urls
        return True

    def _set_urls(self, *, at_start: bool = False) -> None:
        added, removed = self.pool.set_urls([*self.config.proxy_list, *self._file_urls])
        if at_start:
            if not self.pool.proxies:
                raise ConfigError(
                    f"INGEST_PROXY_FILE ({self.config.proxy_file!r}) is invalid: it lists no "
                    "proxy. Fix: write one proxy URL per line, or set INGEST_PROXY_LIST."
                )
            return
        for proxy in added:
            logger.info("Proxy %s added from INGEST_PROXY_FILE", proxy.name)
        for proxy in removed:
            logger.info("Proxy %s removed, as INGEST_PROXY_FILE no longer lists it", proxy.name)

    # lifecycle

    def _spider_opened(self) -> None:
        self._backoff_retry = self.crawler.get_downloader_middleware(BackoffRetryMiddleware)
        c = self.config
        logger.info(
            "Rotating %d proxies (policy %s, sticky %s%s)",
            len(self.pool.proxies),
            c.proxy_policy,
            c.proxy_sticky,
            ", exclusive" if c.proxy_exclusive else "",
        )
        self._ticks.start(TICK, now=True).addErrback(
            lambda failure: logger.error("The proxy pool's ticks stopped: %s", failure.value)
        )

    def _spider_closed(self) -> None:
        if self._ticks.running:
            self._ticks.stop()
        self._publish_states(time.monotonic())

    def _tick(self) -> None:
        now = time.monotonic()
        if self.config.proxy_file and self._read_file():
            self._set_urls()
        self._reanimate(now)
        self._publish_states(now)
        if self._dead_since is not None:
            self._check_dead_timeout(now)

    def _reanimate(self, now: float) -> None:
        for proxy in self.pool.reanimate(now):
            logger.info("Proxy %s is back from the bench", proxy.name)
            self._inc("reanimated", proxy)

    def _publish_states(self, now: float) -> None:
        stats = self.crawler.stats
        assert stats is not None
        for state, count in self.pool.states(now).items():
            stats.set_value(stat_key("proxy", f"state/{state}"), count)

    # downloader middleware methods

    def process_request(
        self, request: Request, spider: Spider | None = None
    ) -> Request | Coroutine[Any, Any, None] | None:
        meta = request.meta
        if "_ingest_proxy" in meta:  # a retry, a redirect: it gets a proxy afresh
            self._forget(request)
        elif "proxy" in meta:
            return None  # the project chose this request's proxy itself
        pinned = meta.get("ingest_proxy")
        if pinned is False:
            self._inc("bypassed")
            return None
        playwright = bool(meta.get("playwright"))
        if pinned:
            if reason := check_proxy_url(pinned):
                raise IgnoreRequest(
                    f"meta['ingest_proxy'] ({proxy_name_or_text(pinned)!r}) is invalid: {reason}"
                )
            self._inc("pinned")
            self._apply(request, self.pool.pinned(pinned), None, playwright)
            return None
        now = time.monotonic()
        if now >= self.pool.next_reanimation:
            self._reanimate(now)
        session = self._session(request)
        proxy = self.pool.choose(session, now, http=not playwright)
        if proxy is None:
            if self._delayed.came_back(request):
                # Set aside already, and handed straight back by engine.download_async()
                # (robots.txt, media pipelines), which bypasses the scheduler: deferring it again
                # would spin until a proxy is free, so it waits here, on a timer (see _delay.py).
                return self._wait_here(request, session, playwright, now)
            return self._wait(request, now, http=not playwright)
        self._inc("requests")
        self._apply(request, proxy, session, playwright)
        return None

    def process_response(
        self, request: Request, response: Response, spider: Spider | None = None
    ) -> Request | Response:
        proxy, sent = self._done(request)
        if proxy is None:
            return response
        delay = self._retry_after(response)
        if delay is not None:
            # the site asks to slow down: the proxy reached it, and is not to blame
            self._inc("rate_limited", proxy)
            return self._rate_limited(request, proxy, response, delay) or response
        if not self._is_ban(response=(request, response)):
            self.pool.succeeded(proxy, sent)
            self._dead_since = None
            self._inc("good", proxy)
            return response
        reason = response_status_message(response.status)
        return self._banned(request, proxy, sent, str(response.status), reason) or response

    def process_exception(
        self, request: Request, exception: Exception, spider: Spider | None = None
    ) -> Request | None:
        proxy, sent = self._done(request)
        if proxy is None or not self._is_ban(exception=(request, exception)):
            return None
        return self._banned(request, proxy, sent, type(exception).__name__, exception)

    # helpers

    def _session(self, request: Request) -> Hashable | None:
        sticky = self.config.proxy_sticky
        if sticky == "domain":
            return ("domain", urlparse_cached(request).hostname)
        if sticky == "cookiejar":
            return ("cookiejar", request.meta.get("cookiejar"))
        return None

    def _apply(
        self, request: Request, proxy: Proxy, session: Hashable | None, playwright: bool
    ) -> None:
        self._assigned[request] = (proxy, session, time.monotonic())
        meta = request.meta
        meta["_ingest_proxy"] = proxy.name  # for the request log, and a copy's marker
        if not playwright:
            meta["proxy"] = proxy.url  # HttpProxyMiddleware moves the credentials to a header
            return
        # scrapy-playwright ignores meta["proxy"]: a browser context per proxy instead
        base = meta.get("_ingest_playwright_context", meta.get("playwright_context", "default"))
        meta["_ingest_playwright_context"] = base
        meta["playwright_context"] = f"{base}@ingest-proxy-{proxy.id}"
        kwargs = {
            **self._playwright_contexts.get(base, {}),
            **(meta.get("playwright_context_kwargs") or {}),
            "proxy": proxy.playwright_proxy(),
        }
        meta["playwright_context_kwargs"] = kwargs
        request.headers.pop(b"Proxy-Authorization", None)

    def _forget(self, request: Request) -> None:
        """Take a request's previous proxy off it (a retry or a redirect copied its meta)."""
        meta = request.meta
        for key in _META_KEYS:
            meta.pop(key, None)
        request.headers.pop(b"Proxy-Authorization", None)

    def _done(self, request: Request) -> tuple[Proxy | None, float]:
        """The proxy of *request* (None: not one of ours) and when the request got it."""
        assigned = self._assigned.pop(request, None)
        if assigned is None:
            return None, 0.0
        proxy, session, sent = assigned
        self.pool.done(proxy, session)
        return proxy, sent

    def _retry_after(self, response: Response) -> float | None:
        """The seconds a rate limit (429 or 503 with a valid Retry-After) asks for, capped by
        INGEST_RETRY_AFTER_MAX; None for any other response."""
        if response.status not in RATE_LIMIT_CODES:
            return None
        value = response.headers.get(b"Retry-After")
        if not value:
            return None
        delay = parse_retry_after(value.decode("latin-1"), time.time())
        return None if delay is None else min(delay, self.config.retry_after_max)

    def _rate_limited(
        self, request: Request, proxy: Proxy, response: Response, delay: float
    ) -> Request | None:
        """A rate limit: left to BackoffRetryMiddleware when it is enabled (it pauses the
        domain), else the request is tried again once *delay* is over."""
        if self._backoff_retry is not None or request.meta.get("dont_retry", False):
            return None
        reason = response_status_message(response.status)
        retry = self._retry(request, reason, f"last: {proxy.name}, {response.status}, Retry-After")
        if retry is None:
            return None
        logger.debug(
            "%(request)s is rate limited (%(status)d, Retry-After): tried again in %(delay).2f s",
            {"request": request, "status": response.status, "delay": delay},
            extra={"spider": self.crawler.spider},
        )
        return self._delayed.defer(retry, time.monotonic() + delay)

    def _is_ban(
        self,
        *,
        response: tuple[Request, Response] | None = None,
        exception: tuple[Request, BaseException] | None = None,
    ) -> bool:
        # the spider's own methods win over the policy class
        spider = self.crawler.spider
        if response is not None:
            check = getattr(spider, "response_is_ban", None) or self._policy.response_is_ban
            return bool(check(*response))
        assert exception is not None
        check = getattr(spider, "exception_is_ban", None) or self._policy.exception_is_ban
        return bool(check(*exception))

    def _banned(
        self, request: Request, proxy: Proxy, sent: float, reason: str, cause: str | Exception
    ) -> Request | None:
        """Bench *proxy*; return the request to try through another one, if any. *cause* is
        the reason as Scrapy's retry stats name it."""
        now = time.monotonic()
        was_benched = proxy.benched_until is not None and proxy.benched_until > now
        self._inc(f"bans/{reason}", proxy)
        if not was_benched:
            seconds = self.pool.bench(proxy, now, sent)
            if seconds:  # 0: the request was sent before the ban it belongs to
                self._inc("benched", proxy)
                logger.info("Proxy %s benched for %.1f s (%s)", proxy.name, seconds, reason)
                if self._dead_since is None and self.pool.all_benched(now, http=False):
                    self._all_dead(now)
        if request.meta.get("ingest_proxy"):
            return None  # pinned: no other proxy to try
        return self._retry(request, cause, f"last: {proxy.name}, {reason}")

    def _retry(self, request: Request, cause: str | Exception, last: str) -> Request | None:
        """The request to try again through a proxy, or None after INGEST_PROXY_MAX_TRIES.
        Made by Scrapy's get_retry_request(), like every retry of the crawl: its retry_times
        grows by one, and retry/count and retry/reason_count/* count it. The limit is
        INGEST_PROXY_MAX_TRIES, checked here, not RETRY_TIMES."""
        tries = request.meta.get("ingest_proxy_tries", 1)
        if tries >= self.config.proxy_max_tries:
            self._inc("gave_up")
            logger.warning(
                "Gave up on %s after %d tries through proxies (%s)", request, tries, last
            )
            return None
        assert self.crawler.spider is not None
        retry = get_retry_request(
            request,
            spider=self.crawler.spider,
            reason=cause,
            max_retry_times=request.meta.get("retry_times", 0) + 1,
        )
        assert retry is not None  # within max_retry_times by construction
        self._inc("retried")
        self._forget(retry)
        retry.meta["ingest_proxy_tries"] = tries + 1
        return retry

    def _wait(self, request: Request, now: float, *, http: bool) -> Request:
        """No proxy can take *request* now: it waits outside the downloader."""
        return self._delayed.defer(request, self._wake(now, http=http))

    async def _wait_here(
        self, request: Request, session: Hashable | None, playwright: bool, now: float
    ) -> None:
        """Wait on a timer until a proxy can take *request*, then give it that proxy; each
        wait after the first one (counted when the request was set aside) is counted too."""
        until = self._wake(now, http=not playwright, count=False)
        while True:
            await self._delayed.wait(request, until)
            now = time.monotonic()
            if now >= self.pool.next_reanimation:
                self._reanimate(now)
            proxy = self.pool.choose(session, now, http=not playwright)
            if proxy is not None:
                self._inc("requests")
                self._apply(request, proxy, session, playwright)
                return
            until = self._wake(now, http=not playwright)

    def _wake(self, now: float, *, http: bool, count: bool = True) -> float:
        """When a request that no proxy can take now should look again."""
        if count:
            self._inc("waited")
        wake = self.pool.next_change(now) or now + TICK
        if self._dead_since is None and self.pool.all_benched(now, http=http):
            self._all_dead(now)
        if self._dead_since is not None:
            wake = min(wake, self._check_dead_timeout(now))
        return max(wake, now + 0.05)

    def _all_dead(self, now: float) -> None:
        """Every proxy is benched: the INGEST_PROXY_ALL_DEAD_TIMEOUT clock starts, and runs
        until a response through a proxy is not a ban (a reanimation alone does not stop it)."""
        self._dead_since = now
        logger.warning(
            "Every proxy is benched; requests wait for them to come back, and the spider "
            "closes if none works within INGEST_PROXY_ALL_DEAD_TIMEOUT (%.0f s)",
            self.config.proxy_all_dead_timeout,
        )

    def _check_dead_timeout(self, now: float) -> float:
        """Close the spider when no proxy has worked for too long; return the deadline."""
        assert self._dead_since is not None
        deadline = self._dead_since + self.config.proxy_all_dead_timeout
        if now >= deadline and not self._closing:
            self._closing = True
            logger.error(
                "Every proxy has been benched for %.0f s (INGEST_PROXY_ALL_DEAD_TIMEOUT); "
                "closing the spider rather than crawling without a proxy",
                now - self._dead_since,
            )
            deferred_from_coro(close_spider(self.crawler, CLOSE_REASON)).addErrback(
                lambda failure: logger.error("Could not close the spider: %s", failure.value)
            )
        return deadline

    def _inc(self, event: str, proxy: Proxy | None = None) -> None:
        stats = self.crawler.stats
        assert stats is not None
        stats.inc_value(stat_key("proxy", event))
        if proxy is not None:
            stats.inc_value(stat_key("proxy", f"{proxy.name}/{event}"))


def proxy_name_or_text(url: Any) -> str:
    """*url* without its password, for a message about a URL that may not even parse."""
    try:
        return proxy_name(url) if not check_proxy_url(url) else str(url).split("@")[-1]
    except ValueError:
        return "<unparsable>"


def _load_policy(crawler: Crawler, policy: Any) -> Any:
    if policy is None:
        return BanPolicy.from_crawler(crawler)
    try:
        cls = load_object(policy) if isinstance(policy, str) else policy
    except (ImportError, ValueError, NameError) as exc:
        raise ConfigError(
            f"INGEST_PROXY_BAN_POLICY ({policy!r}) is invalid: it cannot be imported ({exc}). "
            "Fix: set it to the import path of a class, e.g. 'myproject.proxies.BanPolicy'."
        ) from None
    instance = build_from_crawler(cls, crawler)
    for method in ("response_is_ban", "exception_is_ban"):
        if not callable(getattr(instance, method, None)):
            raise ConfigError(
                f"INGEST_PROXY_BAN_POLICY ({policy!r}) is invalid: it has no {method}() "
                f"method. Fix: subclass scrapy_ingest.downloadermiddlewares.proxy.BanPolicy."
            )
    return instance
