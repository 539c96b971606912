"""Hostile input is stored as data: spider names, item types, URLs, log messages and values
with quotes, ``;``, ``$$``, NUL, newlines or a megabyte of text, in PostgreSQL and SQLite."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from _crawl_script import HOSTILE, HOSTILE_NAME, HOSTILE_TYPE
from _helpers import Database, run_crawl

from scrapy_ingest.extensions.logs import MAX_TEXT

if TYPE_CHECKING:
    from pathlib import Path

    from services import LocalSite

pytestmark = pytest.mark.crawl

#: NUL cannot be stored as text anywhere: it becomes U+FFFD (ingest/values/nul counts it)
STORED = HOSTILE.replace("\x00", "\ufffd")
MEGABYTE = 1024 * 1024


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_hostile_names_urls_messages_and_values_are_stored_as_data(
    site: LocalSite, tmp_path: Path, database: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("sqlite_url" if database == "sqlite" else "pg_url")
    db = Database(url)
    result = run_crawl(
        {"base_url": site.base_url, "spider": "hostile", "settings": {"INGEST_DATABASE_URL": url}},
        tmp_path,
    )
    assert result.returncode == 0, result.describe()
    assert result.stats["finish_reason"] == "finished", result.describe()
    assert "ingest/items/dead_letter" not in result.stats
    items = db.rows("ingest_items")
    assert len(items) == 2
    for item in items:
        assert item["spider"] == HOSTILE_NAME
        assert item["item_type"] == HOSTILE_TYPE
        assert item["data"]["text"] == STORED
        assert item["data"][STORED] == "a key too"
    big = next(item for item in items if "big" in item["data"])
    assert len(big["data"]["big"]) == MEGABYTE
    assert {item["url"] for item in items} == {r["url"] for r in db.rows("ingest_requests")}
    assert all("%27%3B%24%24" in item["url"] for item in items)
    messages = [log["message"] for log in db.rows("ingest_logs") if log["logger"] == HOSTILE_NAME]
    assert STORED in messages or HOSTILE in messages  # SQLite's TEXT keeps NUL
    # a message is kept up to 100,000 characters (MAX_TEXT), then marked as cut
    [big_message] = [m for m in messages if m.startswith("big: ")]
    assert big_message == "big: " + "m" * (MAX_TEXT - 5) + "...[truncated]"
    [job] = db.rows("ingest_jobs")
    assert job["spider"] == HOSTILE_NAME
    assert result.stats["ingest/values/nul"] >= 2
    # every table is still there, with what was written to it
    for table in ("ingest_items", "ingest_requests", "ingest_logs", "ingest_jobs"):
        assert db.table_exists(table)
