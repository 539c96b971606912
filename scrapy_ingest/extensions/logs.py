"""The logs extension: the crawl's log records in the ``logs`` table.

Enabled by the add-on; alone::

    EXTENSIONS = {"scrapy_ingest.IngestLogsExtension": 500}

Settings: ``INGEST_LOGS_ENABLED``, ``INGEST_LOG_LEVEL`` (``INFO``).

For the crawl, from the extension's creation to the spider's close, a
:class:`IngestLogHandler` is added to the root logger, beside the handlers
already there. It changes no logger's level and no other handler, so it
stores the records that Scrapy's own log would show at a level as low as
``INGEST_LOG_LEVEL``; a record that a logger's level filters out reaches no
handler at all (Scrapy's ``LOG_LEVEL`` does not filter loggers, only its own
handler).

Which records a crawl stores:

* those of its own spider: records that name a spider (``spider.logger``,
  and Scrapy's engine and middlewares, pass ``extra={"spider": ...}``) are
  stored by the crawl of that spider only, so two crawlers in one process
  keep their logs apart;
* those that name no spider (other libraries, Twisted): by every crawl of
  the process, since nothing says which one they belong to;
* never the records of scrapy_ingest's storage layer (:data:`STORAGE_LOGGERS`:
  the backends, the writers and their hosts, the spill journal and its replay,
  the runtime and the job row): they report on the storage itself, and
  storing a "the database is failing" line in that failing database would
  feed a loop. They still go to Scrapy's log. scrapy_ingest's other records
  (the proxy and retry middlewares, the pipeline, the scheduler, metrics) are
  stored like any other.

``emit()`` does no I/O: it formats the message, takes a summary of the
traceback (without its source lines, which would be read from disk), and
appends a tuple to a deque; the reactor thread turns them into rows, with
the traceback text, a few times per ``INGEST_FLUSH_INTERVAL``. Records from
any thread are accepted.

Messages and tracebacks are stored with the secrets of the URLs in them hidden
(``scheme://user:password@``, and the query parameters of
``INGEST_REDACT_QUERY_PARAMS``), Scrapy's own lines included, and with the values
of secret-looking settings in a printed dict (``'API_KEY': '...'``) hidden.
"""

from __future__ import annotations

import logging
import traceback
import weakref
from collections import deque
from typing import TYPE_CHECKING

from scrapy import signals
from scrapy.exceptions import NotConfigured

from scrapy_ingest._redact import redact_text
from scrapy_ingest._stats import stat_key
from scrapy_ingest.runtime import ROW_OVERHEAD, IngestRuntime

if TYPE_CHECKING:
    from scrapy.crawler import Crawler
    from typing_extensions import Self

#: loggers whose records are never stored, with the loggers under them (see the module
#: docstring): those that report on the storage itself
STORAGE_LOGGERS = (
    "scrapy_ingest._closing",
    "scrapy_ingest._counters",
    "scrapy_ingest._databases",
    "scrapy_ingest._job",
    "scrapy_ingest.backends",
    "scrapy_ingest.batching",
    "scrapy_ingest.commands",
    "scrapy_ingest.extensions.jobs",
    "scrapy_ingest.hosting",
    "scrapy_ingest.runtime",
    "scrapy_ingest.spill",
)
_STORAGE_PREFIXES = tuple(f"{name}." for name in STORAGE_LOGGERS)
#: largest message or traceback stored, in characters
MAX_TEXT = 100_000
#: records kept for the reactor thread at most; it takes them 4 times per
#: INGEST_FLUSH_INTERVAL, so only a crawl that never opened comes near it
MAX_PENDING = 100_000
_QUEUED = stat_key("logs", "queued")
_DROPPED = stat_key("logs", "dropped")

#: (logged_at, level, level_name, logger, message, exception)
LogEntry = tuple[float, int, str, str, str, traceback.TracebackException | str | None]


