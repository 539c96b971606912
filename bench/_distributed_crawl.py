"""One worker of bench/distributed.py: a RedisSpider crawling bench/_site.py into PostgreSQL.

Usage: python bench/_distributed_crawl.py REDIS_URL PREFIX DATABASE_URL CONCURRENCY

Reads its start URL from ``<PREFIX>:pages:start_urls``, shares the queue and dupefilter under
``<PREFIX>:pages:...`` with the other workers, yields one item per page (title, price), and
closes once the shared queue has been empty, with nothing leased, for 2 seconds.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from scrapy.crawler import CrawlerProcess
from scrapy_redis.spiders import RedisSpider

if TYPE_CHECKING:
    from collections.abc import Iterator

    from scrapy.http import Response


class PagesSpider(RedisSpider):
    name = "pages"

    def parse(self, response: Response) -> Iterator[Any]:
        yield {
            "title": response.css("h1::text").get(),
            "price": response.css("span.price::text").get(),
            "url": response.url,
        }
        yield from response.follow_all(css="a.next", callback=self.parse)


def main() -> None:
    redis_url, prefix, database_url, concurrency = sys.argv[1:5]
    process = CrawlerProcess(
        {
            "ADDONS": {"scrapy_ingest.IngestAddon": 300},
            "INGEST_DATABASE_URL": database_url,
            "SCHEDULER": "scrapy_redis.scheduler.Scheduler",
            "DUPEFILTER_CLASS": "scrapy_redis.dupefilter.RFPDupeFilter",
            "SCHEDULER_PERSIST": True,
            "REDIS_URL": redis_url,
            "SCHEDULER_QUEUE_KEY": f"{prefix}:%(spider)s:requests",
            "SCHEDULER_DUPEFILTER_KEY": f"{prefix}:%(spider)s:dupefilter",
            "REDIS_START_URLS_KEY": f"{prefix}:%(name)s:start_urls",
            "MAX_IDLE_TIME_BEFORE_CLOSE": 2,
            "CONCURRENT_REQUESTS": int(concurrency),
            "CONCURRENT_REQUESTS_PER_DOMAIN": int(concurrency),
            "LOG_LEVEL": "WARNING",
            "TELNETCONSOLE_ENABLED": False,
        }
    )
    process.crawl(PagesSpider)
    process.start()


if __name__ == "__main__":
    main()
