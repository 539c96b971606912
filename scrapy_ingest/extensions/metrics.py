"""The Prometheus extension: live crawl and ingest metrics on ``/metrics``, ``/healthz``,
and pushes to a pushgateway.

Enabled by the add-on when ``INGEST_METRICS_ENABLED`` is true (it opens a
port, so it is off by default); alone::

    EXTENSIONS = {"scrapy_ingest.PrometheusExtension": 500}
    INGEST_METRICS_ENABLED = True

Needs the ``metrics`` extra (prometheus-client). Settings:
``INGEST_METRICS_HOST`` (``127.0.0.1``), ``INGEST_METRICS_PORT`` (a port, or
a ``[first, last]`` range tried in order like Scrapy's ``TELNETCONSOLE_PORT``;
0: any free port), ``INGEST_METRICS_PUSHGATEWAY``,
``INGEST_METRICS_PUSH_INTERVAL``, ``INGEST_METRICS_LABELS``,
``INGEST_METRICS_UNHEALTHY_AFTER``.

How it stays off the reactor thread: almost every metric is read, when
scraped or pushed, from what the crawl counts anyway (Scrapy's stats, the
writers' counts): a collector on the HTTP server's thread copies them. The
reactor thread only adds each response's download latency and each batch's
write time to two histograms (a bucket increment each). Each crawler has its
own ``CollectorRegistry`` and server, so two crawlers in one process never
collide. ``docs/metrics.md`` lists every metric.

Counters whose label values are known when the crawl opens are exported at 0
from the start, so that a dashboard shows 0 rather than "No data": responses
per status class, rows written and failed per open database and table, dead
letters per record kind, retries per reason and download errors per exception
that RetryMiddleware expects (``RETRY_HTTP_CODES``, ``RETRY_EXCEPTIONS``),
and, when ProxyMiddleware runs, the pool's states and bans per
``INGEST_PROXY_BAN_CODES`` status.

``scrapy_ingest_finished`` tells a crawl that ended from one that crashed
(its target is down either way): it turns 1 once the spider has closed and
its rows are written or spilled. So that Prometheus sees that 1, a crawl that
is being scraped regularly keeps serving, at close, until the next scrape
(at most one and a half of its scrape intervals, and never more than
``_FINAL_SCRAPE_MAX`` seconds); nobody scraping, no wait.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from scrapy import signals
from scrapy.exceptions import NotConfigured

from scrapy_ingest._aio import as_deferred, in_thread
from scrapy_ingest._compat import Looping, looping_call
from scrapy_ingest._redact import redact_url
from scrapy_ingest.runtime import IngestRuntime

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from scrapy.crawler import Crawler
    from scrapy.http import Request, Response
    from twisted.internet.defer import Deferred
    from typing_extensions import Self

    from scrapy_ingest.backends import WriteOutcome
    from scrapy_ingest.schema import TableSpec

logger = logging.getLogger(__name__)

PREFIX = "scrapy_ingest"
#: seconds
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FLUSH_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)
#: the status classes of responses, exported at 0 until one comes (an error rate is then 0)
#: seconds a closing crawl waits at most for a last scrape (that sees scrapy_ingest_finished 1)
_FINAL_SCRAPE_MAX = 60.0
_STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx")
#: Scrapy stats that have metrics of their own (the generic bridge leaves them out)
_COVERED = re.compile(
    r"^(item_scraped_count|item_dropped_count|response_received_count"
    r"|downloader/response_status_count/|downloader/response_bytes"
    r"|retry/reason_count/|downloader/exception_type_count/|ingest/)"
)


class _Histogram:
    """Bucket counts kept by the reactor thread, read by the collector: no lock, one increment."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        counts, total, out = list(self.counts), 0, []
        for bound, count in zip([*map(str, self.bounds), "+Inf"], counts, strict=True):
            total += count
            out.append((bound, total))
        return out


