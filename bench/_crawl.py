"""One benchmark crawl, run in its own process by bench/items.py.

Usage: python bench/_crawl.py MODE ITEMS [DATABASE_URL]

MODE is ``none`` (no pipeline), ``quiet`` (no pipeline, with the log formatter
that the add-on sets, ``scrapy_ingest.IngestLogFormatter``: the crawl that the
add-on's own per-item work is added to), ``feed`` (JSON Lines feed export),
``ingest`` (the add-on), ``keyed`` (the add-on with ``INGEST_ITEM_KEYS`` on the items' ``sku``:
every item upserted; run it again into the same database and every item is
found unchanged), ``metrics`` (the add-on with the Prometheus extension serving,
scraped by bench/items.py every second), or one of two partial stacks that bound what any write path
can reach: ``encode`` (a pipeline that only encodes each item with our
encoder and keeps nothing) and ``buffer`` (the add-on, whose batches are
kept and handed over but never written). Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import scrapy
from scrapy.crawler import CrawlerProcess

# about 800 bytes of JSON per item
PADDING = "lorem ipsum dolor sit amet " * 19


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<html><body>one page, many items</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class ItemsSpider(scrapy.Spider):
    """Yields N items of about 800 bytes of JSON each from one local page."""

    name = "bench_items"

    def __init__(self, url: str, count: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.start_urls = [url]
        self.count = count

    def parse(self, response: scrapy.http.Response) -> object:
        for i in range(self.count):
            yield make_item(i, response.url)


def make_item(i: int, base_url: str) -> dict[str, object]:
    """The benchmark's item number *i*: strings, numbers, a list and a nested dict."""
    return {
        "sku": f"SKU-{i:08d}",
        "title": f"Product number {i} with a reasonably long title",
        "price": 10.0 + i % 1000 / 7,
        "in_stock": i % 3 != 0,
        "rating": i % 5,
        "tags": ["alpha", "beta", f"tag{i % 17}", "gamma"],
        "seller": {"id": i % 991, "name": f"Seller {i % 991}", "country": "DE"},
        "description": PADDING,
        "url": f"{base_url}product/{i}",
    }


class EncodeOnlyPipeline:
    """Encodes each item as the add-on does, and keeps nothing."""

    def __init__(self) -> None:
        from scrapy_ingest.records import RecordEncoder

        self._encode = RecordEncoder().encode_item

    async def process_item(self, item: object, spider: object = None) -> object:
        self._encode(item)
        return item


def _never_write() -> None:
    """Make the writer process answer every batch as written, without writing it."""
    from twisted.internet.defer import succeed

    from scrapy_ingest.backends import WriteOutcome
    from scrapy_ingest.hosting import ProcessHost

    def store(self: ProcessHost, table: object, batch: object) -> object:
        return succeed(WriteOutcome(written=len(batch.packed_rows)))  # type: ignore[attr-defined]

    ProcessHost.store = store  # type: ignore[method-assign,assignment]


def _scrape_every_second(crawler: object) -> None:
    """What Prometheus does to the crawl: GET /metrics every second (its server thread formats
    them in the crawl process, which is the cost to measure)."""
    import urllib.request

    while True:
        time.sleep(1)
        port = crawler.stats.get_value("ingest/metrics/port") if crawler.stats else None  # type: ignore[attr-defined]
        if port:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
                answer.read()


def main() -> None:
    mode, count = sys.argv[1], int(sys.argv[2])
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    tmp = Path(tempfile.mkdtemp(prefix="bench_items_"))
    settings: dict[str, object] = {
        "LOG_LEVEL": "WARNING",
        "TELNETCONSOLE_ENABLED": False,
        "LOGSTATS_INTERVAL": 0,
        "ROBOTSTXT_OBEY": False,
    }
    if mode == "quiet":
        settings["LOG_FORMATTER"] = "scrapy_ingest.IngestLogFormatter"
    elif mode == "feed":
        settings["FEEDS"] = {str(tmp / "items.jsonl"): {"format": "jsonlines"}}
    elif mode == "encode":
        settings["ITEM_PIPELINES"] = {EncodeOnlyPipeline: 900}
    elif mode == "buffer":
        _never_write()
        settings["ADDONS"] = {"scrapy_ingest.IngestAddon": 300}
        settings["INGEST_DATABASE_URL"] = sys.argv[3]
    elif mode in ("ingest", "metrics", "durable", "keyed"):
        settings["ADDONS"] = {"scrapy_ingest.IngestAddon": 300}
        if mode == "keyed":
            settings["INGEST_ITEM_KEYS"] = {"dict": ["sku"]}
            # each run's site has its own port: the same item, another url
            settings["INGEST_HASH_EXCLUDE"] = ["url"]
        settings["INGEST_DATABASE_URL"] = sys.argv[3]
        settings["INGEST_DURABLE"] = mode == "durable"
        if mode == "durable" and os.environ.get("BENCH_CONCURRENT_ITEMS"):
            settings["CONCURRENT_ITEMS"] = int(os.environ["BENCH_CONCURRENT_ITEMS"])
        settings["INGEST_SPILL_DIR"] = str(tmp / "spill")
        if mode == "metrics":
            settings["INGEST_METRICS_ENABLED"] = True
            settings["INGEST_METRICS_PORT"] = 0
    process = CrawlerProcess(settings=settings)
    crawler = process.create_crawler(ItemsSpider)
    process.crawl(crawler, url=url, count=count)
    if mode == "metrics":
        threading.Thread(target=_scrape_every_second, args=(crawler,), daemon=True).start()
    started, cpu_started = time.perf_counter(), time.thread_time()
    process.start()
    seconds = time.perf_counter() - started
    # CPU time of the reactor thread alone: what the crawl itself spent
    cpu = time.thread_time() - cpu_started
    stats = crawler.stats.get_stats()
    elapsed = stats["elapsed_time_seconds"]
    result = {
        "mode": mode,
        "items": stats.get("item_scraped_count", 0),
        "stored": stats.get("ingest/items/stored"),
        "unchanged": stats.get("ingest/quality/dict/unchanged"),
        "buffer_waits": stats.get("ingest/buffer/waits", 0),
        # Scrapy's own measure: spider opened to spider closed, which for the
        # add-on includes writing every item (the pipeline drains on close)
        "elapsed": round(elapsed, 3),
        "items_per_s": round(count / elapsed, 1),
        # the whole process.start(), start-up and shutdown included
        "wall": round(seconds, 3),
        "wall_items_per_s": round(count / seconds, 1),
        "reactor_cpu": round(cpu, 3),
    }
    server.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
