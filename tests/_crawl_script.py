"""One real crawl, in a process of its own, for the crawl tests.

    python tests/_crawl_script.py '{"base_url": "http://127.0.0.1:8000", "pages": 2, ...}'

A fresh process per crawl is what users run (``scrapy crawl``), and it is the only way to
choose the Twisted reactor per test. Like ``scrapy crawl``, it uses AsyncCrawlerProcess for
the asyncio reactor and CrawlerProcess otherwise, and exits with 1 when the crawl failed to
start (``bootstrap_failed``). When ``result`` names a file, the crawl's final stats, the
installed reactor and ``bootstrap_failed`` are written there as JSON.

Arguments (JSON object, all optional except ``base_url``):

- ``reactor``: ``"asyncio"`` (AsyncioSelectorReactor, Scrapy's default), ``"default"``
  (``TWISTED_REACTOR = None``: Twisted's own default reactor, epoll on Linux), ``"none"``
  (``TWISTED_REACTOR_ENABLED = False``, Scrapy 2.15+: no reactor, AsyncCrawlerProcess) or
  ``"none-runner"`` (the same, with AsyncCrawlerRunner under ``asyncio.run()``);
- ``settings``: extra Scrapy settings (``INGEST_*`` ...); the add-on is always enabled unless
  ``ADDONS`` is given;
- ``pages``, ``per_page``: the spider fetches ``pages`` pages and yields ``per_page`` items
  from each, item ``idx`` = ``page * per_page + i``, ``title`` = ``item-<idx:05d>``;
- ``delay_ms``: fetch ``/delay?ms=...`` pages instead of ``/items`` (a slow crawl);
- ``kind``: item type, one of ``ITEM_KINDS``, or ``"mixed"`` (``Product`` and dict in turn),
  or ``"str"`` (not an item: the title, a str);
- ``size``: bytes of padding per item;
- ``awkward``: put ``AWKWARD[k]`` into the ``extra`` field of item ``idx = k * 50 + 7``;
- ``poison``: idx values of items that get a ``poison`` key;
- ``spider``: ``"items"`` (the default, the spider above), ``"tree"`` (``TreeSpider``, for
  the request and log tests, with ``refused_url``, ``tls_url``, ``headers`` and ``proxy`` as its
  arguments) or ``"playwright"`` (``PlaywrightTreeSpider``: scrapy-playwright, Debian's
  Chromium);
- ``spider`` ``"catalog"``: ``CatalogSpider``, which crawls ``/catalog?n=<catalog_size>``
  and yields one ``CatalogProduct`` per product page (the data-quality tests);
- ``twins``: with ``"tree"``, run two TreeSpider crawlers (``tree_a``, ``tree_b``) in this one
  process, with ``twin_settings`` (a list of two dicts) added to each one's settings;
- ``spider_args``: keyword arguments for the spider (``_job`` ...);
- ``result``: path of the JSON result file.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import math
import os
import sys
import time
import uuid
from collections import deque
from decimal import Decimal
from pathlib import PurePosixPath
from typing import Any, ClassVar
from urllib.parse import urlencode

import attrs
import scrapy

from scrapy_ingest import IngestPipeline

ASYNCIO_REACTOR = "twisted.internet.asyncioreactor.AsyncioSelectorReactor"
AWKWARD_EVERY = 50
AWKWARD_OFFSET = 7


class ReplaceItemPipeline:
    """A project pipeline that returns a new object for each item (as many do)."""

    def process_item(self, item: Any, spider: Any = None) -> Any:
        return dict(item)


class DropOddItemsPipeline:
    """A project pipeline that drops the items of odd ``idx`` and marks the others."""

    def process_item(self, item: Any, spider: Any = None) -> Any:
        if item["idx"] % 2:
            raise scrapy.exceptions.DropItem("odd")
        item["kept_by"] = "DropOddItemsPipeline"
        return item


class ReturnsNothingPipeline:
    """A project pipeline that forgets ``return item``: every value after it is None."""

    def process_item(self, item: Any, spider: Any = None) -> None:
        item["seen"] = True


class StampingIngestPipeline(IngestPipeline):
    """A project's subclass of IngestPipeline, whose own process_item adds a field."""

    async def process_item(self, item: Any, spider: Any = None) -> Any:
        item["stamped_by"] = "StampingIngestPipeline"
        return await super().process_item(item, spider)


