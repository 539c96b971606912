"""What scrapy_ingest needs to know about a scrapy-redis setup, without importing scrapy-redis.

scrapy-redis shares the scheduler's queue and the dupefilter of a crawl between processes
through Redis (``SCHEDULER = "scrapy_redis.scheduler.Scheduler"``). Its queue key
(``SCHEDULER_QUEUE_KEY``, by default ``"%(spider)s:requests"``) names the shared crawl, so it
is the default ``INGEST_CRAWL_ID`` of every process that works on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scrapy.utils.misc import load_object
from scrapy.utils.python import global_object_name

if TYPE_CHECKING:
    from scrapy.settings import BaseSettings

SCRAPY_REDIS_SCHEDULER = "scrapy_redis.scheduler.Scheduler"
#: scrapy-redis's default SCHEDULER_QUEUE_KEY (scrapy_redis.defaults)
DEFAULT_QUEUE_KEY = "%(spider)s:requests"


def uses_redis_scheduler(settings: BaseSettings) -> bool:
    """Whether ``SCHEDULER`` is scrapy-redis's scheduler or a subclass of it."""
    scheduler = settings.get("SCHEDULER")
    if not scheduler:
        return False
    if scheduler == SCRAPY_REDIS_SCHEDULER:
        return True
    try:
        cls = load_object(scheduler) if isinstance(scheduler, str) else scheduler
    except (ImportError, AttributeError, ValueError, NameError):
        return False  # Scrapy reports an unusable SCHEDULER itself
    return any(global_object_name(c) == SCRAPY_REDIS_SCHEDULER for c in getattr(cls, "__mro__", ()))


def queue_key(settings: BaseSettings, spider: str) -> str:
    """scrapy-redis's queue key of *spider*: ``SCHEDULER_QUEUE_KEY`` with the spider name."""
    template = settings.get("SCHEDULER_QUEUE_KEY") or DEFAULT_QUEUE_KEY
    return str(template) % {"spider": spider}


def redis_crawl_id(settings: BaseSettings, spider: str) -> str | None:
    """The crawl id that scrapy-redis's queue key gives, when its scheduler is in use."""
    return queue_key(settings, spider) if uses_redis_scheduler(settings) else None
