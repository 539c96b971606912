"""An item pipeline for tests/test_routing_open.py, placed before IngestPipeline: at the
spider's first item, it looks in each SQLite file of ``TEST_OPEN_CHECK`` (path -> the tables
the crawl routes there) for those tables and for this job's row, and writes what it found to
``TEST_OPEN_CHECK_FILE`` (JSON: path -> {"tables": [found], "jobs": rows of this spider})."""

from __future__ import annotations

import json
import sqlite3
from typing import Any


class OpenCheck:
    def __init__(self, crawler: Any) -> None:
        self.crawler = crawler
        self.done = False

    @classmethod
    def from_crawler(cls, crawler: Any) -> OpenCheck:
        return cls(crawler)

    def process_item(self, item: Any, spider: Any = None) -> Any:
        if self.done:
            return item
        self.done = True
        settings = self.crawler.settings
        found: dict[str, Any] = {}
        for path, tables in settings.getdict("TEST_OPEN_CHECK").items():
            with sqlite3.connect(path) as conn:
                names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
                jobs = 0
                if "ingest_jobs" in names:
                    query = "SELECT count(*) FROM ingest_jobs WHERE spider = ?"
                    [(jobs,)] = conn.execute(query, [self.crawler.spider.name])
            found[path] = {"tables": sorted(t for t in tables if t in names), "jobs": jobs}
        with open(settings["TEST_OPEN_CHECK_FILE"], "w") as file:
            json.dump(found, file)
        return item
