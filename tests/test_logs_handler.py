"""IngestLogHandler and the logs extension, in this process: what a crawl's handler keeps,
counts and leaves alone. The end-to-end crawls (``test_crawl_requests.py``) show the rows."""

from __future__ import annotations

import linecache
import logging
import sys
from typing import TYPE_CHECKING, Any

import pytest
from scrapy import Spider
from scrapy.exceptions import NotConfigured
from scrapy.utils.test import get_crawler

from scrapy_ingest import IngestLogsExtension

if TYPE_CHECKING:
    from pathlib import Path

    from scrapy.crawler import Crawler


def _crawler(tmp_path: Path, **settings: Any) -> Crawler:
    crawler = get_crawler(
        settings_dict={"INGEST_DATABASE_URL": f"sqlite:///{tmp_path / 'x.sqlite3'}", **settings}
    )
    crawler.spider = Spider("mine")
    return crawler


@pytest.fixture(autouse=True)
def _all_levels(caplog: pytest.LogCaptureFixture) -> None:
    # as Scrapy's configure_logging() leaves it: the root logger lets every record through
    caplog.set_level(logging.NOTSET)


@pytest.fixture
def extension(tmp_path: Path) -> Any:
    ext = IngestLogsExtension.from_crawler(_crawler(tmp_path))
    yield ext
    ext._close()


def _log(level: int, message: str, *, name: str = "some.library", **extra: Any) -> None:
    logging.getLogger(name).log(level, message, extra=extra)


def test_the_handler_is_added_beside_the_others_and_removed_at_close(tmp_path: Path) -> None:
    crawler = _crawler(tmp_path)  # Scrapy 2.13 adds its own handler here
    root = logging.getLogger()
    level, handlers, stdout = root.level, list(root.handlers), sys.stdout
    ext = IngestLogsExtension.from_crawler(crawler)
    assert root.handlers == [*handlers, ext.handler]
    assert (root.level, sys.stdout) == (level, stdout)
    ext._close()
    assert root.handlers == handlers
    assert root.level == level


def test_records_of_this_crawl_at_the_level_are_kept(extension: Any) -> None:
    spider = extension.crawler.spider
    _log(logging.INFO, "kept, names no spider")
    _log(logging.WARNING, "kept, names this spider", spider=spider)
    _log(logging.WARNING, "another crawler's", spider=Spider("theirs"))
    _log(logging.DEBUG, "below INGEST_LOG_LEVEL")
    messages = [entry[4] for entry in extension.handler.entries]
    assert messages == ["kept, names no spider", "kept, names this spider"]
    assert extension.handler.counts == {"INFO": 1, "WARNING": 1}


def test_storage_records_are_counted_never_kept(extension: Any) -> None:
    # a failing database logs through the storage layer's loggers: storing those lines in that
    # same database would feed a loop; the middlewares' records are about the crawl: kept
    _log(logging.ERROR, "the database is down", name="scrapy_ingest.backends.base")
    _log(logging.ERROR, "writing failed", name="scrapy_ingest.batching")
    _log(logging.ERROR, "spilling failed", name="scrapy_ingest.spill")
    proxy_logger = "scrapy_ingest.downloadermiddlewares.proxy"
    _log(logging.WARNING, "every proxy is benched", name=proxy_logger)
    _log(logging.ERROR, "not ours", name="scrapy_ingestion_lookalike")
    kept = [entry[4] for entry in extension.handler.entries]
    assert kept == ["every proxy is benched", "not ours"]
    assert extension.handler.counts == {"ERROR": 4, "WARNING": 1}


def test_errors_are_counted_even_above_the_storing_level(tmp_path: Path) -> None:
    ext = IngestLogsExtension.from_crawler(_crawler(tmp_path, INGEST_LOG_LEVEL="CRITICAL"))
    try:
        _log(logging.ERROR, "an error")
        _log(logging.WARNING, "a warning")
        _log(logging.CRITICAL, "critical")
        assert [entry[4] for entry in ext.handler.entries] == ["critical"]
        assert ext.handler.counts == {"ERROR": 1, "CRITICAL": 1}
    finally:
        ext._close()


def test_emit_reads_no_source_file(extension: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[str] = []
    monkeypatch.setattr(linecache, "updatecache", lambda name, *a: read.append(name) or [])
    linecache.clearcache()
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    extension.handler.handle(record)
    assert read == []
    [entry] = extension.handler.entries
    assert entry[4] == "failed"
    monkeypatch.undo()
    text = "".join(entry[5].format())  # what the reactor thread does later
    assert 'raise ValueError("boom")' in text
    assert text.endswith("ValueError: boom\n")


def test_a_bad_format_string_keeps_the_record(extension: Any) -> None:
    record = logging.getLogger("x").makeRecord(
        "x", logging.WARNING, __file__, 1, "%d items", ("not a number",), None
    )
    extension.handler.handle(record)
    [entry] = extension.handler.entries
    assert "could not be formatted" in entry[4]
    assert "%d items" in entry[4]


def test_disabled_by_setting(tmp_path: Path) -> None:
    crawler = _crawler(tmp_path, INGEST_LOGS_ENABLED=False)
    handlers = list(logging.getLogger().handlers)
    with pytest.raises(NotConfigured):
        IngestLogsExtension.from_crawler(crawler)
    assert logging.getLogger().handlers == handlers
