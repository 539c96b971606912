"""Several crawl processes that start at once against one empty database: the schema is created
once, without errors, and every crawl stores each of its items exactly once."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import pytest
from _crawl_script import title
from _helpers import Crawl, Database

from scrapy_ingest.schema import SCHEMA_VERSION

if TYPE_CHECKING:
    from pathlib import Path

    from services import LocalSite

pytestmark = [pytest.mark.crawl, pytest.mark.slow]

PROCESSES = 4
PAGES, PER_PAGE = 4, 25
ITEMS = PAGES * PER_PAGE


def _crawl_at_once(site: LocalSite, db: Database, tmp_path: Path) -> None:
    crawls = [
        Crawl(
            {
                "base_url": site.base_url,
                "reactor": "asyncio" if n % 2 else "default",
                "pages": PAGES,
                "per_page": PER_PAGE,
                "settings": {
                    "INGEST_DATABASE_URL": db.url,
                    "INGEST_CRAWL_ID": "shared-crawl",
                    "INGEST_BATCH_ROWS": 10,
                },
            },
            tmp_path / f"crawl-{n}",
        )
        for n in range(PROCESSES)
    ]
    try:
        results = [crawl.wait() for crawl in crawls]
    finally:
        for crawl in crawls:
            crawl.kill()
    for result in results:
        result.assert_clean()
        assert result.stats["ingest/items/stored"] == ITEMS

    assert db.query("SELECT version FROM ingest_schema_version") == [(SCHEMA_VERSION,)]
    jobs = db.jobs()
    assert len(jobs) == PROCESSES
    assert len({job["job_id"] for job in jobs}) == PROCESSES
    assert len({job["pid"] for job in jobs}) == PROCESSES
    assert {job["crawl_id"] for job in jobs} == {"shared-crawl"}
    assert {(job["status"], job["close_reason"], job["items_count"]) for job in jobs} == {
        ("finished", "finished", ITEMS)
    }
    items = db.items()
    assert len({item["id"] for item in items}) == len(items) == PROCESSES * ITEMS
    assert Counter(item["job_id"] for item in items) == {job["job_id"]: ITEMS for job in jobs}
    for job in jobs:
        titles = sorted(item["data"]["title"] for item in items if item["job_id"] == job["job_id"])
        assert titles == [title(i) for i in range(ITEMS)]


@pytest.mark.postgres
def test_crawls_starting_at_once_on_postgres(site: LocalSite, pg_url: str, tmp_path: Path) -> None:
    _crawl_at_once(site, Database(pg_url), tmp_path)


def test_crawls_starting_at_once_on_one_sqlite_file(
    site: LocalSite, sqlite_url: str, tmp_path: Path
) -> None:
    _crawl_at_once(site, Database(sqlite_url), tmp_path)
