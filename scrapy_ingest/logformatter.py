"""The log formatter: Scrapy's messages, without the records that no handler would emit.

For every item and every response, Scrapy asks its ``LOG_FORMATTER`` for a
``DEBUG`` message ("Scraped from ...", "Crawled (200) ...") and logs it. Scrapy
sets the root logger's level to ``NOTSET`` and filters with its handler's
level (``LOG_LEVEL``) instead, so the record is built in full (the caller's
frame looked up, the arguments kept) even when ``LOG_LEVEL`` is ``INFO`` and
every handler drops it: in a crawl that does little but yield items, about a
fifth of Scrapy's time per item (docs/performance.md).

:class:`IngestLogFormatter` returns Scrapy's message unchanged when some
handler on the logger's way to the root would take a record of its level,
and ``None`` (Scrapy's documented way to omit a message) when none would: the
test that :meth:`logging.Logger.callHandlers` makes. So everything that a
handler would print, count (Scrapy's ``log_count/*`` stats) or store (the
logs table) is logged as before; with ``LOG_LEVEL = "DEBUG"``, Scrapy's
default, every message is. The add-on sets ``LOG_FORMATTER`` to it where the
project has not set one; alone::

    LOG_FORMATTER = "scrapy_ingest.IngestLogFormatter"

A subclass of it keeps the check for the messages it does not override.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from scrapy.logformatter import LogFormatter

if TYPE_CHECKING:
    from scrapy import Request, Spider
    from scrapy.http import Response
    from scrapy.logformatter import LogFormatterResult
    from twisted.python.failure import Failure

# the loggers Scrapy logs these messages to (its engine's and its scraper's module names)
_ENGINE_LOGGER = logging.getLogger("scrapy.core.engine")
_SCRAPER_LOGGER = logging.getLogger("scrapy.core.scraper")


def would_emit(logger: logging.Logger, level: int) -> bool:
    """Whether a record of *level* logged to *logger* would reach a handler that takes it.

    The checks of :meth:`logging.Logger.isEnabledFor` and
    :meth:`logging.Logger.callHandlers`: the logger's effective level and
    ``logging.disable()``, then each handler's level on the way to the root
    (as far as ``propagate`` goes), then ``logging.lastResort`` when there is
    no handler at all.
    """
    if not logger.isEnabledFor(level):
        return False
    current: logging.Logger | None = logger
    found = False
    while current is not None:
        for handler in current.handlers:
            if level >= handler.level:
                return True
            found = True
        if not current.propagate:
            break
        current = current.parent
    last_resort = logging.lastResort
    return not found and last_resort is not None and level >= last_resort.level


class IngestLogFormatter(LogFormatter):
    """Scrapy's :class:`~scrapy.logformatter.LogFormatter`, omitting what no handler takes."""

    def crawled(  # type: ignore[override]  # Scrapy's stub says it never returns None
        self, request: Request, response: Response, spider: Spider
    ) -> LogFormatterResult | None:
        return _if_emitted(_ENGINE_LOGGER, super().crawled(request, response, spider))

    def scraped(  # type: ignore[override]
        self, item: Any, response: Response | Failure | None, spider: Spider
    ) -> LogFormatterResult | None:
        return _if_emitted(_SCRAPER_LOGGER, super().scraped(item, response, spider))

    def dropped(  # type: ignore[override]
        self,
        item: Any,
        exception: BaseException,
        response: Response | Failure | None,
        spider: Spider,
    ) -> LogFormatterResult | None:
        return _if_emitted(_SCRAPER_LOGGER, super().dropped(item, exception, response, spider))


def _if_emitted(
    logger: logging.Logger, logkws: LogFormatterResult | None
) -> LogFormatterResult | None:
    if logkws is None or would_emit(logger, logkws.get("level", logging.INFO)):
        return logkws
    return None