class AckedItemsPipeline:
    """After ours: writes the ``idx`` of each item the pipelines before it returned for, to the
    file ``TEST_ACKED_FILE``, each line fsync'd (what a SIGKILL must not lose)."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed at close)

    @classmethod
    def from_crawler(cls, crawler: Any) -> AckedItemsPipeline:
        return cls(crawler.settings["TEST_ACKED_FILE"])

    def process_item(self, item: Any, spider: Any = None) -> Any:
        self._file.write(f"{item['idx']}\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        return item

    def close_spider(self, spider: Any = None) -> None:
        self._file.close()


class CountingPipeline:
    """Before ours: writes the time (``time.monotonic()``, one clock for every process of the
    machine) at which each item was yielded into the pipelines, one line per item, to the file
    ``TEST_YIELDED_FILE`` (buffered: read it once the crawl has ended)."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "w", encoding="ascii")  # noqa: SIM115 (closed at close)

    @classmethod
    def from_crawler(cls, crawler: Any) -> CountingPipeline:
        return cls(crawler.settings["TEST_YIELDED_FILE"])

    def process_item(self, item: Any, spider: Any = None) -> Any:
        self._file.write(f"{time.monotonic():.4f}\n")
        return item

    def close_spider(self, spider: Any = None) -> None:
        self._file.close()


class PauseRecorder:
    """An extension: looks at ``crawler.engine.paused`` every 50 ms from ``engine_started``
    and appends each change to the file ``TEST_PAUSES_FILE``, as ``<time.monotonic()>
    paused`` or ``<time.monotonic()> running``, a line each, flushed: a test reads it while
    the crawl runs (see :func:`_helpers.engine_pauses`)."""

    INTERVAL = 0.05

    def __init__(self, crawler: Any) -> None:
        from scrapy import signals

        self._crawler = crawler
        path = crawler.settings["TEST_PAUSES_FILE"]
        self._file = open(path, "a", encoding="ascii")  # noqa: SIM115 (closed at engine_stopped)
        self._paused = False
        self._loop: Any = None
        self._task: Any = None
        crawler.signals.connect(self._start, signal=signals.engine_started)
        crawler.signals.connect(self._stop, signal=signals.engine_stopped)

    @classmethod
    def from_crawler(cls, crawler: Any) -> PauseRecorder:
        return cls(crawler)

    def _look(self) -> None:
        engine = self._crawler.engine
        paused = bool(engine is not None and engine.paused)
        if paused != self._paused:
            self._paused = paused
            self._file.write(f"{time.monotonic():.4f} {'paused' if paused else 'running'}\n")
            self._file.flush()

    def _start(self) -> None:
        if "twisted.internet.reactor" in sys.modules:
            from twisted.internet.task import LoopingCall

            self._loop = LoopingCall(self._look)
            self._loop.start(self.INTERVAL)
        else:  # no reactor (TWISTED_REACTOR_ENABLED = False)
            import asyncio

            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        import asyncio

        while True:
            self._look()
            await asyncio.sleep(self.INTERVAL)

    def _stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._task is not None:
            self._task.cancel()
        self._file.close()


class Product(scrapy.Item):
    title = scrapy.Field()
    idx = scrapy.Field()
    page_url = scrapy.Field()
    price = scrapy.Field()
    pad = scrapy.Field()
    extra = scrapy.Field()
    poison = scrapy.Field()


