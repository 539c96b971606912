"""MySQL and MariaDB through the SQLAlchemy backend, against a real MariaDB server (Debian's
mariadb-server, started by the fixture, or SCRAPY_INGEST_TEST_MYSQL_URL)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import orjson
import pytest
from _helpers import Database, run_crawl

from scrapy_ingest._ids import IdFactory
from scrapy_ingest.backends import Batch, local_host
from scrapy_ingest.schema import all_tables

if TYPE_CHECKING:
    from pathlib import Path

    from services import LocalSite

#: the tree crawl without its refused and TLS links: /tree, 4 pages, a redirect and its
#: target, a 404, and 3 attempts each of a 500 and a timeout
TREE_ROWS = 1 + 4 + 2 + 1 + 2 * 3


@pytest.mark.crawl
def test_a_crawl_into_mariadb(site: LocalSite, mysql_url: str, tmp_path: Path) -> None:
    db = Database(mysql_url)
    result = run_crawl(
        {
            "base_url": site.base_url,
            "spider": "tree",
            "settings": {"INGEST_DATABASE_URL": mysql_url},
        },
        tmp_path,
    )
    assert result.returncode == 0, result.describe()
    assert result.stats["finish_reason"] == "finished"
    items = db.rows("ingest_items")
    assert len(items) == 5
    pages = db.query("SELECT JSON_UNQUOTE(JSON_EXTRACT(data, '$.page')) FROM ingest_items")
    assert sorted(p for (p,) in pages) == sorted(item["url"] for item in items)
    assert db.count("ingest_requests") == TREE_ROWS
    logs = db.rows("ingest_logs")
    assert any("ValueError: boom on" in (log["exception"] or "") for log in logs)
    [job] = db.rows("ingest_jobs")
    assert (job["status"], job["items_count"], job["requests_count"]) == ("finished", 5, TREE_ROWS)
    latencies = [r["latency_ms"] for r in db.rows("ingest_requests") if r["status"] == 200]
    assert all(0 < latency < 1000 for latency in latencies)  # DOUBLE, not a rounded FLOAT
    create = db.query("SHOW CREATE TABLE ingest_items")[0][1]
    assert "datetime(6)" in create.lower()
    assert "json_valid" in create.lower() or " json" in create.lower()
    assert "utf8mb4" in create


@pytest.mark.crawl
def test_awkward_text_and_a_batch_written_twice(mysql_url: str) -> None:
    tables = {t.kind: t for t in all_tables("ingest_")}
    host = local_host(mysql_url, list(tables.values()), create_tables=True, retry_timeout=5)
    host.open()
    try:
        new_id, now = IdFactory(), time.time()
        texts = ["emoji \U0001f600", "nul \x00 inside", "lone \ud800 surrogate", "é"]
        rows = [
            (new_id(now), "job", "s", "dict", text, now, orjson.dumps({"i": i}))
            for i, text in enumerate(texts)
        ]
        assert host.store(tables["items"], Batch(rows)).written == 4
        # written again after an unknown outcome: the idempotent path skips stored ids
        host.backend.write(tables["items"], rows, idempotent=True)
        host.backend.write(tables["items"], rows, idempotent=False)
    finally:
        host.close()
    db = Database(mysql_url)
    stored = sorted(db.query("SELECT url FROM ingest_items"))
    assert len(stored) == 4
    assert {u for (u,) in stored} == {
        "emoji \U0001f600",
        "nul \ufffd inside",
        "lone \ufffd surrogate",
        "é",
    }
