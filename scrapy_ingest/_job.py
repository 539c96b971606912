"""The job row of one crawler: who runs the crawl, its heartbeat, its close and crash marking.

Every database of the crawl holds the row (see :mod:`scrapy_ingest._databases`, which
inserts it when it opens one); the runtime refreshes it on each heartbeat and closes it
with the spider's close reason.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scrapy_ingest import settings as defaults
from scrapy_ingest._compat import scrapyd_job_id
from scrapy_ingest._ids import format_uuid
from scrapy_ingest._redact import redact_value
from scrapy_ingest._redis import redis_crawl_id
from scrapy_ingest.backends.base import safe_text
from scrapy_ingest.exceptions import ConfigError, JobIdConflict
from scrapy_ingest.records import RecordEncoder

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    from scrapy.crawler import Crawler
    from scrapy.settings import BaseSettings

    from scrapy_ingest._ids import IdFactory
    from scrapy_ingest.config import IngestConfig
    from scrapy_ingest.hosting import Host
    from scrapy_ingest.schema import TableSpec

logger = logging.getLogger(__name__)

#: a running job whose row has not been refreshed for this many heartbeats is crashed
STALE_HEARTBEATS = 3

#: the longest spider name stored (an indexed column: VARCHAR(255) on MySQL)
MAX_SPIDER_NAME = 255


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    crawl_id: str
    spider: str
    hostname: str
    pid: int
    started_at: float


def make_job(crawler: Crawler, config: IngestConfig, new_id: IdFactory) -> JobInfo:
    """Who runs this crawl: its job id (INGEST_JOB_ID, scrapyd's, or a new one) and crawl id."""
    spider = crawler.spider
    assert spider is not None
    job_id = config.job_id or scrapyd_job_id(spider) or format_uuid(new_id())
    # the processes of a scrapy-redis crawl share its queue key
    crawl_id = config.crawl_id or redis_crawl_id(crawler.settings, spider.name)
    return JobInfo(
        job_id=str(job_id),
        crawl_id=crawl_id or str(job_id),
        spider=_spider_name(spider.name),
        hostname=socket.gethostname(),
        pid=os.getpid(),
        started_at=time.time(),
    )


class JobRow:
    """The job row of *info* in the *table* of each database, refreshed every *heartbeat*."""

    def __init__(
        self, info: JobInfo, table: TableSpec, heartbeat: float, settings: BaseSettings
    ) -> None:
        self.info = info
        self.table = table
        self._heartbeat = heartbeat
        self._settings = settings
        # our own rows' conversions are not the spider's values to count
        self._encoder = RecordEncoder()

    def first_row(self) -> dict[str, Any]:
        info = self.info
        return {
            "job_id": info.job_id,
            "crawl_id": info.crawl_id,
            "spider": info.spider,
            "hostname": info.hostname,
            "pid": info.pid,
            "status": "running",
            "started_at": info.started_at,
            # not started_at: opening the database may have taken longer than a heartbeat
            "updated_at": time.time(),
            "items_count": 0,
            "requests_count": 0,
            "errors_count": 0,
            "log_counts": self._encoder.encode({}),
            "settings": self._encoder.encode(settings_snapshot(self._settings)),
        }

    async def insert(self, host: Host) -> None:
        """Insert the row at *host*; raise JobIdConflict when its job id is taken there."""
        inserted = await host.insert_job(self.table, self.first_row())
        if not inserted:
            raise JobIdConflict(
                f"a job with job_id {self.info.job_id!r} exists already in "
                f"{self.table.name} at {host.url}: storing this crawl under "
                "it would merge two crawls. Fix: leave INGEST_JOB_ID unset (a fresh id per "
                "crawl), or give each crawl its own INGEST_JOB_ID; use INGEST_CRAWL_ID to group "
                "the jobs of one crawl."
            )

    def values(
        self,
        stats: Mapping[str, Any],
        *,
        items: int,
        requests: int | None,
        log_counts: Mapping[str, int] | None,
        quality: Mapping[str, Any] | None,
        redact: Callable[[str], str],
        reason: str | None,
    ) -> dict[str, Any]:
        """The columns a heartbeat (or, with *reason*, the close) sets."""
        now = time.time()
        if log_counts is None:  # without the logs extension, Scrapy's own counts
            prefix = "log_count/"
            log_counts = {k[len(prefix) :]: v for k, v in stats.items() if k.startswith(prefix)}
        if requests is None:
            requests = stats.get("downloader/request_count", 0)
        encode = self._encoder.encode
        values: dict[str, Any] = {
            "updated_at": now,
            "items_count": items,
            "requests_count": requests,
            "errors_count": log_counts.get("ERROR", 0) + log_counts.get("CRITICAL", 0),
            "log_counts": encode(log_counts),
            # a stats value may hold a URL (a last error, a third-party extension's)
            "stats": redact(encode(stats).decode()).encode(),
        }
        if quality is not None:
            values["quality"] = encode(quality)
        if reason is not None:
            values.update(status="finished", close_reason=reason, finished_at=now)
        else:
            # alive: a row another crawl took for crashed (its heartbeats were late, say behind
            # a slow database) is running again
            values.update(status="running", close_reason=None, finished_at=None)
        return values

    async def update(self, hosts: Iterable[Host], values: dict[str, Any]) -> None:
        """Set *values* in every database with the row, even when one of them fails (the
        first failure is raised then); a heartbeat never overwrites the closed row."""
        unless_finished = values["status"] != "finished"
        failure: BaseException | None = None
        for host in hosts:
            update = host.update_job(
                self.table, self.info.job_id, values, unless_finished=unless_finished
            )
            try:
                await update
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    async def mark_crashed_at_start(self, host: Host) -> None:
        """Jobs left ``running`` by a process that died (their row not refreshed for three
        heartbeats) become ``crashed``."""
        try:
            await self.mark_crashed(host)
        except Exception as exc:
            logger.warning("Could not look for crashed jobs in %s: %s", host.url, exc)

    async def mark_crashed(self, host: Host, crawl_id: str | None = None) -> None:
        """Mark the stale jobs at *host* crashed (with *crawl_id*, only that crawl's)."""
        stale_before = time.time() - STALE_HEARTBEATS * self._heartbeat
        crashed = await host.mark_crashed(self.table, stale_before, self.info.job_id, crawl_id)
        for job_id in crashed:
            logger.warning(
                "Job %s in %s was left running by a process that stopped refreshing it: it is "
                "marked crashed",
                job_id,
                host.url,
            )

    async def mark_crawl_crashed(self, hosts: Iterable[Host]) -> None:
        """:meth:`mark_crashed` for this crawl's jobs in each of *hosts*; every one is tried,
        the first failure is raised then."""
        failure: BaseException | None = None
        for host in hosts:
            try:
                await self.mark_crashed(host, self.info.crawl_id)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure


def _spider_name(name: str) -> str:
    """The spider's name as every row stores it: cleaned like any text (a NUL or a lone
    surrogate becomes U+FFFD); refused when it is longer than its indexed column takes."""
    if len(name) > MAX_SPIDER_NAME:
        raise ConfigError(
            f"the spider's name is {len(name):,} characters long ({name[:40]!r}...), and "
            f"scrapy_ingest stores at most {MAX_SPIDER_NAME}: the spider column is indexed in "
            "every table (VARCHAR(255) on MySQL and MariaDB). Fix: give the spider a shorter "
            "name."
        )
    return safe_text(name)


def settings_snapshot(settings: BaseSettings) -> dict[str, Any]:
    """The settings a project changed (and all INGEST_* ones), credentials redacted."""
    snapshot: dict[str, Any] = {}
    for name in sorted(settings):
        priority = settings.getpriority(name) or 0
        if priority <= 0 and not name.startswith("INGEST_"):
            continue
        value = settings[name]
        if hasattr(value, "copy_to_dict"):
            value = value.copy_to_dict()
        snapshot[name] = _jsonable(redact_value(name, value))
    for name in dir(defaults):
        if name.startswith("INGEST_") and name not in snapshot:
            snapshot[name] = _jsonable(redact_value(name, getattr(defaults, name)))
    return snapshot


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):  # redact_value has made its keys text
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return str(value)
