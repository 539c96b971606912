"""scrapy_ingest: Scrapy items, jobs and crawl data in a real database."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scrapy_ingest.addon import IngestAddon
    from scrapy_ingest.downloadermiddlewares.proxy import ProxyMiddleware
    from scrapy_ingest.downloadermiddlewares.requestlog import RequestLogMiddleware
    from scrapy_ingest.downloadermiddlewares.retry import BackoffRetryMiddleware
    from scrapy_ingest.extensions.jobs import IngestJobsExtension
    from scrapy_ingest.extensions.logs import IngestLogsExtension
    from scrapy_ingest.extensions.metrics import PrometheusExtension
    from scrapy_ingest.logformatter import IngestLogFormatter
    from scrapy_ingest.pipelines import IngestItemProcessor, IngestPipeline
    from scrapy_ingest.spidermiddlewares.source import SourceMiddleware

__version__ = "0.1.0.dev0"

__all__ = [
    "BackoffRetryMiddleware",
    "IngestAddon",
    "IngestItemProcessor",
    "IngestJobsExtension",
    "IngestLogFormatter",
    "IngestLogsExtension",
    "IngestPipeline",
    "PrometheusExtension",
    "ProxyMiddleware",
    "RequestLogMiddleware",
    "SourceMiddleware",
    "__version__",
]

# Imported on first use, so that the writer process, which imports
# scrapy_ingest.backends, does not pay for importing Scrapy.
_EXPORTS = {
    "BackoffRetryMiddleware": "scrapy_ingest.downloadermiddlewares.retry",
    "IngestAddon": "scrapy_ingest.addon",
    "IngestItemProcessor": "scrapy_ingest.pipelines",
    "IngestJobsExtension": "scrapy_ingest.extensions.jobs",
    "IngestLogFormatter": "scrapy_ingest.logformatter",
    "IngestLogsExtension": "scrapy_ingest.extensions.logs",
    "ProxyMiddleware": "scrapy_ingest.downloadermiddlewares.proxy",
    "IngestPipeline": "scrapy_ingest.pipelines",
    "PrometheusExtension": "scrapy_ingest.extensions.metrics",
    "RequestLogMiddleware": "scrapy_ingest.downloadermiddlewares.requestlog",
    "SourceMiddleware": "scrapy_ingest.spidermiddlewares.source",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'scrapy_ingest' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
