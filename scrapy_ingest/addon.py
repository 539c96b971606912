"""The add-on: one ``ADDONS`` line enables the whole stack.

::

    ADDONS = {"scrapy_ingest.IngestAddon": 300}

It adds the item pipeline (900), the jobs, logs and metrics extensions (500), the
request log downloader middleware (950), the proxy downloader middleware (740,
when ``INGEST_PROXY_LIST`` or ``INGEST_PROXY_FILE`` is set) and the source spider
middleware (10), each only where the project has not placed or disabled that
component itself: a project setting always wins. With ``INGEST_ENABLED = False`` it
adds nothing; ``INGEST_REQUESTS_ENABLED``, ``INGEST_LOGS_ENABLED`` and
``INGEST_METRICS_ENABLED`` (off by default) decide whether their component is
placed.

Under a ``scrapy`` command that is not a crawl (``INGEST_SKIP_COMMANDS``: ``shell``,
``fetch``, ``view``, ``check``, ``bench``, and ``parse`` without ``--pipelines``), it
places none of the storing components: such a command opens no database and writes no
row. The proxy and retry middlewares are still placed.

With ``INGEST_RETRY_ENABLED = True`` (off by default) it places
:class:`~scrapy_ingest.downloadermiddlewares.retry.BackoffRetryMiddleware` at
550 and, where that placement stands, sets Scrapy's RetryMiddleware to
``None``: a component in ``REPLACES`` takes the place of Scrapy's, unless the
project placed Scrapy's itself.

Where ``ITEM_PROCESSOR`` is Scrapy's default, it sets it to
:class:`~scrapy_ingest.pipelines.IngestItemProcessor`, Scrapy's item pipeline
manager with one change: it calls IngestPipeline directly instead of through
Scrapy's generic chain of pipeline methods, which costs a crawl of many items
several percent of its speed. A project that sets ``ITEM_PROCESSOR`` (even to
Scrapy's own) keeps it.

Where ``LOG_FORMATTER`` is Scrapy's default, it sets it to
:class:`~scrapy_ingest.logformatter.IngestLogFormatter`, Scrapy's log formatter
omitting the per-item and per-response messages that no log handler would
take (with ``LOG_LEVEL = "INFO"``, Scrapy still builds a ``DEBUG`` record for
every item). A project that sets ``LOG_FORMATTER`` keeps it.

With scrapy-redis (``SCHEDULER = "scrapy_redis.scheduler.Scheduler"``) and
``INGEST_REDIS_LEASES = True`` (the default), it puts
:class:`~scrapy_ingest.scheduler.RedisLeaseScheduler`, a subclass that leases
the requests it takes from Redis until they are done, in its place (at the same
priority), so that a worker that dies loses none of them. A project that names
another scheduler (a subclass of its own) keeps it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scrapy.utils.misc import load_object
from scrapy.utils.python import global_object_name

from scrapy_ingest import settings as defaults
from scrapy_ingest._redis import SCRAPY_REDIS_SCHEDULER
from scrapy_ingest.config import skipped_command

if TYPE_CHECKING:
    from scrapy.settings import BaseSettings

# By import path: a component's module is imported only when the add-on places it, so that a
# crawl without metrics, proxies or retries does not import them (nor the metrics' web server,
# nor the Scrapy HTTP/1.1 handler the proxy middleware needs).
PIPELINE = "scrapy_ingest.pipelines.IngestPipeline"
JOBS = "scrapy_ingest.extensions.jobs.IngestJobsExtension"
LOGS = "scrapy_ingest.extensions.logs.IngestLogsExtension"
METRICS = "scrapy_ingest.extensions.metrics.PrometheusExtension"
REQUEST_LOG = "scrapy_ingest.downloadermiddlewares.requestlog.RequestLogMiddleware"
RETRY = "scrapy_ingest.downloadermiddlewares.retry.BackoffRetryMiddleware"
PROXY = "scrapy_ingest.downloadermiddlewares.proxy.ProxyMiddleware"
SOURCE = "scrapy_ingest.spidermiddlewares.source.SourceMiddleware"

#: (setting, component, order, the INGEST_* switch that must be on for it, if any: a boolean
#: setting, or settings of which one must be non-empty)
COMPONENTS: tuple[tuple[str, str, int, str | tuple[str, ...] | None], ...] = (
    ("ITEM_PIPELINES", PIPELINE, 900, None),
    ("EXTENSIONS", JOBS, 500, None),
    ("EXTENSIONS", LOGS, 500, "INGEST_LOGS_ENABLED"),
    ("EXTENSIONS", METRICS, 500, "INGEST_METRICS_ENABLED"),
    ("DOWNLOADER_MIDDLEWARES", REQUEST_LOG, 950, "INGEST_REQUESTS_ENABLED"),
    ("DOWNLOADER_MIDDLEWARES", RETRY, 550, "INGEST_RETRY_ENABLED"),
    ("DOWNLOADER_MIDDLEWARES", PROXY, 740, ("INGEST_PROXY_LIST", "INGEST_PROXY_FILE")),
    ("SPIDER_MIDDLEWARES", SOURCE, 10, None),
)

#: the components that store (or report on storing): left out where the running ``scrapy``
#: command is not a crawl (INGEST_SKIP_COMMANDS); the proxy and retry middlewares stay, so
#: that ``scrapy shell`` and ``scrapy fetch`` download the way a crawl does
STORING: frozenset[str] = frozenset({PIPELINE, JOBS, LOGS, METRICS, REQUEST_LOG, SOURCE})

#: our component -> the import path of the Scrapy component it takes the place of (set to
#: None where ours is enabled, unless the project placed Scrapy's itself)
REPLACES: dict[str, str] = {
    RETRY: "scrapy.downloadermiddlewares.retry.RetryMiddleware",
}

#: Scrapy's item processor (ITEM_PROCESSOR), and ours, which calls IngestPipeline directly
SCRAPY_ITEM_PROCESSOR = "scrapy.pipelines.ItemPipelineManager"
ITEM_PROCESSOR = "scrapy_ingest.IngestItemProcessor"

#: Scrapy's log formatter (LOG_FORMATTER), and ours, which omits what no handler would take
SCRAPY_LOG_FORMATTER = "scrapy.logformatter.LogFormatter"
LOG_FORMATTER = "scrapy_ingest.IngestLogFormatter"

#: scrapy-redis's scheduler, with leases (see scrapy_ingest.scheduler)
LEASE_SCHEDULER = "scrapy_ingest.scheduler.RedisLeaseScheduler"


class IngestAddon:
    def update_settings(self, settings: BaseSettings) -> None:
        if not settings.getbool("INGEST_ENABLED", defaults.INGEST_ENABLED):
            return
        not_a_crawl = skipped_command(settings) is not None
        for setting, path, order, switch in COMPONENTS:
            if not_a_crawl and path in STORING:
                continue
            # a component switched off is not placed (placed, it would only say it is disabled)
            if _switched_on(settings, switch):
                component = load_object(path)
                settings.setdefault_in_component_priority_dict(setting, component, order)
                replaced = REPLACES.get(path)
                if replaced is not None and _enabled(settings, setting, path):
                    _disable_by_default(settings, setting, replaced)
        if _enabled(settings, "ITEM_PIPELINES", PIPELINE):
            _replace_default(settings, "ITEM_PROCESSOR", SCRAPY_ITEM_PROCESSOR, ITEM_PROCESSOR)
        _replace_default(settings, "LOG_FORMATTER", SCRAPY_LOG_FORMATTER, LOG_FORMATTER)
        if settings.getbool("INGEST_REDIS_LEASES", defaults.INGEST_REDIS_LEASES):
            _lease_redis_requests(settings)


def _replace_default(settings: BaseSettings, name: str, scrapys: str, ours: str) -> None:
    """*name* becomes *ours* where it is Scrapy's default (*scrapys*, at the default priority):
    a value the project (or another add-on) set, even Scrapy's own, is kept."""
    value = settings.get(name)
    if value is not None and not isinstance(value, str):  # a class
        value = global_object_name(value)
    if value == scrapys and settings.getpriority(name) == 0:
        settings.set(name, ours, "addon")


