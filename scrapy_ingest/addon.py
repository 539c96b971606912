"""The add-on: one ``ADDONS`` line enables the whole stack.

::

    ADDONS = {"scrapy_ingest.IngestAddon": 300}

It adds the item pipeline (900), the jobs, logs and metrics extensions (500), the
request log downloader middleware (950) and the source spider middleware
(10), each only where the project has not placed or disabled that component
itself: a project setting always wins. With ``INGEST_ENABLED = False`` it
adds nothing; ``INGEST_REQUESTS_ENABLED``, ``INGEST_LOGS_ENABLED`` and
``INGEST_METRICS_ENABLED`` (off by default) decide whether their component is
placed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scrapy_ingest import settings as defaults
from scrapy_ingest.downloadermiddlewares.requestlog import RequestLogMiddleware
from scrapy_ingest.extensions.jobs import IngestJobsExtension
from scrapy_ingest.extensions.logs import IngestLogsExtension
from scrapy_ingest.extensions.metrics import PrometheusExtension
from scrapy_ingest.pipelines import IngestPipeline
from scrapy_ingest.spidermiddlewares.source import SourceMiddleware

if TYPE_CHECKING:
    from scrapy.settings import BaseSettings

#: (setting, component, order, the INGEST_* switch that must be on for it, if any)
COMPONENTS: tuple[tuple[str, type, int, str | None], ...] = (
    ("ITEM_PIPELINES", IngestPipeline, 900, None),
    ("EXTENSIONS", IngestJobsExtension, 500, None),
    ("EXTENSIONS", IngestLogsExtension, 500, "INGEST_LOGS_ENABLED"),
    ("EXTENSIONS", PrometheusExtension, 500, "INGEST_METRICS_ENABLED"),
    ("DOWNLOADER_MIDDLEWARES", RequestLogMiddleware, 950, "INGEST_REQUESTS_ENABLED"),
    ("SPIDER_MIDDLEWARES", SourceMiddleware, 10, None),
)


class IngestAddon:
    def update_settings(self, settings: BaseSettings) -> None:
        if not settings.getbool("INGEST_ENABLED", defaults.INGEST_ENABLED):
            return
        for setting, component, order, switch in COMPONENTS:
            # a component switched off is not placed (placed, it would only say it is disabled)
            if switch is None or settings.getbool(switch, getattr(defaults, switch)):
                settings.setdefault_in_component_priority_dict(setting, component, order)