@dataclass(frozen=True)
class _KnownLabels:
    """Label values known once the spider opens, exported at 0 until counted."""

    #: Scrapy's retry reasons: "503 Service Unavailable", "builtins.OSError"...
    retry_reasons: tuple[str, ...] = ()
    #: the class names of the download errors retried
    exceptions: tuple[str, ...] = ()
    #: INGEST_PROXY_BAN_CODES, when ProxyMiddleware runs (None: it does not)
    proxy_bans: tuple[str, ...] | None = None

    @classmethod
    def of(cls, crawler: Crawler, runtime: IngestRuntime) -> _KnownLabels:
        from scrapy.downloadermiddlewares.retry import RetryMiddleware
        from scrapy.utils.python import global_object_name
        from scrapy.utils.response import response_status_message

        from scrapy_ingest.downloadermiddlewares.proxy import ProxyMiddleware

        reasons: list[str] = []
        exceptions: list[type[BaseException]] = []
        retry = crawler.get_downloader_middleware(RetryMiddleware)
        if retry is not None:
            reasons = [response_status_message(code) for code in sorted(retry.retry_http_codes)]
            exceptions = list(retry.exceptions_to_retry)
            reasons += [global_object_name(exception) for exception in exceptions]
        bans = None
        if crawler.get_downloader_middleware(ProxyMiddleware) is not None:
            bans = tuple(str(code) for code in sorted(runtime.config.proxy_ban_codes))
        return cls(
            tuple(dict.fromkeys(reasons)),
            tuple(sorted({exception.__name__ for exception in exceptions})),
            bans,
        )