def _lease_redis_requests(settings: BaseSettings) -> None:
    """scrapy-redis's own scheduler becomes RedisLeaseScheduler, at the same priority."""
    scheduler = settings.get("SCHEDULER")
    if scheduler is not None and not isinstance(scheduler, str):  # a class
        scheduler = global_object_name(scheduler)
    if scheduler == SCRAPY_REDIS_SCHEDULER:
        settings.set("SCHEDULER", LEASE_SCHEDULER, settings.getpriority("SCHEDULER") or 0)


def _switched_on(settings: BaseSettings, switch: str | tuple[str, ...] | None) -> bool:
    if switch is None:
        return True
    if isinstance(switch, str):
        return settings.getbool(switch, getattr(defaults, switch))
    return any(settings.get(name, getattr(defaults, name)) for name in switch)


def _enabled(settings: BaseSettings, setting: str, path: str) -> bool:
    """The component at *path* has an order (not None) in the *setting* component dict.

    Compared by the import path of each key's class, so that asking does not import the
    component: under ``scrapy shell``, for instance, the pipeline is not placed.
    """
    return any(
        order is not None
        and global_object_name(load_object(key) if isinstance(key, str) else key) == path
        for key, order in settings.getdict(setting).items()
    )


def _disable_by_default(settings: BaseSettings, setting: str, path: str) -> None:
    """Set the component at *path* to None in *setting*, unless the project placed it.

    By its import path, the key of Scrapy's ``*_BASE`` settings: Scrapy 2.13 does not merge
    a class key with the path key of the same component.
    """
    components = settings.getdict(setting)
    cls = load_object(path)
    if any((load_object(key) if isinstance(key, str) else key) is cls for key in components):
        return
    components[path] = None
    settings.set(setting, components, settings.getpriority(setting) or 0)
