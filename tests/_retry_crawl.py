"""One crawl for the retry tests, in a process of its own.

    python tests/_retry_crawl.py '{"requests": [{"url": "http://127.0.0.1:8000/status/503"}]}'

Arguments (JSON object):

- ``requests``: the start requests, in order, each ``{"url": ..., "meta": {...},
  "priority": 0, "then": [<requests>]}``; ``then`` are requests the spider yields when this
  one's response (whatever its status) reaches it;
- ``settings``: extra Scrapy settings (the add-on is enabled, with ``INGEST_RETRY_ENABLED``
  and the request log off, unless they say otherwise);
- ``result``: the path of a JSON file that gets ``{"stats": ..., "seen": [[url, status],
  ...]}``, ``seen`` being the responses the spider got, in order.
"""

from __future__ import annotations

import json
import sys
from typing import Any, ClassVar

import scrapy

ASYNCIO_REACTOR = "twisted.internet.asyncioreactor.AsyncioSelectorReactor"


class RetrySpider(scrapy.Spider):
    name = "retry"
    custom_settings: ClassVar[dict[str, Any]] = {"HTTPERROR_ALLOW_ALL": True}

    def __init__(self, requests: list[dict[str, Any]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.planned = requests
        self.seen: list[tuple[str, int]] = []

    async def start(self) -> Any:
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

    # AsyncCrawlerProcess is new in Scrapy 2.14; on 2.13 CrawlerProcess runs the same reactor
    process = getattr(scrapy_crawler, "AsyncCrawlerProcess", CrawlerProcess)(settings)
    crawler = process.create_crawler(RetrySpider)
    process.crawl(crawler, requests=args["requests"])
    process.start()
    spider = crawler.spider
    result = {
        "stats": crawler.stats.get_stats() if crawler.stats else {},
        "seen": spider.seen if isinstance(spider, RetrySpider) else [],
    }
    with open(args["result"], "w", encoding="utf-8") as file:
        json.dump(result, file, default=str)
    return 1 if process.bootstrap_failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
