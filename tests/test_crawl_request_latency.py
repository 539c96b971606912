"""``ingest_requests.latency_ms`` is the download time, as Scrapy's ``download_latency`` has it.

Real crawls of the local site (the list crawl of ``_proxy_crawl.py``) with
:class:`DownloadLatencyRecorder` beside the add-on, which writes down the ``download_latency``
Scrapy's download handler set for each response, to compare with the stored rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pytest
from _helpers import Database, run_list_crawl
from scrapy import signals

if TYPE_CHECKING:
    from scrapy import Request
    from scrapy.crawler import Crawler
    from services import LocalSite
    from typing_extensions import Self

pytestmark = pytest.mark.crawl

RECORDER = {f"{__name__}.DownloadLatencyRecorder": 0}
#: milliseconds the site waits before the headers, and then before the body
HEADERS_MS, BODY_MS = 150, 200
QUEUED = 5
#: seconds between two downloads from the site (DOWNLOAD_DELAY), more than each one takes
DELAY = 0.4


class DownloadLatencyRecorder:
    """An extension of these tests' crawls: ``{url: [download_latency, ...]}`` in the meta of
    every request as it leaves the downloader (responses, redirects included, and errors: None
    when the handler set none), written at the end to the file named by ``TEST_LATENCY_FILE``."""

    def __init__(self, crawler: Crawler) -> None:
        self.path = Path(crawler.settings["TEST_LATENCY_FILE"])
        self.latencies: dict[str, list[float | None]] = {}
        crawler.signals.connect(self._left, signal=signals.request_left_downloader)
        crawler.signals.connect(self._closed, signal=signals.spider_closed)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    def _left(self, request: Request) -> None:
        latency = request.meta.get("download_latency")
        self.latencies.setdefault(request.url, []).append(latency)

    def _closed(self) -> None:
        self.path.write_text(json.dumps(self.latencies), encoding="utf-8")


def _crawl(
    requests: list[dict[str, Any]], tmp_path: Path, settings: dict[str, Any]
) -> tuple[dict[str, dict[str, Any]], dict[str, list[float | None]]]:
    """Crawl *requests* (``{"url": ..., "meta": {...}}``); the stored rows by URL, and the
    recorder's download latencies by URL."""
    record = tmp_path / "download_latency.json"
    plan = {
        "requests": requests,
        "settings": {"EXTENSIONS": RECORDER, "TEST_LATENCY_FILE": str(record), **settings},
    }
    result = run_list_crawl(plan, tmp_path)
    assert result["stats"]["finish_reason"] == "finished", result["log"][-3000:]
    rows = Database(f"sqlite:///{tmp_path / 'ingest.sqlite3'}").rows("ingest_requests")
    by_url = {row["url"]: row for row in rows}
    assert len(by_url) == len(rows), rows  # one attempt per URL
    return by_url, json.loads(record.read_text(encoding="utf-8"))


@pytest.mark.exclusive
def test_latency_is_scrapys_download_latency_without_the_queue_wait(
    site: LocalSite, tmp_path: Path
) -> None:
    # All the requests pass the downloader middlewares at once, then wait in the downloader's
    # queue for the host's slot: one download every DELAY seconds (not CONCURRENT_REQUESTS_PER_
    # DOMAIN = 1: with the asyncio reactor, Scrapy 2.19 starts every request queued in a slot at
    # once). Each answer's headers come HEADERS_MS after the request, its body BODY_MS later.
    urls = [site.url(f"/delay?ms={HEADERS_MS}&body_ms={BODY_MS}&n={n}") for n in range(QUEUED)]
    settings = {"DOWNLOAD_DELAY": DELAY, "DOWNLOAD_DELAY_JITTER": 0}
    rows, recorded = _crawl([{"url": url} for url in urls], tmp_path, settings)
    assert sorted(rows) == sorted(urls)
    for url, row in rows.items():
        [download_latency] = recorded[url]
        assert download_latency is not None
        # Scrapy's download_latency: to the response headers, neither the queue wait nor the
        # body's BODY_MS nor the way through the downloader back to the middleware
        assert row["latency_ms"] == pytest.approx(download_latency * 1000, abs=2), row
        assert HEADERS_MS <= row["latency_ms"] < HEADERS_MS + 100, row
    # the downloads did queue (at least half the delay: Scrapy 2.13 has no DOWNLOAD_DELAY_JITTER)
    # and started_at is when each left the queue
    starts = sorted(row["started_at"] for row in rows.values())
    waited = (starts[-1] - starts[0]).total_seconds()
    assert waited >= (QUEUED - 1) * DELAY * 0.5, starts


@pytest.mark.exclusive
def test_latency_without_a_download_latency_of_its_own_is_the_handlers_time(
    site: LocalSite, tmp_path: Path
) -> None:
    # Timeouts (download_timeout 0.5 s): a page slower than that; a redirect to one (the next
    # hop carries the 302's download_latency in its copied meta); a page whose body stalls after
    # its headers (Scrapy sets download_latency at the headers, then the download times out).
    # And a data: URL, whose handler sets no download_latency, with one in meta already (as when
    # a spider passes a response's meta on to its next request).
    slow = "/delay?ms=2000"
    redirect = site.url("/redirect?to=" + quote(slow + "&n=1", safe="/"))
    stalled = site.url("/delay?ms=0&body_ms=2000&n=2")
    data = "data:,hello"
    timeout = {"download_timeout": 0.5}
    requests = [
        *({"url": url, "meta": timeout} for url in [site.url(slow), redirect, stalled]),
        {"url": data, "meta": {"download_latency": 9.0}},
    ]
    rows, recorded = _crawl(requests, tmp_path, {})
    hop = rows.pop(redirect)
    [redirect_latency] = recorded[redirect]
    assert hop["status"] == 302
    assert redirect_latency is not None
    assert hop["latency_ms"] == pytest.approx(redirect_latency * 1000, abs=2), hop
    assert recorded[stalled][0] is not None  # Scrapy had the headers
    data_row = rows.pop(data)
    assert data_row["status"] == 200
    assert data_row["latency_ms"] < 100, data_row  # not the 9 s in meta
    assert sorted(rows) == sorted([site.url(slow), site.url(slow + "&n=1"), stalled])
    for row in rows.values():
        assert row["status"] is None
        assert "TimeoutError" in row["error"], row
        # from the start of the download until the timeout, not the 302's or the headers' time
        assert 450 <= row["latency_ms"] < 1500, row
