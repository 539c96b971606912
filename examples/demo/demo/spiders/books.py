"""Crawl the demo bookshop (``examples/demo/site``) and yield one item per book."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import scrapy

if TYPE_CHECKING:
    from collections.abc import Iterator

    from scrapy.http import Response

_PRICE_RE = re.compile(r"\d+(?:\.\d+)?")


class BooksSpider(scrapy.Spider):
    """Usage: ``scrapy crawl books -a base_url=http://127.0.0.1:8000/``."""

    name = "books"

    def __init__(self, base_url: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not base_url:
            # Fail at start with the fix, rather than crawl nothing.
            raise ValueError(
                "the books spider needs -a base_url=http://127.0.0.1:PORT/ "
                "(where examples/demo/site is served)"
            )
        self.start_urls = [base_url if base_url.endswith("/") else base_url + "/"]

    def parse(self, response: Response) -> Iterator[scrapy.Request]:
        """Index and category pages: follow categories and books."""
        yield from response.follow_all(_hrefs(response, "a.category-link"), callback=self.parse)
        yield from response.follow_all(_hrefs(response, "a.book-link"), callback=self.parse_book)

    def parse_book(self, response: Response) -> Iterator[dict[str, Any] | scrapy.Request]:
        book = response.css("article.book")
        yield {
            "title": book.css("h1.title::text").get("").strip(),
            "price": _price(book.css("p.price::text").get("")),
            "availability": book.css("p.availability::text").get("").strip(),
            "rating": int(book.css("p.rating::attr(data-rating)").get("0")),
            "url": response.url,
            "category": response.css("nav.breadcrumb a.category::text").get("").strip(),
            "tags": book.css("ul.tags li::text").getall(),
            "description": " ".join(book.css("div.description ::text").getall()).strip(),
        }
        # Related books are usually seen already; Scrapy's dupefilter drops repeats.
        related = _hrefs(response, "ul.related a.book-link")
        yield from response.follow_all(related, callback=self.parse_book)


def _hrefs(response: Response, css: str) -> list[str]:
    return response.css(f"{css}::attr(href)").getall()


def _price(text: str) -> float | None:
    match = _PRICE_RE.search(text.replace(",", ""))
    return float(match[0]) if match else None
