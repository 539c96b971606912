"""The request log: one row per download attempt in the ``requests`` table.

Enabled by the add-on; alone::

    DOWNLOADER_MIDDLEWARES = {"scrapy_ingest.RequestLogMiddleware": 950}
    SPIDER_MIDDLEWARES = {"scrapy_ingest.SourceMiddleware": 10}  # fills parent_id

At 950 it sits next to the downloader, after HttpProxyMiddleware (750) and
HttpCacheMiddleware (900): it sees each response as it arrives, before
redirects, retries and decompression act on it, and each download error
before RetryMiddleware turns it into another attempt. So a request retried
twice is three rows (``retry_times`` 0, 1 and 2) and each hop of a redirect
is a row of its own.

What a row holds and where it comes from:

* ``started_at``: when the download handler started the download, after any
  wait in the downloader's per-domain queue (see :meth:`_time_downloads`);
* ``latency_ms``: the download time. For a response, Scrapy's own
  ``download_latency`` (set by the download handler: from sending the request
  to receiving the response headers; the body's transfer is not in it); for a
  download error (a timeout, a refused connection, a TLS failure) and for a
  handler that sets no ``download_latency``, from ``started_at`` until the
  handler raised the error or returned the response. Neither the wait in
  Scrapy's queues nor the time the response takes to reach this middleware is
  in it;
* ``parent_id``: the row id of the attempt whose response produced this
  request, set in ``request.meta["ingest_parent_id"]`` by
  :class:`~scrapy_ingest.spidermiddlewares.source.SourceMiddleware`; the next
  hop of a redirect points to the redirected attempt, a retry keeps the parent
  of the attempt it repeats;
* the row id of the attempt that produced a response is in
  ``response.meta["ingest_request_id"]``;
* ``playwright``: the request asked for scrapy-playwright (``meta["playwright"]``)
  and scrapy-playwright's handler is the one for its URL scheme
  (``DOWNLOAD_HANDLERS``), which is when scrapy-playwright downloads it;
* ``url``, ``proxy`` and ``error`` without the secrets of their URLs
  (``user:password@``, the query parameters of ``INGEST_REDACT_QUERY_PARAMS``); with
  ``INGEST_REQUESTS_STORE_HEADERS``, the headers with ``Authorization``,
  ``Cookie``, ``Set-Cookie`` and ``Proxy-Authorization`` values redacted, and the
  URLs of the others (``Referer``, ``Location``) redacted as any URL.

Requests that never reach the downloader are not rows: those that the
scheduler's dupefilter or the offsite middleware drop are in Scrapy's
``dupefilter/filtered`` and ``offsite/filtered`` stats; those another
downloader middleware answers or refuses before the download (an HTTP cache
hit, ``robots.txt``) are counted in ``ingest/requests/not_downloaded``.

Stats: ``ingest/requests/queued``, ``ingest/requests/stored``,
``ingest/requests/not_downloaded``, and the others of every record kind.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from scrapy import signals
from scrapy.exceptions import NotConfigured
from scrapy.utils.httpobj import urlparse_cached

from scrapy_ingest._compat import time_downloads
from scrapy_ingest._redact import REDACTED, redact_text
from scrapy_ingest._stats import stat_key
from scrapy_ingest.runtime import ROW_OVERHEAD, IngestRuntime

if TYPE_CHECKING:
    from collections.abc import Callable

    from scrapy import Request, Spider
    from scrapy.crawler import Crawler
    from scrapy.http import Headers, Response
    from scrapy.settings import BaseSettings
    from typing_extensions import Self

logger = logging.getLogger(__name__)

#: header values never stored
SECRET_HEADERS = frozenset({b"authorization", b"cookie", b"set-cookie", b"proxy-authorization"})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_QUEUED = stat_key("requests", "queued")
_NOT_DOWNLOADED = stat_key("requests", "not_downloaded")


class RequestLogMiddleware:
    """Store one row per download attempt, with its outcome and timing."""

    def __init__(self, crawler: Crawler) -> None:
        runtime = IngestRuntime.of(crawler)
        if not runtime.config.requests_enabled:
            raise NotConfigured("INGEST_REQUESTS_ENABLED is False")
        self.crawler = crawler
        self._runtime = runtime
        runtime.requests_count = 0
        self._store_headers = runtime.config.requests_store_headers
        self._redact = runtime.redact
        #: request -> when its download started (epoch seconds)
        self._starts: dict[Request, float] = {}
        #: request -> its download time (seconds), once the download handler is done with it
        self._latencies: dict[Request, float] = {}
        self._captured = 0
        self._published = 0
        self._not_downloaded = 0
        self._open = False
        crawler.signals.connect(self._spider_opened, signal=signals.spider_opened)
        runtime.on_close(self._closed)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    async def _spider_opened(self) -> None:
        runtime = self._runtime
        databases = await runtime.opened()
        if databases is None:
            return
        sink = databases.sink("requests")
        self._job_id, self._spider_name = sink.job_id, sink.spider
        self._new_id, self._add = sink.new_id, sink.add
        assert self.crawler.request_fingerprinter is not None
        self._fingerprint = self.crawler.request_fingerprinter.fingerprint
        self._playwright_schemes = _playwright_schemes(self.crawler.settings)
        self._time_downloads()
        runtime.on_tick(self._publish_stats)
        self._open = True

    def _time_downloads(self) -> None:
        """Time each download itself, not its stay in the downloader.

        Downloader middlewares run before the downloader's per-domain queue,
        where a request can wait for a free slot or a download delay; Scrapy
        sends no signal when a download leaves that queue, and a response
        reaches this middleware only after the downloader has started the next
        download and the event loop has run whatever else was ready. So we wrap
        this crawler's download handlers (``engine.downloader.handlers``, one
        object per crawler, nothing global; see :func:`~scrapy_ingest._compat.time_downloads`):
        the wrapper notes when the download starts and how long it took
        (:meth:`_download_ended`). If a Scrapy version has neither method we know, the time at
        which the request reached this middleware is used, queue wait included, until the
        response or error reached it.
        """
        if time_downloads(self.crawler, self._download_started, self._download_ended):
            return
        logger.warning(
            "This Scrapy version's downloader is unknown to scrapy_ingest: started_at and "
            "latency_ms of requests include the time spent in the download queue"
        )

    def _download_started(self, request: Request) -> tuple[float, object]:
        """Note the start; the monotonic clock and the ``download_latency`` already in meta."""
        self._starts[request] = time.time()
        # a retry or a redirect copies the meta, download_latency of the earlier attempt included
        return time.monotonic(), request.meta.get("download_latency")

    def _download_ended(
        self, request: Request, started: tuple[float, object], failed: bool
    ) -> None:
        clock, earlier = started
        latency = request.meta.get("download_latency")
        if failed or latency is None or latency is earlier or not isinstance(latency, float):
            # an error (which may come after the headers, e.g. a timeout reading the body),
            # a handler that sets no download_latency, or only the earlier attempt's one
            latency = time.monotonic() - clock
        self._latencies[request] = latency

    def _publish_stats(self) -> None:
        runtime = self._runtime
        runtime.requests_count = self._captured
        if self._captured != self._published:
            runtime.stats.inc_value(_QUEUED, self._captured - self._published)
            self._published = self._captured
        if self._not_downloaded:
            runtime.stats.inc_value(_NOT_DOWNLOADED, self._not_downloaded)
            self._not_downloaded = 0

    def _closed(self) -> None:
        if self._open:
            self._publish_stats()
        self._open = False
        self._starts.clear()
        self._latencies.clear()

    # downloader middleware methods (reactor thread, once per request: kept cheap)

    def process_request(self, request: Request, spider: Spider | None = None) -> None:
        # replaced by the exact time once the download handler starts (_time_downloads)
        self._starts[request] = time.time()

    def process_response(
        self, request: Request, response: Response, spider: Spider | None = None
    ) -> Response:
        started = self._starts.pop(request, None)
        latency = self._latencies.pop(request, None)
        meta = request.meta
        if started is None or not self._open:
            # answered without a download (an HTTP cache hit): no row, and no parent to give
            meta.pop("ingest_request_id", None)
            self._not_downloaded += started is None
            return response
        row_id = self._new_id(started)
        parent_id = meta.get("ingest_parent_id")
        meta["ingest_request_id"] = row_id
        status = response.status
        if status in _REDIRECTS and b"Location" in response.headers:
            # RedirectMiddleware copies this meta into the next hop: its parent is this attempt
            meta["ingest_parent_id"] = row_id
        headers = (
            _headers_json(request.headers, response.headers, self._redact)
            if self._store_headers
            else None
        )
        self._store(
            request,
            row_id,
            started,
            latency,
            status=status,
            response_bytes=len(response.body),
            parent_id=parent_id,
            error=None,
            headers=headers,
        )
        return response

    def process_exception(
        self, request: Request, exception: Exception, spider: Spider | None = None
    ) -> None:
        started = self._starts.pop(request, None)
        latency = self._latencies.pop(request, None)
        if started is None or not self._open:
            # refused before the download, by another middleware (robots.txt, offsite...)
            self._not_downloaded += started is None
            return
        row_id = self._new_id(started)
        request.meta["ingest_request_id"] = row_id
        headers = (
            _headers_json(request.headers, None, self._redact) if self._store_headers else None
        )
        parent_id = request.meta.get("ingest_parent_id")
        error = self._redact(describe_exception(exception))
        self._store(
            request,
            row_id,
            started,
            latency,
            status=None,
            response_bytes=None,
            parent_id=parent_id,
            error=error,
            headers=headers,
        )

    def _store(
        self,
        request: Request,
        row_id: int,
        started: float,
        latency: float | None,
        *,
        status: int | None,
        response_bytes: int | None,
        parent_id: int | None,
        error: str | None,
        headers: bytes | None,
    ) -> None:
        meta = request.meta
        url = self._redact(request.url)
        # ProxyMiddleware's name of the proxy (a Playwright request's is in its browser context,
        # not in meta["proxy"]), else the proxy the project set
        proxy = meta.get("_ingest_proxy") or meta.get("proxy")
        row = (
            row_id,
            self._job_id,
            self._spider_name,
            url,
            request.method,
            status,
            started,
            # None: a Scrapy whose download handlers are not wrapped (see _time_downloads)
            (time.time() - started if latency is None else latency) * 1000,
            response_bytes,
            parent_id,
            meta.get("depth", 0),
            meta.get("retry_times", 0),
            self._redact(proxy) if proxy else None,
            error,
            self._fingerprint(request).hex(),
            bool(meta.get("playwright")) and self._by_playwright(request),
            headers,
        )
        size = ROW_OVERHEAD + len(url) + (len(error) if error else 0) + len(headers or b"")
        self._add(row, size)
        self._captured += 1

    def _by_playwright(self, request: Request) -> bool:
        # scrapy-playwright downloads a request that asks for it when it handles the scheme
        return urlparse_cached(request).scheme in self._playwright_schemes


def _playwright_schemes(settings: BaseSettings) -> frozenset[str]:
    """The URL schemes whose download handler is scrapy-playwright's."""
    handlers = settings.getwithbase("DOWNLOAD_HANDLERS")
    return frozenset(
        scheme
        for scheme, handler in handlers.items()
        if handler is not None and _name_of(handler).startswith("scrapy_playwright.")
    )


