"""The jobs extension: a live row per crawl in the ``jobs`` table.

The job row is inserted when the crawl opens (``status`` ``running``), is
refreshed every ``INGEST_JOB_HEARTBEAT`` seconds with the current Scrapy stats
and item count, and is closed (``finished``, with the close reason and final
stats) when the spider closes. After each refresh, the heartbeat also marks
``crashed`` the ``running`` rows of other processes that have not been refreshed
for three heartbeats (``JobRow.mark_crawl_crashed``): the live workers of a
distributed crawl mark a killed worker's row without waiting for a process to
start against the database (which marks them too). Enabled by the add-on;
alone::

    EXTENSIONS = {"scrapy_ingest.IngestJobsExtension": 500}

Settings: ``INGEST_JOB_ID``, ``INGEST_CRAWL_ID``, ``INGEST_JOB_HEARTBEAT`` and
the database settings. Stats: ``ingest/jobs/heartbeats``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from scrapy import signals
from scrapy.utils.defer import deferred_from_coro

from scrapy_ingest._compat import Looping, looping_call
from scrapy_ingest._stats import stat_key
from scrapy_ingest.runtime import IngestRuntime

if TYPE_CHECKING:
    from scrapy.crawler import Crawler
    from twisted.internet.defer import Deferred
    from typing_extensions import Self

    from scrapy_ingest._databases import Databases

logger = logging.getLogger(__name__)


class IngestJobsExtension:
    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        self._runtime = IngestRuntime.of(crawler)
        self._heartbeat: Looping | None = None
        self._databases: Databases | None = None
        #: whether the last look for crashed jobs failed (warned once, not at every beat)
        self._crash_check_failed = False
        crawler.signals.connect(self._spider_opened, signal=signals.spider_opened)
        crawler.signals.connect(self._spider_closed, signal=signals.spider_closed)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    async def _spider_opened(self) -> None:
        self._databases = await self._runtime.opened()
        if self._databases is None:
            return  # the runtime has said why, and closes the spider before its first request
        self._heartbeat = looping_call(self._beat)
        self._heartbeat.start(self._runtime.config.job_heartbeat, now=False)

    def _beat(self) -> Deferred[None]:
        return deferred_from_coro(self._refresh())

    async def _refresh(self) -> None:
        try:
            await self._runtime.update_job()
        except Exception as exc:
            # a missed heartbeat is not worth stopping the crawl; the next one may pass
            logger.warning("Could not refresh the job row: %s", exc)
            return
        self.crawler.stats.inc_value(stat_key("jobs", "heartbeats"))
        await self._mark_crashed()

    async def _mark_crashed(self) -> None:
        # at every beat, not every third: a dead worker is then marked three to four
        # heartbeats after its last refresh, as documented, rather than up to six; and it is
        # cheap, one UPDATE per database on the indexed status column, no more than the
        # refresh itself
        try:
            runtime, databases = self._runtime, self._databases
            # not once the databases close: the next crawl looks again
            if not runtime.closing and runtime.job_row is not None and databases is not None:
                await runtime.job_row.mark_crawl_crashed(databases.hosts_with_job())
        except Exception as exc:
            if not self._crash_check_failed:
                logger.warning(
                    "Could not look for crashed jobs of other processes: %s (said once until "
                    "it works again; a crawl starting against the database looks too)",
                    exc,
                )
            self._crash_check_failed = True
        else:
            self._crash_check_failed = False

    def _spider_closed(self) -> None:
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