class PrometheusExtension:
    def __init__(self, crawler: Crawler) -> None:
        runtime = IngestRuntime.of(crawler)
        config = runtime.config
        if not config.metrics_enabled:
            raise NotConfigured("INGEST_METRICS_ENABLED is False")
        try:
            from prometheus_client import CollectorRegistry
        except ImportError:
            raise NotConfigured(
                "INGEST_METRICS_ENABLED is True but prometheus-client is not installed. "
                "Fix: pip install 'scrapy-ingestion[metrics]'"
            ) from None
        self.crawler = crawler
        self._runtime = runtime
        self.registry = CollectorRegistry(auto_describe=False)
        self.latency = _Histogram(LATENCY_BUCKETS)
        #: (backend, table) -> write times of its batches
        self.flush: dict[tuple[str, str], _Histogram] = {}
        self.items_errored = 0
        self.known = _KnownLabels()
        self.port: int | None = None
        #: set once the spider has closed and its rows are written or spilled
        self.finished = False
        #: monotonic times of the last two scrapes of /metrics
        self._scrapes: list[float] = []
        #: set when a scrape that saw finished = 1 has been sent
        self._final_scrape = threading.Event()
        self._server: Any = None
        self._push_loop: Looping | None = None
        self.registry.register(_Collector(self))
        runtime.counters.on_outcome(self._batch_answered)
        crawler.signals.connect(self._spider_opened, signal=signals.spider_opened)
        crawler.signals.connect(self._spider_closed, signal=signals.spider_closed)
        crawler.signals.connect(self._response_received, signal=signals.response_received)
        crawler.signals.connect(self._item_error, signal=signals.item_error)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    # labels

    @property
    def spider(self) -> str:
        spider = self.crawler.spider
        return spider.name if spider is not None else ""

    # the reactor thread: one increment per event

    def _response_received(self, response: Response, request: Request) -> None:
        latency = request.meta.get("download_latency")
        if latency is not None:
            self.latency.observe(latency)

    def _item_error(self) -> None:
        self.items_errored += 1

    def _batch_answered(
        self, url: str, table: TableSpec, outcome: WriteOutcome, seconds: float
    ) -> None:
        key = (redact_url(url), table.name)
        histogram = self.flush.get(key)
        if histogram is None:
            histogram = self.flush[key] = _Histogram(FLUSH_BUCKETS)
        histogram.observe(seconds)

    # serving

    async def _spider_opened(self) -> None:
        self.known = _KnownLabels.of(self.crawler, self._runtime)
        config = self._runtime.config
        if config.metrics_port is not None:
            self._serve(config.metrics_host, config.metrics_port)
        if config.metrics_pushgateway:
            self._push_loop = looping_call(self._push)
            self._push_loop.start(config.metrics_push_interval, now=False)

    def _serve(self, host: str, ports: list[int]) -> None:
        app = _App(self)
        first, last = ports[0], ports[-1]
        error: OSError | None = None
        for port in range(first, last + 1):
            try:
                server = make_server(
                    host, port, app, _ThreadingWSGIServer, handler_class=_QuietHandler
                )
            except OSError as exc:
                error = exc
                continue
            break
        else:
            logger.error(
                "Cannot serve metrics: no port of %s-%s is free on %s (%s). Fix: set "
                "INGEST_METRICS_PORT to a free port, a wider range, or 0 for any free port.",
                first,
                last,
                host,
                error,
            )
            return
        self._server = server
        self.port = server.server_port
        threading.Thread(
            target=server.serve_forever, name="scrapy_ingest_metrics", daemon=True
        ).start()
        # on the job row too, in its stats
        self._runtime.stats.set_value("ingest/metrics/port", self.port)
        logger.info("Prometheus metrics on http://%s:%s/metrics", host, self.port)

    def _push(self) -> Deferred[None]:
        """The push loop's call (a LoopingCall waits for the Deferred it returns)."""
        return as_deferred(self._push_once())

    async def _push_once(self) -> None:
        try:
            await in_thread(self._push_now)
        except Exception as exc:
            gateway = redact_url(str(self._runtime.config.metrics_pushgateway))
            logger.warning("Could not push metrics to %s: %s", gateway, exc)

    def _push_now(self) -> None:
        from prometheus_client import push_to_gateway

        runtime = self._runtime
        gateway = runtime.config.metrics_pushgateway
        assert gateway is not None
        grouping = {"spider": self.spider, "instance": socket.gethostname()}
        if runtime.job is not None:
            grouping["job_id"] = runtime.job.job_id
        push_to_gateway(
            gateway,
            job=PREFIX,
            registry=self.registry,
            grouping_key=grouping,
            timeout=10,
        )

    async def _spider_closed(self) -> None:
        if self._push_loop is not None and self._push_loop.running:
            self._push_loop.stop()
        if self._push_loop is None and self._server is None:
            return
        # the final counts: once every batch is written or spilled
        await self._runtime.wait_closed()
        self.finished = True
        if self._push_loop is not None:  # one last push, for short crawls
            await self._push_once()
        if self._server is not None:
            wait = self._final_scrape_wait()
            if wait > 0:
                await in_thread(self._final_scrape.wait, wait)
            server, self._server = self._server, None
            await in_thread(_shut_down, server)

    # scrapes

    def scraped(self, finished: bool) -> None:
        """A scrape of /metrics has been sent (*finished*: it said scrapy_ingest_finished 1)."""
        if finished:
            self._final_scrape.set()
        self._scrapes = [*self._scrapes[-1:], time.monotonic()]

    def _final_scrape_wait(self) -> float:
        """Seconds to wait for the scraper's next visit: none unless it comes regularly."""
        if len(self._scrapes) < 2:
            return 0.0
        before, last = self._scrapes
        interval = last - before
        return min(last + 1.5 * interval - time.monotonic(), _FINAL_SCRAPE_MAX)

    # health

    def health(self) -> tuple[bool, str]:
        """(healthy, reason), read from the HTTP server's thread."""
        runtime = self._runtime
        if runtime.closing:
            return False, "the crawl is shutting down"
        databases = runtime.databases
        oldest = None if databases is None else databases.oldest_pending_write()
        limit = runtime.config.metrics_unhealthy_after
        if oldest is not None and time.monotonic() - oldest > limit:
            waited = time.monotonic() - oldest
            return False, f"a batch has waited {waited:.0f} s for its database (limit {limit:g} s)"
        return True, "ok"


def _shut_down(server: Any) -> None:
    server.shutdown()
    server.server_close()


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """A thread per request, as prometheus-client's own server: a slow scrape does not hold
    the next one. Daemon threads, which the server does not keep to join at close."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    """Requests are not logged: each scrape would print a line to stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _App:
    """The WSGI app: ``/healthz`` here, everything else is prometheus-client's ``/metrics``."""

    def __init__(self, extension: PrometheusExtension) -> None:
        from prometheus_client import make_wsgi_app

        self._extension = extension
        self._metrics = make_wsgi_app(extension.registry)

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            healthy, reason = self._extension.health()
            body = json.dumps({"status": "ok" if healthy else "unhealthy", "reason": reason})
            status = "200 OK" if healthy else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [body.encode()]
        finished = self._extension.finished
        return _Sent(self._metrics(environ, start_response), self._extension, finished)


class _Sent:
    """A /metrics answer that tells the extension once the server has sent it (WSGI calls
    ``close()`` then)."""

    def __init__(self, body: Iterable[bytes], extension: PrometheusExtension, finished: bool):
        self._body = body
        self._extension = extension
        self._finished = finished

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        self._extension.scraped(self._finished)