@dataclasses.dataclass
class DataclassProduct:
    title: str
    idx: int
    page_url: str
    price: float
    pad: str = ""


@attrs.define
class AttrsProduct:
    title: str
    idx: int
    page_url: str
    price: float
    pad: str = ""


@dataclasses.dataclass
class Inner:
    name: str
    price: Decimal


@attrs.define
class AttrsInner:
    name: str
    when: dt.datetime


class Color(enum.Enum):
    RED = "red"


class Unstorable:
    """An arbitrary object, with no stored form."""

    def __repr__(self) -> str:
        return "<Unstorable>"


@dataclasses.dataclass(frozen=True)
class Refused:
    """The record must go to the dead-letter table, with ``reason`` in its reason."""

    reason: str


def _self_containing() -> dict[str, Any]:
    loop: dict[str, Any] = {"name": "loop"}
    loop["self"] = loop
    return loop


PLUS_2 = dt.timezone(dt.timedelta(hours=2))
MEGABYTE_STRING = "x" * 1_000_000

#: (name, make the value, its stored JSON form or Refused): 40 awkward values
AWKWARD: list[tuple[str, Any, Any]] = [
    (
        "aware-datetime",
        lambda: dt.datetime(2024, 5, 1, 14, tzinfo=PLUS_2),
        "2024-05-01T12:00:00+00:00",
    ),
    ("naive-datetime", lambda: dt.datetime(2024, 5, 1, 12), "2024-05-01T12:00:00+00:00"),
    ("date", lambda: dt.date(2024, 5, 1), "2024-05-01"),
    ("time", lambda: dt.time(12, 30, tzinfo=PLUS_2), "12:30:00+02:00"),
    ("timedelta", lambda: dt.timedelta(minutes=1, seconds=30), 90.0),
    ("decimal", lambda: Decimal("19.99"), "19.99"),
    ("decimal-nan", lambda: Decimal("NaN"), "NaN"),
    ("decimal-minus-infinity", lambda: Decimal("-Infinity"), "-Infinity"),
    ("bytes", lambda: b"\x00\xff", "AP8="),
    ("bytearray", lambda: bytearray(b"ab"), "YWI="),
    ("set", lambda: {3, 1, 2}, [1, 2, 3]),
    ("frozenset", lambda: frozenset({"b", "a"}), ["a", "b"]),
    ("tuple", lambda: (1, "two", None), [1, "two", None]),
    ("nested-tuple", lambda: ((1, 2), (3,)), [[1, 2], [3]]),
    ("nan", lambda: math.nan, None),
    ("infinity", lambda: math.inf, None),
    ("minus-infinity", lambda: -math.inf, None),
    ("nan-inside", lambda: {"a": math.nan, "b": [math.inf]}, {"a": None, "b": [None]}),
    ("nul", lambda: "nul\x00inside", "nul\ufffdinside"),
    ("only-nul", lambda: "\x00\x00\x00", "\ufffd\ufffd\ufffd"),
    ("lone-high-surrogate", lambda: "lone \ud800 high", "lone \ufffd high"),
    ("lone-low-surrogate", lambda: "\udfff", "\ufffd"),
    ("int-beyond-64-bits", lambda: 2**64, "18446744073709551616"),
    ("negative-int-beyond-64-bits", lambda: -(2**70), "-1180591620717411303424"),
    ("big-int-and-nul", lambda: [2**100, "\x00"], ["1267650600228229401496703205376", "\ufffd"]),
    ("megabyte-string", lambda: MEGABYTE_STRING, MEGABYTE_STRING),
    (
        "nested-scrapy-item",
        lambda: Product(title="inner", price=Decimal("1.5")),
        {"title": "inner", "price": "1.5"},
    ),
    ("nested-dataclass", lambda: Inner("inner", Decimal("2.5")), {"name": "inner", "price": "2.5"}),
    (
        "nested-attrs",
        lambda: AttrsInner("inner", dt.datetime(2024, 5, 1, 12)),
        {"name": "inner", "when": "2024-05-01T12:00:00+00:00"},
    ),
    ("enum", lambda: Color.RED, "red"),
    ("path", lambda: PurePosixPath("/data/x.html"), "/data/x.html"),
    ("uuid", lambda: uuid.UUID(int=7), "00000000-0000-0000-0000-000000000007"),
    ("non-str-keys", lambda: {1: "a", None: "b"}, {"1": "a", "None": "b"}),
    ("deque", lambda: deque([1, 2]), [1, 2]),
    (
        "mixed",
        lambda: {"when": dt.datetime(2024, 5, 1, 12), "amounts": {Decimal("1")}},
        {"when": "2024-05-01T12:00:00+00:00", "amounts": ["1"]},
    ),
    ("arbitrary-object", Unstorable, Refused("Unstorable")),
    ("plain-object", object, Refused("object")),
    ("complex", lambda: complex(1, 2), Refused("complex")),
    ("object-in-list", lambda: [1, Unstorable()], Refused("Unstorable")),
    ("self-containing", _self_containing, Refused("contains itself")),
]
assert len(AWKWARD) == 40


