"""The demo bookshop (``examples/demo/site``), crawled by many workers from one Redis frontier."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scrapy_redis.spiders import RedisSpider

if TYPE_CHECKING:
    from collections.abc import Iterator

    from scrapy.http import Response


class BooksSpider(RedisSpider):
    """Reads its start URLs from the Redis list ``books:start_urls`` (run.py seeds it)."""

    name = "books"

    def parse(self, response: Response) -> Iterator[Any]:
        """Index and category pages: follow categories and books."""
        yield from response.follow_all(css="a.category-link", callback=self.parse)
        yield from response.follow_all(css="a.book-link", callback=self.parse_book)

    def parse_book(self, response: Response) -> Iterator[Any]:
        book = response.css("article.book")
        yield {
            "title": book.css("h1.title::text").get("").strip(),
            "price": book.css("p.price::text").get("").strip(),
            "url": response.url,
        }
        yield from response.follow_all(css="ul.related a.book-link", callback=self.parse_book)
