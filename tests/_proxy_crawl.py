"""A crawl of given URLs for the proxy tests, in a process of its own.

    python tests/_proxy_crawl.py '{"requests": [{"url": ..., "meta": {...}}, ...],
                                   "settings": {...}, "result": "out.json",
                                   "playwright": false, "wait_for": ...}'

Every request is sent (``dont_filter``); the result file gets, per answer, the URL, status,
body, time, the process's CPU seconds so far and the proxy the middleware gave it, the errors,
the crawl's stats, and ``round_cpu``: the CPU seconds at the start of each round. With
``"rounds": N`` the list is sent N times, each round after the last one's answers, which
lets a test change things (stop a proxy) between rounds through ``"pause_file"``: before
each round after the first, the spider waits for that file to exist, then deletes it. A
request with ``"round": n`` is sent in round n only. ``"spider_settings"`` replace the
spider's own ``custom_settings`` (``RETRY_ENABLED`` is False there), which win over
``"settings"``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Any, ClassVar

import scrapy
from _crawl_script import PLAYWRIGHT_SETTINGS

ASYNCIO_REACTOR = "twisted.internet.asyncioreactor.AsyncioSelectorReactor"


class ListSpider(scrapy.Spider):
    name = "proxies"
    custom_settings: ClassVar[dict[str, Any]] = {"DOWNLOAD_TIMEOUT": 5, "RETRY_ENABLED": False}

    def __init__(self, plan: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plan = plan
        self.answers: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.round_cpu: list[float] = []

    def _specs(self, number: int) -> list[dict[str, Any]]:
        return [spec for spec in self.plan["requests"] if spec.get("round", number) == number]

    async def start(self) -> Any:
        rounds = self.plan.get("rounds", 1)
        for number in range(rounds):
            if number:
                await self._between_rounds(number)
            self.round_cpu.append(cpu_seconds())
            for spec in self._specs(number):
                yield self._request(spec, number)

    async def _between_rounds(self, number: int) -> None:
        import asyncio

        expected = sum(len(self._specs(n)) for n in range(number))
        while len(self.answers) + len(self.errors) < expected:
            await asyncio.sleep(0.05)
        pause = self.plan.get("pause_file")
        if pause:
            with open(f"{pause}.ready", "w", encoding="utf-8") as file:
                file.write(str(number))
            while not os.path.exists(pause):
                await asyncio.sleep(0.05)
            os.remove(pause)

    def _request(self, spec: dict[str, Any], number: int) -> scrapy.Request:
        return scrapy.Request(
            spec["url"],
            meta={**spec.get("meta", {}), "round": number},
            dont_filter=True,
            callback=self.parse,
            errback=self.failed,
        )

    def parse(self, response: scrapy.http.Response) -> Any:
        self.answers.append(
            {
                "url": response.url,
                "status": response.status,
                "body": response.text.strip(),
                "time": time.time(),
                "cpu": cpu_seconds(),
                "proxy": response.meta.get("_ingest_proxy"),
                "tries": response.meta.get("ingest_proxy_tries", 1),
                "round": response.meta["round"],
                "context": response.meta.get("playwright_context"),
            }
        )
        return None

    def failed(self, failure: Any) -> None:
        request = failure.request
        self.errors.append(
            {
                "url": request.url,
                "error": f"{failure.type.__name__}: {failure.value}",
                "round": request.meta["round"],
                "proxy": request.meta.get("_ingest_proxy"),
            }
        )


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class BodyBanPolicy:
    """An INGEST_PROXY_BAN_POLICY of the tests: a page that says it came through p2 is a ban."""

    def response_is_ban(self, request: scrapy.Request, response: scrapy.http.Response) -> bool:
        return response.status == 200 and b"via p2" in response.body

    def exception_is_ban(self, request: scrapy.Request, exception: BaseException) -> bool:
        return False


def main(argv: list[str]) -> int:
    plan = json.loads(argv[1])
    settings: dict[str, Any] = {
        "TELNETCONSOLE_ENABLED": False,
        "LOG_LEVEL": "INFO",
        "TWISTED_REACTOR": ASYNCIO_REACTOR,
        "HTTPERROR_ALLOW_ALL": True,
        "ADDONS": {"scrapy_ingest.IngestAddon": 300},
        "INGEST_DATABASE_URL": f"sqlite:///{plan['workdir']}/ingest.sqlite3",
        **(PLAYWRIGHT_SETTINGS if plan.get("playwright") else {}),
        **plan.get("settings", {}),
    }
    from scrapy import crawler as scrapy_crawler
    from scrapy.crawler import CrawlerProcess

    ListSpider.custom_settings = {**ListSpider.custom_settings, **plan.get("spider_settings", {})}
    process = getattr(scrapy_crawler, "AsyncCrawlerProcess", CrawlerProcess)(settings)
    crawler = process.create_crawler(ListSpider)
    process.crawl(crawler, plan=plan)
    process.start()
    spider = crawler.spider
    result = {
        "answers": spider.answers if spider else [],
        "errors": spider.errors if spider else [],
        "round_cpu": spider.round_cpu if spider else [],
        "stats": crawler.stats.get_stats() if crawler.stats else {},
    }
    with open(plan["result"], "w", encoding="utf-8") as file:
        json.dump(result, file, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