class IngestLogHandler(logging.Handler):
    """Keep the records of one crawler in memory until the reactor thread takes them."""

    def __init__(self, crawler: Crawler, level: int) -> None:
        # records at ERROR and above are counted even when INGEST_LOG_LEVEL is higher
        super().__init__(min(level, logging.ERROR))
        # held weakly: on the root logger, the handler outlives a crawl that fails before its
        # engine runs (no engine_stopped to remove it), and must not keep that crawl alive
        self._crawler = weakref.ref(crawler, self._crawler_gone)
        self.store_level = level
        self.entries: deque[LogEntry] = deque()
        #: records of this crawl seen per level name, stored or not (the storage layer's too)
        self.counts: dict[str, int] = {}
        #: logger name -> whether its records are the storage layer's (a dict lookup per record)
        self._storage: dict[str, bool] = {}
        #: records not kept because MAX_PENDING were waiting
        self.dropped = 0

    def _crawler_gone(self, _: weakref.ref[Crawler]) -> None:
        logging.root.removeHandler(self)

    def _is_storage(self, name: str) -> bool:
        storage = self._storage.get(name)
        if storage is None:
            storage = self._storage[name] = name in STORAGE_LOGGERS or name.startswith(
                _STORAGE_PREFIXES
            )
        return storage

    def emit(self, record: logging.LogRecord) -> None:
        crawler = self._crawler()
        if crawler is None:
            return  # the crawl is gone (see _crawler_gone)
        spider = record.__dict__.get("spider")
        if spider is not None and spider is not crawler.spider:
            return  # another crawler's
        counts = self.counts
        counts[record.levelname] = counts.get(record.levelname, 0) + 1
        if record.levelno < self.store_level or self._is_storage(record.name):
            return
        if len(self.entries) >= MAX_PENDING:
            self.dropped += 1
            return
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: store what there is, like logging's own output
            message = f"{record.msg!r} % {record.args!r} (the message could not be formatted)"
        exception: traceback.TracebackException | str | None = record.exc_text
        if record.exc_info and record.exc_info[0] is not None:
            # no source lines yet (linecache reads files): the reactor thread formats it
            exception = traceback.TracebackException(*record.exc_info, lookup_lines=False)
        if record.stack_info:
            exception = f"{_format(exception) if exception else ''}{record.stack_info}"
        self.entries.append(
            (record.created, record.levelno, record.levelname, record.name, message, exception)
        )


class IngestLogsExtension:
    def __init__(self, crawler: Crawler) -> None:
        runtime = IngestRuntime.of(crawler)
        if not runtime.config.logs_enabled:
            raise NotConfigured("INGEST_LOGS_ENABLED is False")
        self.crawler = crawler
        self._runtime = runtime
        self.handler = IngestLogHandler(crawler, runtime.config.log_level)
        runtime.log_counts = self.handler.counts
        self._open = False
        # attached now, so that the records of the crawl's start are stored too
        logging.root.addHandler(self.handler)
        crawler.signals.connect(self._spider_opened, signal=signals.spider_opened)
        crawler.signals.connect(self._engine_stopped, signal=signals.engine_stopped)
        runtime.on_close(self._close)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Self:
        return cls(crawler)

    async def _spider_opened(self) -> None:
        runtime = self._runtime
        databases = await runtime.opened()
        if databases is None:
            self._detach()
            self.handler.entries.clear()
            return
        self._sink = databases.sink("logs")
        self._open = True
        runtime.on_tick(self._take)

    def _take(self) -> None:
        """Turn the records kept so far into rows (reactor thread)."""
        entries = self.handler.entries
        if not entries or not self._open:
            return
        sink = self._sink
        add, new_id, job_id, spider = sink.add, sink.new_id, sink.job_id, sink.spider
        redact = self._runtime.redact
        taken = 0
        while entries:
            logged_at, level, level_name, logger_name, message, exception = entries.popleft()
            message = redact(redact_text(_truncate(message)))
            if exception is not None:
                exception = redact(redact_text(_truncate(_format(exception))))
            size = ROW_OVERHEAD + len(message) + (len(exception) if exception else 0)
            add(
                (
                    new_id(logged_at),
                    job_id,
                    spider,
                    logged_at,
                    level,
                    level_name,
                    logger_name,
                    message,
                    exception,
                ),
                size,
            )
            taken += 1
        stats = self._runtime.stats
        stats.inc_value(_QUEUED, taken)
        if self.handler.dropped:
            stats.inc_value(_DROPPED, self.handler.dropped)
            self.handler.dropped = 0

    def _close(self) -> None:
        self._detach()
        self._take()
        self._open = False

    def _detach(self) -> None:
        logging.root.removeHandler(self.handler)

    def _engine_stopped(self) -> None:
        # the crawl never opened (or is long closed): never leave the handler behind
        logging.root.removeHandler(self.handler)


def _format(exception: traceback.TracebackException | str) -> str:
    if isinstance(exception, str):
        return exception
    return "".join(exception.format())


def _truncate(text: str) -> str:
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT] + "...[truncated]"
    return text
