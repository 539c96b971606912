"""One crawl of the bench site, in its own process, for bench/pages.py.

Usage: python bench/_pages_crawl.py MODE BASE_URL PAGES [DATABASE_URL]

MODE is ``none`` (no ingestion) or ``ingest`` (the add-on: items, requests
and logs into DATABASE_URL). Both crawls have the same settings otherwise:
``CONCURRENT_REQUESTS = 32``, ``LOG_LEVEL = "INFO"``. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time

import scrapy
from scrapy.crawler import CrawlerProcess


class PagesSpider(scrapy.Spider):
    """Follows the site's links from /page/0; one item per page."""

    name = "bench_pages"

    def __init__(self, base_url: str, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.start_urls = [f"{base_url}/page/0"]

    def parse(self, response: scrapy.http.Response) -> object:
        yield {
            "url": response.url,
            "title": response.css("h1::text").get(),
            "price": float(response.css(".price::text").get("0")),
            "links": len(response.css("a.next")),
        }
        yield from response.follow_all(css="a.next")


#: the crawl's settings in every mode (bench/retry.py's too)
SETTINGS: dict[str, object] = {
    "CONCURRENT_REQUESTS": 32,
    "CONCURRENT_REQUESTS_PER_DOMAIN": 32,
    "LOG_LEVEL": "INFO",
    "LOGSTATS_INTERVAL": 0,
    "TELNETCONSOLE_ENABLED": False,
    "ROBOTSTXT_OBEY": False,
}


def main() -> None:
    mode, base_url, pages = sys.argv[1], sys.argv[2], int(sys.argv[3])
    settings: dict[str, object] = dict(SETTINGS)
    if mode == "ingest":
        settings["ADDONS"] = {"scrapy_ingest.IngestAddon": 300}
        settings["INGEST_DATABASE_URL"] = sys.argv[4]
    elif mode != "none":
        sys.exit(f"unknown mode {mode!r}")
    process = CrawlerProcess(settings=settings)
    crawler = process.create_crawler(PagesSpider)
    process.crawl(crawler, base_url=base_url)
    started = time.perf_counter()
    process.start()
    wall = time.perf_counter() - started
    stats = crawler.stats.get_stats()
    elapsed = stats["elapsed_time_seconds"]
    fetched = stats.get("response_received_count", 0)
    print(
        json.dumps(
            {
                "mode": mode,
                "pages": fetched,
                "items": stats.get("item_scraped_count", 0),
                "items_stored": stats.get("ingest/items/stored"),
                "requests_stored": stats.get("ingest/requests/stored"),
                "logs_stored": stats.get("ingest/logs/stored"),
                "elapsed": round(elapsed, 3),
                "pages_per_s": round(fetched / elapsed, 1),
                "wall": round(wall, 3),
                "expected": pages,
            }
        )
    )


if __name__ == "__main__":
    main()
