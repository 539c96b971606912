"""One worker of a distributed crawl (scrapy-redis), in a process of its own.

    python tests/_redis_crawl.py '{"redis_url": "redis://127.0.0.1:6379/0", "prefix": "t1", ...}'

The spider, ``NodeSpider`` (a scrapy-redis ``RedisSpider``), reads its start URLs from Redis
(``<prefix>:nodes:start_urls``), follows every link of the test site's ``/node/<k>`` tree and
yields one ``NodeItem`` per page, keyed by its node number (``INGEST_ITEM_KEYS``), so a page
crawled twice is stored once. The scheduler queue and dupefilter live in Redis under
``<prefix>:nodes:...``, so that tests sharing a server never see each other's keys. The worker
closes once the queue has been empty, with no request leased by any worker, for ``max_idle``
seconds.

Arguments (JSON object): ``redis_url``, ``prefix``, ``database_url`` (required); ``settings``:
more Scrapy settings; ``concurrency`` (default 8); ``max_idle`` (default 5); ``result``: path of
a JSON file to write the job id and this process's stats to.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

from scrapy.crawler import CrawlerProcess
from scrapy_redis.spiders import RedisSpider

from scrapy_ingest.runtime import IngestRuntime


@dataclasses.dataclass
class NodeItem:
    node: int
    title: str | None
    url: str


class NodeSpider(RedisSpider):
    name = "nodes"

    def parse(self, response: Any) -> Any:
        node = int(response.url.split("/node/", 1)[1].split("?", 1)[0])
        yield NodeItem(node=node, title=response.css("h1::text").get(), url=response.url)
        yield from response.follow_all(css="li a", callback=self.parse)


def worker_settings(args: dict[str, Any]) -> dict[str, Any]:
    prefix = args["prefix"]
    concurrency = args.get("concurrency", 8)
    return {
        "ADDONS": {"scrapy_ingest.IngestAddon": 300},
        "INGEST_DATABASE_URL": args["database_url"],
        "INGEST_ITEM_KEYS": {"NodeItem": ("node",)},
        "SCHEDULER": "scrapy_redis.scheduler.Scheduler",
        "DUPEFILTER_CLASS": "scrapy_redis.dupefilter.RFPDupeFilter",
        "SCHEDULER_PERSIST": True,
        "REDIS_URL": args["redis_url"],
        "SCHEDULER_QUEUE_KEY": f"{prefix}:%(spider)s:requests",
        "SCHEDULER_DUPEFILTER_KEY": f"{prefix}:%(spider)s:dupefilter",
        "REDIS_START_URLS_KEY": f"{prefix}:%(name)s:start_urls",
        "MAX_IDLE_TIME_BEFORE_CLOSE": args.get("max_idle", 5),
        "CONCURRENT_REQUESTS": concurrency,
        "CONCURRENT_REQUESTS_PER_DOMAIN": concurrency,
        "TELNETCONSOLE_ENABLED": False,
        "LOG_LEVEL": "INFO",
        **args.get("settings", {}),
    }


def main() -> None:
    args = json.loads(sys.argv[1])
    process = CrawlerProcess(worker_settings(args), install_root_handler=True)
    crawler = process.create_crawler(NodeSpider)
    process.crawl(crawler)
    process.start()
    if args.get("result"):
        runtime = IngestRuntime.of(crawler)
        result = {
            "job_id": runtime.job.job_id if runtime.job else None,
            "stats": runtime.process_stats.get_stats(),
        }
        with open(args["result"], "w", encoding="utf-8") as file:
            json.dump(result, file, default=str)


if __name__ == "__main__":
    main()
