"""Pages/s of the page crawl of bench/pages.py with Scrapy's RetryMiddleware and with ours.

    python bench/retry.py [--pages 5000] [--pairs 3] [--ingest]

The same 5,000-page local crawl (bench/_site.py, bench/_pages_crawl.py's spider) in a fresh
process per run, alternating: scrapy, backoff, scrapy, backoff, ... ``scrapy`` is Scrapy's
settings as they are; ``backoff`` sets Scrapy's RetryMiddleware to None and
BackoffRetryMiddleware at 550. No page fails, so this measures what the middleware costs
every request. With ``--ingest`` both modes also run the add-on (items, requests and logs
into a fresh SQLite file). Prints every run, then the medians and the ratio. The target:
backoff >= 0.97 of scrapy.

    python bench/retry.py --crawl MODE BASE_URL PAGES [DATABASE_URL]

runs one crawl and prints one JSON line (what the loop above starts).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pages import site  # the same local site as bench/pages.py

HERE = Path(__file__).resolve().parent
MODES = ("scrapy", "backoff")


def crawl(mode: str, base_url: str, pages: int, db_url: str | None) -> dict[str, float]:
    args = [sys.executable, str(Path(__file__).resolve()), "--crawl", mode, base_url, str(pages)]
    if db_url:
        args.append(db_url)
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def one_crawl(mode: str, base_url: str, pages: int, db_url: str | None) -> None:
    sys.path.insert(0, str(HERE))
    from _pages_crawl import SETTINGS, PagesSpider
    from scrapy.crawler import CrawlerProcess

    settings: dict[str, object] = dict(SETTINGS)
    if mode == "backoff":
        settings["DOWNLOADER_MIDDLEWARES"] = {
            "scrapy.downloadermiddlewares.retry.RetryMiddleware": None,
            "scrapy_ingest.downloadermiddlewares.retry.BackoffRetryMiddleware": 550,
        }
    elif mode != "scrapy":
        sys.exit(f"unknown mode {mode!r}")
    if db_url:
        settings["ADDONS"] = {"scrapy_ingest.IngestAddon": 300}
        settings["INGEST_DATABASE_URL"] = db_url
    process = CrawlerProcess(settings=settings)
    crawler = process.create_crawler(PagesSpider)
    process.crawl(crawler, base_url=base_url)
    started = time.perf_counter()
    process.start()
    wall = time.perf_counter() - started
    assert crawler.stats is not None
    stats = crawler.stats.get_stats()
    fetched = stats.get("response_received_count", 0)
    elapsed = stats["elapsed_time_seconds"]
    result = {
        "mode": mode,
        "pages": fetched,
        "retries": stats.get("retry/count", 0),
        "elapsed": round(elapsed, 3),
        "pages_per_s": round(fetched / elapsed, 1),
        "wall": round(wall, 3),
    }
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=5_000)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--ingest", action="store_true", help="run the add-on in both modes")
    parser.add_argument("--crawl", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.crawl:
        mode, base_url, pages, *db_url = options.crawl
        one_crawl(mode, base_url, int(pages), db_url[0] if db_url else None)
        return
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with contextlib.ExitStack() as stack:
        base_url = site(stack, options.pages)
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-retry-")))
        for n in range(options.pairs):
            for mode in MODES:
                db_url = f"sqlite:///{workdir / f'{mode}-{n}.sqlite3'}" if options.ingest else None
                result = crawl(mode, base_url, options.pages, db_url)
                if result["pages"] != options.pages or result["retries"]:
                    sys.exit(f"{mode} run {n}: {result} (expected {options.pages} pages)")
                runs[mode].append(result)
                print(f"run {n + 1} {mode:<8} {json.dumps(result)}", flush=True)
    print()
    base = statistics.median(r["pages_per_s"] for r in runs["scrapy"])
    print(f"{'mode':<10}{'pages/s':>10}{'ratio':>8}")
    for mode in MODES:
        rate = statistics.median(r["pages_per_s"] for r in runs[mode])
        print(f"{mode:<10}{rate:>10.0f}{rate / base:>8.3f}")


if __name__ == "__main__":
    main()