class _Collector:
    """Builds every metric when scraped (or pushed), from counts the crawl keeps anyway."""

    def __init__(self, extension: PrometheusExtension) -> None:
        self._extension = extension

    def collect(self) -> Iterator[Any]:
        ext = self._extension
        # this process's stats (a copy), even with a collector shared by many processes
        stats = ext._runtime.process_stats.get_stats()
        labels = ext._runtime.config.metrics_labels
        family = _Families(["spider", *labels], [ext.spider, *labels.values()])
        yield from self._crawl(family, stats)
        yield from self._ingest(family, stats)
        yield from self._bridge(family, stats)

    def _crawl(self, family: _Families, stats: dict[str, Any]) -> Iterator[Any]:
        ext, base, number = self._extension, family.values, _numbers(stats)
        for name, doc, value in (
            ("items_scraped", "Items scraped", number("item_scraped_count")),
            (
                "items_dropped",
                "Items dropped by a pipeline (DropItem)",
                number("item_dropped_count"),
            ),
            ("items_errored", "Items whose pipeline raised an error", ext.items_errored),
            ("response_bytes", "Bytes of responses received", number("downloader/response_bytes")),
        ):
            metric = family.counter(name, doc)
            metric.add_metric(base, value)
            yield metric
        responses = family.counter("responses", "Responses, by status class", ("status_class",))
        retries = family.counter("retries", "Requests retried, by reason", ("reason",))
        exceptions = family.counter("download_exceptions", "Download errors", ("exception",))
        by_class: dict[str, float] = dict.fromkeys(_STATUS_CLASSES, 0.0)
        by_reason = dict.fromkeys(ext.known.retry_reasons, 0.0)
        # two classes of one name (Twisted's TimeoutErrors) share their sample
        by_exception = dict.fromkeys(ext.known.exceptions, 0.0)
        for key, value in stats.items():
            if key.startswith("downloader/response_status_count/"):
                status_class = key.rsplit("/", 1)[1][:1] + "xx"
                by_class[status_class] = by_class.get(status_class, 0) + value
            elif key.startswith("retry/reason_count/"):
                reason = key.split("/", 2)[2]
                by_reason[reason] = by_reason.get(reason, 0) + value
            elif key.startswith("downloader/exception_type_count/"):
                name = key.split("/", 2)[2].rsplit(".", 1)[-1]
                by_exception[name] = by_exception.get(name, 0) + value
        for status_class, value in sorted(by_class.items()):
            responses.add_metric([*base, status_class], value)
        for reason, value in by_reason.items():
            retries.add_metric([*base, reason], value)
        for name, value in sorted(by_exception.items()):
            exceptions.add_metric([*base, name], value)
        yield from (responses, retries, exceptions)
        in_flight = family.gauge("requests_in_flight", "Requests in the downloader, unanswered")
        in_flight.add_metric(
            base,
            number("downloader/request_count")
            - number("downloader/response_count")
            - number("downloader/exception_count"),
        )
        queued = family.gauge("scheduler_queue_size", "Requests waiting in the scheduler")
        queued.add_metric(base, number("scheduler/enqueued") - number("scheduler/dequeued"))
        latency = family.histogram(
            "download_latency_seconds",
            "Download latency (Scrapy's download_latency: to the response headers)",
        )
        latency.add_metric(base, ext.latency.buckets(), ext.latency.sum)
        yield from (in_flight, queued, latency)

    def _ingest(self, family: _Families, stats: dict[str, Any]) -> Iterator[Any]:
        ext, base = self._extension, family.values
        runtime = ext._runtime
        where = ("backend", "table")
        rows = family.counter("ingest_rows_written", "Rows the database accepted", where)
        failed = family.counter(
            "ingest_rows_failed", "Rows not written: refused (dead-lettered) or given up", where
        )
        for (backend, table), (written, not_written) in sorted(
            runtime.counters.write_counts().items()
        ):
            rows.add_metric([*base, backend, table], written)
            failed.add_metric([*base, backend, table], not_written)
        flush = family.histogram(
            "ingest_flush_duration_seconds", "From handing a batch over to its answer", where
        )
        for (backend, table), histogram in sorted(dict(ext.flush).items()):
            flush.add_metric([*base, backend, table], histogram.buckets(), histogram.sum)
        buffered = family.gauge("ingest_buffered_bytes", "Bytes of rows buffered or in flight")
        buffered.add_metric(base, runtime.budget.used)
        dead = family.counter("ingest_dead_letters", "Records sent to dead letters", ("kind",))
        by_kind = dict.fromkeys(runtime.config.record_kinds(), 0)
        for key, value in stats.items():
            if key.startswith("ingest/") and key.endswith("/dead_letter"):
                by_kind[key.split("/")[1]] = value
        for kind, value in by_kind.items():
            dead.add_metric([*base, kind], value)
        healthy = family.gauge("healthy", "1 while /healthz answers 200, else 0")
        healthy.add_metric(base, 1.0 if ext.health()[0] else 0.0)
        spilled = family.counter(
            "ingest_spilled_batches", "Batches put in the spill journal (database unavailable)"
        )
        spilled.add_metric(base, stats.get("ingest/spill/batches", 0))
        replayed = family.counter(
            "ingest_replayed_batches", "Spilled batches replayed into their database"
        )
        replayed.add_metric(base, stats.get("ingest/spill/replayed_batches", 0))
        journal = family.gauge("ingest_spill_bytes", "Bytes in the spill journal, as last seen")
        journal.add_metric(base, stats.get("ingest/spill/bytes", 0))
        config = runtime.config
        buffer_max = family.gauge(
            "ingest_max_buffer_bytes", "INGEST_MAX_BUFFER_BYTES: the bound of buffered bytes"
        )
        buffer_max.add_metric(base, config.max_buffer_bytes)
        spill_max = family.gauge(
            "ingest_spill_max_bytes", "INGEST_SPILL_MAX_BYTES: the bound of the spill journal"
        )
        spill_max.add_metric(base, config.spill_max_bytes)
        finished = family.gauge(
            "finished", "1 once the spider has closed and its rows are written or spilled"
        )
        finished.add_metric(base, 1.0 if ext.finished else 0.0)
        yield from (rows, failed, flush, buffered, dead, healthy, spilled, replayed, journal)
        yield from (buffer_max, spill_max, finished)
        yield from self._proxies(family, stats)

    def _proxies(self, family: _Families, stats: dict[str, Any]) -> Iterator[Any]:
        """ProxyMiddleware's pool, when it runs (its per-proxy stats stay out: they name hosts)."""
        known = self._extension.known.proxy_bans
        if known is None:
            return
        base = family.values
        proxies = family.gauge("proxies", "Proxies of the pool, by state", ("state",))
        for state in ("good", "unchecked", "benched"):
            proxies.add_metric([*base, state], stats.get(f"ingest/proxy/state/{state}", 0))
        bans = family.counter("proxy_bans", "Bans and failures seen through proxies", ("reason",))
        by_reason = dict.fromkeys(known, 0)
        for key, value in stats.items():
            if key.startswith("ingest/proxy/bans/"):
                by_reason[key[len("ingest/proxy/bans/") :]] = value
        for reason, value in by_reason.items():
            bans.add_metric([*base, reason], value)
        yield from (proxies, bans)

    def _bridge(self, family: _Families, stats: dict[str, Any]) -> Iterator[Any]:
        bridge = family.gauge(
            "scrapy_stat", "Numeric Scrapy stats without a metric of their own", ("stat",)
        )
        for key, value in sorted(stats.items()):
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric and not _COVERED.match(key):
                bridge.add_metric([*family.values, key], float(value))
        yield bridge


class _Families:
    """Metric families with the crawl's labels (``spider`` and ``INGEST_METRICS_LABELS``)."""

    def __init__(self, names: list[str], values: list[str]) -> None:
        self.names = names
        self.values = values

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
        from prometheus_client.core import CounterMetricFamily

        return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=[*self.names, *labels])

    def gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=[*self.names, *labels])

    def histogram(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
        from prometheus_client.core import HistogramMetricFamily

        return HistogramMetricFamily(f"{PREFIX}_{name}", doc, labels=[*self.names, *labels])


def _numbers(stats: dict[str, Any]) -> Callable[[str], float]:
    def number(key: str) -> float:
        value = stats.get(key, 0)
        return float(value) if isinstance(value, (int, float)) else 0.0

    return number
