"""IngestLogFormatter omits Scrapy's messages that no log handler would take, and only those."""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from _helpers import REACTORS, Database, run_crawl
from scrapy import Request, Spider
from scrapy.exceptions import DropItem
from scrapy.http import HtmlResponse
from scrapy.logformatter import LogFormatter
from scrapy.utils.test import get_crawler

from scrapy_ingest import IngestLogFormatter
from scrapy_ingest.logformatter import would_emit

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from services import LocalSite


@pytest.fixture
def chain() -> Iterator[tuple[logging.Logger, logging.Logger]]:
    """A parent logger that does not propagate, and its child: loggers of the test's own."""
    name = f"tests.logformatter.{uuid.uuid4().hex}"
    parent, child = logging.getLogger(name), logging.getLogger(f"{name}.child")
    parent.propagate = False
    parent.setLevel(1)  # every record through, as Scrapy leaves the root logger
    yield parent, child
    for logger in (parent, child):
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True


def _only(logger: logging.Logger, level: int) -> None:
    """Give *logger* one handler, at *level*. In the test's body: pytest adds its own handlers
    (which take every level) to loggers that do not propagate, as each test starts."""
    logger.handlers = [logging.NullHandler(level)]


def test_a_record_is_emitted_when_a_handler_on_the_way_takes_its_level(
    chain: tuple[logging.Logger, logging.Logger],
) -> None:
    parent, child = chain
    _only(parent, logging.INFO)
    assert not would_emit(child, logging.DEBUG)
    assert would_emit(child, logging.INFO)
    assert would_emit(child, logging.ERROR)
    child.addHandler(logging.NullHandler(logging.DEBUG))
    assert would_emit(child, logging.DEBUG)


def test_propagation_stops_where_a_logger_says_so(
    chain: tuple[logging.Logger, logging.Logger],
) -> None:
    parent, child = chain
    _only(parent, logging.DEBUG)
    child.propagate = False
    # no handler at all on the way: logging's last resort, which takes WARNING and above
    assert not would_emit(child, logging.INFO)
    assert would_emit(child, logging.WARNING)
    _only(child, logging.ERROR)  # a handler, so no last resort
    assert not would_emit(child, logging.WARNING)


def test_logger_levels_and_logging_disable_are_obeyed(
    chain: tuple[logging.Logger, logging.Logger],
) -> None:
    parent, child = chain
    _only(parent, logging.DEBUG)
    child.setLevel(logging.ERROR)
    assert not would_emit(child, logging.WARNING)
    assert would_emit(child, logging.ERROR)
    child.setLevel(logging.NOTSET)
    logging.disable(logging.INFO)
    try:
        assert not would_emit(child, logging.INFO)
        assert would_emit(child, logging.WARNING)
    finally:
        logging.disable(logging.NOTSET)


@pytest.fixture
def scrapy_loggers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[logging.Logger]]:
    """Scrapy's engine and scraper loggers, cut off from the root (pytest's handlers), letting
    every record through."""
    loggers = [logging.getLogger("scrapy.core.engine"), logging.getLogger("scrapy.core.scraper")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        monkeypatch.setattr(logger, "propagate", False)
        monkeypatch.setattr(logger, "handlers", [])
        logger.setLevel(1)  # setLevel, not the attribute: it clears logging's cache of levels
    yield loggers
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


def _messages(*formatters: LogFormatter) -> list[dict[str, Any]]:
    """What each formatter says of one crawled page, one scraped and one dropped item."""
    spider = Spider.from_crawler(get_crawler(), "mine")
    response = HtmlResponse("http://example.com/", body=b"", request=Request("http://example.com"))
    item, drop = {"title": "x"}, DropItem("no")
    return [
        {
            "crawled": f.crawled(response.request, response, spider),  # type: ignore[arg-type]
            "scraped": f.scraped(item, response, spider),
            "dropped": f.dropped(item, drop, response, spider),
        }
        for f in formatters
    ]


@pytest.mark.parametrize("level", [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR])
def test_the_formatter_gives_scrapys_message_or_none_by_the_handlers_level(
    scrapy_loggers: list[logging.Logger], level: int
) -> None:
    for logger in scrapy_loggers:
        _only(logger, level)
    ours, scrapys = _messages(IngestLogFormatter(), LogFormatter())
    for action, logkws in scrapys.items():
        taken = logkws["level"] >= level
        assert ours[action] == (logkws if taken else None), (action, level)


def _crawl(site: LocalSite, tmp_path: Path, reactor: str, **settings: Any) -> Any:
    db = Database(f"sqlite:///{tmp_path / 'ingest.sqlite3'}")
    result = run_crawl(
        {
            "base_url": site.base_url,
            "reactor": reactor,
            "pages": 2,
            "per_page": 5,
            "settings": {"INGEST_DATABASE_URL": db.url, **settings},
        },
        tmp_path,
    )
    result.assert_clean()
    assert result.stats["item_scraped_count"] == 10
    return result, db


@pytest.mark.parametrize("reactor", REACTORS)
def test_with_log_level_debug_every_message_is_logged(
    site: LocalSite, tmp_path: Path, reactor: str
) -> None:
    result, _ = _crawl(site, tmp_path, reactor, LOG_LEVEL="DEBUG")
    assert result.output.count("DEBUG: Scraped from <200 ") == 10, result.describe()
    assert result.output.count("DEBUG: Crawled (200) ") >= 2, result.describe()
    # Scrapy's counter of logged records saw them too
    assert result.stats["log_count/DEBUG"] >= 12


def test_a_message_below_log_level_is_still_stored_when_the_logs_table_takes_it(
    site: LocalSite, tmp_path: Path
) -> None:
    result, db = _crawl(site, tmp_path, "asyncio", LOG_LEVEL="INFO", INGEST_LOG_LEVEL="DEBUG")
    assert "Scraped from" not in result.output
    assert "log_count/DEBUG" not in result.stats  # Scrapy's counter takes INFO and above
    stored = db.query(
        "SELECT count(*) FROM ingest_logs WHERE logger = 'scrapy.core.scraper'"
        " AND level = 10 AND message LIKE 'Scraped from <200 %'"
    )
    assert stored == [(10,)]