def awkward_index(idx: int) -> int | None:
    """The AWKWARD entry item ``idx`` carries in an awkward crawl, if any."""
    if idx % AWKWARD_EVERY != AWKWARD_OFFSET:
        return None
    k = idx // AWKWARD_EVERY
    return k if k < len(AWKWARD) else None


def title(idx: int) -> str:
    return f"item-{idx:05d}"


class ProductRouter:
    """An INGEST_ROUTER: ``Product`` items to the ``products`` table of ``TEST_PRODUCTS_URL``."""

    def __init__(self, url: str) -> None:
        self.url = url

    @classmethod
    def from_crawler(cls, crawler: Any) -> ProductRouter:
        return cls(crawler.settings["TEST_PRODUCTS_URL"])

    def route(self, kind: str, record: Any) -> Any:
        from scrapy_ingest.router import Route

        # by name: this module runs as __main__, and is imported again as _crawl_script
        if kind == "items" and type(record).__name__ == "Product":
            return Route(self.url, table="products")
        return None


ITEM_KINDS = {
    "dict": "dict",
    "scrapy.Item": "Product",
    "dataclass": "DataclassProduct",
    "attrs": "AttrsProduct",
}


def make_item(kind: str, idx: int, page_url: str, pad: str, extra: dict[str, Any]) -> Any:
    fields = {"title": title(idx), "idx": idx, "page_url": page_url, "price": idx + 0.5, "pad": pad}
    if kind == "mixed":  # even items are Products, odd ones dicts
        kind = "scrapy.Item" if idx % 2 == 0 else "dict"
    if kind == "dict":
        return {**fields, **extra}
    if kind == "str":  # not an item: what a spider that yields the wrong thing sends
        return title(idx)
    if kind == "scrapy.Item":
        return Product(**fields, **extra)
    if extra:
        raise ValueError(f"{kind} items take no extra fields")
    if kind == "dataclass":
        return DataclassProduct(**fields)
    if kind == "attrs":
        return AttrsProduct(**fields)
    raise ValueError(f"unknown item kind {kind!r}")