def _name_of(handler: Any) -> str:
    if isinstance(handler, str):
        return handler
    return f"{handler.__module__}.{getattr(handler, '__qualname__', '')}"


def describe_exception(exc: BaseException) -> str:
    """``ClassName: message``, with the causes Twisted wraps, and no credentials.

    Twisted's ``ResponseNeverReceived`` and ``ResponseFailed`` hold their real
    causes as a list of Failures (Scrapy 2.14+ wraps them once more, in a
    ``DownloadFailedError``); those are shown instead of the list's repr:
    ``DownloadFailedError: OpenSSL.SSL.Error: [('SSL routines', '', 'wrong version number')]``.
    """
    name = type(exc).__name__
    causes = _wrapped_causes(exc)
    if causes:
        text = f"{name}: " + "; ".join(f"{_class_name(c)}: {c}" for c in causes)
    else:
        text = f"{name}: {exc}" if str(exc) else name
    return redact_text(text)


def _wrapped_causes(exc: BaseException) -> list[BaseException]:
    for candidate in (exc, exc.__cause__):
        if candidate is None:
            continue
        reasons = getattr(candidate, "reasons", None)
        if reasons is None and candidate.args and isinstance(candidate.args[0], list):
            reasons = candidate.args[0]
        if isinstance(reasons, list) and reasons:
            causes = [
                cause
                for reason in reasons
                if isinstance(cause := getattr(reason, "value", reason), BaseException)
            ]
            if len(causes) == len(reasons):
                return causes
    return []


def _class_name(exc: BaseException) -> str:
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _headers_json(
    request_headers: Headers, response_headers: Headers | None, redact: Callable[[str], str]
) -> bytes:
    record: dict[str, Any] = {"request": _header_values(request_headers, redact)}
    if response_headers is not None:
        record["response"] = _header_values(response_headers, redact)
    return orjson.dumps(record)


def _header_values(headers: Headers, redact: Callable[[str], str]) -> dict[str, list[str]]:
    # secret headers are hidden whole; the URLs of the others (Referer, Location) as any URL
    return {
        name.decode("latin-1"): (
            [REDACTED]
            if name.lower() in SECRET_HEADERS
            else [redact(value.decode("latin-1")) for value in values]
        )
        for name, values in headers.items()
    }
