"""The private names of Scrapy and others that ``scrapy_ingest/_compat.py`` keeps, each checked
against the installed version: the attribute exists and behaves as _compat assumes. A release
that changes one fails here (tests/test_private_names.py keeps them out of other modules).

Checked elsewhere: ``fail_crawl`` (tests/test_backend_refused.py), the scrapy-redis scheduler's
use of the engine slot in a real distributed crawl (tests/test_distributed.py).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from scrapy import Request, Spider
from scrapy.pipelines import ItemPipelineManager
from scrapy.statscollectors import MemoryStatsCollector
from scrapy.utils.test import get_crawler

from scrapy_ingest._compat import (
    ITEM_PROCESSOR_IS_ASYNC,
    decode_queued_request,
    drop_last_process_item,
    encode_queued_request,
    replace_stats_method,
    scrapyd_job_id,
)

if TYPE_CHECKING:
    from pathlib import Path


class _First:
    def process_item(self, item: Any, spider: Spider | None = None) -> Any:
        return {**item, "first": True}


class _Last:
    def process_item(self, item: Any, spider: Spider | None = None) -> Any:
        return {**item, "last": True}


def _run_chain(manager: ItemPipelineManager, item: Any) -> Any:
    if ITEM_PROCESSOR_IS_ASYNC:
        import asyncio

        return asyncio.run(manager.process_item_async(item))
    results: list[Any] = []
    manager.process_item(item, Spider("s")).addBoth(results.append)  # sync pipelines: fired
    return results[0]


@pytest.mark.parametrize("pipelines", [[_First, _Last], [_Last]])
def test_dropping_the_last_process_item_leaves_the_others_to_run(pipelines: list[type]) -> None:
    crawler = get_crawler(Spider, {"ITEM_PIPELINES": {cls: i for i, cls in enumerate(pipelines)}})
    manager = ItemPipelineManager.from_crawler(crawler)
    assert drop_last_process_item(manager) is (len(pipelines) > 1)
    result = _run_chain(manager, {"n": 1})
    assert result == ({"n": 1, "first": True} if len(pipelines) > 1 else {"n": 1})


def test_a_replaced_stats_method_is_the_one_called_even_after_a_first_call() -> None:
    collector = MemoryStatsCollector(get_crawler(Spider))
    collector.set_value("before", 1)  # Scrapy 2.19 caches its wrapper of set_value now
    calls: list[tuple[Any, ...]] = []
    original = collector.set_value

    def tee(*args: Any, **kwargs: Any) -> None:
        calls.append(args)
        original(*args, **kwargs)

    replace_stats_method(collector, "set_value", tee)
    collector.set_value("after", 2)
    assert calls == [("after", 2)]
    assert collector.get_stats() == {"before": 1, "after": 2}


def test_a_request_survives_the_scrapy_redis_queue_encoding(redis_server_url: str) -> None:
    import redis
    from scrapy_redis.queue import FifoQueue, PriorityQueue

    server = redis.Redis.from_url(redis_server_url)
    spider = Spider("compat")
    for queue_class in (FifoQueue, PriorityQueue):
        key = f"compat-{uuid.uuid4().hex}:%(spider)s"
        queue = queue_class(server, spider, key)
        request = Request("https://example.com/a", callback=spider.parse, meta={"n": 1}, priority=3)
        try:
            queue.push(request)
            if queue_class is PriorityQueue:
                (stored,) = server.zrange(queue.key, 0, -1)
            else:
                (stored,) = server.lrange(queue.key, 0, -1)
            # what _compat encodes is what the queue stores, and decodes back to the request
            assert stored == encode_queued_request(queue, request)
            decoded = decode_queued_request(queue, stored)
        finally:
            server.delete(queue.key)
        assert (decoded.url, decoded.meta, decoded.priority) == (request.url, {"n": 1}, 3)
        assert decoded.callback == spider.parse
    server.close()


def test_scrapyds_job_id_is_the_spider_argument_it_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    launcher = pytest.importorskip("scrapyd.launcher")
    monkeypatch.delenv("SCRAPY_JOB", raising=False)
    args = launcher.get_crawl_args({"_project": "p", "_spider": "s", "_job": "j1", "x": "1"})
    spider_args = dict(
        value.split("=", 1) for option, value in itertools.pairwise(args) if option == "-a"
    )
    assert spider_args["_job"] == "j1"
    assert scrapyd_job_id(Spider("s", **spider_args)) == "j1"
    assert scrapyd_job_id(Spider("s")) is None
    monkeypatch.setenv("SCRAPY_JOB", "j0")  # scrapyd 1.3 and older
    assert scrapyd_job_id(Spider("s")) == "j0"


_CRAWL = """
import json

from scrapy import Spider, signals
from scrapy.crawler import CrawlerProcess

from scrapy_ingest._compat import requests_in_progress, time_downloads, wake_engine

EVENTS = []


class Probe:
    def __init__(self, crawler):
        self.crawler = crawler
        crawler.signals.connect(self.opened, signal=signals.spider_opened)

    @classmethod
    def from_crawler(cls, crawler):
        return cls(crawler)

    def opened(self):
        EVENTS.append(["wrapped", time_downloads(self.crawler, self.started, self.ended)])

    def started(self, request):
        EVENTS.append(["started", request.url])
        return request.url

    def ended(self, request, token, failed):
        EVENTS.append(["ended", request.url, token == request.url, failed])


class ProbeSpider(Spider):
    name = "probe"
    start_urls = ["data:,hello", "http://127.0.0.1:1/"]

    def parse(self, response):
        in_progress = requests_in_progress(self.crawler)
        EVENTS.append(["in progress", in_progress is not None and response.request in in_progress])
        wake_engine(self.crawler)


process = CrawlerProcess(
    {
        "EXTENSIONS": {Probe: 0},
        "RETRY_ENABLED": False,
        "TELNETCONSOLE_ENABLED": False,
        "LOG_LEVEL": "CRITICAL",
    }
)
process.crawl(ProbeSpider)
process.start()
print(json.dumps(EVENTS))
"""


@pytest.mark.crawl
def test_downloads_are_timed_and_the_engine_slot_has_the_requests_in_progress(
    tmp_path: Path,
) -> None:
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(_CRAWL))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    events = json.loads(done.stdout.strip().splitlines()[-1])
    assert events[0] == ["wrapped", True]
    ok, refused = "data:,hello", "http://127.0.0.1:1/"
    assert sorted(map(tuple, events[1:])) == sorted(
        [
            ("started", ok),
            ("ended", ok, True, False),
            ("in progress", True),
            ("started", refused),
            ("ended", refused, True, True),
        ]
    )
    assert events.index(["started", ok]) < events.index(["ended", ok, True, False])