class IngestTestSpider(scrapy.Spider):
    name = "ingest_test"

    def __init__(
        self,
        base_url: str,
        *,
        pages: int = 1,
        per_page: int = 10,
        kind: str = "dict",
        size: int = 0,
        delay_ms: int = 0,
        awkward: bool = False,
        poison: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.base_url = base_url
        self.pages = pages
        self.per_page = per_page
        self.kind = kind
        self.pad = "p" * size
        self.delay_ms = delay_ms
        self.awkward = awkward
        self.poison = set(poison or ())

    async def start(self) -> Any:
        for page in range(self.pages):
            if self.delay_ms:
                path = f"/delay?ms={self.delay_ms}&page={page}"
            else:
                path = f"/items?n={self.per_page}&page={page}"
            yield scrapy.Request(self.base_url + path, cb_kwargs={"page": page})

    def parse(self, response: scrapy.http.Response, page: int) -> Any:
        for i in range(self.per_page):
            idx = page * self.per_page + i
            extra: dict[str, Any] = {}
            k = awkward_index(idx) if self.awkward else None
            if k is not None:
                extra["extra"] = AWKWARD[k][1]()
            if idx in self.poison:
                extra["poison"] = True
            yield make_item(self.kind, idx, response.url, self.pad, extra)


class CatalogProduct(scrapy.Item):
    sku = scrapy.Field()
    name = scrapy.Field()
    price = scrapy.Field()
    url = scrapy.Field()
    #: when the page was parsed: differs on every crawl (leave it out of the content hash)
    seen_at = scrapy.Field()


class CatalogSpider(scrapy.Spider):
    """The catalog of the test site: one ``CatalogProduct`` per product page."""

    name = "catalog"

    def __init__(self, base_url: str, catalog_size: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.base_url = base_url
        self.catalog_size = catalog_size

    async def start(self) -> Any:
        yield scrapy.Request(f"{self.base_url}/catalog?n={self.catalog_size}")

    def parse(self, response: scrapy.http.Response) -> Any:
        yield from response.follow_all(css="a", callback=self.parse_product)

    def parse_product(self, response: scrapy.http.Response) -> Any:
        yield CatalogProduct(
            sku=response.css(".sku::text").get(),
            name=response.css("h1::text").get(),
            price=response.css(".price::text").get(),
            url=response.url,
            seen_at=dt.datetime.now(dt.timezone.utc).isoformat(),
        )


class TreeSpider(scrapy.Spider):
    """Crawl the site's ``/tree``: follow every link, warn once per page, fail on page 3.

    Yields one item per page. ``headers`` are sent with every request, through ``proxy`` when
    given (the redaction test plants an ``Authorization`` header and a proxy password there).
    ``query`` is added to the first URL's query, and ``userinfo`` (``user:password``) to its
    authority: the URL secrets test plants secrets there; the items then hold the page's path
    alone (what a spider stores in its own fields is its own to clean).
    """

    name = "tree"
    custom_settings: ClassVar[dict[str, Any]] = {"DOWNLOAD_TIMEOUT": 1}

    def __init__(
        self,
        base_url: str,
        *,
        refused_url: str | None = None,
        tls_url: str | None = None,
        headers: dict[str, str] | None = None,
        proxy: str | None = None,
        query: str | None = None,
        userinfo: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.base_url = base_url.replace("://", f"://{userinfo}@") if userinfo else base_url
        self.query = query
        self.refused_url = refused_url
        self.tls_url = tls_url
        self.headers = headers or {}
        self.meta = {"proxy": proxy} if proxy else {}

    async def start(self) -> Any:
        links = {"refused": self.refused_url, "tls": self.tls_url}
        query = urlencode({name: url for name, url in links.items() if url})
        query = "&".join(filter(None, [query, self.query]))
        query = f"?{query}" if query else ""
        yield scrapy.Request(f"{self.base_url}/tree{query}", headers=self.headers, meta=self.meta)

    def parse(self, response: scrapy.http.Response) -> Any:
        if "/page/3?" in response.url:
            raise ValueError(f"boom on {response.url}")
        self.logger.warning("tree page %s", response.url)
        if self.query and "/tree?" in response.url:  # a stat that holds a URL, as some keep
            self.crawler.stats.set_value("tree/start_url", response.url)
        yield {"page": response.url.split("?")[0] if self.query else response.url}
        for href in response.css("a::attr(href)").getall():
            yield response.follow(href, headers=self.headers, meta=self.meta)


#: scrapy-playwright with Debian's Chromium (`playwright install` cannot download one here)
PLAYWRIGHT_SETTINGS: dict[str, Any] = {
    "DOWNLOAD_HANDLERS": {
        "http": "scrapy_playwright.handler.ScrapyPlaywrightDownloadHandler",
        "https": "scrapy_playwright.handler.ScrapyPlaywrightDownloadHandler",
    },
    "PLAYWRIGHT_BROWSER_TYPE": "chromium",
    "PLAYWRIGHT_LAUNCH_OPTIONS": {
        "executable_path": "/usr/bin/chromium",
        "headless": True,
        "args": ["--no-sandbox"],
    },
}


class PlaywrightTreeSpider(scrapy.Spider):
    """Fetch ``/page/0?total=3&fanout=2`` through scrapy-playwright (Chromium), its links
    without it."""

    name = "playwright_tree"
    custom_settings: ClassVar[dict[str, Any]] = PLAYWRIGHT_SETTINGS

    def __init__(self, base_url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.base_url = base_url

    async def start(self) -> Any:
        url = f"{self.base_url}/page/0?total=3&fanout=2"
        yield scrapy.Request(url, meta={"playwright": True})

    def parse(self, response: scrapy.http.Response) -> Any:
        yield {"page": response.url, "title": response.css("h1::text").get()}
        for href in response.css("a::attr(href)").getall():
            yield response.follow(href)


#: text that breaks SQL built by string formatting: quotes, ";", "$$" (PostgreSQL's dollar
#: quoting), a comment, NUL, a newline and a backslash
HOSTILE = 'it\'s "quoted"; DROP TABLE ingest_items; -- $$ $tag$ \x00 nul\nnew line \\ slash'
HOSTILE_NAME = "spider'; DROP TABLE ingest_jobs; --$$"
HOSTILE_TYPE = 'Item"; DELETE FROM ingest_items; --$$'
MEGABYTE = 1024 * 1024

#: an item class with a hostile name (item_type is the class name)
HostileItem = type(HOSTILE_TYPE, (dict,), {})


class HostileSpider(scrapy.Spider):
    """One page whose URL, log records and two items (one with a megabyte of text) carry
    :data:`HOSTILE`; the spider's name and item class name are hostile too."""

    name = HOSTILE_NAME

    def __init__(self, base_url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.base_url = base_url

    async def start(self) -> Any:
        yield scrapy.Request(f"{self.base_url}/items?n=1&q=%27%3B%24%24")

    def parse(self, response: scrapy.http.Response) -> Any:
        self.logger.warning(HOSTILE)
        self.logger.warning("big: %s", "m" * MEGABYTE)
        yield HostileItem(text=HOSTILE, **{HOSTILE: "a key too"})
        yield HostileItem(text=HOSTILE, big="b" * MEGABYTE, **{HOSTILE: "a key too"})


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, (dt.datetime, dt.date)) else str(value)


class _RunnerProcess:
    """AsyncCrawlerRunner under ``asyncio.run()``, with the few methods main() uses of a
    CrawlerProcess."""

    def __init__(self, runner: Any) -> None:
        self._runner = runner
        self.bootstrap_failed = False
        self._crawls: list[tuple[Any, dict[str, Any]]] = []

    def create_crawler(self, spider_cls: Any) -> Any:
        return self._runner.create_crawler(spider_cls)

    def crawl(self, crawler: Any, **kwargs: Any) -> None:
        self._crawls.append((crawler, kwargs))

    def start(self) -> None:
        import asyncio

        async def run() -> None:
            await asyncio.gather(*(self._runner.crawl(c, **kw) for c, kw in self._crawls))

        asyncio.run(run())
        self.bootstrap_failed = self._runner.bootstrap_failed


def _process(reactor: str, settings: dict[str, Any]) -> Any:
    """The crawler process for *reactor* (see the module's docstring)."""
    from scrapy import crawler as scrapy_crawler
    from scrapy.crawler import CrawlerProcess

    # AsyncCrawlerProcess is new in Scrapy 2.14; on 2.13 CrawlerProcess runs the same reactor
    async_process = getattr(scrapy_crawler, "AsyncCrawlerProcess", CrawlerProcess)
    if reactor == "asyncio":
        settings["TWISTED_REACTOR"] = ASYNCIO_REACTOR
        return async_process(settings)
    if reactor == "default":
        settings["TWISTED_REACTOR"] = None
        return CrawlerProcess(settings)
    if reactor in ("none", "none-runner"):
        settings["TWISTED_REACTOR_ENABLED"] = False
        if reactor == "none":
            return scrapy_crawler.AsyncCrawlerProcess(settings)
        return _RunnerProcess(scrapy_crawler.AsyncCrawlerRunner(settings))
    raise ValueError(f"unknown reactor {reactor!r}")


def main(argv: list[str]) -> int:
    args = json.loads(argv[1])
    reactor = args.get("reactor", "asyncio")
    settings: dict[str, Any] = {
        "ADDONS": {"scrapy_ingest.IngestAddon": 300},
        "TELNETCONSOLE_ENABLED": False,
        "LOG_LEVEL": "INFO",
        "CONCURRENT_REQUESTS": 8,
        **args.get("settings", {}),
    }
    process = _process(reactor, settings)
    crawlers = []
    if args.get("spider") == "playwright":
        crawler = process.create_crawler(PlaywrightTreeSpider)
        process.crawl(crawler, base_url=args["base_url"])
        crawlers.append(crawler)
    elif args.get("spider") == "hostile":
        crawler = process.create_crawler(HostileSpider)
        process.crawl(crawler, base_url=args["base_url"])
        crawlers.append(crawler)
    elif args.get("spider") == "catalog":
        crawler = process.create_crawler(CatalogSpider)
        process.crawl(crawler, base_url=args["base_url"], catalog_size=args.get("catalog_size", 10))
        crawlers.append(crawler)
    elif args.get("spider") == "tree":
        spider_args = {
            key: args[key]
            for key in ("refused_url", "tls_url", "headers", "proxy", "query", "userinfo")
            if key in args
        }
        twins = [("tree_a", 0), ("tree_b", 1)] if args.get("twins") else [("tree", None)]
        for name, index in twins:
            spider_cls = type(name, (TreeSpider,), {"name": name})
            if index is not None:
                spider_cls.custom_settings = {
                    **TreeSpider.custom_settings,
                    **args["twin_settings"][index],
                }
            crawler = process.create_crawler(spider_cls)
            process.crawl(
                crawler, base_url=args["base_url"], **spider_args, **args.get("spider_args", {})
            )
            crawlers.append(crawler)
    else:
        crawler = process.create_crawler(IngestTestSpider)
        spider_args = {
            key: args[key]
            for key in ("pages", "per_page", "kind", "size", "delay_ms", "awkward", "poison")
            if key in args
        }
        process.crawl(
            crawler, base_url=args["base_url"], **spider_args, **args.get("spider_args", {})
        )
        crawlers.append(crawler)
    process.start()

    installed_name = None
    if "twisted.internet.reactor" in sys.modules:
        from twisted.internet import reactor as installed

        installed_name = f"{type(installed).__module__}.{type(installed).__qualname__}"
    if args.get("result"):
        result = {
            "stats": crawlers[0].stats.get_stats() if crawlers[0].stats else {},
            "all_stats": [c.stats.get_stats() if c.stats else {} for c in crawlers],
            "bootstrap_failed": process.bootstrap_failed,
            "reactor": installed_name,
        }
        with open(args["result"], "w", encoding="utf-8") as file:
            json.dump(result, file, default=_jsonable)
    return 1 if process.bootstrap_failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
