"""scrapy_ingest: Scrapy items, jobs and crawl data in a real database."""

from __future__ import annotations

from scrapy_ingest.addon import IngestAddon
from scrapy_ingest.extensions.jobs import IngestJobsExtension
from scrapy_ingest.pipelines import IngestPipeline
from scrapy_ingest.spidermiddlewares.itemsource import ItemSourceMiddleware

__version__ = "0.1.0.dev0"

__all__ = [
    "IngestAddon",
    "IngestJobsExtension",
    "IngestPipeline",
    "ItemSourceMiddleware",
    "__version__",
]
