"""A spider's name is stored like any text: one with a NUL stores its job and its items on a
real PostgreSQL (the NUL becomes U+FFFD); one longer than its indexed column takes is refused
at start, naming the limit, with nothing scraped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
from _helpers import REPO_DIR, Database

if TYPE_CHECKING:
    from pathlib import Path

    from services import LocalSite

pytestmark = [pytest.mark.crawl, pytest.mark.postgres]

SCRIPT = """
import json, sys
import scrapy
from scrapy.crawler import CrawlerProcess

with open(sys.argv[1], encoding="utf-8") as file:
    name, base_url, database = json.load(file)


class Spider(scrapy.Spider):
    start_urls = [base_url + "/items?n=100"]

    def parse(self, response):
        for n in range(int(response.text)):
            yield {"n": n}


Spider.name = name
process = CrawlerProcess(
    {
        "ADDONS": {"scrapy_ingest.IngestAddon": 300},
        "INGEST_DATABASE_URL": database,
        "INGEST_SPILL_DIR": "spill",
        "LOG_LEVEL": "INFO",
    }
)
crawler = process.create_crawler(Spider)
process.crawl(crawler)
process.start()
finished = crawler.stats.get_value("finish_reason") == "finished"
sys.exit(0 if finished and not process.bootstrap_failed else 1)
"""


def _crawl(
    name: str, site: LocalSite, url: str, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "crawl.py"
    script.write_text(SCRIPT)
    arguments = tmp_path / "arguments.json"
    arguments.write_text(json.dumps([name, site.base_url, url]), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO_DIR)}
    env.pop("SCRAPY_SETTINGS_MODULE", None)
    return subprocess.run(
        [sys.executable, str(script), str(arguments)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_spider_named_with_a_nul_stores_its_job_and_items(
    site: LocalSite, pg_url: str, tmp_path: Path
) -> None:
    run = _crawl("shop\x00v2", site, pg_url, tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    db = Database(pg_url)
    assert db.query("SELECT spider, status FROM ingest_jobs") == [("shop\ufffdv2", "finished")]
    assert db.query("SELECT count(*), min(spider) FROM ingest_items") == [(100, "shop\ufffdv2")]
    assert not (tmp_path / "spill").exists() or not any((tmp_path / "spill").rglob("*.batch"))


def test_a_spider_name_longer_than_its_column_is_refused_at_start(
    site: LocalSite, pg_url: str, tmp_path: Path
) -> None:
    run = _crawl("x" * 1_000_000, site, pg_url, tmp_path)
    assert run.returncode != 0
    assert "the spider's name is 1,000,000 characters long" in run.stderr
    assert "at most 255" in run.stderr and "Fix: give the spider a shorter name" in run.stderr
    assert not any("/items" in hit for hit in site.hits)  # nothing scraped for nothing
    assert not Database(pg_url).query(
        "SELECT 1 FROM pg_tables WHERE tablename = 'ingest_items'"
    ) or Database(pg_url).query("SELECT count(*) FROM ingest_items") == [(0,)]
