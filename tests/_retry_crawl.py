"""One crawl for the retry tests, in a process of its own.

    python tests/_retry_crawl.py '{"requests": [{"url": "http://127.0.0.1:8000/status/503"}]}'

Arguments (JSON object):

- ``requests``: the start requests, in order, each ``{"url": ..., "meta": {...},
  "priority": 0, "then": [<requests>]}``; ``then`` are requests the spider yields when this
  one's response (whatever its status) reaches it;
- ``settings``: extra Scrapy settings (the add-on is enabled, with ``INGEST_RETRY_ENABLED``
  and the request log off, unless they say otherwise);
- ``instance``: attributes to set on the retry middleware instance that
  ``crawler.get_downloader_middleware(RetryMiddleware)`` finds when the spider starts
  (``{"max_retry_times": 0}``);
- ``result``: the path of a JSON file that gets ``{"stats": ..., "seen": [[url, status],
  ...], "retry_middleware": ..., "cpu": ...}``, ``seen`` being the responses the spider got,
  in order, ``retry_middleware`` the import path of the class that
  ``get_downloader_middleware(RetryMiddleware)`` found (or None), and ``cpu`` the CPU seconds
  (user and system, all threads) the process spent from ``spider_opened`` to ``spider_closed``.
"""

from __future__ import annotations

import json
import resource
import sys
from typing import Any, ClassVar

import scrapy
from scrapy import signals
from scrapy.downloadermiddlewares.retry import RetryMiddleware
from scrapy.utils.python import global_object_name

ASYNCIO_REACTOR = "twisted.internet.asyncioreactor.AsyncioSelectorReactor"


class RetrySpider(scrapy.Spider):
    name = "retry"
    custom_settings: ClassVar[dict[str, Any]] = {"HTTPERROR_ALLOW_ALL": True}

    def __init__(
        self, requests: list[dict[str, Any]], instance: dict[str, Any], **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.planned = requests
        self.instance = instance
        self.seen: list[tuple[str, int]] = []
        self.retry_middleware: str | None = None
        self.cpu = 0.0

    @classmethod
    def from_crawler(cls, crawler: Any, *args: Any, **kwargs: Any) -> RetrySpider:
        spider = super().from_crawler(crawler, *args, **kwargs)
        crawler.signals.connect(spider.on_opened, signal=signals.spider_opened)
        crawler.signals.connect(spider.on_closed, signal=signals.spider_closed)
        return spider  # type: ignore[no-any-return]

    def on_opened(self) -> None:
        self.cpu = -_cpu_seconds()

    def on_closed(self) -> None:
        self.cpu += _cpu_seconds()

    async def start(self) -> Any:
        middleware = self.crawler.get_downloader_middleware(RetryMiddleware)
        if middleware is not None:
            self.retry_middleware = global_object_name(type(middleware))
            for name, value in self.instance.items():
                setattr(middleware, name, value)
        for spec in self.planned:
            yield self._request(spec)

    def _request(self, spec: dict[str, Any]) -> scrapy.Request:
        return scrapy.Request(
            spec["url"],
            callback=self.parse,
            errback=self.failed,
            meta={**spec.get("meta", {}), "then": spec.get("then", [])},
            priority=spec.get("priority", 0),
            dont_filter=True,
        )

    def parse(self, response: scrapy.http.Response) -> Any:
        self.seen.append((response.url, response.status))
        for spec in response.meta["then"]:
            yield self._request(spec)

    def failed(self, failure: Any) -> None:
        self.seen.append((failure.request.url, 0))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str]) -> int:
    args = json.loads(argv[1])
    settings: dict[str, Any] = {
        "ADDONS": {"scrapy_ingest.IngestAddon": 300},
        "INGEST_RETRY_ENABLED": True,
        "INGEST_REQUESTS_ENABLED": False,
        "INGEST_DATABASE_URL": "sqlite:///ingest.sqlite3",
        "TELNETCONSOLE_ENABLED": False,
        "ROBOTSTXT_OBEY": False,
        "LOG_LEVEL": "DEBUG",
        "TWISTED_REACTOR": ASYNCIO_REACTOR,
        **args.get("settings", {}),
    }
    from scrapy import crawler as scrapy_crawler
    from scrapy.crawler import CrawlerProcess

    # AsyncCrawlerProcess is new in Scrapy 2.14 (and needs the asyncio reactor); on 2.13, and
    # for another reactor, CrawlerProcess runs the reactor TWISTED_REACTOR names
    process_class = CrawlerProcess
    if settings["TWISTED_REACTOR"] == ASYNCIO_REACTOR:
        process_class = getattr(scrapy_crawler, "AsyncCrawlerProcess", CrawlerProcess)
    process = process_class(settings)
    crawler = process.create_crawler(RetrySpider)
    process.crawl(crawler, requests=args["requests"], instance=args.get("instance", {}))
    process.start()
    spider = crawler.spider
    result = {
        "stats": crawler.stats.get_stats() if crawler.stats else {},
        "seen": spider.seen if isinstance(spider, RetrySpider) else [],
        "retry_middleware": spider.retry_middleware if isinstance(spider, RetrySpider) else None,
        "cpu": spider.cpu if isinstance(spider, RetrySpider) else None,
    }
    with open(args["result"], "w", encoding="utf-8") as file:
        json.dump(result, file, default=str)
    return 1 if process.bootstrap_failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
