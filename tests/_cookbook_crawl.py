"""The crawl whose tables the SQL of the docs is run on (tests/test_cookbook.py).

``python _cookbook_crawl.py '{"base_url": ..., "settings": {...}, "result": path}'`` crawls the
test site with a spider named ``books``, as the docs' examples are, whose items have the demo's
fields (``title``, ``price``, ``category``, ``tags``). The crawl meets what the docs query: a
tree of pages, a redirect, a 404, a 500 retried twice by Scrapy's ``RetryMiddleware``, a
warning and an error of the spider, and an item that goes to the dead-letter table.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import scrapy
from scrapy.crawler import CrawlerProcess

ASYNCIO_REACTOR = "twisted.internet.asyncioreactor.AsyncioSelectorReactor"
CATEGORIES = ("History", "Fiction", "Science")


class Unstorable:
    """A value with no stored form: its item goes to the dead-letter table."""

    def __repr__(self) -> str:
        return "<Unstorable>"


class BooksSpider(scrapy.Spider):
    name = "books"

    def __init__(self, base_url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.base_url = base_url

    async def start(self) -> Any:
        for path in (
            "/page/0?total=6&fanout=2",
            "/redirect?to=/page/9%3Ftotal%3D6",
            "/status/404",
            "/status/500",
        ):
            yield scrapy.Request(self.base_url + path)

    def parse(self, response: scrapy.http.Response) -> Any:
        page = int(response.url.split("/page/")[1].split("?")[0])
        yield {
            "title": f"Book {page}",
            "price": 12.5 + page,
            "category": CATEGORIES[page % len(CATEGORIES)],
            "tags": ["empire", f"tag{page % 2}"],
            "url": response.url,
        }
        if page == 0:
            self.logger.warning("A warning of the books spider")
            self.logger.error("An error of the books spider")
            yield {"title": "Unstorable", "price": Unstorable()}
        yield from response.follow_all(css="a", callback=self.parse)


def main(argv: list[str]) -> int:
    args = json.loads(argv[1])
    settings: dict[str, Any] = {
        "ADDONS": {"scrapy_ingest.IngestAddon": 300},
        "TELNETCONSOLE_ENABLED": False,
        "LOG_LEVEL": "INFO",
        "TWISTED_REACTOR": ASYNCIO_REACTOR,
        **args["settings"],
    }
    process = CrawlerProcess(settings)
    crawler = process.create_crawler(BooksSpider)
    process.crawl(crawler, base_url=args["base_url"])
    process.start()
    with open(args["result"], "w", encoding="utf-8") as file:
        json.dump({"stats": crawler.stats.get_stats()}, file, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
